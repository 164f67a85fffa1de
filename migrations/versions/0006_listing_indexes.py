"""listing indexes: experts by creation time and by size (ls --sort created / size, newest first)

Every other filter of the query language already has its index: the name (unique, bytewise), the
kind, the base (``ix_experts_base_kind``), tags and tasks (their link tables' ``*_id`` indexes and
the unique names), clusters (``ix_experts_cluster_id``). ``tests/test_catalog_indexes.py`` checks
with ``EXPLAIN`` that each is used, on SQLite and PostgreSQL.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 06:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(op.f("ix_experts_created_at"), "experts", ["created_at"], unique=False)
    op.create_index(op.f("ix_experts_bytes"), "experts", ["bytes"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_experts_bytes"), table_name="experts")
    op.drop_index(op.f("ix_experts_created_at"), table_name="experts")
