"""expert names compare bytewise on PostgreSQL

Name globs are case-sensitive on every backend (``GLOB`` on SQLite, ``LIKE`` on PostgreSQL). With the
name column in the ``C`` collation PostgreSQL can serve a prefix glob (``e09*``) from the name's
unique index, as SQLite does for ``GLOB`` on its ``BINARY`` column, and names sort the same way
(by code point; names are ASCII) on both. SQLite needs no change.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 22:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "experts",
            "name",
            type_=sa.String(length=96, collation="C"),
            existing_type=sa.String(length=96),
            existing_nullable=False,
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "experts",
            "name",
            type_=sa.String(length=96),
            existing_type=sa.String(length=96, collation="C"),
            existing_nullable=False,
        )
