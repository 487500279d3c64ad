"""JSON-RPC: protocol types, the outbound client and the HTTP server."""
