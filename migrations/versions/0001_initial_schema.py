"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 08:42:17.602958
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "base_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=96), nullable=False),
        sa.Column("source", sa.String(length=1024), nullable=False),
        sa.Column("revision", sa.String(length=255), nullable=True),
        sa.Column("architecture", sa.String(length=255), nullable=False),
        sa.Column("model_type", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("linear_shapes", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_models")),
        sa.UniqueConstraint("name", name=op.f("uq_base_models_name")),
    )
    with op.batch_alter_table("base_models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_base_models_fingerprint"), ["fingerprint"], unique=False)

    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blobs")),
    )
    op.create_table(
        "remotes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=96), nullable=False),
        sa.Column("repo_id", sa.String(length=255), nullable=False),
        sa.Column("repo_type", sa.String(length=16), nullable=False),
        sa.Column("revision", sa.String(length=255), nullable=False),
        sa.Column("private", sa.Boolean(), nullable=False),
        sa.Column("last_commit", sa.String(length=64), nullable=True),
        sa.Column("last_synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_remotes")),
        sa.UniqueConstraint("name", name=op.f("uq_remotes_name")),
    )
    op.create_table(
        "tags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=96), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tags")),
        sa.UniqueConstraint("name", name=op.f("uq_tags_name")),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=96), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("name", name=op.f("uq_tasks_name")),
    )
    op.create_table(
        "clusterings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=96), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("criterion", sa.JSON(), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_model_id"],
            ["base_models.id"],
            name=op.f("fk_clusterings_base_model_id_base_models"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clusterings")),
        sa.UniqueConstraint("name", name=op.f("uq_clusterings_name")),
    )
    op.create_table(
        "prototype_cache",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("expert_sha256", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("method_version", sa.Integer(), nullable=False),
        sa.Column("params_key", sa.String(length=64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["blob_sha256"],
            ["blobs.sha256"],
            name=op.f("fk_prototype_cache_blob_sha256_blobs"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prototype_cache")),
        sa.UniqueConstraint(
            "expert_sha256",
            "method",
            "method_version",
            "params_key",
            name=op.f("uq_prototype_cache_expert_sha256_method_method_version_params_key"),
        ),
    )
    with op.batch_alter_table("prototype_cache", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_prototype_cache_blob_sha256"), ["blob_sha256"], unique=False)
        batch_op.create_index(batch_op.f("ix_prototype_cache_expert_sha256"), ["expert_sha256"], unique=False)

    op.create_table(
        "remote_experts",
        sa.Column("remote_id", sa.Integer(), nullable=False),
        sa.Column("expert_name", sa.String(length=96), nullable=False),
        sa.Column("synced_sha256", sa.String(length=64), nullable=False),
        sa.Column("remote_commit", sa.String(length=64), nullable=True),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["remote_id"],
            ["remotes.id"],
            name=op.f("fk_remote_experts_remote_id_remotes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("remote_id", "expert_name", name=op.f("pk_remote_experts")),
    )
    op.create_table(
        "clusters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("clustering_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=96), nullable=True),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["clustering_id"],
            ["clusterings.id"],
            name=op.f("fk_clusters_clustering_id_clusterings"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clusters")),
        sa.UniqueConstraint("clustering_id", "index", name=op.f("uq_clusters_clustering_id_index")),
    )
    op.create_table(
        "cluster_tasks",
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["cluster_id"],
            ["clusters.id"],
            name=op.f("fk_cluster_tasks_cluster_id_clusters"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_cluster_tasks_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("cluster_id", "task_id", name=op.f("pk_cluster_tasks")),
    )
    with op.batch_alter_table("cluster_tasks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cluster_tasks_task_id"), ["task_id"], unique=False)

    op.create_table(
        "experts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=96), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("use_rslora", sa.Boolean(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("module_shapes", sa.JSON(), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=1024), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('task', 'general', 'residual', 'cluster', 'merged')", name=op.f("ck_experts_kind")
        ),
        sa.CheckConstraint("rank > 0", name=op.f("ck_experts_rank_positive")),
        sa.ForeignKeyConstraint(
            ["base_model_id"],
            ["base_models.id"],
            name=op.f("fk_experts_base_model_id_base_models"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["cluster_id"], ["clusters.id"], name=op.f("fk_experts_cluster_id_clusters"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experts")),
        sa.UniqueConstraint("name", name=op.f("uq_experts_name")),
    )
    with op.batch_alter_table("experts", schema=None) as batch_op:
        batch_op.create_index("ix_experts_base_kind", ["base_model_id", "kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_experts_cluster_id"), ["cluster_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_experts_kind"), ["kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_experts_sha256"), ["sha256"], unique=False)

    op.create_table(
        "cluster_members",
        sa.Column("cluster_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=True),
        sa.Column("expert_name", sa.String(length=96), nullable=False),
        sa.ForeignKeyConstraint(
            ["cluster_id"],
            ["clusters.id"],
            name=op.f("fk_cluster_members_cluster_id_clusters"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"],
            ["experts.id"],
            name=op.f("fk_cluster_members_expert_id_experts"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("cluster_id", "position", name=op.f("pk_cluster_members")),
    )
    with op.batch_alter_table("cluster_members", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cluster_members_expert_id"), ["expert_id"], unique=False)

    op.create_table(
        "clustering_inputs",
        sa.Column("clustering_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=True),
        sa.Column("expert_name", sa.String(length=96), nullable=False),
        sa.Column("expert_sha256", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["clustering_id"],
            ["clusterings.id"],
            name=op.f("fk_clustering_inputs_clustering_id_clusterings"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"],
            ["experts.id"],
            name=op.f("fk_clustering_inputs_expert_id_experts"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("clustering_id", "position", name=op.f("pk_clustering_inputs")),
    )
    with op.batch_alter_table("clustering_inputs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_clustering_inputs_expert_id"), ["expert_id"], unique=False)

    op.create_table(
        "derivations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("child_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("method_version", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("inputs_key", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["child_id"], ["experts.id"], name=op.f("fk_derivations_child_id_experts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_derivations")),
        sa.UniqueConstraint("child_id", name=op.f("uq_derivations_child_id")),
    )
    with op.batch_alter_table("derivations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_derivations_inputs_key"), ["inputs_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_derivations_method"), ["method"], unique=False)

    op.create_table(
        "expert_files",
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["blob_sha256"],
            ["blobs.sha256"],
            name=op.f("fk_expert_files_blob_sha256_blobs"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_expert_files_expert_id_experts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("expert_id", "path", name=op.f("pk_expert_files")),
    )
    with op.batch_alter_table("expert_files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_expert_files_blob_sha256"), ["blob_sha256"], unique=False)

    op.create_table(
        "expert_tags",
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.Column("tag_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_expert_tags_expert_id_experts"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["tag_id"], ["tags.id"], name=op.f("fk_expert_tags_tag_id_tags"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("expert_id", "tag_id", name=op.f("pk_expert_tags")),
    )
    with op.batch_alter_table("expert_tags", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_expert_tags_tag_id"), ["tag_id"], unique=False)

    op.create_table(
        "expert_tasks",
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_expert_tasks_expert_id_experts"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_expert_tasks_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("expert_id", "task_id", name=op.f("pk_expert_tasks")),
    )
    with op.batch_alter_table("expert_tasks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_expert_tasks_task_id"), ["task_id"], unique=False)

    op.create_table(
        "derivation_parents",
        sa.Column("derivation_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("parent_name", sa.String(length=96), nullable=False),
        sa.Column("parent_sha256", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["derivation_id"],
            ["derivations.id"],
            name=op.f("fk_derivation_parents_derivation_id_derivations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["experts.id"],
            name=op.f("fk_derivation_parents_parent_id_experts"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("derivation_id", "position", name=op.f("pk_derivation_parents")),
    )
    with op.batch_alter_table("derivation_parents", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_derivation_parents_parent_id"), ["parent_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("derivation_parents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_derivation_parents_parent_id"))

    op.drop_table("derivation_parents")
    with op.batch_alter_table("expert_tasks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_expert_tasks_task_id"))

    op.drop_table("expert_tasks")
    with op.batch_alter_table("expert_tags", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_expert_tags_tag_id"))

    op.drop_table("expert_tags")
    with op.batch_alter_table("expert_files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_expert_files_blob_sha256"))

    op.drop_table("expert_files")
    with op.batch_alter_table("derivations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_derivations_method"))
        batch_op.drop_index(batch_op.f("ix_derivations_inputs_key"))

    op.drop_table("derivations")
    with op.batch_alter_table("clustering_inputs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_clustering_inputs_expert_id"))

    op.drop_table("clustering_inputs")
    with op.batch_alter_table("cluster_members", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cluster_members_expert_id"))

    op.drop_table("cluster_members")
    with op.batch_alter_table("experts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_experts_sha256"))
        batch_op.drop_index(batch_op.f("ix_experts_kind"))
        batch_op.drop_index(batch_op.f("ix_experts_cluster_id"))
        batch_op.drop_index("ix_experts_base_kind")

    op.drop_table("experts")
    with op.batch_alter_table("cluster_tasks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cluster_tasks_task_id"))

    op.drop_table("cluster_tasks")
    op.drop_table("clusters")
    op.drop_table("remote_experts")
    with op.batch_alter_table("prototype_cache", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_prototype_cache_expert_sha256"))
        batch_op.drop_index(batch_op.f("ix_prototype_cache_blob_sha256"))

    op.drop_table("prototype_cache")
    op.drop_table("clusterings")
    op.drop_table("tasks")
    op.drop_table("tags")
    op.drop_table("remotes")
    op.drop_table("blobs")
    with op.batch_alter_table("base_models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_base_models_fingerprint"))

    op.drop_table("base_models")
