"""Persistence: the only code that talks to PostgreSQL."""
