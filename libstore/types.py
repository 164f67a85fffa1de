"""Frozen dataclasses that cross layers. No torch, no SQL: safe to import anywhere."""

from __future__ import annotations

import datetime as dt
import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from libstore.canonical import canonical_sha256
from libstore.errors import QueryError

if TYPE_CHECKING:
    import torch

# --- the named choices of the public API (one place; the CLI's click.Choice lists come from here) ---

ExpertKind = Literal["task", "general", "residual", "cluster", "merged"]
#: What a listing can be ordered by (then by name): ``libstore ls --sort``.
ExpertSort = Literal["name", "created", "size", "rank", "kind"]
EXPERT_SORTS: tuple[str, ...] = get_args(ExpertSort)
EXPERT_KINDS: tuple[str, ...] = get_args(ExpertKind)

GksMode = Literal["param", "delta"]
"""GenKnowSub: ``param`` (A − mean A_g, B − mean B_g, as PEFT) or ``delta`` (ΔW − mean ΔW_g, exact)."""
GKS_MODES: tuple[str, ...] = get_args(GksMode)

PrototypeMethod = Literal["exact", "peft", "spectrum"]
"""Cached prototypes: ``exact`` (QR + small SVD, top ``top_n``), ``peft`` (PEFT's power iteration,
bit for bit) or ``spectrum`` (every singular pair, exact: SpectR's keys)."""
PROTOTYPE_METHODS: tuple[str, ...] = get_args(PrototypeMethod)

SimilarityMetric = Literal["delta", "flat"]
"""``delta``: exact cosine of ΔW; ``flat``: of the flattened parameters (MBC: sparsified, reduced)."""
SIMILARITY_METRICS: tuple[str, ...] = get_args(SimilarityMetric)

#: The text formats a clustering's task lists are exported as.
ExportFormat = Literal["json", "csv"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)

Mixing = Literal["output", "parameter"]
"""Routed models: mix experts' ``output`` (PEFT: Σ cₑ·sₑ·BₑAₑx) or ``parameter`` (mttl: per-token A, B)."""
MIXINGS: tuple[str, ...] = get_args(Mixing)
Strategy = Literal["auto", "dense", "gather", "grouped"]
"""How a routed layer computes its mixture (``libstore.router.layer.choose_strategy``; ``auto`` picks)."""
STRATEGIES: tuple[str, ...] = get_args(Strategy)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The folder, inside an expert's, of the data attached to it (:class:`ExpertData`):
#: ``mttl/<data_type>.json`` and ``mttl/<data_type>.safetensors``.
EXPERT_DATA_DIR = "mttl"
EXPERT_DATA_FILE = re.compile(
    rf"{EXPERT_DATA_DIR}/(?P<data_type>[A-Za-z0-9][A-Za-z0-9._-]*)\.(?P<ext>json|safetensors)"
)


@dataclass(frozen=True)
class ModuleShape:
    """Shape of one LoRA module: A is (rank, in_features), B is (out_features, rank)."""

    in_features: int
    out_features: int
    rank: int


@dataclass(frozen=True)
class LinearShape:
    """Shape of one adaptable layer of a base model: an ``nn.Linear``, or a transformers ``Conv1D``
    (GPT-2), whose weight is stored as (in, out) but which LoRA adapts like a Linear."""

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
        linear_shapes: every ``nn.Linear`` and ``Conv1D`` module name -> its shape.
        origin: ``None`` when the user registered it here; else where the record came from (the
            remote commit a pull took it from, ``hf://ORG/REPO@COMMIT``). Weights are never loaded
            from a ``source`` a remote named unless the user names the model themselves.
    """

    name: str
    source: str
    revision: str | None
    architecture: str
    model_type: str
    fingerprint: str
    linear_shapes: dict[str, LinearShape]
    created_at: dt.datetime | None = None
    origin: str | None = None


@dataclass(frozen=True)
class StoredFile:
    """One file of an expert as stored: relative path inside the PEFT folder, content hash, size."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ExpertData:
    """Data attached to an expert besides its adapter: mttl's auxiliary data (Arrow prototypes,
    ``_vectors``, ``_eigvals``, embeddings), kept as mttl stored it for comparison and reuse.

    Stored pickle-free as two of the expert's files (so sync, gc, verify and export carry it and the
    expert's weights identity is unchanged): ``mttl/<data_type>.safetensors`` holds every tensor and
    numpy array, ``mttl/<data_type>.json`` the config and the plain values. Keys are the nested dict
    keys joined by '/' (list items by their index); data that is a single array or value (mttl's
    ``add_embeddings``) has the key ``data``. Empty dicts leave no key.

    Attributes:
        data_type: mttl's name for it (``<expert>.<data_type>.bin``), e.g. ``embeddings``.
        source: where it came from (``mttl``).
        config: the config stored with it (the transform's parameters), as JSON.
        tensors: every tensor and numpy array, by key, bit-equal to what was stored.
        values: every plain value (numbers, strings, booleans, null, lists of them), by key.
        arrays: the keys of ``tensors`` that were numpy arrays.
    """

    data_type: str
    source: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    values: dict[str, Any]
    arrays: tuple[str, ...] = ()


# --- records shared by catalog, manifest and API (one type per record) ------------------------------
#
# These are what is *stored*: the catalog writes and returns them, the Hub manifest serialises them,
# the public API hands them out. Views that add the current state of the library (staleness, the
# parents' current hashes, linked experts) wrap a record instead of copying its fields.

ParentStatus = Literal["ok", "changed", "gone"]


@dataclass(frozen=True)
class DerivationParent:
    """A parent of a derived expert: its role in the method (``expert``, ``general``), its name and
    its weights sha256 when the child was computed."""

    role: str
    name: str
    sha256: str


@dataclass(frozen=True)
class Derivation:
    """How a derived expert was computed.

    Attributes:
        method: ``gks-param``, ``gks-delta``, ``merge``, ...
        method_version: bumped when the method's output changes for the same inputs.
        params: the method's parameters as recorded.
        inputs_key: sha256 over method, version, params and everything that defines each parent's
            ΔW; an operation asked twice for the same thing finds the first result by it.
        parents: in the method's order.
    """

    method: str
    method_version: int
    params: dict[str, Any]
    inputs_key: str
    parents: tuple[DerivationParent, ...]
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class ClusteringInput:
    """An expert a clustering saw: its name and weights sha256 at clustering time."""

    name: str
    sha256: str


@dataclass(frozen=True)
class ClusterRecord:
    """One cluster of a recorded clustering.

    Attributes:
        index: 0..k−1, numbered by first member in name order (the same partition, the same numbers).
        members: expert names at clustering time, in name order.
        tasks: what a cluster expert for it should be trained on (union of the members' tasks).
        label: an optional human label.
        stats: ``within``, ``between``, ``silhouette`` (``None`` where undefined).
    """

    index: int
    members: tuple[str, ...]
    tasks: tuple[str, ...]
    label: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusteringRecord:
    """One recorded MBC run, as stored and as pushed.

    Attributes:
        name: ``mbc-k10``; its clusters are referred to as ``NAME:INDEX``.
        base_model: the base model of every expert clustered.
        method: ``mbc``; metric: ``flat`` or ``delta``; k, seed: as run.
        query: the canonical query the experts were selected by.
        params: every other parameter; criterion: how k was chosen.
        inputs: every expert the run saw, in row order of its similarity matrix.
        clusters: by index.
    """

    name: str
    base_model: str
    method: str
    metric: str
    k: int
    seed: int
    query: str
    params: dict[str, Any]
    criterion: dict[str, Any]
    inputs: tuple[ClusteringInput, ...]
    clusters: tuple[ClusterRecord, ...]
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class PrototypeSet:
    """One cached set of Arrow prototypes (every LoRA module) of the experts with these weights.

    Attributes:
        expert_sha256: the weights sha256 it was computed from.
        method, method_version, params, params_key: how it was computed (``params_key`` = sha256
            of the canonical JSON of ``params``).
        blob_sha256, size: the safetensors blob holding it.
        experts: where the catalog lists its cache, the experts that have these weights now (empty:
            orphaned); not part of the record (not compared, not serialised).
    """

    expert_sha256: str
    method: str
    method_version: int
    params: dict[str, Any]
    params_key: str
    blob_sha256: str
    size: int
    created_at: dt.datetime | None = None
    experts: tuple[str, ...] = field(default=(), compare=False)


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
    lineage: Derivation | None = None
    created_at: dt.datetime | None = None

    @property
    def scale(self) -> float:
        """LoRA scale s = alpha/r, or alpha/sqrt(r) with rsLoRA (uniform rank)."""
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    @property
    def delta_key(self) -> str:
        """The identity of this expert's ΔW: see :func:`delta_key`."""
        return delta_key(self.sha256, rank=self.rank, alpha=self.alpha, use_rslora=self.use_rslora)

    @property
    def data_types(self) -> tuple[str, ...]:
        """The types of data attached to this expert (:class:`ExpertData`), sorted."""
        found = (EXPERT_DATA_FILE.fullmatch(f.path) for f in self.files)
        return tuple(sorted(m["data_type"] for m in found if m is not None and m["ext"] == "json"))

    def file(self, path: str) -> StoredFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(f"expert {self.name!r} has no file {path!r}")


@dataclass(frozen=True)
class ExpertSummary:
    """What a listing shows of one expert: everything but module shapes, files, metadata and
    parents, so listing 100,000 experts reads no JSON columns (``Expert`` has the rest)."""

    name: str
    kind: str
    base_model: str
    rank: int
    alpha: float
    use_rslora: bool
    dtype: str
    sha256: str
    bytes: int
    tasks: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    cluster: str | None = None
    derived_by: str | None = None  # the derivation method, for derived experts
    created_at: dt.datetime | None = None


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """The PEFT scaling factor for one module."""
    return alpha / (rank**0.5) if use_rslora else alpha / rank


def delta_key(weights_sha256: str, *, rank: int, alpha: float, use_rslora: bool) -> str:
    """The key of an expert's update ΔW = s·B·A: sha256 over the weights file's sha256 and every
    config field that changes the math (r, lora_alpha, use_rslora; the ones that would change it
    beyond these, per-module ranks and alphas, DoRA, biases, are refused when an adapter is stored).

    Everything derived from ΔW (GenKnowSub residuals, merges) is keyed on this, never on the weights
    file alone: two experts with one weights file and another ``lora_alpha`` are other inputs. The
    one function that computes it (migration 0003 repeats the formula, frozen).
    """
    return canonical_sha256(
        {
            "delta": 1,
            "weights": weights_sha256,
            "rank": int(rank),
            "alpha": float(alpha),
            "use_rslora": bool(use_rslora),
        }
    )


#: Largest cluster index a query may name: the catalog stores indexes as 32-bit integers.
MAX_CLUSTER_INDEX = 2**31 - 1
_CLUSTER_REF = re.compile(r"(?P<name>[^:]+)(?::(?P<index>[0-9]+))?")


def parse_cluster_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:INDEX`` -> (clustering name, index or ``None``); :class:`QueryError` otherwise."""
    m = _CLUSTER_REF.fullmatch(ref)
    if m is None:
        raise QueryError(f"cluster must be NAME or NAME:INDEX (e.g. mbc-k10:3), got {ref!r}", query=ref)
    index = m["index"]
    if index is None:
        return m["name"], None
    if len(index) > 10 or int(index) > MAX_CLUSTER_INDEX:
        raise QueryError(
            f"cluster index {index[:20]}{'...' if len(index) > 20 else ''} in {ref[:60]!r} is out of "
            f"range (0..{MAX_CLUSTER_INDEX}); see the clusters with: libstore clusters ls",
            query=ref,
        )
    return m["name"], int(index)


def is_glob(pattern: str) -> bool:
    """Does a name pattern hold a wildcard (``*`` or ``?``)?"""
    return "*" in pattern or "?" in pattern


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.DOTALL
    )


def glob_match(pattern: str, name: str) -> bool:
    """The one name-glob semantics of libstore, case-sensitive like file globs: ``*`` matches any run
    of characters (also none), ``?`` exactly one, every other character itself. The catalog's SQL
    (``GLOB`` on SQLite, ``LIKE`` on PostgreSQL) implements the same; :class:`ExpertQuery` refuses
    ``[...]`` classes, which names (letters, digits, ``.``, ``_``, ``-``) never need."""
    return _glob_regex(pattern).fullmatch(name) is not None


@dataclass(frozen=True)
class ExpertQuery:
    """A parsed catalog query. Within one field values are OR-ed; fields are AND-ed.

    ``names`` may hold globs (``arc_*``, see :func:`glob_match`); ``clusters`` are ``NAME`` or
    ``NAME:INDEX``. Checked on construction (:class:`QueryError`), so a query built in Python is
    refused the same way as a parsed one.
    """

    names: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    bases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for n in self.names:
            if "[" in n or "]" in n:
                raise QueryError(
                    f"name pattern {n!r}: character classes [...] are not supported; use * (any run "
                    f"of characters) and ? (one character), e.g. 'arc_*'",
                    query=n,
                )
        bad = [k for k in self.kinds if k not in EXPERT_KINDS]
        if bad:
            raise QueryError(f"unknown kind {bad[0]!r}; kinds are {', '.join(EXPERT_KINDS)}", query=bad[0])
        for c in self.clusters:
            parse_cluster_ref(c)

    def matches_name(self, name: str) -> bool:
        """Does ``name`` match one of ``names`` (true when the query names nothing)?"""
        return not self.names or any(glob_match(p, name) for p in self.names)


@dataclass(frozen=True)
class StagedBlob:
    """Bytes copied into the blob store under a temp name and hashed, not yet at their address.

    Made by ``BlobStore.stage_file``; validate the copy at ``path``, then ``BlobStore.commit_staged``
    renames it to ``blobs/sha256/<2 hex>/<sha256>`` (or drops it when that blob is already stored)
    or ``BlobStore.discard`` drops it. Validating this copy, never the source again, is what makes
    the stored bytes the validated ones. ``path`` may also name a blob already in place (an adapter
    validated where it is stored); committing that claims it, discarding it does nothing.
    ``durable`` is false for a copy staged without its fsync (a batch fsyncs many together:
    ``BlobStore.make_durable``); committing such a copy fsyncs it first.
    """

    path: str
    sha256: str
    size: int
    durable: bool = True


@dataclass(frozen=True)
class AdapterFile:
    """A PEFT adapter folder that passed validation, ready to be stored.

    Built by the store layer; carries no tensors, only header facts, and the validated copy of the
    weights (``weights``, staged in the blob store: commit or discard it).
    """

    folder: str
    config: dict[str, Any]
    config_bytes: bytes
    weights: StagedBlob
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    modules: dict[str, ModuleShape]
    dtype: str
    base_model_name_or_path: str | None
    extra_files: tuple[str, ...] = ()

    @property
    def weights_sha256(self) -> str:
        return self.weights.sha256

    @property
    def weights_size(self) -> int:
        return self.weights.size


# --- routers and evaluations ------------------------------------------------------------------------

RouterName = Literal["arrow", "spectr", "uniform"]
"""The routers a routed model can use (``libstore.router.routers``)."""
ROUTER_NAMES: tuple[str, ...] = get_args(RouterName)
Granularity = Literal["token", "sequence"]
"""Route every token, or each sequence once from its prompt."""
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
EvalMetric = Literal["exact_match", "loss", "routing_token", "routing_sequence"]
EVAL_METRICS: tuple[str, ...] = get_args(EvalMetric)


@dataclass(frozen=True)
class RouterSpec:
    """One routing configuration, by router name and parameters (``libstore.ops.routers`` parses,
    checks and builds them).

    Attributes:
        name: ``arrow``, ``spectr``, ``uniform`` or ``oracle`` (the task's own expert; evaluations only).
        params: ``top_k``, ``temperature``, ``granularity`` (``token`` | ``sequence``), ``general``
            (a query: GenKnowSub on the fly), and the router's own (Arrow: ``top_n``, ``method``);
            absent ones take the evaluation's or routed model's defaults.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The canonical text form, ``name`` or ``name:key=value;key=value`` (keys sorted)."""
        if not self.params:
            return self.name
        return self.name + ":" + ";".join(f"{k}={self.params[k]}" for k in sorted(self.params))


@dataclass(frozen=True)
class EvalMetrics:
    """Held-out results of one router on one task (or on all examples).

    Attributes:
        examples: examples counted; tokens: target tokens counted.
        loss: mean cross-entropy per target token (teacher forced).
        exact_match: share of examples whose every target token is the greedy (argmax) choice, i.e.
            whose greedy continuation is the target.
        routing_token: share of (token, routed module) pairs whose top-1 expert is the task's own;
            ``None`` where undefined (no task, no own expert, or a router that does not choose).
        routing_sequence: share of sequences whose majority top-1 expert (over tokens x modules) is
            the task's own; ``None`` likewise.
    """

    examples: int
    tokens: int
    loss: float
    exact_match: float
    routing_token: float | None = None
    routing_sequence: float | None = None


@dataclass(frozen=True)
class EvalRecord:
    """One recorded evaluation: what was run on which data, and the results.

    Attributes:
        name: the evaluation's name (``eval-3`` unless given).
        base_model: the experts' base model.
        query: the canonical query that selected the experts.
        data_path: the JSONL file as given; data_sha256: sha256 of its bytes.
        examples: number of examples; tasks: the tasks seen, sorted.
        routers: router labels (:attr:`RouterSpec.label`), in the order run.
        params: the evaluation's defaults and settings (top_k, temperature, batch size, ...).
        experts: every routed expert with its weights sha256 at evaluation time.
        metrics: router label -> ``"all"`` or task -> :class:`EvalMetrics`.
    """

    name: str
    base_model: str
    query: str
    data_path: str
    data_sha256: str
    examples: int
    tasks: tuple[str, ...]
    routers: tuple[str, ...]
    params: dict[str, Any]
    experts: tuple[ClusteringInput, ...]
    metrics: dict[str, dict[str, EvalMetrics]]
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class Remote:
    """A Hub repo the library syncs with, and where the last sync left it.

    Attributes:
        name: the library's name for it (``origin``).
        repo_id: ``namespace/name`` of a model repo.
        revision: the branch push writes to and pull reads by default.
        private: visibility used when push creates the repo.
        last_commit: the remote commit of the last push or pull of the branch (``None``: never).
        last_synced_at: when that was.
        synced: number of experts with a sync record.
    """

    name: str
    repo_id: str
    revision: str
    private: bool
    last_commit: str | None
    last_synced_at: dt.datetime | None
    created_at: dt.datetime | None = None
    synced: int = 0
