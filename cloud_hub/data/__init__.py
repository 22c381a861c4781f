"""The hub's data path: every result stored once, receipted after commit, then aggregated.

``ingest`` (MQTT in, receipts and acks after commit), ``store`` (idempotent batched writes and the reads),
``tables`` (the SQL tables), ``revisions`` (which schema a database is at; Alembic ``migrations/``),
``sessions`` (engines, transactions, errors), ``db`` (opening a database at this build's revision),
``aggregate`` (per device, per window, fleet-wide).
"""
