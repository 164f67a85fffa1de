"""``Library``: the Python API. Each method opens no more than it needs and calls one operation."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from libstore import config
from libstore.ops import experts as _experts
from libstore.ops.context import Context, init_library, open_library
from libstore.types import BaseModel, Expert, ExpertQuery

PathLike = str | os.PathLike[str]


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
    def init(cls, path: PathLike | None = None, *, db_url: str | None = None) -> Library:
        """Create a library folder (catalog + ``blobs/``) at ``path`` (default: see ``config``)."""
        return cls(init_library(config.library_path(path), db_url))

    @classmethod
    def open(cls, path: PathLike | None = None, *, db_url: str | None = None) -> Library:
        """Open a library, upgrading its catalog if an older libstore created it."""
        return cls(open_library(config.library_path(path), db_url))

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
        _experts.remove_base(self._ctx, name)

    # --- experts ---------------------------------------------------------------------------

    def add(
        self,
        path: PathLike,
        *,
        name: str | None = None,
        kind: str = "task",
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
            self._ctx, path, name=name, kind=kind, base=base, tasks=tasks, tags=tags,
            metadata=metadata, cluster=cluster, allow_base_mismatch=allow_base_mismatch,
            allow_nonfinite=allow_nonfinite,
        )

    def import_dir(
        self,
        root: PathLike,
        *,
        kind: str = "task",
        base: str | None = None,
        tags: Iterable[str] = (),
        task_from_name: bool = False,
        allow_base_mismatch: bool = False,
    ) -> _experts.ImportReport:
        """Import every PEFT folder below ``root`` in one transaction; names from folder names."""
        return _experts.import_dir(
            self._ctx, root, kind=kind, base=base, tags=tags, task_from_name=task_from_name,
            allow_base_mismatch=allow_base_mismatch,
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
