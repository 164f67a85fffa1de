"""Frozen dataclasses that cross layers. No torch, no SQL: safe to import anywhere."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

ExpertKind = Literal["task", "general", "residual", "cluster", "merged"]
EXPERT_KINDS: tuple[str, ...] = get_args(ExpertKind)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class ModuleShape:
    """Shape of one LoRA module: A is (rank, in_features), B is (out_features, rank)."""

    in_features: int
    out_features: int
    rank: int


@dataclass(frozen=True)
class LinearShape:
    """Shape of one ``nn.Linear`` of a base model."""

    in_features: int
    out_features: int


@dataclass(frozen=True)
class BaseModel:
    """A registered base model.

    Attributes:
        name: the library's short name for it (``phi3``).
        source: hub id or local path it was registered from.
        revision: hub revision, if any.
        architecture: ``config.architectures[0]``.
        model_type: ``config.model_type``.
        fingerprint: sha256 of the canonical config (identity check for routers and imports).
        linear_shapes: every ``nn.Linear`` module name -> its shape.
    """

    name: str
    source: str
    revision: str | None
    architecture: str
    model_type: str
    fingerprint: str
    linear_shapes: dict[str, LinearShape]
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class StoredFile:
    """One file of an expert as stored: relative path inside the PEFT folder, content hash, size."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Lineage:
    """How a derived expert was computed."""

    method: str
    method_version: int
    params: dict[str, Any]
    parents: tuple[tuple[str, str, str], ...]  # (role, parent name, parent sha256 at derivation)
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class Expert:
    """One LoRA expert as recorded in the catalog.

    ``sha256`` is the hash of ``adapter_model.safetensors``: the content identity that caches key on.
    ``modules`` maps base-model module names (``model.layers.0.self_attn.q_proj``) to shapes.
    """

    name: str
    kind: str
    base_model: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    modules: dict[str, ModuleShape]
    dtype: str
    sha256: str
    bytes: int
    files: tuple[StoredFile, ...]
    source: str | None = None
    tasks: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    cluster: str | None = None  # "clustering:index" for cluster experts
    metadata: dict[str, Any] = field(default_factory=dict)
    lineage: Lineage | None = None
    created_at: dt.datetime | None = None

    @property
    def scale(self) -> float:
        """LoRA scale s = alpha/r, or alpha/sqrt(r) with rsLoRA (uniform rank)."""
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    def file(self, path: str) -> StoredFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(f"expert {self.name!r} has no file {path!r}")


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """The PEFT scaling factor for one module."""
    return alpha / (rank**0.5) if use_rslora else alpha / rank


@dataclass(frozen=True)
class ExpertQuery:
    """A parsed catalog query. Within one field values are OR-ed; fields are AND-ed.

    ``names`` may hold shell-style globs (``arc_*``).
    """

    names: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    bases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdapterFile:
    """A PEFT adapter folder that passed validation, ready to be stored.

    Built by the store layer from files on disk; carries no tensors, only header facts.
    """

    folder: str
    config: dict[str, Any]
    config_bytes: bytes
    weights_path: str
    weights_sha256: str
    weights_size: int
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    modules: dict[str, ModuleShape]
    dtype: str
    base_model_name_or_path: str | None
    extra_files: tuple[str, ...] = ()
