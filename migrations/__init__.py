"""Migrations: forward-only SQL files NNNN_description.sql, applied in order."""
