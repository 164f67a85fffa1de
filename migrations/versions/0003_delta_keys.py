"""derived results keyed on ΔW, not on the weights file alone

Two experts with one weights file and another ``lora_alpha`` have different updates ΔW = s·B·A, but
derivation keys and the prototype cache used to hash only the weights file, so one could be reused
for the other. From this revision on:

- a derivation's ``inputs_key`` hashes each parent's *ΔW key* (weights sha256, r, lora_alpha,
  use_rslora) instead of its weights sha256. Existing keys are rewritten where that is provably
  right: the method is one libstore computes (gks-param, gks-delta, merge, version 1), the stored key
  is exactly the old formula over the recorded parents, and every parent still exists with the
  recorded weights (for parameter-mode residuals also with the residual's own alpha, r and rsLoRA,
  which the residual copied from its parent). Other derivations keep their old key, which no new key
  can equal: they are never reused and ``libstore stale`` reports them (recompute with --refresh).
- prototype cache entries of method version 1 (values of s·B·A for whichever expert with those
  weights came first) are deleted; version 2 stores the values of B·A and scales them per expert.
  Their blobs become unreferenced and go at the next ``gc``. A cache recomputes in milliseconds.

The formulas are repeated here, frozen, rather than imported: a migration must mean the same thing
whatever later code does. Downgrading keeps the new keys and the deleted cache entries deleted (an
older libstore then recomputes them with --refresh / on demand).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_METHODS = ("gks-param", "gks-delta", "merge")
_OUTPUT_PARAMS = ("energy_kept", "energy_kept_min")

experts = sa.table(
    "experts",
    sa.column("id", sa.Integer),
    sa.column("sha256", sa.String),
    sa.column("rank", sa.Integer),
    sa.column("alpha", sa.Float),
    sa.column("use_rslora", sa.Boolean),
)
derivations = sa.table(
    "derivations",
    sa.column("id", sa.Integer),
    sa.column("child_id", sa.Integer),
    sa.column("method", sa.String),
    sa.column("method_version", sa.Integer),
    sa.column("params", sa.JSON),
    sa.column("inputs_key", sa.String),
)
parents = sa.table(
    "derivation_parents",
    sa.column("derivation_id", sa.Integer),
    sa.column("position", sa.Integer),
    sa.column("role", sa.String),
    sa.column("parent_id", sa.Integer),
    sa.column("parent_sha256", sa.String),
)
prototype_cache = sa.table(
    "prototype_cache",
    sa.column("method", sa.String),
    sa.column("method_version", sa.Integer),
)


def _sha(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _delta_key(sha: str, rank: int, alpha: float, use_rslora: bool) -> str:
    return _sha(
        {"delta": 1, "weights": sha, "rank": int(rank), "alpha": float(alpha), "use_rslora": bool(use_rslora)}
    )


def _key(method: str, version: int, params: dict[str, Any], pairs: list[tuple[str, str]]) -> str:
    ordered = [p for p in pairs if p[0] != "general"] + sorted(p for p in pairs if p[0] == "general")
    return _sha(
        {
            "method": method,
            "method_version": int(version),
            "params": params,
            "parents": [[role, key] for role, key in ordered],
        }
    )


def upgrade() -> None:
    conn = op.get_bind()
    conn.execute(
        sa.delete(prototype_cache).where(
            prototype_cache.c.method.in_(["exact", "peft"]), prototype_cache.c.method_version < 2
        )
    )
    now = {
        eid: (sha, rank, alpha, rslora)
        for eid, sha, rank, alpha, rslora in conn.execute(
            sa.select(experts.c.id, experts.c.sha256, experts.c.rank, experts.c.alpha, experts.c.use_rslora)
        )
    }
    links: dict[int, list[tuple[str, int | None, str]]] = {}
    for did, role, pid, sha in conn.execute(
        sa.select(
            parents.c.derivation_id, parents.c.role, parents.c.parent_id, parents.c.parent_sha256
        ).order_by(parents.c.derivation_id, parents.c.position)
    ):
        links.setdefault(did, []).append((role, pid, sha))
    rows = conn.execute(
        sa.select(
            derivations.c.id,
            derivations.c.child_id,
            derivations.c.method,
            derivations.c.method_version,
            derivations.c.params,
            derivations.c.inputs_key,
        ).where(derivations.c.method.in_(_METHODS), derivations.c.method_version == 1)
    ).all()
    for did, child_id, method, version, params, key in rows:
        inputs = {k: v for k, v in dict(params or {}).items() if k not in _OUTPUT_PARAMS}
        recorded = links.get(did, [])
        if not recorded or _key(method, version, inputs, [(r, sha) for r, _, sha in recorded]) != key:
            continue  # not the formula we know: leave it (it can never be reused)
        current = [now.get(pid) if pid is not None else None for _, pid, _ in recorded]
        if any(c is None or c[0] != sha for c, (_, _, sha) in zip(current, recorded, strict=True)):
            continue  # a parent changed or is gone: stale either way
        if method == "gks-param":
            expert = next(c for c, (role, _, _) in zip(current, recorded, strict=True) if role == "expert")
            child = now.get(child_id)
            if child is None or expert is None or child[1:] != expert[1:]:
                continue  # the expert's scale is no longer the one the residual copied
        new = _key(
            method,
            version,
            inputs,
            [
                (role, _delta_key(*c))
                for c, (role, _, _) in zip(current, recorded, strict=True)
                if c is not None
            ],
        )
        conn.execute(sa.update(derivations).where(derivations.c.id == did).values(inputs_key=new))


def downgrade() -> None:
    """Nothing to undo: see the module doc."""
