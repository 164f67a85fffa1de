"""``ls`` and ``show`` read the catalog through its driver (ops/reading.py, catalog/snapshots.py): the
same records as the library, no SQLAlchemy import, and the full library whenever the snapshot cannot
serve."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from libstore import Library
from libstore.catalog import migrate
from libstore.catalog.engine import make_engine
from libstore.catalog.reads import Reader
from libstore.catalog.snapshots import Unavailable, open_snapshot
from libstore.ops.reading import SnapshotReader, open_snapshot_reader
from tests.catalog_support import clone_experts
from tests.factories import make_adapter

QUERIES = [
    "",
    "e0001*",
    "tag=g3",
    "task=task_e00042",
    "cluster=mbc_e:0",
    "kind=task tag=g1,g2",
    "e00499 e00500",
]
PAGES = [
    {},
    {"limit": 7},
    {"limit": 5, "offset": 3},
    {"offset": 990},
    {"sort": "created", "descending": True, "limit": 4},
    {"sort": "size", "limit": 3, "offset": 1},
]


def _fill(lib: Library, base_dir: Path, tmp_path: Path) -> Library:
    lib.add(make_adapter(base_dir, tmp_path / "a", seed=1), name="proto", tags=["p"], tasks=["t"])
    clone_experts(lib, "proto", 1001)
    lib.tag("e00500", "extra")
    return lib


@pytest.fixture
def big(library: Library, base_dir: Path, tmp_path: Path) -> Library:
    """1,002 experts on SQLite and on PostgreSQL."""
    return _fill(library, base_dir, tmp_path)


@pytest.fixture
def sqlite_lib(tmp_path: Path, base_dir: Path) -> Library:
    lib = Library.init(tmp_path / "lib")
    lib.add_base("tiny", str(base_dir))
    return _fill(lib, base_dir, tmp_path)


def _reader(lib: Library) -> SnapshotReader:
    reader = open_snapshot_reader(str(lib.path), lib.context.catalog.url, lambda: lib)
    assert reader is not None
    return reader


@pytest.mark.parametrize("page", PAGES)
def test_the_snapshot_reads_the_same_records_as_the_library(big: Library, page: dict) -> None:  # type: ignore[type-arg]
    reader = _reader(big)
    try:
        for q in QUERIES:
            assert reader.summaries(q, **page) == big.summaries(q, **page), q
            assert reader.experts(q, **page) == big.experts(q, **page), q
        derived = reader.get("e00499")
        assert derived.lineage is not None and derived.lineage == big.get("e00499").lineage
        assert reader.get("e00500") == big.get("e00500") and "extra" in reader.get("e00500").tags
    finally:
        reader.close()


def test_ls_and_show_answer_without_importing_sqlalchemy(big: Library) -> None:
    """The start-up that made ``show`` cost ~1 s: SQLAlchemy and the ORM models load only when a
    command needs more than reading the catalog."""
    db = [] if big.context.catalog.is_sqlite else ["--db", big.context.catalog.url]
    code = f"""
import sys
from click.testing import CliRunner
from libstore.cli import cli
for args in (["ls"], ["ls", "--json", "tag=g3"], ["ls", "--jsonl", "--limit", "3"], ["ls", "--full"],
             ["show", "e00499"], ["show", "e00042", "--json"]):
    r = CliRunner().invoke(cli, ["-L", {str(big.path)!r}, *{db!r}, *args])
    assert r.exit_code == 0, (args, r.output)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("sqlalchemy", "alembic", "torch"))
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_an_older_catalog_is_upgraded_by_the_library_not_read_by_the_snapshot(sqlite_lib: Library) -> None:
    path = sqlite_lib.path
    url = sqlite_lib.context.catalog.url
    expected = sqlite_lib.summaries("tag=g3")
    sqlite_lib.close()
    engine = make_engine(url)
    migrate.downgrade(engine, "0006")
    engine.dispose()
    with pytest.raises(Unavailable):
        open_snapshot(url)
    assert open_snapshot_reader(str(path), None, lambda: Library.open(path)) is None
    from click.testing import CliRunner

    from libstore.cli import cli

    r = CliRunner().invoke(cli, ["-L", str(path), "ls", "--jsonl", "tag=g3"])
    assert r.exit_code == 0, r.output
    assert len(r.output.splitlines()) == len(expected)
    open_snapshot(url).close()  # the library upgraded it to this libstore's head


def test_a_snapshot_that_fails_mid_read_hands_over_to_the_library(
    big: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = _reader(big)

    def broken(sql: str, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        raise Unavailable("database disk image is malformed")

    monkeypatch.setattr(reader._snapshot, "reader", Reader(broken, "sqlite"))
    assert reader.summaries("tag=g3", limit=5) == big.summaries("tag=g3", limit=5)


def test_other_databases_and_unreachable_servers_are_read_by_the_library(tmp_path: Path) -> None:
    for url in ("mysql+pymysql://me@127.0.0.1/x", "postgresql+psycopg://nobody:s3cret@127.0.0.1:1/none"):
        with pytest.raises(Unavailable) as e:
            open_snapshot(url)
        assert "s3cret" not in str(e.value)


def test_the_snapshot_cannot_write(big: Library) -> None:
    snapshot = open_snapshot(big.context.catalog.url)
    try:
        with pytest.raises(Unavailable, match="readonly|read-only|query_only"):
            snapshot.reader.rows("DELETE FROM experts", {})
    finally:
        snapshot.close()
    assert len(big.summaries()) == 1002  # proto and its 1001 copies
