"""Alembic environment: runs on the connection :mod:`cloud_hub.data.revisions` hands over (no alembic.ini).

``render_as_batch`` makes ALTERs work on SQLite (copy-and-move of the table); PostgreSQL alters in
place. Each migration runs in the caller's transaction.
"""

from __future__ import annotations

from alembic import context

from cloud_hub.data.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                  transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
