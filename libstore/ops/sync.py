"""Hub sync of whole libraries: remotes and status (push: ``ops.push``, pull: ``ops.pull``).

**Push** builds the new manifest from the remote's (at its head) with this library's changed experts
laid over it, uploads only files whose content the remote's head does not already hold (compared by
sha256 for LFS files and git blob id for small ones), and commits everything in one commit on top of
the head it planned against (``parent_commit``). Pushes of more than ``MAX_FILES_PER_COMMIT`` files
go in bounded batches with the manifest (and README) committed last, so a reader never sees a
manifest naming missing files; an interrupted batched push leaves only unreferenced files, and the
next push skips whatever already arrived. If the remote's manifest moved since the last sync, push
refuses (:class:`~libstore.errors.RemoteMovedError`): pull first. A commit whose answer is lost may
still have been applied, so before retrying the head is checked: a commit counts as ours only if the
head holds exactly our content (sha256 / git blob ids). Before the manifest is committed the real
head is read again; if its manifest is not the one the push planned against (someone else pushed in
between), the push refuses rather than write a manifest that drops their experts.

**Pull** reads and strictly validates the manifest at a branch, tag or commit, checks that every
file it names exists in that commit with the stated size (and LFS sha256), downloads only blobs the
store lacks (in parallel, each to a unique temp name inside the library, bounded in size and time),
checks each against its sha256 as it enters the blob store, re-validates each expert's PEFT folder
against the manifest's claims, checks pulled prototypes against the pulled weights, and then applies
everything to the catalog in one transaction. An interrupted pull leaves the catalog as it was; blobs
already stored are not downloaded again by the next pull. Base models a pull registers remember the
remote they came from: their weights are not loaded from the source the remote named unless the user
names the model (``route --base``).

**Status** compares the library, the remote head and the last sync record (see
``libstore.hub.plan``) and says per expert what push and pull would do. Conflicts (an expert
changed on both sides) are reported and never overwritten unless ``force`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from libstore.catalog import remotes as remote_repo
from libstore.errors import ValidationError
from libstore.hub.client import HubClient, check_repo_id
from libstore.hub.plan import ExpertPlan, State, plan
from libstore.ops.context import Context
from libstore.ops.sync_state import head_or_none, local_state, read_remote, temp_dir, why_remote_moved
from libstore.store.adapter import validate_name
from libstore.types import Remote


@dataclass(frozen=True)
class StatusReport:
    """Library vs remote head vs last sync, per expert.

    Attributes:
        remote: the remote record.
        head: the commit the remote branch points at (``None``: repo or branch missing).
        remote_moved: the remote's manifest changed since the last sync (push would refuse).
        experts: per expert: state, and what push and pull would do.
        counts: number of experts per state.
    """

    remote: Remote
    head: str | None
    remote_moved: bool
    experts: tuple[ExpertPlan, ...]
    counts: dict[State, int] = field(default_factory=dict)


# --- remotes -------------------------------------------------------------------------------------


def add_remote(
    ctx: Context, name: str, repo_id: str, *, revision: str = "main", private: bool = False
) -> Remote:
    """Record a remote (no network): ``name`` -> Hub model repo ``repo_id`` on branch ``revision``."""
    validate_name(name)
    check_repo_id(repo_id)
    _check_branch(revision)
    with ctx.catalog.write() as s:
        return remote_repo.add_remote(s, name=name, repo_id=repo_id, revision=revision, private=private)


def remotes(ctx: Context) -> list[Remote]:
    """Every remote with its last synced commit, by name."""
    with ctx.catalog.read() as s:
        return remote_repo.list_remotes(s)


def remove_remote(ctx: Context, name: str) -> None:
    """Forget a remote and its sync records (the Hub repo is not touched)."""
    with ctx.catalog.write() as s:
        remote_repo.remove_remote(s, name)


def _check_branch(revision: str) -> None:
    if not revision or any(c.isspace() for c in revision) or ".." in revision or revision.startswith("/"):
        raise ValidationError(f"{revision!r} is not a branch name", field="revision")


# --- status --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusOptions:
    """The options of ``libstore status`` and ``Library.status``: the Hub token (never shown)."""

    token: str | None = field(default=None, repr=False)


def status(ctx: Context, remote: str | None = None, *, options: StatusOptions) -> StatusReport:
    """Per expert: local only, remote only, in sync, changed (which side), conflict; and what
    push and pull would do. Reads the remote head's manifest; changes nothing."""
    token = options.token
    with ctx.catalog.read() as s:
        rem = remote_repo.resolve_remote(s, remote)
        synced = remote_repo.sync_state(s, rem.name)
        local = local_state(s)
    client = HubClient(token=token)
    with temp_dir(ctx, "status") as tmp:
        head = head_or_none(client, rem)
        view = read_remote(client, rem.repo_id, head, tmp)
        moved = why_remote_moved(client, rem, view) is not None
    remote_d = view.manifest.digests() if view.manifest else {}
    plans = plan(local.digests(), remote_d, synced)
    counts: dict[State, int] = {}
    for p in plans:
        counts[p.state] = counts.get(p.state, 0) + 1
    return StatusReport(remote=rem, head=head, remote_moved=moved, experts=tuple(plans), counts=counts)
