"""Three "machines" (library folders with their own caches, separate processes) on one PostgreSQL
catalog and one SeaweedFS bucket: concurrent imports, gc while importing, SIGKILL during an upload and
during a cache fill; afterwards every machine's verify passes, nothing is lost, and a machine that
never imported an expert routes over all of them exactly as a local-only library does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from libstore import Library
from libstore.store.object_store import ObjectBlobStore
from tests.factories import load_base, make_adapter

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

#: One machine's work, run in its own process: ``import`` adds adapters (retrying when a gc with
#: grace 0 took a blob first, as the error says to), ``gc`` runs gc with grace 0 a few times,
#: ``kill-upload`` / ``kill-fill`` SIGKILL themselves in the middle of an upload / a cache fill.
MACHINE = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from libstore import Library
    from libstore.errors import BlobsRemovedError
    from libstore.store import blobs, object_store
    job = json.loads(sys.argv[1])
    lib = Library.open(job["lib"], db_url=job["db"])

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    if job["do"] == "import":
        for name, folder in job["adapters"]:
            for _ in range(20):
                try:
                    lib.add(folder, name=name, kind="task")
                    break
                except BlobsRemovedError:
                    continue
    elif job["do"] == "gc":
        for _ in range(4):
            lib.gc(grace_s=0)
    elif job["do"] == "kill-upload":
        real = object_store.ObjectBlobStore._upload

        def upload(self, sha, size, body):
            if size > 1000:  # the weights: claimed, then the machine dies before the PUT completes
                self.claims.claim([sha], time.time())
                die()
            return real(self, sha, size, body)

        object_store.ObjectBlobStore._upload = upload
        lib.add(job["adapters"][0][1], name=job["adapters"][0][0], kind="task")
    elif job["do"] == "kill-fill":
        real = blobs.BlobStore.stage_chunks

        def stage(self, chunks, **kw):
            def some():
                for i, c in enumerate(chunks):
                    yield c[: len(c) // 2]
                    die()
            return real(self, some(), **kw)

        blobs.BlobStore.stage_chunks = stage
        lib.export(job["name"], job["out"])
    lib.close()
    """
)


def _start(job: dict[str, Any], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", MACHINE, json.dumps(job)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait(proc: subprocess.Popen[bytes], code: int = 0) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == code, out.decode()[-3000:]


def test_three_machines_share_one_catalog_and_bucket(
    tmp_path: Path, pg_url: str, s3_url: str, s3_server: Any, base_dir: Path
) -> None:
    env = s3_server.env()
    first = Library.init(tmp_path / "m0", db_url=pg_url, blob_store=s3_url)
    first.add_base("tiny", str(base_dir))
    for i in (1, 2):
        Library.init(tmp_path / f"m{i}", db_url=pg_url).close()
    src = {f"e{i}": make_adapter(base_dir, tmp_path / "src" / f"e{i}", seed=i) for i in range(7)}
    same = str(src["e0"])  # all three import the same bytes under their own names
    jobs = [
        {"do": "import", "adapters": [[f"m{m}_same", same], *[[n, str(src[n])] for n in names]]}
        for m, names in enumerate([["e1", "e2"], ["e3", "e4"], ["e5"]])
    ]
    procs = [_start({**job, "lib": str(tmp_path / f"m{m}"), "db": pg_url}, env) for m, job in enumerate(jobs)]
    procs.append(_start({"do": "gc", "lib": str(tmp_path / "m2"), "db": pg_url}, env))  # gc while importing
    for p in procs:
        _wait(p)

    killed = _start(
        {
            "do": "kill-upload",
            "adapters": [["e6", str(src["e6"])]],
            "lib": str(tmp_path / "m1"),
            "db": pg_url,
        },
        env,
    )
    _wait(killed, -signal.SIGKILL)
    filling = _start(
        {
            "do": "kill-fill",
            "name": "e1",
            "out": str(tmp_path / "out"),
            "lib": str(tmp_path / "m2"),
            "db": pg_url,
        },
        env,
    )
    _wait(filling, -signal.SIGKILL)

    names = sorted(e.name for e in first.experts())
    assert names == ["e1", "e2", "e3", "e4", "e5", "m0_same", "m1_same", "m2_same"]
    assert len({e.sha256 for e in first.experts("name=m*_same")}) == 1
    for m in range(3):
        lib = Library.open(tmp_path / f"m{m}", db_url=pg_url)
        report = lib.verify()
        assert report.ok, report.errors
        lib.close()

    fresh = Library.init(tmp_path / "fresh", db_url=pg_url)
    local = Library.init(tmp_path / "local")
    local.add_base("tiny", str(base_dir))
    for name in names:
        local.add(same if name.endswith("_same") else src[name], name=name, kind="task")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = fresh.routed_model(load_base(base_dir), experts="kind=task", top_k=2)(ids).logits
        ref = local.routed_model(load_base(base_dir), experts="kind=task", top_k=2)(ids).logits
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    assert isinstance(fresh.context.blobs, ObjectBlobStore)
    assert fresh.gc(grace_s=3600).blobs == ()  # the killed upload's claim is honoured
    assert fresh.verify().ok
    fresh.close()
    local.close()
    first.close()
