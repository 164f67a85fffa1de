"""evaluations: recorded router evaluations and the experts they routed over

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=96), nullable=False),
        sa.Column("base_model", sa.String(length=96), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("data_path", sa.Text(), nullable=False),
        sa.Column("data_sha256", sa.String(length=64), nullable=False),
        sa.Column("examples", sa.Integer(), nullable=False),
        sa.Column("tasks", sa.JSON(), nullable=False),
        sa.Column("routers", sa.JSON(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
        sa.UniqueConstraint("name", name=op.f("uq_evaluations_name")),
    )
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_evaluations_base_model"), ["base_model"], unique=False)
        batch_op.create_index(batch_op.f("ix_evaluations_data_sha256"), ["data_sha256"], unique=False)
        batch_op.create_index(batch_op.f("ix_evaluations_created_at"), ["created_at"], unique=False)

    op.create_table(
        "evaluation_experts",
        sa.Column("evaluation_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=True),
        sa.Column("expert_name", sa.String(length=96), nullable=False),
        sa.Column("expert_sha256", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["evaluation_id"],
            ["evaluations.id"],
            name=op.f("fk_evaluation_experts_evaluation_id_evaluations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"],
            ["experts.id"],
            name=op.f("fk_evaluation_experts_expert_id_experts"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("evaluation_id", "position", name=op.f("pk_evaluation_experts")),
    )
    with op.batch_alter_table("evaluation_experts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_evaluation_experts_expert_id"), ["expert_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("evaluation_experts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evaluation_experts_expert_id"))
    op.drop_table("evaluation_experts")
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evaluations_created_at"))
        batch_op.drop_index(batch_op.f("ix_evaluations_data_sha256"))
        batch_op.drop_index(batch_op.f("ix_evaluations_base_model"))
    op.drop_table("evaluations")
