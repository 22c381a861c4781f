"""Alembic migrations of the hub's schema (run through :mod:`cloud_hub.data.revisions`, never by hand)."""
