"""team libraries: library-wide settings (the object store URL) and object-store blob claims

``settings`` holds what every machine on one catalog must agree on, such as ``blob_store`` (an
``s3://bucket/prefix`` URL; never credentials). ``blob_claims`` records when a blob was last claimed
by a writer on any machine, so gc anywhere honours its grace period.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "settings",
        sa.Column("key", sa.String(length=96), nullable=False),
        sa.Column("value", sa.String(length=1024), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_settings")),
    )
    op.create_table(
        "blob_claims",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("claimed_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blob_claims")),
    )


def downgrade() -> None:
    op.drop_table("blob_claims")
    op.drop_table("settings")
