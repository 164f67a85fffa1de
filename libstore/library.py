"""``Library``: the Python API. Each method opens no more than it needs and calls one operation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from libstore import config
from libstore.api.base import PathLike, Selection
from libstore.api.evaluation import EvalMethods
from libstore.api.lowrank import LowRankMethods
from libstore.ops import experts as _experts
from libstore.ops.context import Context, SchemaState, init_library, open_library, schema_state
from libstore.types import (
    BaseModel,
    Expert,
    ExpertData,
    ExpertKind,
    ExpertQuery,
    ExpertSort,
    ExpertSummary,
    Granularity,
    Mixing,
    PrototypeMethod,
    Remote,
    RouterName,
)

if TYPE_CHECKING:  # torch and the Hub client load only when an operation needs them
    import torch
    from torch import nn

    from libstore.ops.gc import GcReport
    from libstore.ops.problems import VerifyReport
    from libstore.ops.pull import PullReport
    from libstore.ops.push import PushReport
    from libstore.ops.sync import StatusReport
    from libstore.ops.team import CacheStats, MigrateReport
    from libstore.router.model import RoutedModel

__all__ = ["Library", "PathLike", "Selection"]


class Library(LowRankMethods, EvalMethods):
    """A library of LoRA experts: one catalog database plus one content-addressed blob store.

    The methods of low-rank work and clustering are in ``libstore/api/lowrank.py``, those of
    routed-adapter export and evaluation in ``libstore/api/evaluation.py``.

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

    def experts(
        self,
        query: str | ExpertQuery | None = None,
        *,
        sort: ExpertSort = "name",
        descending: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Expert]:
        """Experts matching a query such as ``"kind=task tag=v1"`` (see ``libstore.ops.query``),
        ordered by ``sort`` (then name); ``limit``/``offset`` take one page of them."""
        return _experts.experts(
            self._ctx, query, sort=sort, descending=descending, limit=limit, offset=offset
        )

    def summaries(
        self,
        query: str | ExpertQuery | None = None,
        *,
        sort: ExpertSort = "name",
        descending: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[ExpertSummary]:
        """:meth:`experts` without module shapes, files, metadata or parents: the fast listing."""
        return _experts.summaries(
            self._ctx, query, sort=sort, descending=descending, limit=limit, offset=offset
        )

    def get(self, name: str) -> Expert:
        return _experts.get(self._ctx, name)

    def export(self, name: str, dest: PathLike, *, overwrite: bool = False) -> Path:
        """Write ``name`` as a PEFT folder that ``PeftModel.from_pretrained`` loads (with its
        attached data, if any, in ``mttl/``: PEFT ignores it)."""
        return _experts.export(self._ctx, name, dest, overwrite=overwrite)

    def expert_data(self, name: str, data_type: str) -> ExpertData:
        """The data of type ``data_type`` attached to expert ``name`` (``Expert.data_types`` lists
        them): what an mttl import found in ``<expert>.<data_type>.bin``, read back pickle-free."""
        return _experts.data(self._ctx, name, data_type)

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

        options = push.PushOptions(
            experts=experts, message=message, tag=tag, token=token, force=force, prune=prune
        )
        return push.push(self._ctx, remote, options=options)

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

        options = pull.PullOptions(revision=revision, experts=experts, token=token, force=force, prune=prune)
        return pull.pull(self._ctx, remote, options=options)

    def status(self, remote: str | None = None, *, token: str | None = None) -> StatusReport:
        """Per expert: local only, remote only, in sync, changed, conflict; and what push and pull
        would do. Returns a ``StatusReport``."""
        from libstore.ops import sync

        return sync.status(self._ctx, remote, options=sync.StatusOptions(token=token))

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
        """Import one PEFT adapter from a Hub repo (optionally a subfolder, also given in the id as
        ``user/repo/sub/folder``), validated like ``add``."""
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

    def import_hub_all(
        self,
        repo_id: str,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        kind: ExpertKind = "task",
        base: str | None = None,
        tasks: Iterable[str] = (),
        tags: Iterable[str] = (),
        token: str | None = None,
        allow_base_mismatch: bool = False,
    ) -> _experts.ImportReport:
        """Import every PEFT adapter folder at or below ``subfolder`` of a Hub repo, all or nothing;
        names from the paths (``arc/checkpoint-17`` -> ``arc.checkpoint-17``)."""
        from libstore.ops import hub_import

        return hub_import.import_hub_all(
            self._ctx,
            repo_id,
            subfolder=subfolder,
            revision=revision,
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
        seed: int = 0,
        joint_prototypes: bool = False,
    ) -> RoutedModel:
        """A routed model over the experts a query selects (see ``libstore.ops.route``).

        ``base`` is a folder, a Hub id, a loaded ``PreTrainedModel`` or ``None`` (the registered
        source). ``router``: ``"arrow"`` (default; ``top_n``, ``method``, ``seed`` of ``method="peft"``'s
        power iteration, PEFT's ``rng_seed``), ``"spectr"`` or
        ``"uniform"``; ``granularity="sequence"`` routes each sequence once from its prompt;
        ``joint_prototypes``: mttl's one prototype for the modules ``tie_params`` tied (warns where
        that changes the routing). The
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
            seed=seed,
            joint_prototypes=joint_prototypes,
        )
