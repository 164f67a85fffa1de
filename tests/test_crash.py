"""Crash safety: a process killed with SIGKILL at a random moment leaves a library that opens, passes
``verify``, and references no half-written blob.

A harness runs each operation — import, GenKnowSub, prototype computation, pull from a Hub server
running in this process, gc — in a child process and kills it with SIGKILL after a random delay
(seeded) within the operation's measured duration, over 50+ trials on one SQLite library (pulls: a
fresh library each). Children fork from a forkserver that has torch and libstore imported, so a
trial costs milliseconds, not a Python start-up. After each kill the library is opened anew and:

* ``verify`` reports no error (temp files and unrecorded blobs of the killed write are warnings);
* every blob any row references hashes to its name (no half-written blob is referenced);
* the operation happened all or nothing: an imported expert has the source's weights, a GenKnowSub
  run's residuals exist all together or not at all, a prototype run's cache entries likewise.

At the end ``gc --grace 0`` clears every leftover and ``verify`` reports nothing at all, and an
interrupted pull completes when run again.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import configure_mappers

from libstore import Library
from libstore.store.blobs import sha256_file
from tests import hub_support as support
from tests.factories import make_adapter
from tests.hub_support import REPO
from tests.hubserver import HubServer

hub = support.hub  # fixture

configure_mappers()  # done once in the forkserver (which imports this module), not in every child

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SEED = 20260109
PLAN = {"import": 14, "prototypes": 10, "gks": 10, "gc": 8, "pull": 12}  # 54 kills
PRELOAD = [
    "torch",
    "libstore.library",
    "libstore.ops.experts",
    "libstore.ops.prototypes",
    "libstore.ops.derive",
    "libstore.ops.maintenance",
    "libstore.ops.verify",
    "libstore.ops.gc",
    "libstore.ops.sync",
    "libstore.ops.push",
    "libstore.ops.pull",
    "libstore.lowrank.prototypes",
    "libstore.lowrank.gks",
    "huggingface_hub",
    "tests.hubserver",
    "tests.test_crash",
]  # the child's function lives here: unpickling it must not import
TASKS = ["t0", "t1", "t2"]
GENERAL = ["g0", "g1"]


@pytest.fixture(autouse=True)
def _quiet_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed client leaves the server a reset connection; that is the point, not news."""
    from tests import hubserver

    monkeypatch.setattr(hubserver._HTTPServer, "handle_error", lambda *args: None)


class _Env:
    """What ``patch_hf_client`` needs of pytest's monkeypatch, applied for good (a child process)."""

    def setenv(self, key: str, value: str) -> None:
        os.environ[key] = value

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        setattr(obj, name, value)


def _child(op: str, lib_path: str, arg: Any, hub_url: str | None, conn: Any) -> None:
    """Open the library, say ready, run one operation when told, report its duration, wait."""
    import torch

    torch.set_num_threads(1)
    if hub_url is not None:
        from tests.hubserver import patch_hf_client

        patch_hf_client(_Env(), hub_url, Path(lib_path).parent / "hf-child")
    lib = Library.open(lib_path)
    lib.experts()  # warm-up, so that kill delays spread over the operation itself
    conn.send("ready")
    if conn.recv() != "go":
        return
    t0 = time.perf_counter()
    if op == "import":
        lib.add(arg, name=Path(arg).name)
    elif op == "prototypes":
        lib.compute_prototypes(method="peft", seed=arg)
    elif op == "gks":
        lib.subtract_general(general=GENERAL, experts=TASKS, suffix=f"_r{arg}")
    elif op == "gc":
        lib.gc(grace_s=0)
    elif op == "pull":
        lib.pull()
    conn.send(time.perf_counter() - t0)
    conn.recv()  # killed here if the kill comes late


def _referenced_blobs_are_whole(lib: Library) -> None:
    from libstore.catalog.repo import referenced_blobs

    with lib.context.catalog.read() as s:
        referenced = referenced_blobs(s)
    for sha in referenced:
        assert sha256_file(lib.context.blobs.path(sha)) == sha, f"referenced blob {sha} is not whole"


class Harness:
    def __init__(self, hub_url: str) -> None:
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.hub_url = hub_url

    def run(self, op: str, lib_path: Path, arg: Any, delay: float | None) -> tuple[bool, float | None]:
        """Run ``op`` in a child; SIGKILL it ``delay`` s after it starts (None: let it finish).

        Returns (killed while the operation ran, its duration if it finished)."""
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(
            target=_child, args=(op, str(lib_path), arg, self.hub_url if op == "pull" else None, child)
        )
        p.start()
        try:
            assert parent.poll(120), f"{op}: the child did not start"
            assert parent.recv() == "ready"
            parent.send("go")
            finished = parent.poll(delay if delay is not None else 120)
            duration = parent.recv() if finished else None
            if delay is None:
                assert finished, f"{op}: did not finish"
                parent.send("exit")
        finally:
            if p.is_alive() and delay is not None:
                os.kill(p.pid, signal.SIGKILL)
            p.join(30)
            parent.close()
            child.close()
        if delay is not None:
            assert p.exitcode == -signal.SIGKILL
        return (delay is not None and not finished), duration


def test_sigkill_at_random_moments_leaves_a_sound_library(
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
) -> None:
    t_start = time.monotonic()
    rng = random.Random(SEED)
    # the library under test: task and general experts; the Hub: a pushed library to pull
    lib_path = tmp_path / "lib"
    lib = Library.init(lib_path)
    lib.add_base("tiny", str(base_dir))
    for i, name in enumerate([*TASKS, *GENERAL]):
        lib.add(
            make_adapter(base_dir, tmp_path / "src" / name, seed=i),
            name=name,
            kind="general" if name in GENERAL else "task",
        )
    folders = {
        k: make_adapter(base_dir, tmp_path / "imports" / f"imp{k}", seed=100 + k)
        for k in range(PLAN["import"] + 1)
    }
    remote = Library.init(tmp_path / "remote")
    remote.add_base("tiny", str(base_dir))
    support.add_experts(remote, base_dir, tmp_path, ["r0", "r1", "r2", "r3"], seed0=200)
    remote.compute_prototypes()
    remote.add_remote("origin", REPO)
    remote.push()
    remote.close()

    def fresh_pull_library(name: str) -> Path:
        with Library.init(tmp_path / name) as target:
            target.add_remote("origin", REPO)
        return tmp_path / name

    h = Harness(hub.url)
    # calibration: each operation once, uninterrupted, to know how long it runs
    cal_args = {
        "import": str(folders[PLAN["import"]]),
        "prototypes": -1,
        "gks": "cal",
        "gc": None,
        "pull": None,
    }
    est: dict[str, float] = {}
    for op, arg in cal_args.items():
        path = fresh_pull_library("pull-cal") if op == "pull" else lib_path
        _, est[op] = h.run(op, path, arg, delay=None)
    lib.close()

    trials = [op for op, n in PLAN.items() for _ in range(n)]
    rng.shuffle(trials)
    counters: Counter[str] = Counter()
    mid_op = 0
    pulls: list[Path] = []
    for i, op in enumerate(trials):
        k = counters[op]
        counters[op] += 1
        path = lib_path
        arg: Any = None
        if op == "import":
            arg = str(folders[k])
        elif op == "prototypes":
            arg = k
        elif op == "gks":  # residuals of the same inputs would be reused, not made: remove them
            arg = k
            with Library.open(lib_path) as before:
                for e in before.experts("kind=residual"):
                    before.remove(e.name)
        elif op == "pull":
            path = fresh_pull_library(f"pull-{k}")
            pulls.append(path)
        elif op == "gc":  # give gc something to delete
            with Library.open(lib_path) as before:
                victims = [e.name for e in before.experts() if e.name not in (*TASKS, *GENERAL)]
                for name in rng.sample(victims, min(2, len(victims))):
                    before.remove(name)
        with Library.open(path) as before:
            n_weights = len({e.sha256 for e in before.experts()})
        killed, _ = h.run(op, path, arg, delay=rng.uniform(0.0, 0.9 * est[op]))
        mid_op += killed

        with Library.open(path) as after:  # the library opens
            report = after.verify()
            assert report.ok, (i, op, [p.message for p in report.errors])
            _referenced_blobs_are_whole(after)
            names = {e.name for e in after.experts()}
            if op == "import" and Path(arg).name in names:
                assert after.get(Path(arg).name).sha256 == sha256_file(
                    Path(arg) / "adapter_model.safetensors"
                )
            if op == "gks":
                made = {f"{t}_r{k}" for t in TASKS} & names
                assert made in (set(), {f"{t}_r{k}" for t in TASKS}), (i, made)
            if op == "prototypes":
                done = [
                    c for c in after.prototype_cache() if c.method == "peft" and c.params.get("seed") == k
                ]
                assert len(done) in (0, n_weights), (i, len(done), n_weights)

    # every leftover of the killed writes is collectable, and interrupted pulls complete when re-run
    with Library.open(lib_path) as after:
        after.gc(grace_s=0)
        assert after.verify().problems == ()
    with Library.open(pulls[0]) as pulled:
        pulled.pull()
        assert sorted(e.name for e in pulled.experts()) == ["r0", "r1", "r2", "r3"]
        pulled.gc(grace_s=0)
        assert pulled.verify().problems == ()

    assert sum(PLAN.values()) >= 50
    assert mid_op >= 30, f"only {mid_op} kills landed while an operation ran"
    elapsed = time.monotonic() - t_start
    print(
        f"{len(trials)} SIGKILL trials ({mid_op} mid-operation) in {elapsed:.1f} s; "
        f"calibrated durations: { {k: round(v, 3) for k, v in est.items()} }"
    )
