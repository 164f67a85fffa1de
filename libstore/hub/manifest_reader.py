"""The strict reader of ``libstore.json`` (format: :mod:`libstore.hub.manifest`).

A manifest comes from a remote nobody vouches for. The reader refuses, naming the offending place
(``experts.arc.files``): duplicate JSON keys, NaN/Infinity and lone surrogates (``"\\ud800"``, which
no encoder can write back and no database can store; all three refused by
:func:`libstore.store.strict_json.strict_loads`), wrong types, unknown kinds and dtypes, names that
are not safe path components, stated paths other than the derived ones, hashes that are not 64
lowercase hex, sizes out of range, and references to base models, clusterings or experts the
manifest does not define. What it returns holds the shared records of :mod:`libstore.types`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from libstore.errors import LibstoreError
from libstore.hub.manifest import (
    DTYPES,
    EXPERT_FILES,
    FORMAT,
    FORMAT_VERSION,
    HEX64,
    MANIFEST_FILE,
    MAX_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    METHOD_NAME,
    Manifest,
    ManifestError,
    PrototypeEntry,
    expert_path,
)
from libstore.store.adapter import validate_name
from libstore.store.expert_data import check_files
from libstore.store.strict_json import strict_loads
from libstore.types import (
    ADAPTER_WEIGHTS,
    EXPERT_KINDS,
    BaseModel,
    ClusteringInput,
    ClusteringRecord,
    ClusterRecord,
    Derivation,
    DerivationParent,
    Expert,
    LinearShape,
    ModuleShape,
    PrototypeSet,
    StoredFile,
)

_MODULE = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


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
        if not isinstance(v, str) or not HEX64.fullmatch(v):
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

    def method(self, v: Any, where: str) -> str:
        if not isinstance(v, str) or not METHOD_NAME.fullmatch(v):
            raise self.fail(where, f"{v!r:.80} is not a plain lowercase name (a-z, 0-9, _ and -)")
        return v


def validate_manifest(m: Manifest) -> None:
    """Check a manifest built in memory the same way a downloaded one is checked."""
    parse_manifest(json.dumps(m.to_json(), allow_nan=False).encode())


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

    bases: dict[str, BaseModel] = {}
    for name, b in r.obj(r.key(top, "base_models", "top level"), "base_models").items():
        bases[name] = _parse_base(r, name, b)

    clusterings: dict[str, ClusteringRecord] = {}
    for name, c in r.obj(r.key(top, "clusterings", "top level"), "clusterings").items():
        clusterings[name] = _parse_clustering(r, name, c, bases)

    experts: dict[str, Expert] = {}
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
    """A free-form JSON object (parameters, metadata); ``strict_loads`` refused NaN, duplicates and
    surrogates in it."""
    return dict(r.obj(v, where))


def _parse_base(r: _Reader, name: str, b: Any) -> BaseModel:
    w = f"base_models.{name}"
    r.name(name, w)
    b = r.obj(b, w)
    shapes = r.obj(r.key(b, "linear_shapes", w), f"{w}.linear_shapes")
    linear = {}
    for m, s in shapes.items():
        n_in, n_out = r.ints(s, f"{w}.linear_shapes.{m}", 2)
        linear[r.module(m, f"{w}.linear_shapes")] = LinearShape(n_in, n_out)
    return BaseModel(
        name=name,
        source=r.str_(r.key(b, "source", w), f"{w}.source"),
        revision=r.opt_str(b.get("revision"), f"{w}.revision"),
        architecture=r.str_(r.key(b, "architecture", w), f"{w}.architecture", max_len=255),
        model_type=r.str_(r.key(b, "model_type", w), f"{w}.model_type", max_len=255),
        fingerprint=r.hex64(r.key(b, "fingerprint", w), f"{w}.fingerprint"),
        linear_shapes=linear,
    )


def _parse_files(r: _Reader, name: str, e: Mapping[str, Any], w: str) -> tuple[StoredFile, ...]:
    files_raw = r.obj(r.key(e, "files", w), f"{w}.files")
    try:
        check_files(files_raw, where="the expert folder")
    except LibstoreError as err:
        raise r.fail(f"{w}.files", err.message) from None
    files = []
    for fname in [*EXPERT_FILES, *sorted(set(files_raw) - set(EXPERT_FILES))]:
        fw = f"{w}.files.{fname}"
        f = r.obj(files_raw[fname], fw)
        if "path" in f and f["path"] != expert_path(name, fname):
            raise r.fail(f"{fw}.path", f"{f['path']!r:.80} is not {expert_path(name, fname)!r}")
        files.append(
            StoredFile(
                fname,
                r.hex64(r.key(f, "sha256", fw), f"{fw}.sha256"),
                r.int_(r.key(f, "size", fw), f"{fw}.size", lo=1, hi=MAX_FILE_BYTES),
            )
        )
    return tuple(files)


def _parse_derivation(r: _Reader, d: Any, dw: str) -> Derivation:
    d = r.obj(d, dw)
    parents_raw = r.key(d, "parents", dw)
    if not isinstance(parents_raw, list):
        raise r.fail(f"{dw}.parents", "expected a list")
    parents = []
    for i, p in enumerate(parents_raw):
        pw = f"{dw}.parents[{i}]"
        p = r.obj(p, pw)
        parents.append(
            DerivationParent(
                role=r.method(r.key(p, "role", pw), f"{pw}.role"),
                name=r.name(r.key(p, "name", pw), f"{pw}.name"),
                sha256=r.hex64(r.key(p, "sha256", pw), f"{pw}.sha256"),
            )
        )
    return Derivation(
        method=r.method(r.key(d, "method", dw), f"{dw}.method"),
        method_version=r.int_(r.key(d, "method_version", dw), f"{dw}.method_version", lo=0, hi=1 << 30),
        params=_json_obj(r, r.key(d, "params", dw), f"{dw}.params"),
        inputs_key=r.hex64(r.key(d, "inputs_key", dw), f"{dw}.inputs_key"),
        parents=tuple(parents),
    )


def _parse_cluster_ref(r: _Reader, cluster: Any, w: str, clusterings: Mapping[str, ClusteringRecord]) -> None:
    cname, sep, idx = cluster.rpartition(":") if isinstance(cluster, str) else ("", "", "")
    if not sep or not idx.isdigit() or cname not in clusterings:
        raise r.fail(
            f"{w}.cluster", f"{cluster!r:.80} is not CLUSTERING:INDEX of a clustering in this manifest"
        )
    if int(idx) not in {c.index for c in clusterings[cname].clusters}:
        raise r.fail(f"{w}.cluster", f"clustering {cname!r} has no cluster {idx}")


def _parse_expert(
    r: _Reader,
    name: str,
    e: Any,
    bases: Mapping[str, BaseModel],
    clusterings: Mapping[str, ClusteringRecord],
) -> Expert:
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
    modules: dict[str, ModuleShape] = {}
    for m, s in modules_raw.items():
        n_in, n_out, r_m = r.ints(s, f"{w}.modules.{m}", 3)
        if r_m != rank:
            raise r.fail(f"{w}.modules.{m}", f"rank {r_m} differs from the expert's rank {rank}")
        modules[r.module(m, f"{w}.modules")] = ModuleShape(n_in, n_out, r_m)
    files = _parse_files(r, name, e, w)
    d = e.get("derivation")
    derivation = None if d is None else _parse_derivation(r, d, f"{w}.derivation")
    cluster = e.get("cluster")
    if cluster is not None:
        _parse_cluster_ref(r, cluster, w, clusterings)
    return Expert(
        name=name,
        kind=kind,
        base_model=base,
        rank=rank,
        alpha=alpha,
        use_rslora=r.bool_(r.key(e, "use_rslora", w), f"{w}.use_rslora"),
        target_modules=tuple(r.module(t, f"{w}.target_modules") for t in targets),
        modules=modules,
        dtype=dtype,
        sha256=next(f.sha256 for f in files if f.path == ADAPTER_WEIGHTS),
        bytes=sum(f.size for f in files),
        files=files,
        tasks=r.names(e.get("tasks", []), f"{w}.tasks"),
        tags=r.names(e.get("tags", []), f"{w}.tags"),
        metadata=_json_obj(r, e.get("metadata", {}), f"{w}.metadata"),
        lineage=derivation,
        cluster=cluster,
    )


def _parse_clustering(r: _Reader, name: str, c: Any, bases: Mapping[str, BaseModel]) -> ClusteringRecord:
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
            ClusteringInput(
                r.name(r.key(x, "name", xw), f"{xw}.name"), r.hex64(r.key(x, "sha256", xw), f"{xw}.sha256")
            )
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
            ClusterRecord(
                index=r.int_(r.key(k, "index", kw), f"{kw}.index", hi=1 << 20),
                members=r.names(r.key(k, "members", kw), f"{kw}.members"),
                tasks=r.names(k.get("tasks", []), f"{kw}.tasks"),
                label=None if label is None else r.str_(label, f"{kw}.label", max_len=96),
                stats=_json_obj(r, k.get("stats", {}), f"{kw}.stats"),
            )
        )
    if len({c.index for c in clusters}) != len(clusters):
        raise r.fail(f"{w}.clusters", "cluster indices repeat")
    return ClusteringRecord(
        name=name,
        base_model=base,
        method=r.str_(r.key(c, "method", w), f"{w}.method", max_len=64),
        metric=r.str_(r.key(c, "metric", w), f"{w}.metric", max_len=32),
        k=r.int_(r.key(c, "k", w), f"{w}.k", lo=1, hi=1 << 20),
        seed=r.int_(r.key(c, "seed", w), f"{w}.seed", lo=-(1 << 62)),
        query=r.str_(c.get("query", ""), f"{w}.query", empty=True),
        params=_json_obj(r, c.get("params", {}), f"{w}.params"),
        criterion=_json_obj(r, c.get("criterion", {}), f"{w}.criterion"),
        inputs=tuple(inputs),
        clusters=tuple(clusters),
    )


def _parse_prototype(r: _Reader, w: str, p: Any, experts: Mapping[str, Expert]) -> PrototypeEntry:
    p = r.obj(p, w)
    expert = r.name(r.key(p, "expert", w), f"{w}.expert")
    if expert not in experts:
        raise r.fail(f"{w}.expert", f"expert {expert!r} is not in this manifest")
    expert_sha = r.hex64(r.key(p, "expert_sha256", w), f"{w}.expert_sha256")
    if expert_sha != experts[expert].sha256:
        raise r.fail(f"{w}.expert_sha256", f"does not match the weights hash of expert {expert!r}")
    entry = PrototypeEntry(
        expert=expert,
        prototypes=PrototypeSet(
            expert_sha256=expert_sha,
            method=r.method(r.key(p, "method", w), f"{w}.method"),
            method_version=r.int_(r.key(p, "method_version", w), f"{w}.method_version", hi=1 << 30),
            params=_json_obj(r, p.get("params", {}), f"{w}.params"),
            params_key=r.hex64(r.key(p, "params_key", w), f"{w}.params_key"),
            blob_sha256=r.hex64(r.key(p, "sha256", w), f"{w}.sha256"),
            size=r.int_(r.key(p, "size", w), f"{w}.size", lo=1, hi=MAX_FILE_BYTES),
        ),
    )
    if "path" in p and p["path"] != entry.path:
        raise r.fail(f"{w}.path", f"{p['path']!r:.80} is not {entry.path!r}")
    return entry
