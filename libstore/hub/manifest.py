"""``libstore.json``: the manifest at the root of a library's Hub repo, and its deterministic writer.

A library on the Hub is one model repo::

    libstore.json                                   this manifest
    README.md                                       generated model card
    experts/<name>/adapter_config.json              one PEFT folder per expert, so that
    experts/<name>/adapter_model.safetensors        PeftModel.from_pretrained(base, repo, subfolder=...)
    experts/<name>/mttl/<data_type>.json            data attached to the expert (optional, e.g. mttl's
    experts/<name>/mttl/<data_type>.safetensors     auxiliary data: libstore.store.expert_data)
    prototypes/<name>/<method>-v<N>-<key>.safetensors   cached Arrow prototypes of expert <name>

Format (``format_version`` 1; every key is required unless marked optional)::

    {
      "format": "libstore-library",
      "format_version": 1,
      "generator": "libstore 0.1.0",                                     (optional, informative)
      "base_models": {"<name>": {"source", "revision", "architecture", "model_type",
                                 "fingerprint", "linear_shapes": {"<module>": [in, out]}}},
      "experts": {"<name>": {
          "kind", "base_model", "rank", "alpha", "use_rslora", "target_modules": [...],
          "modules": {"<module>": [in, out, rank]}, "dtype",
          "files": {"adapter_config.json": {"sha256", "size"},
                    "adapter_model.safetensors": {"sha256", "size"},
                    "mttl/<data_type>.json": {...}, "mttl/<data_type>.safetensors": {...}},
                                                  (the mttl/ files optional: attached data)
          "tasks": [...], "tags": [...], "metadata": {...},
          "derivation": null | {"method", "method_version", "params", "inputs_key",
                                "parents": [{"role", "name", "sha256"}]},
          "cluster": null | "<clustering>:<index>"}},
      "clusterings": {"<name>": {"base_model", "method", "metric", "k", "seed", "params",
                                 "criterion", "query", "inputs": [{"name", "sha256"}],
                                 "clusters": [{"index", "label", "stats", "members": [...],
                                               "tasks": [...]}]}},
      "prototypes": [{"expert", "expert_sha256", "method", "method_version", "params_key",
                      "params", "sha256", "size", "path"}]
    }

The manifest holds the shared records of :mod:`libstore.types` — :class:`~libstore.types.BaseModel`,
:class:`~libstore.types.Expert` (with its ``lineage``), :class:`~libstore.types.ClusteringRecord` and,
per expert name, a :class:`~libstore.types.PrototypeSet` — and this module writes them in the format
above. What the catalog adds to a record (``source``, ``created_at``) is not part of the format.

File paths are never read from the manifest: they are *derived* from validated names
(``experts/<name>/<known file>``, ``prototypes/<name>/<method>-v<N>-<key>.safetensors``), and a
``path`` the manifest does state must equal the derived one (see :mod:`libstore.hub.manifest_reader`).

Writing is deterministic (sorted keys, no timestamps), so an unchanged library produces the same
bytes and a push with nothing to do creates no commit. An expert's *record digest*
(:func:`record_digest`) is the sha256 of its canonical entry: it changes when the weights, the
config, the kind, tasks, tags, metadata, derivation or cluster change, which is what sync compares.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from libstore.canonical import canonical_json
from libstore.errors import ValidationError
from libstore.store.adapter import validate_name
from libstore.types import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXPERT_DATA_DIR,
    EXPERT_DATA_FILE,
    BaseModel,
    ClusteringRecord,
    Derivation,
    Expert,
    PrototypeSet,
    StoredFile,
)

MANIFEST_FILE = "libstore.json"
README_FILE = "README.md"
FORMAT = "libstore-library"
FORMAT_VERSION = 1
EXPERTS_DIR = "experts"
PROTOTYPES_DIR = "prototypes"
#: The files of an expert folder, in the order they are listed.
EXPERT_FILES: tuple[str, ...] = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
MAX_MANIFEST_BYTES = 64 << 20
MAX_FILE_BYTES = 1 << 40
DTYPES = ("float16", "bfloat16", "float32", "float64")
HEX64 = re.compile(r"[0-9a-f]{64}")
#: Prototype methods and derivation roles: plain lowercase names (they become file names).
METHOD_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class ManifestError(ValidationError):
    """A manifest that is not a valid libstore manifest; nothing was changed."""


# --- what only the manifest has ------------------------------------------------------------------

PrototypeKey = tuple[str, str, int, str]


@dataclass(frozen=True)
class PrototypeEntry:
    """A cached prototype set as the manifest lists it: the expert (by name) it belongs to, and the
    set (``prototypes.blob_sha256`` and ``prototypes.size`` describe the file at :attr:`path`)."""

    expert: str
    prototypes: PrototypeSet

    @property
    def key(self) -> PrototypeKey:
        p = self.prototypes
        return (p.expert_sha256, p.method, p.method_version, p.params_key)

    @property
    def path(self) -> str:
        p = self.prototypes
        return prototype_path(self.expert, p.method, p.method_version, p.params_key)

    @property
    def file(self) -> StoredFile:
        return StoredFile(self.path, self.prototypes.blob_sha256, self.prototypes.size)


@dataclass(frozen=True)
class Manifest:
    """The whole manifest. Build one from records, write it with :meth:`to_bytes`."""

    base_models: dict[str, BaseModel] = field(default_factory=dict)
    experts: dict[str, Expert] = field(default_factory=dict)
    clusterings: dict[str, ClusteringRecord] = field(default_factory=dict)
    prototypes: tuple[PrototypeEntry, ...] = ()
    generator: str = ""
    format_version: int = FORMAT_VERSION

    def files(self) -> dict[str, StoredFile]:
        """Every data file the manifest names (expert files and prototypes): ``repo path -> file``
        (``StoredFile.path`` is the repo path)."""
        out: dict[str, StoredFile] = {}
        for e in self.experts.values():
            out.update(expert_repo_files(e))
        for p in self.prototypes:
            out[p.path] = p.file
        return out

    def digests(self) -> dict[str, str]:
        """``expert name -> record digest``: what sync planning compares."""
        return {n: record_digest(e) for n, e in self.experts.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "generator": self.generator,
            "base_models": {n: base_json(b) for n, b in sorted(self.base_models.items())},
            "experts": {n: expert_json(e) for n, e in sorted(self.experts.items())},
            "clusterings": {n: clustering_json(c) for n, c in sorted(self.clusterings.items())},
            "prototypes": [
                prototype_json(p) for p in sorted(self.prototypes, key=lambda p: (p.expert, p.key))
            ],
        }

    def to_bytes(self) -> bytes:
        """Deterministic UTF-8 JSON (sorted keys, one-space indent, trailing newline), checked by the
        same strict reader a downloaded manifest goes through, so a push never writes a manifest
        that a pull would refuse."""
        from libstore.hub.manifest_reader import validate_manifest  # the reader builds on this module

        validate_manifest(self)
        text = json.dumps(self.to_json(), sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False)
        return (text + "\n").encode()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


# --- records as manifest JSON --------------------------------------------------------------------


def base_json(b: BaseModel) -> dict[str, Any]:
    return {
        "source": b.source,
        "revision": b.revision,
        "architecture": b.architecture,
        "model_type": b.model_type,
        "fingerprint": b.fingerprint,
        "linear_shapes": {m: [s.in_features, s.out_features] for m, s in sorted(b.linear_shapes.items())},
    }


def derivation_json(d: Derivation) -> dict[str, Any]:
    return {
        "method": d.method,
        "method_version": d.method_version,
        "params": d.params,
        "inputs_key": d.inputs_key,
        "parents": [{"role": p.role, "name": p.name, "sha256": p.sha256} for p in d.parents],
    }


def expert_json(e: Expert) -> dict[str, Any]:
    """The manifest entry of an expert (its ``source`` and ``created_at`` are the library's own)."""
    return {
        "kind": e.kind,
        "base_model": e.base_model,
        "rank": e.rank,
        "alpha": float(e.alpha),
        "use_rslora": e.use_rslora,
        "target_modules": list(e.target_modules),
        "modules": {m: [s.in_features, s.out_features, s.rank] for m, s in sorted(e.modules.items())},
        "dtype": e.dtype,
        "files": {
            f.path: {"sha256": f.sha256, "size": f.size} for f in sorted(e.files, key=lambda f: f.path)
        },
        "tasks": sorted(e.tasks),
        "tags": sorted(e.tags),
        "metadata": e.metadata,
        "derivation": None if e.lineage is None else derivation_json(e.lineage),
        "cluster": e.cluster,
    }


def record_digest(e: Expert) -> str:
    """sha256 of the canonical manifest entry: what sync compares between library, remote and the
    last sync (``remote_experts.synced_digest``)."""
    return hashlib.sha256(canonical_json(expert_json(e)).encode()).hexdigest()


def clustering_json(c: ClusteringRecord) -> dict[str, Any]:
    return {
        "base_model": c.base_model,
        "method": c.method,
        "metric": c.metric,
        "k": c.k,
        "seed": c.seed,
        "params": c.params,
        "criterion": c.criterion,
        "query": c.query,
        "inputs": [{"name": i.name, "sha256": i.sha256} for i in c.inputs],
        "clusters": [
            {
                "index": k.index,
                "label": k.label,
                "stats": k.stats,
                "members": list(k.members),
                "tasks": list(k.tasks),
            }
            for k in c.clusters
        ],
    }


def same_clustering(a: ClusteringRecord, b: ClusteringRecord) -> bool:
    """Equal as the manifest records them (``created_at`` and the like are not compared)."""
    return a.name == b.name and canonical_json(clustering_json(a)) == canonical_json(clustering_json(b))


def prototype_json(p: PrototypeEntry) -> dict[str, Any]:
    s = p.prototypes
    return {
        "expert": p.expert,
        "expert_sha256": s.expert_sha256,
        "method": s.method,
        "method_version": s.method_version,
        "params_key": s.params_key,
        "params": s.params,
        "sha256": s.blob_sha256,
        "size": s.size,
        "path": p.path,
    }


# --- paths ---------------------------------------------------------------------------------------


def expert_path(name: str, file: str) -> str:
    """``experts/<name>/<file>`` for a validated name and a known file name (the adapter's two, or
    attached data ``mttl/<data_type>.json|.safetensors`` with a valid data type)."""
    validate_name(name)
    data = EXPERT_DATA_FILE.fullmatch(file)
    if file not in EXPERT_FILES and (data is None or data["data_type"] != validate_name(data["data_type"])):
        raise ManifestError(
            f"{file!r:.80} is not an expert file; expert folders hold {', '.join(EXPERT_FILES)} and "
            f"attached data ({EXPERT_DATA_DIR}/<data_type>.json and .safetensors)"
        )
    return f"{EXPERTS_DIR}/{name}/{file}"


def expert_folder(name: str) -> str:
    return f"{EXPERTS_DIR}/{validate_name(name)}"


def expert_repo_files(e: Expert) -> dict[str, StoredFile]:
    """``repo path -> file`` of an expert's folder (``StoredFile.path`` is the repo path)."""
    out = {}
    for f in e.files:
        path = expert_path(e.name, f.path)
        out[path] = StoredFile(path, f.sha256, f.size)
    return out


def prototype_path(expert: str, method: str, method_version: int, params_key: str) -> str:
    """``prototypes/<expert>/<method>-v<N>-<first 16 hex of params_key>.safetensors``."""
    validate_name(expert)
    if not METHOD_NAME.fullmatch(method):
        raise ManifestError(f"prototype method {method!r} is not a plain lowercase name")
    if not HEX64.fullmatch(params_key):
        raise ManifestError(f"prototype params_key {params_key!r} is not 64 lowercase hex")
    return f"{PROTOTYPES_DIR}/{expert}/{method}-v{int(method_version)}-{params_key[:16]}.safetensors"


def merge_prototypes(*groups: Iterable[PrototypeEntry]) -> tuple[PrototypeEntry, ...]:
    """Union of prototype entries, later groups winning on the same (expert, key)."""
    out: dict[tuple[str, PrototypeKey], PrototypeEntry] = {}
    for group in groups:
        for p in group:
            out[(p.expert, p.key)] = p
    return tuple(sorted(out.values(), key=lambda p: (p.expert, p.key)))
