"""Baseline: the hub's schema as of the first release with ``models.weights``.

Written out table by table, not from ``cloud_hub.data.db.metadata``: a migration is frozen in time, the
metadata moves on. A database created before migrations existed is adopted by
:func:`cloud_hub.data.revisions.upgrade` (it adds ``models.weights`` where missing and stamps this revision).

Revision ID: 0001_baseline
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")  # SQLite: INTEGER PRIMARY KEY is the rowid


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("first_seen", sa.Double, nullable=False),
        sa.Column("last_seen", sa.Double, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="online"),
        sa.Column("model_name", sa.String(64)),
        sa.Column("model_version", sa.BigInteger),
        sa.Column("model_sha256", sa.String(64)),
        sa.Column("outbox_depth", sa.BigInteger),
        sa.Column("last_error", sa.Text),
        sa.Column("status_ts", sa.Double),
    )
    op.create_table(
        "results",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("start", sa.Double, nullable=False),
        sa.Column("end", sa.Double, nullable=False),
        sa.Column("model_version", sa.BigInteger, nullable=False),
        sa.Column("label", sa.String(256)),
        sa.Column("confidence", sa.Double),
        sa.Column("value", sa.Text),
        sa.Column("truth", sa.String(256)),
        sa.Column("latency_ms", sa.Double, nullable=False),
        sa.Column("features", sa.LargeBinary),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.UniqueConstraint("device_id", "seq", name="uq_results_device_seq"),
    )
    op.create_index("ix_results_start", "results", ["start"])
    op.create_table(
        "dead_letters",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("received_at", sa.Double, nullable=False),
    )
    op.create_table(
        "models",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("manifest", sa.Text, nullable=False),
        sa.Column("bundle", sa.LargeBinary),
        sa.Column("weights", sa.LargeBinary),
        sa.Column("metrics", sa.Text),
        sa.Column("state", sa.String(16), nullable=False, server_default="candidate"),
        sa.Column("published_at", sa.Double),
        sa.UniqueConstraint("name", "version", name="uq_models_name_version"),
        sa.CheckConstraint("state IN ('candidate', 'publishable', 'rejected', 'published')", name="ck_models_state"),
    )


def downgrade() -> None:
    raise NotImplementedError(
        "0001_baseline cannot be downgraded: it would drop every table and all their data. "
        "Restore a backup instead (on SQLite, `cloud-hub db upgrade` wrote one next to the database).")
