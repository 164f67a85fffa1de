"""Fixtures and helpers shared by the Hub sync tests (imported by ``tests/test_hub_*.py``).

The real ``huggingface_hub`` client talks to ``tests/hubserver.py`` on 127.0.0.1; the client's retry
sleeps are made instant so that injected faults cost no wall time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from libstore import Library
from tests.factories import make_adapter
from tests.hubserver import HubServer, patch_hf_client, skip_client_backoff

REPO = "tester/phi3-experts"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A fresh Hub stand-in; this process's client points at it (token: the server's default)."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    quiet = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        with HubServer() as server:
            patch_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
            skip_client_backoff(monkeypatch)
            yield server
    finally:
        if not quiet:
            enable_progress_bars()


@pytest.fixture
def other(tmp_path: Path, db_url: str | None, base_dir: Path) -> Iterator[Library]:
    """A second library (same database kind as ``library``) with the same base registered."""
    url = None
    if db_url is not None:  # a second private schema on the same server
        from tests.conftest import _pg_schema_url

        gen = _pg_schema_url()
        url = next(gen)
    lib = Library.init(tmp_path / "other", db_url=url)
    lib.add_base("tiny", str(base_dir))
    try:
        yield lib
    finally:
        lib.close()
        if db_url is not None:
            with pytest.raises(StopIteration):
                next(gen)


def add_experts(
    lib: Library, base_dir: Path, tmp: Path, names: list[str], *, seed0: int = 0, **kw: object
) -> None:
    """Add rank-4 task experts named ``names`` (each its own seed), tagged v1, task = name."""
    for i, name in enumerate(names):
        folder = make_adapter(base_dir, tmp / "src" / f"{name}-{seed0 + i}", seed=seed0 + i, **kw)  # type: ignore[arg-type]
        lib.add(folder, name=name, kind="task", tasks=[name], tags=["v1"])


def snapshot(lib: Library) -> tuple[list[tuple], list, list]:
    """Everything a failed sync must leave unchanged: experts, remotes and sync records."""
    experts = [(e.name, e.kind, e.sha256, e.tags, e.tasks, e.cluster, e.metadata) for e in lib.experts()]
    remotes = [(r.name, r.last_commit, r.synced) for r in lib.remotes()]
    with lib.context.catalog.read() as s:
        from sqlalchemy import select

        from libstore.catalog.models import RemoteExpertRow

        records = sorted(
            s.execute(select(RemoteExpertRow.expert_name, RemoteExpertRow.synced_digest)).tuples()
        )
    return experts, remotes, records
