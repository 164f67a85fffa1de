"""``libstore.json``: the manifest at the root of a library's Hub repo, and its strict reader.

A library on the Hub is one model repo::

    libstore.json                                   this manifest
    README.md                                       generated model card
    experts/<name>/adapter_config.json              one PEFT folder per expert, so that
    experts/<name>/adapter_model.safetensors        PeftModel.from_pretrained(base, repo, subfolder=...)
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
                    "adapter_model.safetensors": {"sha256", "size"}},
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

File paths are never read from the manifest: they are *derived* from validated names
(``experts/<name>/<known file>``, ``prototypes/<name>/<method>-v<N>-<key>.safetensors``), and a
``path`` the manifest does state must equal the derived one. So a hostile manifest cannot point
outside the repo or the library (``../``, absolute paths, odd files), and every hash is 64 lowercase
hex. The reader rejects duplicate JSON keys, NaN/Infinity, wrong types, unknown kinds, and
references to base models, clusterings or experts the manifest does not define.

Writing is deterministic (sorted keys, no timestamps), so an unchanged library produces the same
bytes and a push with nothing to do creates no commit. An expert's *record digest*
(:meth:`ExpertEntry.digest`) is the sha256 of its canonical entry: it changes when the weights, the
config, the kind, tasks, tags, metadata, derivation or cluster change, which is what sync compares.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from libstore.canonical import canonical_json
from libstore.errors import LibstoreError, ValidationError
from libstore.store.adapter import validate_name
from libstore.store.strict_json import strict_loads
from libstore.types import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_KINDS

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

_HEX64 = re.compile(r"[0-9a-f]{64}")
_MODULE = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_METHOD = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_ROLE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class ManifestError(ValidationError):
    """A manifest that is not a valid libstore manifest; nothing was changed."""


# --- entries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """A file of the repo named by the manifest: content hash and size."""

    sha256: str
    size: int


@dataclass(frozen=True)
class BaseEntry:
    """A base model as the manifest records it (enough to register it without its config)."""

    name: str
    source: str
    revision: str | None
    architecture: str
    model_type: str
    fingerprint: str
    linear_shapes: dict[str, tuple[int, int]]


@dataclass(frozen=True)
class DerivationEntry:
    """How a derived expert was computed; parents are ``(role, name, sha256 at derivation)``."""

    method: str
    method_version: int
    params: dict[str, Any]
    inputs_key: str
    parents: tuple[tuple[str, str, str], ...]


@dataclass(frozen=True)
class ExpertEntry:
    """One expert of the manifest. ``files`` maps a known file name to its hash and size."""

    name: str
    kind: str
    base_model: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    modules: dict[str, tuple[int, int, int]]
    dtype: str
    files: dict[str, FileEntry]
    tasks: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    derivation: DerivationEntry | None = None
    cluster: str | None = None

    @property
    def sha256(self) -> str:
        """The weights hash: the expert's content identity (what caches key on)."""
        return self.files[ADAPTER_WEIGHTS].sha256

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def repo_path(self, file: str) -> str:
        return expert_path(self.name, file)

    def repo_files(self) -> dict[str, FileEntry]:
        """``repo path -> file`` for this expert's folder."""
        return {self.repo_path(n): f for n, f in self.files.items()}

    def to_json(self) -> dict[str, Any]:
        d = self.derivation
        return {
            "kind": self.kind,
            "base_model": self.base_model,
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": list(self.target_modules),
            "modules": {m: list(s) for m, s in sorted(self.modules.items())},
            "dtype": self.dtype,
            "files": {n: {"sha256": f.sha256, "size": f.size} for n, f in sorted(self.files.items())},
            "tasks": sorted(self.tasks),
            "tags": sorted(self.tags),
            "metadata": self.metadata,
            "derivation": None
            if d is None
            else {
                "method": d.method,
                "method_version": d.method_version,
                "params": d.params,
                "inputs_key": d.inputs_key,
                "parents": [{"role": r, "name": n, "sha256": s} for r, n, s in d.parents],
            },
            "cluster": self.cluster,
        }

    def digest(self) -> str:
        """sha256 of the canonical entry: what sync compares between library, remote and last sync."""
        return hashlib.sha256(canonical_json(self.to_json()).encode()).hexdigest()


@dataclass(frozen=True)
class ClusterEntry:
    index: int
    label: str | None
    stats: dict[str, Any]
    members: tuple[str, ...]
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class ClusteringEntry:
    """A recorded MBC run: parameters, the experts it saw (with their hashes), its clusters."""

    name: str
    base_model: str
    method: str
    metric: str
    k: int
    seed: int
    params: dict[str, Any]
    criterion: dict[str, Any]
    query: str
    inputs: tuple[tuple[str, str], ...]
    clusters: tuple[ClusterEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "base_model": self.base_model,
            "method": self.method,
            "metric": self.metric,
            "k": self.k,
            "seed": self.seed,
            "params": self.params,
            "criterion": self.criterion,
            "query": self.query,
            "inputs": [{"name": n, "sha256": s} for n, s in self.inputs],
            "clusters": [
                {
                    "index": c.index,
                    "label": c.label,
                    "stats": c.stats,
                    "members": list(c.members),
                    "tasks": list(c.tasks),
                }
                for c in self.clusters
            ],
        }


@dataclass(frozen=True)
class PrototypeEntry:
    """A cached prototype set of expert ``expert`` (whose weights hash is ``expert_sha256``)."""

    expert: str
    expert_sha256: str
    method: str
    method_version: int
    params_key: str
    params: dict[str, Any]
    sha256: str
    size: int

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.expert_sha256, self.method, self.method_version, self.params_key)

    @property
    def path(self) -> str:
        return prototype_path(self.expert, self.method, self.method_version, self.params_key)

    def to_json(self) -> dict[str, Any]:
        return {
            "expert": self.expert,
            "expert_sha256": self.expert_sha256,
            "method": self.method,
            "method_version": self.method_version,
            "params_key": self.params_key,
            "params": self.params,
            "sha256": self.sha256,
            "size": self.size,
            "path": self.path,
        }


@dataclass(frozen=True)
class Manifest:
    """The whole manifest. Build one with the entries, write it with :meth:`to_bytes`."""

    base_models: dict[str, BaseEntry] = field(default_factory=dict)
    experts: dict[str, ExpertEntry] = field(default_factory=dict)
    clusterings: dict[str, ClusteringEntry] = field(default_factory=dict)
    prototypes: tuple[PrototypeEntry, ...] = ()
    generator: str = ""
    format_version: int = FORMAT_VERSION

    def files(self) -> dict[str, FileEntry]:
        """Every data file the manifest names (expert files and prototypes): ``path -> file``."""
        out: dict[str, FileEntry] = {}
        for e in self.experts.values():
            out.update(e.repo_files())
        for p in self.prototypes:
            out[p.path] = FileEntry(p.sha256, p.size)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "generator": self.generator,
            "base_models": {
                b.name: {
                    "source": b.source,
                    "revision": b.revision,
                    "architecture": b.architecture,
                    "model_type": b.model_type,
                    "fingerprint": b.fingerprint,
                    "linear_shapes": {m: list(s) for m, s in sorted(b.linear_shapes.items())},
                }
                for b in sorted(self.base_models.values(), key=lambda b: b.name)
            },
            "experts": {n: e.to_json() for n, e in sorted(self.experts.items())},
            "clusterings": {n: c.to_json() for n, c in sorted(self.clusterings.items())},
            "prototypes": [p.to_json() for p in sorted(self.prototypes, key=lambda p: (p.expert, p.key))],
        }

    def to_bytes(self) -> bytes:
        """Deterministic UTF-8 JSON (sorted keys, one-space indent, trailing newline)."""
        validate_manifest(self)
        return (
            json.dumps(self.to_json(), sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
        ).encode()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


# --- paths ---------------------------------------------------------------------------------------


def expert_path(name: str, file: str) -> str:
    """``experts/<name>/<file>`` for a validated name and a known file name."""
    validate_name(name)
    if file not in EXPERT_FILES:
        raise ManifestError(f"{file!r} is not an expert file; expert folders hold {', '.join(EXPERT_FILES)}")
    return f"{EXPERTS_DIR}/{name}/{file}"


def expert_folder(name: str) -> str:
    return f"{EXPERTS_DIR}/{validate_name(name)}"


def prototype_path(expert: str, method: str, method_version: int, params_key: str) -> str:
    """``prototypes/<expert>/<method>-v<N>-<first 16 hex of params_key>.safetensors``."""
    validate_name(expert)
    if not _METHOD.fullmatch(method):
        raise ManifestError(f"prototype method {method!r} is not a plain lowercase name")
    if not _HEX64.fullmatch(params_key):
        raise ManifestError(f"prototype params_key {params_key!r} is not 64 lowercase hex")
    return f"{PROTOTYPES_DIR}/{expert}/{method}-v{int(method_version)}-{params_key[:16]}.safetensors"


# --- writing helpers -----------------------------------------------------------------------------


def validate_manifest(m: Manifest) -> None:
    """Check a manifest built in memory the same way a downloaded one is checked."""
    parse_manifest(json.dumps(m.to_json(), allow_nan=False).encode())


# --- strict reading ------------------------------------------------------------------------------


class _Reader:
    """Typed accessors that name the offending place (``experts.arc.files``) in every error."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, msg: str) -> ManifestError:
        return ManifestError(f"{self.source}: {where}: {msg}; refusing it, nothing was changed")

    def obj(self, v: Any, where: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(where, f"expected an object, got {type(v).__name__}")
        return v

    def key(self, d: Mapping[str, Any], k: str, where: str) -> Any:
        if k not in d:
            raise self.fail(where, f"missing key {k!r}")
        return d[k]

    def str_(self, v: Any, where: str, *, empty: bool = False, max_len: int = 4096) -> str:
        if not isinstance(v, str) or (not v and not empty) or len(v) > max_len:
            raise self.fail(where, f"expected a string of at most {max_len} characters, got {v!r:.80}")
        return v

    def opt_str(self, v: Any, where: str) -> str | None:
        return None if v is None else self.str_(v, where)

    def int_(self, v: Any, where: str, *, lo: int = 0, hi: int = 1 << 62) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self.fail(where, f"expected an integer in [{lo}, {hi}], got {v!r:.80}")
        return v

    def num(self, v: Any, where: str) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(where, f"expected a finite number, got {v!r:.80}")
        return float(v)

    def bool_(self, v: Any, where: str) -> bool:
        if not isinstance(v, bool):
            raise self.fail(where, f"expected true or false, got {v!r:.80}")
        return v

    def hex64(self, v: Any, where: str) -> str:
        if not isinstance(v, str) or not _HEX64.fullmatch(v):
            raise self.fail(where, f"expected a sha256 (64 lowercase hex characters), got {v!r:.80}")
        return v

    def name(self, v: Any, where: str) -> str:
        try:
            return validate_name(v)
        except LibstoreError as e:
            raise self.fail(where, str(e)) from None

    def names(self, v: Any, where: str) -> tuple[str, ...]:
        if not isinstance(v, list):
            raise self.fail(where, f"expected a list of names, got {type(v).__name__}")
        out = tuple(self.name(x, f"{where}[{i}]") for i, x in enumerate(v))
        if len(set(out)) != len(out):
            raise self.fail(where, "names repeat")
        return out

    def module(self, v: Any, where: str) -> str:
        if not isinstance(v, str) or len(v) > 512 or not _MODULE.fullmatch(v):
            raise self.fail(where, f"{v!r:.80} is not a module name (dotted identifiers)")
        return v

    def ints(self, v: Any, where: str, n: int) -> tuple[int, ...]:
        if not isinstance(v, list) or len(v) != n:
            raise self.fail(where, f"expected a list of {n} positive integers, got {v!r:.80}")
        return tuple(self.int_(x, where, lo=1, hi=1 << 31) for x in v)

    def method(self, v: Any, where: str, pattern: re.Pattern[str] = _METHOD) -> str:
        if not isinstance(v, str) or not pattern.fullmatch(v):
            raise self.fail(where, f"{v!r:.80} is not a plain lowercase name (a-z, 0-9, _ and -)")
        return v


def parse_manifest(data: bytes, *, source: str = MANIFEST_FILE) -> Manifest:
    """Parse and validate manifest bytes; raise :class:`ManifestError` at the first fault."""
    r = _Reader(source)
    if len(data) > MAX_MANIFEST_BYTES:
        raise r.fail("file", f"{len(data)} bytes is over the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        raw = strict_loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise r.fail("file", f"not valid UTF-8 JSON ({e})") from None
    top = r.obj(raw, "top level")
    if r.key(top, "format", "top level") != FORMAT:
        raise r.fail("format", f"expected {FORMAT!r}, got {top.get('format')!r:.80}")
    version = r.int_(r.key(top, "format_version", "top level"), "format_version", lo=1)
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{source} has format_version {version}, newer than this libstore understands "
            f"({FORMAT_VERSION}); upgrade libstore (pip install -U libstore)"
        )
    generator = top.get("generator", "")
    generator = "" if generator is None else r.str_(generator, "generator", empty=True, max_len=200)

    bases: dict[str, BaseEntry] = {}
    for name, b in r.obj(r.key(top, "base_models", "top level"), "base_models").items():
        w = f"base_models.{name}"
        r.name(name, w)
        b = r.obj(b, w)
        shapes = r.obj(r.key(b, "linear_shapes", w), f"{w}.linear_shapes")
        bases[name] = BaseEntry(
            name=name,
            source=r.str_(r.key(b, "source", w), f"{w}.source"),
            revision=r.opt_str(b.get("revision"), f"{w}.revision"),
            architecture=r.str_(r.key(b, "architecture", w), f"{w}.architecture", max_len=255),
            model_type=r.str_(r.key(b, "model_type", w), f"{w}.model_type", max_len=255),
            fingerprint=r.hex64(r.key(b, "fingerprint", w), f"{w}.fingerprint"),
            linear_shapes={
                r.module(m, f"{w}.linear_shapes"): r.ints(s, f"{w}.linear_shapes.{m}", 2)  # type: ignore[misc]
                for m, s in shapes.items()
            },
        )

    clusterings: dict[str, ClusteringEntry] = {}
    for name, c in r.obj(r.key(top, "clusterings", "top level"), "clusterings").items():
        clusterings[name] = _parse_clustering(r, name, c, bases)

    experts: dict[str, ExpertEntry] = {}
    for name, raw_expert in r.obj(r.key(top, "experts", "top level"), "experts").items():
        experts[name] = _parse_expert(r, name, raw_expert, bases, clusterings)

    prototypes: list[PrototypeEntry] = []
    seen: set[tuple[str, tuple[str, str, int, str]]] = set()
    protos = r.key(top, "prototypes", "top level")
    if not isinstance(protos, list):
        raise r.fail("prototypes", "expected a list")
    for i, p in enumerate(protos):
        entry = _parse_prototype(r, f"prototypes[{i}]", p, experts)
        if (entry.expert, entry.key) in seen:
            raise r.fail(f"prototypes[{i}]", "the same prototype entry is listed twice")
        seen.add((entry.expert, entry.key))
        prototypes.append(entry)

    return Manifest(
        base_models=bases,
        experts=experts,
        clusterings=clusterings,
        prototypes=tuple(prototypes),
        generator=generator,
        format_version=version,
    )


def _json_obj(r: _Reader, v: Any, where: str) -> dict[str, Any]:
    """A free-form JSON object (parameters, metadata); already free of NaN and duplicates."""
    return dict(r.obj(v, where))


def _parse_expert(
    r: _Reader,
    name: str,
    e: Any,
    bases: Mapping[str, BaseEntry],
    clusterings: Mapping[str, ClusteringEntry],
) -> ExpertEntry:
    w = f"experts.{name}"
    r.name(name, w)
    e = r.obj(e, w)
    kind = r.key(e, "kind", w)
    if kind not in EXPERT_KINDS:
        raise r.fail(f"{w}.kind", f"{kind!r:.40} is not one of {', '.join(EXPERT_KINDS)}")
    base = r.name(r.key(e, "base_model", w), f"{w}.base_model")
    if base not in bases:
        raise r.fail(f"{w}.base_model", f"base model {base!r} is not defined under base_models")
    rank = r.int_(r.key(e, "rank", w), f"{w}.rank", lo=1, hi=1 << 20)
    alpha = r.num(r.key(e, "alpha", w), f"{w}.alpha")
    dtype = r.key(e, "dtype", w)
    if dtype not in DTYPES:
        raise r.fail(f"{w}.dtype", f"{dtype!r:.40} is not one of {', '.join(DTYPES)}")
    targets = r.key(e, "target_modules", w)
    if not isinstance(targets, list) or not targets:
        raise r.fail(f"{w}.target_modules", "expected a non-empty list of module names")
    modules_raw = r.obj(r.key(e, "modules", w), f"{w}.modules")
    if not modules_raw:
        raise r.fail(f"{w}.modules", "an expert has at least one LoRA module")
    modules: dict[str, tuple[int, int, int]] = {}
    for m, s in modules_raw.items():
        shape = r.ints(s, f"{w}.modules.{m}", 3)
        if shape[2] != rank:
            raise r.fail(f"{w}.modules.{m}", f"rank {shape[2]} differs from the expert's rank {rank}")
        modules[r.module(m, f"{w}.modules")] = shape  # type: ignore[assignment]
    files_raw = r.obj(r.key(e, "files", w), f"{w}.files")
    if set(files_raw) != set(EXPERT_FILES):
        odd = sorted(set(files_raw) - set(EXPERT_FILES))
        what = (
            f"unknown file {odd[0]!r:.80}" if odd else f"missing {sorted(set(EXPERT_FILES) - set(files_raw))}"
        )
        raise r.fail(f"{w}.files", f"{what}; an expert folder holds exactly {', '.join(EXPERT_FILES)}")
    files: dict[str, FileEntry] = {}
    for fname in EXPERT_FILES:
        f = r.obj(files_raw[fname], f"{w}.files.{fname}")
        fw = f"{w}.files.{fname}"
        if "path" in f and f["path"] != expert_path(name, fname):
            raise r.fail(f"{fw}.path", f"{f['path']!r:.80} is not {expert_path(name, fname)!r}")
        files[fname] = FileEntry(
            r.hex64(r.key(f, "sha256", fw), f"{fw}.sha256"),
            r.int_(r.key(f, "size", fw), f"{fw}.size", lo=1, hi=MAX_FILE_BYTES),
        )
    derivation = None
    d = e.get("derivation")
    if d is not None:
        dw = f"{w}.derivation"
        d = r.obj(d, dw)
        parents_raw = r.key(d, "parents", dw)
        if not isinstance(parents_raw, list):
            raise r.fail(f"{dw}.parents", "expected a list")
        parents = []
        for i, p in enumerate(parents_raw):
            pw = f"{dw}.parents[{i}]"
            p = r.obj(p, pw)
            parents.append(
                (
                    r.method(r.key(p, "role", pw), f"{pw}.role", _ROLE),
                    r.name(r.key(p, "name", pw), f"{pw}.name"),
                    r.hex64(r.key(p, "sha256", pw), f"{pw}.sha256"),
                )
            )
        derivation = DerivationEntry(
            method=r.method(r.key(d, "method", dw), f"{dw}.method"),
            method_version=r.int_(r.key(d, "method_version", dw), f"{dw}.method_version", lo=0, hi=1 << 30),
            params=_json_obj(r, r.key(d, "params", dw), f"{dw}.params"),
            inputs_key=r.hex64(r.key(d, "inputs_key", dw), f"{dw}.inputs_key"),
            parents=tuple(parents),
        )
    cluster = e.get("cluster")
    if cluster is not None:
        cname, sep, idx = str(cluster).rpartition(":") if isinstance(cluster, str) else ("", "", "")
        if not sep or not idx.isdigit() or cname not in clusterings:
            raise r.fail(
                f"{w}.cluster", f"{cluster!r:.80} is not CLUSTERING:INDEX of a clustering in this manifest"
            )
        if int(idx) not in {c.index for c in clusterings[cname].clusters}:
            raise r.fail(f"{w}.cluster", f"clustering {cname!r} has no cluster {idx}")
    return ExpertEntry(
        name=name,
        kind=kind,
        base_model=base,
        rank=rank,
        alpha=alpha,
        use_rslora=r.bool_(r.key(e, "use_rslora", w), f"{w}.use_rslora"),
        target_modules=tuple(r.module(t, f"{w}.target_modules") for t in targets),
        modules=modules,
        dtype=dtype,
        files=files,
        tasks=r.names(e.get("tasks", []), f"{w}.tasks"),
        tags=r.names(e.get("tags", []), f"{w}.tags"),
        metadata=_json_obj(r, e.get("metadata", {}), f"{w}.metadata"),
        derivation=derivation,
        cluster=cluster,
    )


def _parse_clustering(r: _Reader, name: str, c: Any, bases: Mapping[str, BaseEntry]) -> ClusteringEntry:
    w = f"clusterings.{name}"
    r.name(name, w)
    c = r.obj(c, w)
    base = r.name(r.key(c, "base_model", w), f"{w}.base_model")
    if base not in bases:
        raise r.fail(f"{w}.base_model", f"base model {base!r} is not defined under base_models")
    inputs_raw = r.key(c, "inputs", w)
    if not isinstance(inputs_raw, list):
        raise r.fail(f"{w}.inputs", "expected a list")
    inputs = []
    for i, x in enumerate(inputs_raw):
        xw = f"{w}.inputs[{i}]"
        x = r.obj(x, xw)
        inputs.append(
            (r.name(r.key(x, "name", xw), f"{xw}.name"), r.hex64(r.key(x, "sha256", xw), f"{xw}.sha256"))
        )
    clusters_raw = r.key(c, "clusters", w)
    if not isinstance(clusters_raw, list):
        raise r.fail(f"{w}.clusters", "expected a list")
    clusters = []
    for i, k in enumerate(clusters_raw):
        kw = f"{w}.clusters[{i}]"
        k = r.obj(k, kw)
        label = k.get("label")
        clusters.append(
            ClusterEntry(
                index=r.int_(r.key(k, "index", kw), f"{kw}.index", hi=1 << 20),
                label=None if label is None else r.str_(label, f"{kw}.label", max_len=96),
                stats=_json_obj(r, k.get("stats", {}), f"{kw}.stats"),
                members=r.names(r.key(k, "members", kw), f"{kw}.members"),
                tasks=r.names(k.get("tasks", []), f"{kw}.tasks"),
            )
        )
    if len({c.index for c in clusters}) != len(clusters):
        raise r.fail(f"{w}.clusters", "cluster indices repeat")
    return ClusteringEntry(
        name=name,
        base_model=base,
        method=r.str_(r.key(c, "method", w), f"{w}.method", max_len=64),
        metric=r.str_(r.key(c, "metric", w), f"{w}.metric", max_len=32),
        k=r.int_(r.key(c, "k", w), f"{w}.k", lo=1, hi=1 << 20),
        seed=r.int_(r.key(c, "seed", w), f"{w}.seed", lo=-(1 << 62)),
        params=_json_obj(r, c.get("params", {}), f"{w}.params"),
        criterion=_json_obj(r, c.get("criterion", {}), f"{w}.criterion"),
        query=r.str_(c.get("query", ""), f"{w}.query", empty=True),
        inputs=tuple(inputs),
        clusters=tuple(clusters),
    )


def _parse_prototype(r: _Reader, w: str, p: Any, experts: Mapping[str, ExpertEntry]) -> PrototypeEntry:
    p = r.obj(p, w)
    expert = r.name(r.key(p, "expert", w), f"{w}.expert")
    if expert not in experts:
        raise r.fail(f"{w}.expert", f"expert {expert!r} is not in this manifest")
    expert_sha = r.hex64(r.key(p, "expert_sha256", w), f"{w}.expert_sha256")
    if expert_sha != experts[expert].sha256:
        raise r.fail(f"{w}.expert_sha256", f"does not match the weights hash of expert {expert!r}")
    entry = PrototypeEntry(
        expert=expert,
        expert_sha256=expert_sha,
        method=r.method(r.key(p, "method", w), f"{w}.method"),
        method_version=r.int_(r.key(p, "method_version", w), f"{w}.method_version", hi=1 << 30),
        params_key=r.hex64(r.key(p, "params_key", w), f"{w}.params_key"),
        params=_json_obj(r, p.get("params", {}), f"{w}.params"),
        sha256=r.hex64(r.key(p, "sha256", w), f"{w}.sha256"),
        size=r.int_(r.key(p, "size", w), f"{w}.size", lo=1, hi=MAX_FILE_BYTES),
    )
    if "path" in p and p["path"] != entry.path:
        raise r.fail(f"{w}.path", f"{p['path']!r:.80} is not {entry.path!r}")
    return entry


def merge_prototypes(*groups: Iterable[PrototypeEntry]) -> tuple[PrototypeEntry, ...]:
    """Union of prototype entries, later groups winning on the same (expert, key)."""
    out: dict[tuple[str, tuple[str, str, int, str]], PrototypeEntry] = {}
    for group in groups:
        for p in group:
            out[(p.expert, p.key)] = p
    return tuple(sorted(out.values(), key=lambda p: (p.expert, p.key)))
