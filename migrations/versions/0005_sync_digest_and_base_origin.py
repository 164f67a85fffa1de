"""sync records hold record digests; base models remember where their registration came from

``remote_experts.synced_sha256`` always held the digest of the expert's manifest entry, not a weights
hash: it is renamed ``synced_digest``. ``base_models.origin`` is NULL for base models the user
registered and the remote commit (``hf://ORG/REPO@COMMIT``) for those a pull registered, so that
weights are never loaded from a source a remote named without the user saying so.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _rename(old: str, new: str) -> None:
    # native RENAME COLUMN (SQLite >= 3.25) rather than a batch table copy: no data is moved
    if _sqlite():
        op.execute(f"ALTER TABLE remote_experts RENAME COLUMN {old} TO {new}")
    else:
        op.alter_column("remote_experts", old, new_column_name=new)


def upgrade() -> None:
    _rename("synced_sha256", "synced_digest")
    op.add_column("base_models", sa.Column("origin", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    # native DROP COLUMN (SQLite >= 3.35): a batch copy of base_models would drop a table that
    # experts reference, which foreign keys forbid
    if _sqlite():
        op.execute("ALTER TABLE base_models DROP COLUMN origin")
    else:
        op.drop_column("base_models", "origin")
    _rename("synced_digest", "synced_sha256")
