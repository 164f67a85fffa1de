"""ORM models of the catalog: the whole schema, typed with ``Mapped[...]``.

The schema covers every feature from the start (experts, tasks, tags, clusterings, derivations,
prototype cache, remotes and sync state) so later features add rows, not redesigns. It changes only
through Alembic migrations in ``migrations/``; a test checks that models and migrations agree.

ORM objects never leave ``libstore.catalog``: the repository functions convert them to the frozen
dataclasses of ``libstore.types``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NAME_LEN = 96
SHA_LEN = 64
KINDS_SQL = "kind IN ('task', 'general', 'residual', 'cluster', 'merged')"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite drops the zone on the way back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class BaseModelRow(Base):
    """A base model: identity (fingerprint of its config) and the shapes of its Linear modules."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    source: Mapped[str] = mapped_column(String(1024))
    revision: Mapped[str | None] = mapped_column(String(255))
    architecture: Mapped[str] = mapped_column(String(255))
    model_type: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(SHA_LEN), index=True)
    linear_shapes: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)
    #: NULL: registered by the user; else the remote commit a pull registered it from.
    origin: Mapped[str | None] = mapped_column(String(1024))


class BlobRow(Base):
    """A content-addressed blob known to the catalog; the file lives in the blob store."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(SHA_LEN), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)


class ExpertRow(Base):
    """One LoRA expert. ``sha256`` is the weights file's hash: the content identity caches key on.

    ``name`` compares bytewise on every backend (``C`` collation on PostgreSQL, SQLite's ``BINARY``),
    so case-sensitive prefix globs use its index and names sort alike everywhere.
    """

    __tablename__ = "experts"
    __table_args__ = (
        CheckConstraint(KINDS_SQL, name="kind"),
        CheckConstraint("rank > 0", name="rank_positive"),
        Index("ix_experts_base_kind", "base_model_id", "kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(
        String(NAME_LEN).with_variant(String(NAME_LEN, collation="C"), "postgresql"), unique=True
    )
    kind: Mapped[str] = mapped_column(String(16), index=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="RESTRICT"))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(Boolean, default=False)
    target_modules: Mapped[list[Any]] = mapped_column(JSON)
    module_shapes: Mapped[dict[str, Any]] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(SHA_LEN), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger, index=True)
    source: Mapped[str | None] = mapped_column(String(1024))
    extra: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    cluster_id: Mapped[int | None] = mapped_column(ForeignKey("clusters.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now, onupdate=_now)

    base_model: Mapped[BaseModelRow] = relationship(lazy="joined")
    files: Mapped[list[ExpertFileRow]] = relationship(
        cascade="all, delete-orphan", order_by="ExpertFileRow.path", lazy="selectin"
    )
    tags: Mapped[list[TagRow]] = relationship(
        secondary="expert_tags", order_by="TagRow.name", lazy="selectin"
    )
    tasks: Mapped[list[TaskRow]] = relationship(
        secondary="expert_tasks", order_by="TaskRow.name", lazy="selectin"
    )
    cluster: Mapped[ClusterRow | None] = relationship(foreign_keys=[cluster_id], lazy="selectin")


class ExpertFileRow(Base):
    """A file of an expert's PEFT folder (relative path) pointing at its blob."""

    __tablename__ = "expert_files"

    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(255), primary_key=True)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256", ondelete="RESTRICT"), index=True)
    size: Mapped[int] = mapped_column(BigInteger)


class TagRow(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)


class ExpertTagRow(Base):
    __tablename__ = "expert_tags"

    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id", ondelete="CASCADE"), primary_key=True)
    tag_id: Mapped[int] = mapped_column(
        ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class TaskRow(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    description: Mapped[str | None] = mapped_column(Text)


class ExpertTaskRow(Base):
    __tablename__ = "expert_tasks"

    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id", ondelete="CASCADE"), primary_key=True)
    task_id: Mapped[int] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class ClusteringRow(Base):
    """One recorded MBC run: all parameters, the k-selection criterion, and what it saw."""

    __tablename__ = "clusterings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="RESTRICT"))
    method: Mapped[str] = mapped_column(String(64))
    metric: Mapped[str] = mapped_column(String(32))
    k: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    criterion: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    query: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)

    clusters: Mapped[list[ClusterRow]] = relationship(
        cascade="all, delete-orphan",
        order_by="ClusterRow.index",
        lazy="selectin",
        foreign_keys="ClusterRow.clustering_id",
    )
    inputs: Mapped[list[ClusteringInputRow]] = relationship(
        cascade="all, delete-orphan", order_by="ClusteringInputRow.position", lazy="selectin"
    )


class ClusteringInputRow(Base):
    """An expert a clustering saw, with its hash at that time (a changed hash makes the run stale)."""

    __tablename__ = "clustering_inputs"

    clustering_id: Mapped[int] = mapped_column(
        ForeignKey("clusterings.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    expert_id: Mapped[int | None] = mapped_column(ForeignKey("experts.id", ondelete="SET NULL"), index=True)
    expert_name: Mapped[str] = mapped_column(String(NAME_LEN))
    expert_sha256: Mapped[str] = mapped_column(String(SHA_LEN))


class ClusterRow(Base):
    __tablename__ = "clusters"
    __table_args__ = (UniqueConstraint("clustering_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clustering_id: Mapped[int] = mapped_column(ForeignKey("clusterings.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(String(NAME_LEN))
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    members: Mapped[list[ClusterMemberRow]] = relationship(
        cascade="all, delete-orphan", order_by="ClusterMemberRow.position", lazy="selectin"
    )
    tasks: Mapped[list[TaskRow]] = relationship(
        secondary="cluster_tasks", order_by="TaskRow.name", lazy="selectin"
    )


class ClusterMemberRow(Base):
    __tablename__ = "cluster_members"

    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    expert_id: Mapped[int | None] = mapped_column(ForeignKey("experts.id", ondelete="SET NULL"), index=True)
    expert_name: Mapped[str] = mapped_column(String(NAME_LEN))


class ClusterTaskRow(Base):
    __tablename__ = "cluster_tasks"

    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id", ondelete="CASCADE"), primary_key=True)
    task_id: Mapped[int] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class DerivationRow(Base):
    """The edge "child was computed from these parents with this method and these parameters"."""

    __tablename__ = "derivations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("experts.id", ondelete="CASCADE"), unique=True)
    method: Mapped[str] = mapped_column(String(64), index=True)
    method_version: Mapped[int] = mapped_column(Integer, default=1)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    inputs_key: Mapped[str] = mapped_column(String(SHA_LEN), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)

    parents: Mapped[list[DerivationParentRow]] = relationship(
        cascade="all, delete-orphan", order_by="DerivationParentRow.position", lazy="selectin"
    )


class DerivationParentRow(Base):
    """A parent of a derivation with its role and its hash when the child was computed."""

    __tablename__ = "derivation_parents"

    derivation_id: Mapped[int] = mapped_column(
        ForeignKey("derivations.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    role: Mapped[str] = mapped_column(String(32))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("experts.id", ondelete="SET NULL"), index=True)
    parent_name: Mapped[str] = mapped_column(String(NAME_LEN))
    parent_sha256: Mapped[str] = mapped_column(String(SHA_LEN))


class PrototypeCacheRow(Base):
    """Cached Arrow prototypes of one expert, keyed by content hash, method, version and parameters."""

    __tablename__ = "prototype_cache"
    __table_args__ = (UniqueConstraint("expert_sha256", "method", "method_version", "params_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    expert_sha256: Mapped[str] = mapped_column(String(SHA_LEN), index=True)
    method: Mapped[str] = mapped_column(String(32))
    method_version: Mapped[int] = mapped_column(Integer)
    params_key: Mapped[str] = mapped_column(String(SHA_LEN))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256", ondelete="RESTRICT"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)


class RemoteRow(Base):
    """A Hub repo the library syncs with. Tokens are never stored here."""

    __tablename__ = "remotes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    repo_id: Mapped[str] = mapped_column(String(255))
    repo_type: Mapped[str] = mapped_column(String(16), default="model")
    revision: Mapped[str] = mapped_column(String(255), default="main")
    private: Mapped[bool] = mapped_column(Boolean, default=False)
    last_commit: Mapped[str | None] = mapped_column(String(64))
    last_synced_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)


class RemoteExpertRow(Base):
    """Per remote and expert name: the record digest (sha256 of the expert's manifest entry) both
    sides had at the last sync."""

    __tablename__ = "remote_experts"

    remote_id: Mapped[int] = mapped_column(ForeignKey("remotes.id", ondelete="CASCADE"), primary_key=True)
    expert_name: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    synced_digest: Mapped[str] = mapped_column(String(SHA_LEN))
    remote_commit: Mapped[str | None] = mapped_column(String(64))
    synced_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)


class EvaluationRow(Base):
    """One recorded evaluation of routers on held-out data (``libstore eval``): what ran, on which
    data (by sha256), and the metrics per router and task."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    base_model: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    query: Mapped[str] = mapped_column(Text, default="")
    data_path: Mapped[str] = mapped_column(Text)
    data_sha256: Mapped[str] = mapped_column(String(SHA_LEN), index=True)
    examples: Mapped[int] = mapped_column(Integer)
    tasks: Mapped[list[Any]] = mapped_column(JSON, default=list)
    routers: Mapped[list[Any]] = mapped_column(JSON, default=list)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now, index=True)

    experts: Mapped[list[EvaluationExpertRow]] = relationship(
        cascade="all, delete-orphan", order_by="EvaluationExpertRow.position", lazy="selectin"
    )


class EvaluationExpertRow(Base):
    """An expert an evaluation routed over, with its hash then (another hash now: the results are stale)."""

    __tablename__ = "evaluation_experts"

    evaluation_id: Mapped[int] = mapped_column(
        ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    expert_id: Mapped[int | None] = mapped_column(ForeignKey("experts.id", ondelete="SET NULL"), index=True)
    expert_name: Mapped[str] = mapped_column(String(NAME_LEN))
    expert_sha256: Mapped[str] = mapped_column(String(SHA_LEN))


class SettingRow(Base):
    """A library-wide setting every machine on this catalog reads (e.g. ``blob_store``, the object
    store URL). Never a secret: credentials come from each machine's environment."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    value: Mapped[str] = mapped_column(String(1024))


class BlobClaimRow(Base):
    """A claim on an object-store blob (epoch seconds): gc on any machine keeps an unreferenced blob
    claimed within its grace period. The local folder store keeps its claims in file times instead."""

    __tablename__ = "blob_claims"

    sha256: Mapped[str] = mapped_column(String(SHA_LEN), primary_key=True)
    claimed_at: Mapped[float] = mapped_column(Float)
