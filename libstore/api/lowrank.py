"""``Library``'s low-rank methods: prototypes, GenKnowSub, similarity, merge, lineage, MBC clustering.

Each imports its operation when called, so opening a library never pays for torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from libstore.api.base import Facade, PathLike, Selection, selection
from libstore.types import (
    Expert,
    ExpertQuery,
    ExportFormat,
    GksMode,
    PrototypeMethod,
    PrototypeSet,
    SimilarityMetric,
)

if TYPE_CHECKING:
    from libstore.ops.clusters import Clustering
    from libstore.ops.derive import GksReport
    from libstore.ops.lineage import LineageInfo, StaleReport
    from libstore.ops.prototypes import ExpertPrototypes, PrototypeReport
    from libstore.ops.similarity import SimilarityMatrix


class LowRankMethods(Facade):
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

        target = None if query is None else selection(query)
        options = _protos.PrototypeOptions(method=method, top_n=top_n, iters=iters, seed=seed, device=device)
        return _protos.compute(self._ctx, target, options=options)

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
        options = _protos.PrototypeOptions(method=method, top_n=top_n, iters=iters, seed=seed, device=device)
        return _protos.load(self._ctx, target, options=options, modules=modules)

    def prototype_cache(self) -> list[PrototypeSet]:
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
            general=selection(general),
            experts=selection(experts),
            options=_derive.GksOptions(mode=mode, rank=rank, suffix=suffix, refresh=refresh, device=device),
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

        target = None if query is None else selection(query)
        return _sim.similarity(
            self._ctx, target, options=_sim.SimilarityOptions(metric=metric, device=device)
        )

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
            options=_derive.MergeOptions(
                rank=rank,
                weights=None if weights is None else tuple(weights),
                refresh=refresh,
                device=device,
            ),
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

        target = None if experts is None else selection(experts)
        options = _clusters.ClusterOptions(
            k=k,
            metric=metric,
            seed=seed,
            name=name,
            keep=keep,
            dim=dim,
            k_range=None if k_range is None else tuple(k_range),
            n_init=n_init,
            device=device,
        )
        return _clusters.cluster(self._ctx, target, options=options)

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
