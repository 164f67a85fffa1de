"""sync records hold record digests; base models remember where their registration came from

``remote_experts.synced_sha256`` always held the digest of the expert's manifest entry, not a weights
hash: it is renamed ``synced_digest``. ``base_models.origin`` is NULL for base models the user
registered and the remote commit (``hf://ORG/REPO@COMMIT``) for those a pull registered, so that
weights are never loaded from a source a remote named without the user saying so.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("remote_experts", schema=None) as batch_op:
        batch_op.alter_column(
            "synced_sha256",
            new_column_name="synced_digest",
            existing_type=sa.String(64),
            existing_nullable=False,
        )
    with op.batch_alter_table("base_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("origin", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("base_models", schema=None) as batch_op:
        batch_op.drop_column("origin")
    with op.batch_alter_table("remote_experts", schema=None) as batch_op:
        batch_op.alter_column(
            "synced_digest",
            new_column_name="synced_sha256",
            existing_type=sa.String(64),
            existing_nullable=False,
        )
