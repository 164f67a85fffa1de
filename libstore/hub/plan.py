"""Pure sync planning: the library's experts vs the remote's vs what both had at the last sync.

Each side is a mapping ``name -> record digest`` (see ``manifest.record_digest``); ``synced`` holds the
digest both sides had when they were last synced (the ``remote_experts`` table). A three-way
comparison, as git does for files, tells who changed what:

=================  ==============================  ===============  ===================
state              condition (L local, R remote,   push             pull
                   S last synced)
=================  ==============================  ===============  ===================
in_sync            L == R                          -                -
local_only         L, no R, no S                   upload           -
remote_only        R, no L, no S                   -                download
local_changed      L != S, R == S                  upload           -
remote_changed     R != S, L == S                  -                download
conflict           both differ from S (or no S     refused; upload  skipped; download
                   and L != R), incl. changed on   with force       with force
                   one side and deleted on the
                   other
deleted_local      no L, R == S                    delete if prune  - (download w/ force)
deleted_remote     no R, L == S                    - (upload w/     remove if prune
                                                   force)
=================  ==============================  ===============  ===================

Nothing is ever overwritten silently: a conflict is reported and left alone unless the caller asks
for ``force`` (take this side's version), and deletions only travel with ``prune``.
No I/O, no catalog, no Hub: the functions here take plain data and are tested as such.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from libstore.types import Expert, ExpertQuery

State = Literal[
    "in_sync",
    "local_only",
    "remote_only",
    "local_changed",
    "remote_changed",
    "conflict",
    "deleted_local",
    "deleted_remote",
]
PushAction = Literal["none", "upload", "delete", "conflict"]
PullAction = Literal["none", "download", "remove", "conflict"]

STATE_TEXT: dict[str, str] = {
    "in_sync": "in sync",
    "local_only": "local only",
    "remote_only": "remote only",
    "local_changed": "changed locally",
    "remote_changed": "changed on remote",
    "conflict": "CONFLICT: changed on both sides",
    "deleted_local": "deleted locally",
    "deleted_remote": "deleted on remote",
}


@dataclass(frozen=True)
class ExpertPlan:
    """What one expert's state is and what push and pull would do with it.

    Attributes:
        name: the expert.
        state: one of :data:`State` (see the module table).
        push: what ``push`` does (``conflict``: refused unless forced).
        pull: what ``pull`` does (``conflict``: skipped and reported unless forced).
        local, remote, synced: the three record digests compared (``None`` where absent).
        selected: whether the expert is within the operation's ``--experts`` selection.
    """

    name: str
    state: State
    push: PushAction
    pull: PullAction
    local: str | None
    remote: str | None
    synced: str | None
    selected: bool = True

    @property
    def text(self) -> str:
        return STATE_TEXT[self.state]


def classify(local: str | None, remote: str | None, synced: str | None) -> State | None:
    """The state of one expert from its three digests; ``None`` when it exists nowhere."""
    if local is None and remote is None:
        return None
    if local is not None and local == remote:
        return "in_sync"
    if remote is None:
        assert local is not None
        if synced is None:
            return "local_only"
        return "deleted_remote" if local == synced else "conflict"
    if local is None:
        if synced is None:
            return "remote_only"
        return "deleted_local" if remote == synced else "conflict"
    if synced is not None and remote == synced:
        return "local_changed"
    if synced is not None and local == synced:
        return "remote_changed"
    return "conflict"


def _push_action(state: State, local: str | None, *, force: bool, prune: bool) -> PushAction:
    if state in ("local_only", "local_changed"):
        return "upload"
    if state == "deleted_local":
        return "delete" if prune else "none"
    if state == "deleted_remote":
        return "upload" if force else "none"
    if state == "conflict":
        if not force:
            return "conflict"
        if local is not None:
            return "upload"
        return "delete" if prune else "none"
    return "none"


def _pull_action(state: State, remote: str | None, *, force: bool, prune: bool) -> PullAction:
    if state in ("remote_only", "remote_changed"):
        return "download"
    if state == "deleted_remote":
        return "remove" if prune else "none"
    if state == "deleted_local":
        return "download" if force else "none"
    if state == "conflict":
        if not force:
            return "conflict"
        if remote is not None:
            return "download"
        return "remove" if prune else "none"
    return "none"


def plan(
    local: Mapping[str, str],
    remote: Mapping[str, str],
    synced: Mapping[str, str],
    *,
    selected: Iterable[str] | None = None,
    force: bool = False,
    prune: bool = False,
) -> list[ExpertPlan]:
    """Per-expert states and actions, sorted by name.

    ``selected``: the names an operation is limited to (``None``: all). Experts outside it are
    still listed, with actions ``none``.
    """
    chosen = None if selected is None else set(selected)
    out: list[ExpertPlan] = []
    for name in sorted(set(local) | set(remote) | set(synced)):
        loc, r, s = local.get(name), remote.get(name), synced.get(name)
        state = classify(loc, r, s)
        if state is None:
            continue
        sel = chosen is None or name in chosen
        out.append(
            ExpertPlan(
                name=name,
                state=state,
                push=_push_action(state, loc, force=force, prune=prune) if sel else "none",
                pull=_pull_action(state, r, force=force, prune=prune) if sel else "none",
                local=loc,
                remote=r,
                synced=s,
                selected=sel,
            )
        )
    return out


def stale_sync_records(
    local: Mapping[str, str], remote: Mapping[str, str], synced: Mapping[str, str]
) -> list[str]:
    """Sync records of experts that exist on neither side any more (safe to forget)."""
    return sorted(n for n in synced if n not in local and n not in remote)


def matches(entry: Expert, query: ExpertQuery) -> bool:
    """Does an expert record (a manifest's or the library's) match a catalog query (same semantics as
    ``libstore ls``)?"""
    if not query.matches_name(entry.name):
        return False
    if query.kinds and entry.kind not in query.kinds:
        return False
    if query.bases and entry.base_model not in query.bases:
        return False
    if query.tags and not set(entry.tags) & set(query.tags):
        return False
    if query.tasks and not set(entry.tasks) & set(query.tasks):
        return False
    if query.clusters:
        if entry.cluster is None:
            return False
        cname = entry.cluster.rpartition(":")[0]
        if not any(c in (cname, entry.cluster) for c in query.clusters):
            return False
    return True
