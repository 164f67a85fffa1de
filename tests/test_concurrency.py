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
from collections.abc import Iterator
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


# --- gc beside operations that re-use or stage blobs (issue 12 item 1) ------------------------------

HOURS_AGO = 2 * 3600.0


def _gc_loop(lib_path: str, grace_s: float | None, ready: Any, go: Any, stop: Any, results: Any) -> None:
    """Run ``gc`` over and over from ``go`` until ``stop``; report how often and any unexpected error."""
    out: dict[str, Any] = {"runs": 0, "removed": 0, "unexpected": []}
    try:
        from libstore import Library

        lib = Library.open(lib_path)
        lib.gc(dry_run=True)  # warm up: imports done, connection open
        ready.set()
        go.wait(timeout=300)
        while True:  # at least one run after ``go``, even when ``stop`` came with it
            out["removed"] += len(lib.gc(grace_s=grace_s).blobs)
            out["runs"] += 1
            if stop.is_set():
                break
        lib.close()
    except BaseException:
        out["unexpected"].append(traceback.format_exc())
    results.put(out)


class _GcBeside:
    """A gc loop in another process, started before and stopped after the operations under test."""

    def __init__(self, lib_path: Path, grace_s: float | None) -> None:
        ctx = mp.get_context("spawn")
        self.go, self.stop, self.results = ctx.Event(), ctx.Event(), ctx.Queue()
        ready = ctx.Event()
        self.proc = ctx.Process(
            target=_gc_loop, args=(str(lib_path), grace_s, ready, self.go, self.stop, self.results)
        )
        self.proc.start()
        assert ready.wait(timeout=120), "the gc process did not start"

    def finish(self) -> dict[str, Any]:
        self.go.set()
        self.stop.set()
        out: dict[str, Any] = self.results.get(timeout=120)
        self.proc.join(timeout=60)
        assert out["unexpected"] == [], out["unexpected"]
        return out


def _age_unreferenced(lib: Any, shas: set[str]) -> None:
    """Make blobs look like leftovers of long ago: gc's grace period no longer protects them."""
    t = time.time() - HOURS_AGO
    for sha in shas:
        os.utime(lib.context.blobs.path(sha), (t, t))


def _nothing_missing(lib: Any, *, full: bool = True) -> None:
    """Every blob a row references is whole; with ``full``, ``verify`` passes too."""
    from libstore.catalog.repo import referenced_blobs

    if full:
        report = lib.verify()
        assert report.ok, [p.message for p in report.errors]
    with lib.context.catalog.read() as s:
        referenced = referenced_blobs(s)
    assert all(lib.context.blobs.verify(sha) for sha in referenced)


@pytest.fixture
def hub_with_library(
    tmp_path: Path, adapters: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, Any]]:
    """A Hub server holding a pushed library of six experts with prototypes, and an empty library
    (this process's client points at the server; its retry sleeps are real)."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    from libstore import Library
    from tests.hub_support import REPO
    from tests.hubserver import HubServer, patch_hf_client

    base, folders = adapters
    disable_progress_bars()
    with HubServer() as hub:
        patch_hf_client(monkeypatch, hub.url, tmp_path / "hf")
        remote = Library.init(tmp_path / "remote")
        remote.add_base("tiny", str(base))
        for i in range(6):
            remote.add(folders[i], name=f"r{i}", tags=["v1"])
        remote.compute_prototypes()
        remote.add_remote("origin", REPO)
        remote.push()
        lib = Library.init(tmp_path / "lib")
        lib.add_remote("origin", REPO)
        yield hub, remote
        remote.close()
        lib.close()
    enable_progress_bars()


@pytest.mark.slow
def test_gc_beside_a_resumed_pull_keeps_the_blobs_it_reuses(
    tmp_path: Path, hub_with_library: tuple[Any, Any]
) -> None:
    """An interrupted pull left half the files it needs in the store, long enough ago that gc's grace
    period no longer covers them. The resumed pull re-uses them while gc runs beside it (default
    grace): the pull must claim them, so that it succeeds and ``verify`` finds nothing missing."""
    from libstore import Library
    from tests.hubserver import client_env

    hub, remote = hub_with_library
    lib_path = tmp_path / "lib"
    with Library.open(lib_path) as lib:
        # what the interrupted pull had downloaded: the files and prototypes of r0..r2
        reused = {f.sha256 for e in remote.experts("r0 r1 r2") for f in e.files}
        reused |= {c.blob_sha256 for c in remote.prototype_cache() if set(c.experts) & {"r0", "r1", "r2"}}
        for sha in reused:
            lib.context.blobs.put_file(remote.context.blobs.path(sha), expected_sha256=sha)
        _age_unreferenced(lib, reused)

    gc = _GcBeside(lib_path, None)
    # the first expert file the pull fetches is cut short: the client retries after 1 s, which is
    # when gc runs (the pull has decided what to re-use by then)
    hub.faults.cut_download("experts/*", after_bytes=16)
    env = {**os.environ, **client_env(hub.url, tmp_path / "hf-cli")}
    pull = subprocess.Popen(
        [sys.executable, "-c", "from libstore.cli import main; main()", "-L", str(lib_path), "pull"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any("/resolve/" in r.path and "/experts/" in r.path for r in list(hub.log)):
        assert pull.poll() is None and time.monotonic() < deadline, pull.communicate()
        time.sleep(0.005)
    gc.go.set()
    out, err = pull.communicate(timeout=300)
    assert gc.finish()["runs"] >= 1
    assert pull.returncode == 0, (out, err)
    with Library.open(lib_path) as lib:
        assert sorted(e.name for e in lib.experts()) == [f"r{i}" for i in range(6)]
        _nothing_missing(lib)


@pytest.mark.slow
def test_a_pull_staging_longer_than_the_grace_period_fails_cleanly(
    tmp_path: Path, hub_with_library: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull that downloads for longer than gc's grace period loses its first downloads to a gc
    running beside it. Re-claiming its blobs before it records them, the pull notices and fails with
    ``BlobsRemovedError`` (exit 9), changing nothing; run again, it completes.

    Deterministic: when the downloads are done, their blobs are made older than the grace period and a
    gc (default grace) runs in another process before the pull goes on, as a slow pull would meet it."""
    from libstore import Library
    from libstore.errors import BlobsRemovedError
    from libstore.ops import pull as pull_mod

    _hub, _remote = hub_with_library
    lib = Library.open(tmp_path / "lib")
    gc = _GcBeside(lib.path, None)
    real_download = pull_mod._download
    gc_runs: list[dict[str, Any]] = []

    def slow_download(ctx: Any, client: Any, repo_id: str, commit: str, missing: Any, *a: Any) -> None:
        real_download(ctx, client, repo_id, commit, missing, *a)
        _age_unreferenced(lib, set(missing))
        gc_runs.append(gc.finish())

    monkeypatch.setattr(pull_mod, "_download", slow_download)
    with pytest.raises(BlobsRemovedError) as err:
        pull_mod.pull(lib.context, options=pull_mod.PullOptions(), workers=1)
    assert gc_runs[0]["removed"] >= 1
    assert err.value.exit_code == 9 and err.value.sha256s
    assert lib.experts() == [] and lib.verify().ok
    monkeypatch.setattr(pull_mod, "_download", real_download)
    lib.pull()
    assert sorted(e.name for e in lib.experts()) == [f"r{i}" for i in range(6)]
    _nothing_missing(lib)
    lib.close()


def _stocked(tmp_path: Path, adapters: tuple[Path, list[str]]) -> Any:
    """Tasks t0..t2 and general g0, g1 with residuals, a merge and exact prototypes of all."""
    from libstore import Library

    base, folders = adapters
    lib = Library.init(tmp_path / "lib")
    lib.add_base("tiny", str(base))
    for i, name in enumerate(["t0", "t1", "t2", "g0", "g1"]):
        lib.add(folders[i], name=name, kind="general" if name.startswith("g") else "task")
    return lib


@pytest.mark.slow
def test_gc_beside_imports_and_derivations_keeps_what_they_reuse(
    tmp_path: Path, adapters: tuple[Path, list[str]]
) -> None:
    """Import, GenKnowSub, merge and prototypes re-use (deduplicate) blobs that nothing references and
    that are older than gc's grace period, while gc (default grace) runs beside them: each claims what
    it re-uses, so nothing they record goes missing."""
    from libstore.catalog.repo import referenced_blobs

    _base, folders = adapters
    lib = _stocked(tmp_path, adapters)
    lib.add(folders[5], name="x")
    lib.subtract_general(general="kind=general", experts="kind=task")
    lib.merge(["t0", "t1"], name="m")
    lib.compute_prototypes()
    for name in ["x", "t0_res", "t1_res", "t2_res", "m"]:
        lib.remove(name)
    with lib.context.catalog.read() as s:
        unreferenced = set(lib.context.blobs) - referenced_blobs(s)
    assert len(unreferenced) >= 5
    _age_unreferenced(lib, unreferenced)

    gc = _GcBeside(lib.path, None)
    gc.go.set()
    for _ in range(3):
        lib.add(folders[5], name="x")
        assert len(lib.subtract_general(general="kind=general", experts="kind=task").created) == 3
        lib.merge(["t0", "t1"], name="m")
        lib.compute_prototypes()
        _nothing_missing(lib)
        for name in ["x", "t0_res", "t1_res", "t2_res", "m"]:
            lib.remove(name)
    lib.add(folders[5], name="x")
    lib.subtract_general(general="kind=general", experts="kind=task")
    lib.merge(["t0", "t1"], name="m")
    lib.compute_prototypes()
    assert gc.finish()["runs"] >= 1
    _nothing_missing(lib)
    lib.close()


@pytest.mark.slow
def test_gc_with_no_grace_beside_imports_never_records_a_missing_blob(
    tmp_path: Path, adapters: tuple[Path, list[str]]
) -> None:
    """``gc --grace 0`` in a loop beside imports deletes every blob the moment nothing references
    it, and every staged copy at once. An import then either records its expert with every blob in
    place (a blob it re-uses is claimed inside its transaction, which gc's deletions cannot
    interleave with) or fails with ``BlobsRemovedError`` and changes nothing — never both: the same
    adapters are added and removed over and over, re-using the blobs gc is deleting."""
    from libstore.errors import BlobsRemovedError

    _base, folders = adapters
    lib = _stocked(tmp_path, adapters)
    gc = _GcBeside(lib.path, 0.0)
    gc.go.set()
    outcomes: list[str] = []
    for _ in range(8):
        for j in range(3):
            try:
                lib.add(folders[5 + j], name=f"x{j}")
                outcomes.append("added")
            except BlobsRemovedError as e:
                assert f"x{j}" not in {x.name for x in lib.experts()}, e
                outcomes.append("refused")
        _nothing_missing(lib, full=False)
        for e in lib.experts("x*"):
            lib.remove(e.name)
    runs = gc.finish()
    assert runs["runs"] >= 1 and len(outcomes) == 24
    print(f"gc --grace 0 ran {runs['runs']} times beside 24 imports: {sorted(set(outcomes))}")
    _nothing_missing(lib)
    lib.close()
