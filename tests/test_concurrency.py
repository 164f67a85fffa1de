"""Many processes on one library at once lose nothing and corrupt nothing (SQLite and PostgreSQL).

Eight API workers (multiprocessing, spawn) start together at a barrier and then race: all of them for
the same new name, then each adds, tags (its own experts and everybody's), removes and — every other
worker — computes prototypes, for several rounds, on overlapping content (two workers store the same
weights, every expert shares its config blob). Alongside, a CLI process adds, tags and removes
through ``libstore`` subprocesses, and a checker process runs ``verify`` (which must never see an
error) and ``gc`` with a grace period (which must never remove a blob an import is about to commit).
Afterwards the catalog holds exactly what the workers' logs say it must, ``verify`` passes, and after
``gc --grace 0`` the store holds exactly the referenced blobs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

WORKERS = 8
ROUNDS = 2
PER_ROUND = 2
DISTINCT = 12  # adapters; worker i round r slot j uses (4i + 2r + j) % DISTINCT: content overlaps


def _folder_index(idx: int, r: int, j: int) -> int:
    return (4 * idx + PER_ROUND * r + j) % DISTINCT


def _api_worker(
    idx: int, lib_path: str, db_url: str | None, folders: list[str], barrier: Any, results: Any
) -> None:
    """Race on one library through the Python API; report what happened and any unexpected error."""
    out: dict[str, Any] = {
        "idx": idx,
        "shared": None,
        "kept": [],
        "removed": [],
        "protos": [],
        "unexpected": [],
        "t": {},
    }
    t0 = time.monotonic()
    try:
        from libstore import Library
        from libstore.errors import AlreadyExistsError

        lib = Library.open(lib_path, db_url=db_url)
        out["t"]["open"] = time.monotonic() - t0
        barrier.wait(timeout=300)
        t0 = time.monotonic()
        try:
            lib.add(folders[-1], name="shared", tags=["race"])
            out["shared"] = "won"
        except AlreadyExistsError:
            out["shared"] = "lost"
        for r in range(ROUNDS):
            names = []
            for j in range(PER_ROUND):
                name = f"w{idx}_r{r}_{j}"
                lib.add(
                    folders[_folder_index(idx, r, j)],
                    name=name,
                    tags=[f"w{idx}", "common"],
                    tasks=["t_common", f"t{idx}"],
                )
                names.append(name)
            lib.tag(f"tag=w{idx}", "hot", f"by{idx}")
            lib.tag("tag=common", "everyone")  # others' experts too, while they are being removed
            lib.remove(names[0])
            out["removed"].append(names[0])
            out["kept"].extend(names[1:])
            out["t"][f"round{r}"] = time.monotonic() - t0
            if idx % 2:
                lib.compute_prototypes(names[1:])
                out["protos"].extend(names[1:])
            out["t"][f"protos{r}"] = time.monotonic() - t0
            lib.untag(names[1], "everyone")
        lib.close()
        out["t"]["all"] = time.monotonic() - t0
    except BaseException:
        out["unexpected"].append(traceback.format_exc())
    results.put(out)


def _checker(lib_path: str, db_url: str | None, stop: Any, results: Any) -> None:
    """verify (never an error) and gc with a grace period (never removes a blob in flight)."""
    out: dict[str, Any] = {"idx": "checker", "verifies": 0, "unexpected": []}
    try:
        from libstore import Library

        lib = Library.open(lib_path, db_url=db_url)
        while not stop.is_set() and out["verifies"] < 40:
            report = lib.verify()
            out["verifies"] += 1
            if not report.ok:
                out["unexpected"].append([p.message for p in report.errors])
            lib.gc(grace_s=120)
            time.sleep(0.2)
        lib.close()
    except BaseException:
        out["unexpected"].append(traceback.format_exc())
    results.put(out)


def _cli(lib: Path, db_url: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"LIBSTORE_DB_URL": db_url} if db_url else {})}
    return subprocess.run(
        [sys.executable, "-c", "from libstore.cli import main; main()", "-L", str(lib), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny base model and DISTINCT + 1 adapters of distinct content (the last: "shared")."""
    from tests.factories import make_adapter, make_base_model

    root = tmp_path_factory.mktemp("conc")
    base = make_base_model(root / "base")
    folders = [str(make_adapter(base, root / "ad" / f"a{i}", seed=100 + i)) for i in range(DISTINCT + 2)]
    return base, folders


def _run(tmp_path: Path, db_url: str | None, adapters: tuple[Path, list[str]]) -> None:
    from libstore import Library

    base, folders = adapters
    lib_path = tmp_path / "lib"
    lib = Library.init(lib_path, db_url=db_url)
    lib.add_base("tiny", str(base))

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    stop = ctx.Event()
    procs = [
        ctx.Process(
            target=_api_worker, args=(i, str(lib_path), db_url, folders[: DISTINCT + 1], barrier, results)
        )
        for i in range(WORKERS)
    ]
    procs.append(ctx.Process(target=_checker, args=(str(lib_path), db_url, stop, results)))
    t0 = time.monotonic()
    for p in procs:
        p.start()
    # the CLI process: add, tag and remove through separate `libstore` invocations meanwhile
    cli_log = []
    for args in (
        ["add", folders[DISTINCT + 1], "--name", "cli_a", "--tag", "common"],
        ["add", folders[0], "--name", "cli_b", "--tag", "common"],
        ["tag", "cli_a", "from_cli"],
        ["rm", "cli_b"],
        ["ls", "--json"],
    ):
        cli_log.append(_cli(lib_path, db_url, *args))
    got = []
    for _ in range(WORKERS):
        got.append(results.get(timeout=300))
    stop.set()
    got.append(results.get(timeout=120))
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    elapsed = time.monotonic() - t0

    for r in cli_log:
        assert r.returncode == 0, (r.args, r.stdout, r.stderr)
    unexpected = {str(o["idx"]): o["unexpected"] for o in got if o["unexpected"]}
    assert unexpected == {}, unexpected
    checker = next(o for o in got if o["idx"] == "checker")
    assert checker["verifies"] >= 1
    workers = [o for o in got if o["idx"] != "checker"]
    assert sorted(o["shared"] for o in workers) == ["lost"] * (WORKERS - 1) + ["won"]

    # nothing lost: exactly the experts the logs say survive, with their tags, tasks and prototypes
    expected = {"shared", "cli_a"} | {n for o in workers for n in o["kept"]}
    experts = {e.name: e for e in lib.experts()}
    assert set(experts) == expected
    for o in workers:
        i = o["idx"]
        for n in o["kept"]:
            e = experts[n]
            assert {f"w{i}", "common", "hot", f"by{i}"} <= set(e.tags), (n, e.tags)
            assert set(e.tasks) == {"t_common", f"t{i}"}
            src = folders[_folder_index(i, int(n.split("_r")[1][0]), int(n[-1]))]
            from libstore.store.blobs import sha256_file

            assert e.sha256 == sha256_file(Path(src) / "adapter_model.safetensors")
    assert "from_cli" in experts["cli_a"].tags
    cached = {n for c in lib.prototype_cache() for n in c.experts}
    assert {n for o in workers for n in o["protos"]} <= cached

    # nothing corrupt: catalog and store agree, and gc leaves exactly the referenced blobs
    report = lib.verify()
    assert report.ok, [p.message for p in report.errors]
    lib.gc(grace_s=0)
    report = lib.verify()
    assert report.ok and not report.problems, [p.message for p in report.problems]
    with lib.context.catalog.read() as s:
        from libstore.catalog.repo import referenced_blobs

        referenced = referenced_blobs(s)
    assert set(lib.context.blobs) == referenced
    lib.close()
    slowest = max(o["t"].get("all", 0.0) for o in workers)
    print(
        f"{WORKERS} workers + checker + CLI: {elapsed:.1f} s (slowest worker after the barrier "
        f"{slowest:.1f} s; checker ran verify {checker['verifies']} times)"
    )


@pytest.fixture(autouse=True)
def _one_thread_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten processes on two cores: one math thread each (inherited by the spawned workers)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")


def test_many_processes_on_sqlite(tmp_path: Path, adapters: tuple[Path, list[str]]) -> None:
    _run(tmp_path, None, adapters)


@pytest.mark.postgres
def test_many_processes_on_postgres(tmp_path: Path, pg_url: str, adapters: tuple[Path, list[str]]) -> None:
    _run(tmp_path, pg_url, adapters)
