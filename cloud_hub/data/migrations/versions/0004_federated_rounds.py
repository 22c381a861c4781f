"""Federated rounds: each round's plan and outcome, and every update a device sent (accepted, late or refused).

Revision ID: 0004_federated_rounds
Revises: 0003_device_drift
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_federated_rounds"
down_revision = "0003_device_drift"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "fl_rounds",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("base_version", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("participants", sa.Text, nullable=False),
        sa.Column("plan", sa.Text, nullable=False),
        sa.Column("announcement", sa.LargeBinary, nullable=False),
        sa.Column("opened_at", sa.Double, nullable=False),
        sa.Column("deadline", sa.Double, nullable=False),
        sa.Column("closed_at", sa.Double),
        sa.Column("new_version", sa.BigInteger),
        sa.Column("outcome", sa.Text),
        sa.Column("reason", sa.Text),
        sa.CheckConstraint("state IN ('open', 'closed', 'published', 'rejected', 'failed')", name="ck_fl_rounds_state"),
    )
    op.create_index("ix_fl_rounds_model_state", "fl_rounds", ["model_name", "state"])
    op.create_table(
        "fl_updates",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("round_id", sa.BigInteger, nullable=False),
        sa.Column("update_round", sa.BigInteger),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("n_examples", sa.BigInteger),
        sa.Column("staleness", sa.BigInteger),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("metrics", sa.Text),
        sa.Column("payload", sa.LargeBinary),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.CheckConstraint("status IN ('accepted', 'late', 'refused', 'evaluated')", name="ck_fl_updates_status"),
    )
    op.create_index("ix_fl_updates_round_device", "fl_updates", ["round_id", "device_id"])
    op.create_index("ix_fl_updates_sha256", "fl_updates", ["sha256"])


def downgrade() -> None:
    op.drop_index("ix_fl_updates_sha256", "fl_updates")
    op.drop_index("ix_fl_updates_round_device", "fl_updates")
    op.drop_table("fl_updates")
    op.drop_index("ix_fl_rounds_model_state", "fl_rounds")
    op.drop_table("fl_rounds")
