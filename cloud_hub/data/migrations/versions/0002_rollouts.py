"""Canary rollouts and the events of the fleet's models.

Revision ID: 0002_rollouts
Revises: 0001_baseline
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_rollouts"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("previous_version", sa.BigInteger),
        sa.Column("cohort", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("min_results", sa.BigInteger, nullable=False),
        sa.Column("tolerance", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("ended_at", sa.Double),
        sa.Column("reason", sa.Text),
        sa.CheckConstraint("state IN ('canary', 'promoted', 'rolled_back')", name="ck_rollouts_state"),
    )
    op.create_table(
        "events",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Double, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("model_name", sa.String(64)),
        sa.Column("version", sa.BigInteger),
        sa.Column("detail", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("rollouts")
