"""Devices report drift: the PSI of their features against the training's, and their mean confidence.

Revision ID: 0003_device_drift
Revises: 0002_rollouts
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_device_drift"
down_revision = "0002_rollouts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("drift_psi", sa.Double))
        batch.add_column(sa.Column("mean_confidence", sa.Double))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("mean_confidence")
        batch.drop_column("drift_psi")
