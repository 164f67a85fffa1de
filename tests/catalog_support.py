"""Big catalogs fast: copy one real expert's rows in bulk (tests of scale and benchmarks/catalog.py).

The copies share the original's blobs and shapes; each gets its own name, task and one of ten tags
(``g0`` .. ``g9``), every 100th a cluster link and every 500th a lineage, so listings read every
linked table. Rows go in with a few executemany statements per 5,000 experts.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, insert, select, text

from libstore import Library
from libstore.catalog.models import (
    ClusteringRow,
    ClusterRow,
    DerivationParentRow,
    DerivationRow,
    ExpertFileRow,
    ExpertRow,
    ExpertTagRow,
    ExpertTaskRow,
    TagRow,
    TaskRow,
)


def clone_experts(
    lib: Library, proto: str, n: int, *, prefix: str = "e", digits: int = 5, derive_every: int = 500
) -> None:
    """Add ``n`` copies of expert ``proto`` named ``{prefix}00000`` ..., with a clustering
    ``mbc_{prefix}``; every ``derive_every``-th copy (the last of each run) gets a lineage."""
    cols = [c.key for c in ExpertRow.__table__.columns if c.key != "id"]
    with lib.context.catalog.write() as s:
        row = s.scalars(select(ExpertRow).where(ExpertRow.name == proto)).one()
        values = {c: getattr(row, "extra" if c == "metadata" else c) for c in cols}
        files = [(f.path, f.blob_sha256, f.size) for f in row.files]
        run = ClusteringRow(name=f"mbc_{prefix}", base_model_id=row.base_model_id, method="mbc")
        run.metric, run.k, run.seed = "flat", 1, 0
        run.clusters = [ClusterRow(index=0)]
        s.add(run)
        s.flush()
        cluster_id = run.clusters[0].id
        have = set(s.scalars(select(TagRow.name)))
        missing = [{"name": f"g{j}"} for j in range(10) if f"g{j}" not in have]
        if missing:
            s.execute(insert(TagRow), missing)
        tag_ids = {name: i for name, i in s.execute(select(TagRow.name, TagRow.id))}
        for lo in range(0, n, 5000):
            names = [f"{prefix}{i:0{digits}d}" for i in range(lo, min(n, lo + 5000))]
            s.execute(
                insert(ExpertRow),
                [
                    {**values, "name": nm, "cluster_id": cluster_id if i % 100 == 0 else None}
                    for i, nm in enumerate(names, lo)
                ],
            )
            s.execute(insert(TaskRow), [{"name": f"task_{nm}"} for nm in names])
            ids = {
                nm: i
                for nm, i in s.execute(select(ExpertRow.name, ExpertRow.id).where(ExpertRow.name.in_(names)))
            }
            tasks = {
                nm: i
                for nm, i in s.execute(
                    select(TaskRow.name, TaskRow.id).where(TaskRow.name.in_([f"task_{nm}" for nm in names]))
                )
            }
            s.execute(
                insert(ExpertFileRow),
                [
                    {"expert_id": ids[nm], "path": p, "blob_sha256": h, "size": z}
                    for nm in names
                    for p, h, z in files
                ],
            )
            s.execute(
                insert(ExpertTagRow),
                [{"expert_id": ids[nm], "tag_id": tag_ids[f"g{i % 10}"]} for i, nm in enumerate(names, lo)],
            )
            s.execute(
                insert(ExpertTaskRow),
                [{"expert_id": ids[nm], "task_id": tasks[f"task_{nm}"]} for nm in names],
            )
            for i, nm in enumerate(names, lo):
                if i % derive_every == derive_every - 1:
                    d = DerivationRow(child_id=ids[nm], method="merge", inputs_key=f"{i:064d}")
                    parent = f"{prefix}{i - 1:0{digits}d}"
                    d.parents = [
                        DerivationParentRow(
                            position=0, role="expert", parent_name=parent, parent_sha256="1" * 64
                        )
                    ]
                    s.add(d)
            s.flush()


@contextmanager
def fresh_pg_schema(admin_url: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL schema on ``admin_url``'s database, dropped afterwards (for
    the benchmarks: each run gets a catalog of its own)."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{admin_url}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
