"""Alembic migrations of the hub's schema (run through :mod:`cloud_hub.schema`, never by hand)."""
