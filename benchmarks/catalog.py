"""Benchmark of the catalog at scale: the real CLI over 10k and 100k experts, on SQLite and PostgreSQL.

    python benchmarks/catalog.py                          # SQLite and PostgreSQL, 10k and 100k
    python benchmarks/catalog.py --db sqlite --experts 10000 --import 2000 --runs 3

Every number is the wall time of the real ``libstore`` command in a fresh subprocess (interpreter
start-up and imports included), the median of ``--runs`` runs. The listing library is one real
tiny-model adapter imported with ``libstore add`` and then copied row by row in bulk (files, a tag
each, a task each, a cluster link and a lineage on some), so ``ls`` reads every linked table.
``import-dir`` is measured on real adapter folders (tiny Llama, rank 4, q_proj and v_proj, distinct
random weights) in a fresh library, next to ``sha256sum`` over the same files.
PostgreSQL uses a fresh schema of database ``test`` at 127.0.0.1:5432 (``--pg-url`` to change),
dropped afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLI = [str(Path(sys.executable).parent / "libstore")]
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _cli(lib: Path, db: str | None, *args: str, out: Any = subprocess.DEVNULL) -> float:
    """Wall seconds of one ``libstore`` run (fails loudly on a non-zero exit)."""
    cmd = [*CLI, "-L", str(lib), *(["--db", db] if db else []), *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode()[-2000:]}")
    return wall


def _median(lib: Path, db: str | None, args: Sequence[str], runs: int) -> float:
    return statistics.median(_cli(lib, db, *args) for _ in range(runs))


@contextmanager
def _database(kind: str, pg_admin: str) -> Iterator[str | None]:
    """``None`` (the library's own SQLite file) or the URL of a fresh PostgreSQL schema."""
    if kind == "sqlite":
        yield None
        return
    from tests.catalog_support import fresh_pg_schema

    with fresh_pg_schema(pg_admin) as url:
        yield url


def _adapters(proto: Path, dest: Path, n: int) -> int:
    """``n`` adapter folders like ``proto`` with distinct random weights; returns their total bytes."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(proto / "adapter_model.safetensors"))
    config = (proto / "adapter_config.json").read_bytes()
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        out = dest / f"a{i:06d}"
        out.mkdir(parents=True)
        save_file(
            {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in tensors.items()},
            str(out / "adapter_model.safetensors"),
        )
        (out / "adapter_config.json").write_bytes(config)
        total += sum(f.stat().st_size for f in out.iterdir())
    return total


def _bulk_copy(lib_path: Path, db: str | None, n: int) -> None:
    """Grow the library to ``n`` experts named e00000.. by copying its one expert's rows in bulk."""
    from libstore import Library
    from tests.catalog_support import clone_experts

    lib = Library.open(lib_path, db_url=db)
    clone_experts(lib, "proto", n)
    lib.remove("proto")
    lib.close()


def _python_api(lib_path: Path, db: str | None, base: Path) -> dict[str, float]:
    """In-process: ``lib.experts(query)`` at this size, and a routed model over 1,000 experts."""
    code = f"""
import json, statistics, sys, time
from libstore import Library
lib = Library.open({str(lib_path)!r}, db_url={db!r})
def t(fn):
    runs = []
    for _ in range(3):
        s = time.perf_counter(); fn(); runs.append(time.perf_counter() - s)
    return statistics.median(runs)
out = {{
    "experts(all)": t(lambda: lib.experts()),
    "experts('tag=g3')": t(lambda: lib.experts("tag=g3")),
    "experts('e09*')": t(lambda: lib.experts("e09*")),
}}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(base)!r})
s = time.perf_counter()
lib.routed_model(model, experts="e00*", router="uniform")
out["routed_model(1,000 experts)"] = time.perf_counter() - s
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"python API": float("nan"), "error": proc.stderr[-1500:]}  # type: ignore[dict-item]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _sha256sum_seconds(folder: Path) -> float:
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    t = time.perf_counter()
    for lo in range(0, len(files), 2000):
        subprocess.run(["sha256sum", *files[lo : lo + 2000]], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def bench(kind: str, sizes: Sequence[int], n_import: int, runs: int, pg_admin: str, api: bool) -> list[str]:
    from libstore import Library
    from tests.factories import make_adapter, make_base_model

    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="libstore-bench-") as tmp:
        root = Path(tmp)
        base = make_base_model(root / "base")
        proto = make_adapter(base, root / "proto", r=4, targets=("q_proj", "v_proj"))
        for n in sizes:
            with _database(kind, pg_admin) as db:
                lib_path = root / f"lib-{n}"
                lib = Library.init(lib_path, db_url=db)
                lib.add_base("tiny", str(base))
                lib.add(proto, name="proto", tags=["p"], tasks=["t"])
                lib.close()
                _bulk_copy(lib_path, db, n)
                probe = f"e{n // 2:05d}"
                with open(root / "ls.json", "wb") as f:
                    _cli(lib_path, db, "ls", "--json", out=f)
                mb = (root / "ls.json").stat().st_size / 1e6
                cells = {
                    "ls --json": _median(lib_path, db, ["ls", "--json"], runs),
                    "ls (table)": _median(lib_path, db, ["ls"], runs),
                    "ls --jsonl": _median(lib_path, db, ["ls", "--jsonl"], runs)
                    if _supports(lib_path, db, "--jsonl")
                    else float("nan"),
                    "ls --full --json": _median(lib_path, db, ["ls", "--full", "--json"], runs)
                    if _supports(lib_path, db, "--full")
                    else float("nan"),
                    f"show {probe}": _median(lib_path, db, ["show", probe], runs),
                    "ls 'name=e09*'": _median(lib_path, db, ["ls", "name=e09*"], runs),
                    "ls --limit 20": _median(lib_path, db, ["ls", "--limit", "20"], runs)
                    if _supports(lib_path, db, "--limit")
                    else float("nan"),
                    "--help": _median(lib_path, db, ["--help"], runs),
                }
                for op, s in cells.items():
                    note = f" ({mb:.1f} MB of JSON)" if op == "ls --json" else ""
                    rows.append(f"| {kind} | {n:,} | `{op}` | {s:.2f}{note} |")
                if api:
                    for op, s in _python_api(lib_path, db, base).items():
                        val = f"{s:.2f}" if isinstance(s, float) else str(s)
                        rows.append(f"| {kind} | {n:,} | `{op}` (Python, in process) | {val} |")
        if not n_import:
            return rows
        with _database(kind, pg_admin) as db:
            src = root / "adapters"
            total = _adapters(proto, src, n_import)
            lib_path = root / "lib-import"
            lib = Library.init(lib_path, db_url=db)
            lib.add_base("tiny", str(base))
            lib.close()
            wall = _cli(lib_path, db, "import-dir", str(src), "--task-from-name")
            again = _cli(lib_path, db, "import-dir", str(src), "--task-from-name")
            sha = _sha256sum_seconds(src)
            rows.append(
                f"| {kind} | {n_import:,} folders | `import-dir` | {wall:.2f}: "
                f"{n_import / wall:.0f} adapters/s, "
                f"{total / 1e6 / wall:.1f} MB/s (sha256sum: {total / 1e6 / sha:.1f} MB/s) |"
            )
            rows.append(f"| {kind} | {n_import:,} folders | `import-dir` again (all skipped) | {again:.2f} |")
    return rows


def _supports(lib: Path, db: str | None, option: str) -> bool:
    proc = subprocess.run([*CLI, "ls", "--help"], capture_output=True, text=True, check=False)
    return option in proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", default="sqlite,postgres", help="sqlite, postgres or both (comma-separated)")
    p.add_argument("--experts", default="10000,100000", help="library sizes (comma-separated)")
    p.add_argument(
        "--import", dest="n_import", type=int, default=2000, help="adapter folders to import (0: skip)"
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--pg-url", default=os.environ.get("LIBSTORE_TEST_PG_URL", PG_ADMIN))
    p.add_argument("--no-api", action="store_true", help="skip the in-process Python API rows")
    a = p.parse_args()
    print(
        f"{dt.date.today()}  {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs  "
        f"Python {platform.python_version()}  load {os.getloadavg()[0]:.1f}"
    )
    print("\n| database | experts | operation | wall s (median) |\n|---|---|---|---|")
    for kind in a.db.split(","):
        for row in bench(
            kind, [int(x) for x in a.experts.split(",")], a.n_import, a.runs, a.pg_url, not a.no_api
        ):
            print(row, flush=True)


if __name__ == "__main__":
    main()
