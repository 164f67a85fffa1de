"""``Library``: the Python API. Each method opens no more than it needs and calls one operation."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from libstore import config
from libstore.ops import experts as _experts
from libstore.ops.context import Context, SchemaState, init_library, open_library, schema_state
from libstore.types import (
    BaseModel,
    EvalRecord,
    Expert,
    ExpertKind,
    ExpertQuery,
    ExportFormat,
    GksMode,
    Granularity,
    Mixing,
    PrototypeMethod,
    Remote,
    RouterName,
    RouterSpec,
    SimilarityMetric,
)

if TYPE_CHECKING:  # torch and the Hub client load only when an operation needs them
    import torch
    from torch import nn

    from libstore.ops.clusters import Clustering
    from libstore.ops.derive import GksReport
    from libstore.ops.evaluate import Comparison, Evaluation
    from libstore.ops.export_routed import RoutedExport
    from libstore.ops.gc import GcReport
    from libstore.ops.lineage import LineageInfo, StaleReport
    from libstore.ops.problems import VerifyReport
    from libstore.ops.prototypes import CacheEntry, ExpertPrototypes, PrototypeReport
    from libstore.ops.pull import PullReport
    from libstore.ops.push import PushReport
    from libstore.ops.similarity import SimilarityMatrix
    from libstore.ops.sync import StatusReport
    from libstore.ops.team import CacheStats, MigrateReport
    from libstore.router.model import RoutedModel

PathLike = str | os.PathLike[str]
#: What selects experts: a query string (``"kind=task tag=v1"``), a parsed query, or names.
Selection = str | ExpertQuery | Iterable[str]


def _selection(target: Selection) -> str | ExpertQuery | list[str]:
    """A selection the operations take: queries as they are, an iterable of names as a list."""
    return target if isinstance(target, str | ExpertQuery) else list(target)


class Library:
    """A library of LoRA experts: one catalog database plus one content-addressed blob store.

    >>> lib = Library.init("./mylib")
    >>> lib.add_base("tiny", "./tiny-model")
    >>> lib.add("./adapters/arc_easy", name="arc_easy", kind="task", tasks=["arc_easy"])
    >>> [e.name for e in lib.experts("kind=task")]
    """

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def init(
        cls, path: PathLike | None = None, *, db_url: str | None = None, blob_store: str | None = None
    ) -> Library:
        """Create a library folder (catalog + ``blobs/``) at ``path`` (default: see ``config``);
        ``blob_store`` (``s3://bucket/prefix``) records the team's object store in the catalog."""
        return cls(init_library(config.library_path(path), db_url, blob_store))

    @classmethod
    def open(cls, path: PathLike | None = None, *, db_url: str | None = None) -> Library:
        """Open a library, upgrading its catalog if an older libstore created it."""
        return cls(open_library(config.library_path(path), db_url))

    @staticmethod
    def schema_state(path: PathLike | None = None, *, db_url: str | None = None) -> SchemaState:
        """The catalog's schema revision and this libstore's, read without upgrading anything."""
        return schema_state(config.library_path(path), db_url)

    @property
    def path(self) -> Path:
        return self._ctx.path

    @property
    def context(self) -> Context:
        """The open catalog and blob store, for operations beyond this facade."""
        return self._ctx

    def close(self) -> None:
        self._ctx.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- base models -----------------------------------------------------------------------

    def add_base(self, name: str, source: str, *, revision: str | None = None) -> BaseModel:
        """Register a base model from a local folder or hub id (reads its config only)."""
        return _experts.add_base(self._ctx, name, source, revision)

    def bases(self) -> list[BaseModel]:
        return _experts.bases(self._ctx)

    def base(self, name: str) -> BaseModel:
        return _experts.get_base(self._ctx, name)

    def remove_base(self, name: str) -> None:
        """Unregister a base model; ``InUseError`` while experts of it remain."""
        _experts.remove_base(self._ctx, name)

    # --- experts ---------------------------------------------------------------------------

    def add(
        self,
        path: PathLike,
        *,
        name: str | None = None,
        kind: ExpertKind = "task",
        base: str | None = None,
        tasks: Iterable[str] = (),
        tags: Iterable[str] = (),
        metadata: dict[str, Any] | None = None,
        cluster: str | None = None,
        allow_base_mismatch: bool = False,
        allow_nonfinite: bool = False,
    ) -> Expert:
        """Import one PEFT adapter folder; validated first, then stored all or nothing."""
        return _experts.add(
            self._ctx,
            path,
            name=name,
            kind=kind,
            base=base,
            tasks=tasks,
            tags=tags,
            metadata=metadata,
            cluster=cluster,
            allow_base_mismatch=allow_base_mismatch,
            allow_nonfinite=allow_nonfinite,
        )

    def import_dir(
        self,
        root: PathLike,
        *,
        kind: ExpertKind = "task",
        base: str | None = None,
        tags: Iterable[str] = (),
        task_from_name: bool = False,
        allow_base_mismatch: bool = False,
        allow_nonfinite: bool = False,
    ) -> _experts.ImportReport:
        """Import every PEFT folder below ``root`` in one transaction; names from folder names."""
        return _experts.import_dir(
            self._ctx,
            root,
            kind=kind,
            base=base,
            tags=tags,
            task_from_name=task_from_name,
            allow_base_mismatch=allow_base_mismatch,
            allow_nonfinite=allow_nonfinite,
        )

    def experts(self, query: str | ExpertQuery | None = None) -> list[Expert]:
        """Experts matching a query such as ``"kind=task tag=v1"`` (see ``libstore.ops.query``)."""
        return _experts.experts(self._ctx, query)

    def get(self, name: str) -> Expert:
        return _experts.get(self._ctx, name)

    def export(self, name: str, dest: PathLike, *, overwrite: bool = False) -> Path:
        """Write ``name`` as a PEFT folder that ``PeftModel.from_pretrained`` loads."""
        return _experts.export(self._ctx, name, dest, overwrite=overwrite)

    def remove(self, name: str) -> None:
        _experts.remove(self._ctx, name)

    def rename(self, old: str, new: str) -> Expert:
        return _experts.rename(self._ctx, old, new)

    def tag(self, query: str | ExpertQuery, *tags: str) -> list[str]:
        return _experts.tag(self._ctx, query, tags)

    def untag(self, query: str | ExpertQuery, *tags: str) -> list[str]:
        return _experts.untag(self._ctx, query, tags)

    def tags(self) -> list[tuple[str, int]]:
        return _experts.tags(self._ctx)

    # --- low-rank core: prototypes, GenKnowSub, similarity, merge, lineage ----------------------

    def compute_prototypes(
        self,
        query: Selection | None = None,
        *,
        method: PrototypeMethod = "exact",
        top_n: int = 1,
        iters: int = 15,
        seed: int = 0,
        device: str | None = None,
    ) -> PrototypeReport:
        """Cache the Arrow prototypes of the matching experts; computes only what is missing.

        ``method="exact"`` (default): top ``top_n`` right singular vectors of ΔW, exact.
        ``method="peft"``: PEFT's power iteration (``iters`` steps, start vector seeded by ``seed``).
        The report says which experts were computed and which were already cached.
        """
        from libstore.ops import prototypes as _protos

        target = None if query is None else _selection(query)
        return _protos.compute(
            self._ctx, target, method=method, top_n=top_n, iters=iters, seed=seed, device=device
        )

    def prototypes(
        self,
        expert_or_query: str | Expert | ExpertQuery | Iterable[str],
        method: PrototypeMethod = "exact",
        top_n: int = 1,
        *,
        iters: int = 15,
        seed: int = 0,
        modules: Iterable[str] | None = None,
        device: str | None = None,
    ) -> dict[str, ExpertPrototypes]:
        """Expert name -> its prototypes (``.modules[m].vectors`` (n, in), ``.values`` (n,)).

        Computed and cached first where missing. ``expert_or_query`` is a name, a query such as
        ``"kind=residual"``, an ``Expert`` or a list of names.
        """
        from libstore.ops import prototypes as _protos

        target = (
            expert_or_query
            if isinstance(expert_or_query, str | Expert | ExpertQuery)
            else list(expert_or_query)
        )
        return _protos.load(
            self._ctx,
            target,
            method=method,
            top_n=top_n,
            iters=iters,
            seed=seed,
            modules=modules,
            device=device,
        )

    def prototype_cache(self) -> list[CacheEntry]:
        """Every cached prototype set, with the experts that currently have its weights."""
        from libstore.ops import prototypes as _protos

        return _protos.cache_entries(self._ctx)

    def subtract_general(
        self,
        *,
        general: Selection,
        experts: Selection,
        mode: GksMode = "param",
        rank: int | None = None,
        suffix: str = "_res",
        refresh: bool = False,
        device: str | None = None,
    ) -> GksReport:
        """GenKnowSub: store ``<expert><suffix>`` = expert minus the mean of the general experts.

        ``mode="param"`` subtracts mean A and mean B (PEFT's ``use_gks``; equal ranks);
        ``mode="delta"`` subtracts mean ΔW exactly (any ranks), truncated to ``rank`` if given.
        Residuals computed before from the same inputs are reused; ``refresh=True`` recomputes in
        place those whose inputs changed.
        """
        from libstore.ops import derive as _derive

        return _derive.subtract_general(
            self._ctx,
            general=_selection(general),
            experts=_selection(experts),
            mode=mode,
            rank=rank,
            suffix=suffix,
            refresh=refresh,
            device=device,
        )

    def similarity(
        self,
        query: Selection | None = None,
        *,
        metric: SimilarityMetric = "delta",
        device: str | None = None,
    ) -> SimilarityMatrix:
        """Cosine similarity of the matching experts: ``delta`` (of ΔW, exact) or ``flat``
        (of the flattened parameters, as the MBC paper)."""
        from libstore.ops import similarity as _sim

        target = None if query is None else _selection(query)
        return _sim.similarity(self._ctx, target, metric=metric, device=device)

    def plot_similarity(self, matrix: SimilarityMatrix, path: PathLike) -> Path:
        """Write a heatmap PNG of a similarity matrix."""
        from libstore.ops import similarity as _sim

        return _sim.plot(matrix, path)

    def merge(
        self,
        names: Iterable[str],
        *,
        name: str,
        rank: int | None = None,
        weights: Iterable[float] | None = None,
        refresh: bool = False,
        device: str | None = None,
    ) -> Expert:
        """Store ``name`` (kind ``merged``) = the (weighted) average of the experts' ΔW, exactly
        re-factorised, truncated to ``rank`` by SVD if given."""
        from libstore.ops import derive as _derive

        return _derive.merge(
            self._ctx,
            list(names),
            name=name,
            rank=rank,
            weights=None if weights is None else list(weights),
            refresh=refresh,
            device=device,
        )

    def lineage(self, name: str) -> LineageInfo:
        """How ``name`` was derived (parents with their current state, method, params), and its children."""
        from libstore.ops import lineage as _lineage

        return _lineage.lineage(self._ctx, name)

    def stale(self) -> StaleReport:
        """Derived experts whose parents changed or are gone, and orphaned prototype caches."""
        from libstore.ops import lineage as _lineage

        return _lineage.stale(self._ctx)

    # --- MBC clustering (issue 5) -----------------------------------------------------------

    def cluster(
        self,
        experts: Selection | None = "kind=task",
        *,
        k: int | None = None,
        metric: SimilarityMetric = "flat",
        seed: int = 0,
        name: str | None = None,
        keep: float = 0.2,
        dim: int = 64,
        k_range: Iterable[int] | None = None,
        n_init: int = 10,
        device: str | None = None,
    ) -> Clustering:
        """Cluster the experts ``experts`` selects (MBC) and record the run as ``name``.

        ``metric="flat"``: mttl's MBC (flattened parameters, top ``keep`` by magnitude, SVD to
        ``dim``, cosine); ``"delta"``: exact cosine of ΔW. Without ``k``, k is the best silhouette
        over ``k_range`` (default 2..min(20, n-1)). Deterministic for a ``seed``; default name
        ``mbc-k<k>``. The record holds every parameter and the hash of every expert seen, so a
        changed or added expert marks it stale.
        """
        from libstore.ops import clusters as _clusters

        target = None if experts is None else _selection(experts)
        return _clusters.cluster(
            self._ctx,
            target,
            k=k,
            metric=metric,
            seed=seed,
            name=name,
            keep=keep,
            dim=dim,
            k_range=None if k_range is None else list(k_range),
            n_init=n_init,
            device=device,
        )

    def clusterings(self) -> list[Clustering]:
        """Every recorded clustering (with ``stale`` and ``stale_reasons``)."""
        from libstore.ops import clusters as _clusters

        return _clusters.clusterings(self._ctx)

    def clustering(self, name: str) -> Clustering:
        """One recorded clustering: parameters, criterion, clusters (members, tasks, statistics)."""
        from libstore.ops import clusters as _clusters

        return _clusters.get(self._ctx, name)

    def export_clustering(self, name: str, format: ExportFormat = "json") -> str:
        """The task lists of the clusters as ``json`` or ``csv`` text (to train cluster experts)."""
        from libstore.ops import clusters as _clusters

        return _clusters.export(self._ctx, name, format)

    def remove_clustering(self, name: str, *, force: bool = False) -> list[str]:
        """Remove a clustering; refuses while cluster experts link to it unless ``force``.
        Returns the cluster experts whose link was cleared."""
        from libstore.ops import clusters as _clusters

        return _clusters.remove(self._ctx, name, force=force)

    def plot_clustering(self, name: str, path: PathLike) -> Path:
        """Write a PNG: similarity matrix ordered by cluster, and a 2-D embedding."""
        from libstore.ops import clusters as _clusters

        return _clusters.plot(self._ctx, name, path)

    # --- maintenance (issue 9) ---------------------------------------------------------------

    def verify(self, *, repair: bool = False, grace_s: float | None = None) -> VerifyReport:
        """Check that catalog and blob store agree: every blob hashes right, every expert's stored
        weights match its record, every reference points at a row. ``repair`` fixes only what is
        safe (never deletes an expert); temp files older than ``grace_s`` (default 1 h) go too."""
        from libstore.ops.maintenance import DEFAULT_GRACE_S
        from libstore.ops.verify import verify

        return verify(self._ctx, repair=repair, grace_s=DEFAULT_GRACE_S if grace_s is None else grace_s)

    def gc(self, *, dry_run: bool = False, grace_s: float | None = None) -> GcReport:
        """Remove unreferenced blobs, prototype caches of weights no expert has, and stale temp
        files. Blobs written or re-used within ``grace_s`` (default 1 h) are kept, so a concurrent
        import never loses a blob it has stored but not yet committed."""
        from libstore.ops.gc import gc
        from libstore.ops.maintenance import DEFAULT_GRACE_S

        return gc(self._ctx, dry_run=dry_run, grace_s=DEFAULT_GRACE_S if grace_s is None else grace_s)

    # --- team libraries (issue 14) -----------------------------------------------------------

    def cache_stats(self) -> CacheStats:
        """This machine's cache of the team's object store (entries least recently used first)."""
        from libstore.ops.team import cache_stats

        return cache_stats(self._ctx)

    def cache_clear(self) -> CacheStats:
        """Empty this machine's cache of the object store; returns what it held. Nothing shared changes."""
        from libstore.ops.team import cache_clear

        return cache_clear(self._ctx)

    def migrate_blobs(self, to: str) -> MigrateReport:
        """Move this library's blobs to the object store ``to`` (``s3://bucket/prefix``) and record it
        in the catalog: resumable, every blob hash-checked before upload and listed after."""
        from libstore.ops.team import migrate_blobs

        return migrate_blobs(self._ctx, to=to)

    # --- Hub sync (issue 6) ----------------------------------------------------------------
    # Imported per call: opening a library must not pay for the Hub client.

    def add_remote(self, name: str, repo_id: str, *, revision: str = "main", private: bool = False) -> Remote:
        """Record remote ``name`` -> Hub model repo ``repo_id`` (branch ``revision``); no network.

        ``private`` is the visibility ``push`` uses if it has to create the repo.
        """
        from libstore.ops import sync

        return sync.add_remote(self._ctx, name, repo_id, revision=revision, private=private)

    def remotes(self) -> list[Remote]:
        """Every remote with its last synced commit."""
        from libstore.ops import sync

        return sync.remotes(self._ctx)

    def remove_remote(self, name: str) -> None:
        """Forget a remote and its sync records; the Hub repo is not touched."""
        from libstore.ops import sync

        sync.remove_remote(self._ctx, name)

    def push(
        self,
        remote: str | None = None,
        *,
        experts: str | ExpertQuery | None = None,
        message: str | None = None,
        tag: str | None = None,
        token: str | None = None,
        force: bool = False,
        prune: bool = False,
    ) -> PushReport:
        """Upload what changed since the last sync (one commit; batches of <=100 files, manifest
        last). Refuses if the remote moved (pull first) or on conflicts. Returns a ``PushReport``."""
        from libstore.ops import push

        return push.push(
            self._ctx,
            remote,
            experts=experts,
            message=message,
            tag=tag,
            token=token,
            force=force,
            prune=prune,
        )

    def pull(
        self,
        remote: str | None = None,
        *,
        revision: str | None = None,
        experts: str | ExpertQuery | None = None,
        token: str | None = None,
        force: bool = False,
        prune: bool = False,
    ) -> PullReport:
        """Download what is missing or changed (hash-checked), at a branch, tag or commit, and apply
        it in one transaction. Conflicts are reported, not overwritten. Returns a ``PullReport``."""
        from libstore.ops import pull

        return pull.pull(
            self._ctx, remote, revision=revision, experts=experts, token=token, force=force, prune=prune
        )

    def status(self, remote: str | None = None, *, token: str | None = None) -> StatusReport:
        """Per expert: local only, remote only, in sync, changed, conflict; and what push and pull
        would do. Returns a ``StatusReport``."""
        from libstore.ops import sync

        return sync.status(self._ctx, remote, token=token)

    def import_hub(
        self,
        repo_id: str,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        name: str | None = None,
        kind: ExpertKind = "task",
        base: str | None = None,
        tasks: Iterable[str] = (),
        tags: Iterable[str] = (),
        token: str | None = None,
        allow_base_mismatch: bool = False,
    ) -> Expert:
        """Import one PEFT adapter from a Hub repo (optionally a subfolder), validated like ``add``."""
        from libstore.ops import hub_import

        return hub_import.import_hub(
            self._ctx,
            repo_id,
            subfolder=subfolder,
            revision=revision,
            name=name,
            kind=kind,
            base=base,
            tasks=tasks,
            tags=tags,
            token=token,
            allow_base_mismatch=allow_base_mismatch,
        )

    def import_mttl(
        self,
        source: PathLike,
        *,
        kind: ExpertKind = "task",
        base: str | None = None,
        tags: Iterable[str] = (),
        experts: Iterable[str] | None = None,
        revision: str | None = None,
        token: str | None = None,
        allow_base_mismatch: bool = False,
    ) -> _experts.ImportReport:
        """Import a library in microsoft/mttl's expert-library format (folder or Hub repo), converting
        each LoRA expert to a PEFT folder; all or nothing. Returns an ``ImportReport``."""
        from libstore.ops import hub_import

        return hub_import.import_mttl(
            self._ctx,
            source,
            kind=kind,
            base=base,
            tags=tags,
            experts=experts,
            revision=revision,
            token=token,
            allow_base_mismatch=allow_base_mismatch,
        )

    # --- routing ---------------------------------------------------------------------------

    def routed_model(
        self,
        base: str | nn.Module | None = None,
        *,
        experts: str | ExpertQuery | list[str] = "kind=task",
        top_k: int = 3,
        temperature: float = 1.0,
        general: str | ExpertQuery | None = None,
        method: PrototypeMethod = "exact",
        mixing: Mixing = "output",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        allow_base_mismatch: bool = False,
        router: RouterName = "arrow",
        top_n: int = 1,
        granularity: Granularity = "token",
    ) -> RoutedModel:
        """A routed model over the experts a query selects (see ``libstore.ops.route``).

        ``base`` is a folder, a Hub id, a loaded ``PreTrainedModel`` or ``None`` (the registered
        source). ``router``: ``"arrow"`` (default; ``top_n``, ``method``), ``"spectr"`` or
        ``"uniform"``; ``granularity="sequence"`` routes each sequence once from its prompt. The
        result forwards ``__call__``/``generate`` and adds ``explain()``, ``sequence_routing()``,
        ``pinned()``.
        """
        from libstore.ops.route import routed_model

        return routed_model(
            self._ctx,
            base=base,
            experts=experts,
            top_k=top_k,
            temperature=temperature,
            general=general,
            method=method,
            mixing=mixing,
            device=device,
            dtype=dtype,
            allow_base_mismatch=allow_base_mismatch,
            router=router,
            top_n=top_n,
            granularity=granularity,
        )

    def export_routed(
        self,
        dest: PathLike,
        *,
        prompt: str,
        experts: str | ExpertQuery = "kind=task",
        base: Any = None,
        tokenizer: Any = None,
        router: RouterName = "arrow",
        top_k: int = 3,
        temperature: float = 1.0,
        general: str | ExpertQuery | None = None,
        top_n: int = 1,
        method: PrototypeMethod = "exact",
        mixing: Mixing = "output",
        overwrite: bool = False,
        allow_base_mismatch: bool = False,
    ) -> RoutedExport:
        """Route ``prompt`` once and write that mixture as one exact PEFT adapter at ``dest``
        (see ``libstore.ops.export_routed``): ``PeftModel.from_pretrained(base, dest)`` serves it."""
        from libstore.ops.export_routed import export_routed

        return export_routed(
            self._ctx,
            dest,
            prompt=prompt,
            experts=experts,
            base=base,
            tokenizer=tokenizer,
            router=router,
            top_k=top_k,
            temperature=temperature,
            general=general,
            top_n=top_n,
            method=method,
            mixing=mixing,
            overwrite=overwrite,
            allow_base_mismatch=allow_base_mismatch,
        )

    # --- evaluation ------------------------------------------------------------------------

    def evaluate(
        self,
        data: PathLike,
        *,
        experts: str | ExpertQuery = "kind=task",
        routers: Iterable[str | RouterSpec] = ("arrow",),
        base: Any = None,
        tokenizer: Any = None,
        top_k: int = 3,
        temperature: float = 1.0,
        batch_size: int = 32,
        name: str | None = None,
        record: bool = True,
        device: str | None = None,
    ) -> EvalRecord:
        """Held-out loss, exact match and routing accuracy of each router on a JSONL file of
        ``{"input", "target", "task"}`` examples, recorded in the catalog (``libstore.ops.evaluate``)."""
        from libstore.ops.evaluate import evaluate

        return evaluate(
            self._ctx,
            data,
            experts=experts,
            routers=list(routers),
            base=base,
            tokenizer=tokenizer,
            top_k=top_k,
            temperature=temperature,
            batch_size=batch_size,
            name=name,
            record=record,
            device=device,
        )

    def evals(self) -> list[Evaluation]:
        """Every recorded evaluation (oldest first), each with ``.stale`` and ``.stale_reasons``."""
        from libstore.ops.evaluate import evaluations

        return evaluations(self._ctx)

    def evaluation(self, name: str) -> Evaluation:
        from libstore.ops.evaluate import evaluation

        return evaluation(self._ctx, name)

    def compare_evals(self, names: Iterable[str], *, metric: str = "exact_match") -> Comparison:
        from libstore.ops.evaluate import compare

        return compare(self._ctx, list(names), metric=metric)

    def remove_eval(self, name: str) -> None:
        from libstore.ops.evaluate import remove

        remove(self._ctx, name)

    def plot_eval(self, name: str, path: PathLike, *, metric: str = "exact_match") -> Path:
        """A heatmap of one metric, routers x tasks (matplotlib)."""
        from libstore.ops.evaluate import evaluation, plot

        return plot(evaluation(self._ctx, name).record, path, metric=metric)
