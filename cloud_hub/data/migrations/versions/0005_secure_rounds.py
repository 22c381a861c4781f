"""Secure rounds: a device's messages in a secure round (its keys, its sealed shares, its masked vectors, its
revealed shares) are kept with the round, beside the plain rounds' updates.

Revision ID: 0005_secure_rounds
Revises: 0004_federated_rounds
"""

from __future__ import annotations

from alembic import op

revision = "0005_secure_rounds"
down_revision = "0004_federated_rounds"
branch_labels = None
depends_on = None

_BEFORE = "status IN ('accepted', 'late', 'refused', 'evaluated')"
_AFTER = "status IN ('accepted', 'late', 'refused', 'evaluated', 'advert', 'shares', 'masked', 'revealed')"


def _status(allowed: str) -> None:
    with op.batch_alter_table("fl_updates", recreate="always") as batch:
        batch.drop_constraint("ck_fl_updates_status", type_="check")
        batch.create_check_constraint("ck_fl_updates_status", allowed)


def upgrade() -> None:
    _status(_AFTER)


def downgrade() -> None:
    op.execute("DELETE FROM fl_updates WHERE status IN ('advert', 'shares', 'masked', 'revealed')")
    _status(_BEFORE)
