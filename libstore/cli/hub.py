"""``libstore remote|push|pull|status|import-hub|import-mttl``: sync with the Hugging Face Hub.

Thin commands: parse, call one ``Library`` method, print its report. The token comes from
``--token``, else ``$HF_TOKEN``, else the ``hf auth login`` token, and is never printed.
"""

from __future__ import annotations

from typing import Any

import click

from libstore.cli.app import State
from libstore.cli.options import option_kwargs
from libstore.cli.output import echo_json, echo_table, human_bytes, json_option
from libstore.types import EXPERT_KINDS

TOKEN_HELP = "Hub token (default: $HF_TOKEN, else the `hf auth login` token). Never printed."


def _token_option(fn: Any) -> Any:
    return click.option("--token", metavar="TOKEN", default=None, help=TOKEN_HELP)(fn)


def _short(commit: str | None) -> str:
    return commit[:12] if commit else "-"


# --- remote --------------------------------------------------------------------------------------


@click.group()
def remote() -> None:
    """Hub repos this library pushes to and pulls from.

    \b
    Example:
      libstore remote add origin my-org/phi3-experts --private
      libstore remote ls
    """


@remote.command("add")
@click.argument("name")
@click.argument("repo_id")
@click.option("--revision", default="main", show_default=True, help="Branch to push to and pull from.")
@click.option("--private", is_flag=True, help="Create the repo private if push has to create it.")
@click.pass_obj
def remote_add(state: State, name: str, repo_id: str, revision: str, private: bool) -> None:
    """Add remote NAME for the Hub model repo REPO_ID (nothing is sent until push).

    \b
    Example:
      libstore remote add origin my-org/phi3-experts --revision main --private
    """
    r = state.lib.add_remote(name, repo_id, revision=revision, private=private)
    click.echo(f"Added remote {r.name} -> {r.repo_id}@{r.revision}{' (private)' if r.private else ''}")


@remote.command("ls")
@json_option
@click.pass_obj
def remote_ls(state: State, as_json: bool) -> None:
    """List remotes with their last synced commit.

    \b
    Example:
      libstore remote ls --json
    """
    rows = state.lib.remotes()
    if as_json:
        echo_json(rows)
        return
    echo_table(
        ["name", "repo", "branch", "private", "last commit", "synced experts", "last sync"],
        [
            [
                r.name,
                r.repo_id,
                r.revision,
                "yes" if r.private else "no",
                _short(r.last_commit),
                r.synced,
                r.last_synced_at.isoformat(timespec="seconds") if r.last_synced_at else "never",
            ]
            for r in rows
        ],
    )


@remote.command("rm")
@click.argument("name")
@click.pass_obj
def remote_rm(state: State, name: str) -> None:
    """Forget remote NAME and its sync records (the Hub repo is left as it is).

    \b
    Example:
      libstore remote rm origin
    """
    state.lib.remove_remote(name)
    click.echo(f"Removed remote {name}")


# --- push / pull / status ------------------------------------------------------------------------


@click.command()
@click.argument("remote_name", metavar="[REMOTE]", required=False)
@click.option("--experts", metavar="QUERY", help="Push only the experts matching QUERY (e.g. 'tag=v1').")
@click.option("-m", "--message", help="Commit message.")
@click.option("--tag", help="Tag the pushed commit (e.g. v1).")
@click.option("--force", is_flag=True, help="Upload this library's version of experts that conflict.")
@click.option(
    "--prune", is_flag=True, help="Delete on the remote the experts deleted here since the last sync."
)
@_token_option
@json_option
@click.pass_obj
def push(state: State, /, remote_name: str | None, as_json: bool, **kw: Any) -> None:
    """Upload what changed since the last sync to REMOTE (default: origin).

    Only changed experts' files and the manifest travel; one commit (bounded batches, manifest last,
    for big pushes). Refused if the remote moved since the last sync: pull first.

    \b
    Example:
      libstore push origin -m "add arc experts" --tag v1
      libstore push --experts 'tag=v2'
    """
    from libstore.ops.push import PushOptions

    r = state.lib.push(remote_name, **option_kwargs(PushOptions, kw))
    if as_json:
        echo_json(r)
        return
    if not r.changed:
        click.echo(f"Nothing to push: {r.repo_id}@{r.branch} is up to date (at {_short(r.commit)})")
    else:
        what = f"{len(r.uploaded)} expert(s) uploaded" + (f", {len(r.deleted)} deleted" if r.deleted else "")
        click.echo(
            f"Pushed to {r.repo_id}@{r.branch}: {what}; {r.files_uploaded} file(s), "
            f"{human_bytes(r.bytes_uploaded)} in {r.commits} commit(s) -> {_short(r.commit)}"
        )
    if r.tag:
        click.echo(f"Tagged {_short(r.commit)} as {r.tag}")
    waiting = [p.name for p in r.experts if p.state == "remote_changed"]
    if waiting:
        click.echo(
            f"{len(waiting)} expert(s) changed on the remote are not here yet: libstore pull", err=True
        )


@click.command()
@click.argument("remote_name", metavar="[REMOTE]", required=False)
@click.option("--revision", help="Branch, tag or commit id to pull (default: the remote's branch).")
@click.option("--experts", metavar="QUERY", help="Pull only the remote experts matching QUERY.")
@click.option("--force", is_flag=True, help="Take the remote's version of experts that conflict.")
@click.option(
    "--prune", is_flag=True, help="Remove here the experts deleted on the remote since the last sync."
)
@_token_option
@json_option
@click.pass_obj
def pull(state: State, /, remote_name: str | None, as_json: bool, **kw: Any) -> None:
    """Download what is missing or changed from REMOTE (default: origin), hash-checked, applied at once.

    \b
    Example:
      libstore pull origin
      libstore pull origin --revision v1 --experts 'kind=task'
    """
    from libstore.ops.pull import PullOptions

    r = state.lib.pull(remote_name, **option_kwargs(PullOptions, kw))
    if as_json:
        echo_json(r)
        return
    parts = [f"{len(r.added)} added", f"{len(r.updated)} updated"]
    if r.removed:
        parts.append(f"{len(r.removed)} removed")
    click.echo(
        f"Pulled {r.repo_id}@{r.revision} ({_short(r.commit)}): {', '.join(parts)}; "
        f"{r.files_downloaded} file(s) downloaded ({human_bytes(r.bytes_downloaded)}), "
        f"{r.files_reused} already here" + (f"; {r.prototypes} prototype set(s)" if r.prototypes else "")
    )
    if r.clusterings_skipped:
        click.echo(
            f"Kept local clusterings that differ from the remote's: {', '.join(r.clusterings_skipped)}",
            err=True,
        )
    if r.conflicts:
        click.echo(
            f"CONFLICT: {len(r.conflicts)} expert(s) changed both here and on the remote were left "
            f"alone: {', '.join(r.conflicts)}. Take theirs with --force, or push --force to keep "
            f"yours.",
            err=True,
        )


@click.command("status")
@click.argument("remote_name", metavar="[REMOTE]", required=False)
@click.option("--all", "show_all", is_flag=True, help="Also list experts that are in sync.")
@_token_option
@json_option
@click.pass_obj
def status_cmd(state: State, /, remote_name: str | None, show_all: bool, as_json: bool, **kw: Any) -> None:
    """Per expert: local only, remote only, in sync, changed, conflict; and what push/pull would do.

    \b
    Example:
      libstore status origin
      libstore status --json
    """
    from libstore.ops.sync import StatusOptions

    r = state.lib.status(remote_name, **option_kwargs(StatusOptions, kw))
    if as_json:
        echo_json(r)
        return
    rem = r.remote
    click.echo(
        f"remote {rem.name}: {rem.repo_id}@{rem.revision}, head {_short(r.head)}, "
        f"last synced {_short(rem.last_commit)}"
    )
    if r.remote_moved:
        click.echo("The remote moved since the last sync: push is refused until you pull.")
    rows = [p for p in r.experts if show_all or p.state != "in_sync"]
    if rows:
        echo_table(
            ["expert", "state", "push would", "pull would"], [[p.name, p.text, p.push, p.pull] for p in rows]
        )
    text = {p.state: p.text for p in r.experts}
    summary = ", ".join(f"{n} {text.get(k, k)}" for k, n in sorted(r.counts.items())) or "no experts"
    click.echo(summary)


# --- imports -------------------------------------------------------------------------------------


@click.command("import-hub")
@click.argument("repo_id")
@click.option("--subfolder", metavar="PATH", help="Folder of the repo that holds the adapter(s).")
@click.option("--revision", help="Branch, tag or commit id (default: main).")
@click.option("--name", help="Expert name (default: the subfolder's or repo's name).")
@click.option(
    "--all",
    "every",
    is_flag=True,
    help="Import every adapter folder at or below the subfolder, named by its path (not with --name).",
)
@click.option("--kind", type=click.Choice(EXPERT_KINDS), default="task", show_default=True)
@click.option("--base", help="Base model name (default: the only registered one).")
@click.option("--task", "tasks", multiple=True, help="Task the expert was trained on (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Tag (repeatable).")
@click.option(
    "--allow-base-mismatch",
    is_flag=True,
    help="Accept an adapter whose config names another base model (shapes must still fit).",
)
@_token_option
@json_option
@click.pass_obj
def import_hub(
    state: State, /, repo_id: str, as_json: bool, name: str | None, every: bool, **kw: Any
) -> None:
    """Import a PEFT adapter from Hub repo REPO_ID (``user/repo``, or ``user/repo/sub/folder`` like
    --subfolder), validated like `libstore add`.

    With --all, every adapter folder at or below it, all or nothing (a collection trained with
    PEFT/TRL, one folder per adapter or checkpoint), each named by its path below the subfolder
    ('/' becomes '.', e.g. arc/checkpoint-17 -> arc.checkpoint-17; the one at the subfolder itself
    is named after it).

    \b
    Example:
      libstore import-hub user/some-peft-adapter --kind task --task arc_easy
      libstore import-hub org/adapters/tasks/arc_easy --name arc_easy
      libstore import-hub org/checkpoints --subfolder runs --all
    """
    if every and name is not None:
        raise click.UsageError("--name names one adapter; --all names each by its path")
    if not every:
        e = state.lib.import_hub(repo_id, name=name, **kw)
        if as_json:
            echo_json(e)
        else:
            click.echo(
                f"Imported {e.name} ({e.kind}, rank {e.rank}, {len(e.modules)} modules, "
                f"{human_bytes(e.bytes)}) from {e.source}"
            )
        return
    report = state.lib.import_hub_all(repo_id, **kw)
    if as_json:
        echo_json(report)
        return
    for e in report.added:
        click.echo(f"Imported {e.name} ({e.kind}, rank {e.rank}, {len(e.modules)} modules) from {e.source}")
    for skipped in report.skipped:
        click.echo(f"Skipped {skipped}: already in the library with the same weights")


@click.command("import-mttl")
@click.argument("source", metavar="PATH_OR_REPO")
@click.option("--kind", type=click.Choice(EXPERT_KINDS), default="task", show_default=True)
@click.option("--base", help="Base model name (default: the only registered one).")
@click.option("--tag", "tags", multiple=True, help="Tag every imported expert (repeatable).")
@click.option(
    "--expert",
    "experts",
    multiple=True,
    metavar="NAME",
    help="Import only these experts (repeatable; globs allowed).",
)
@click.option("--revision", help="For a Hub repo: branch, tag or commit id.")
@click.option(
    "--allow-base-mismatch",
    is_flag=True,
    help="Accept experts whose metadata names another base model (shapes must still fit).",
)
@_token_option
@json_option
@click.pass_obj
def import_mttl(state: State, /, source: str, experts: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """Import a library in microsoft/mttl's expert-library format (folder or Hub repo), all or nothing.

    Files are read with torch.load(weights_only=True) only; anything else is refused.

    \b
    Example:
      libstore import-mttl ./mttl-library --tag mttl
      libstore import-mttl sordonia/library-phi_2-v3 --expert 'niv2_*'
    """
    r = state.lib.import_mttl(source, experts=list(experts) or None, **kw)
    if as_json:
        echo_json(r)
        return
    for e in r.added:
        click.echo(f"added    {e.name} (rank {e.rank}, tasks {', '.join(e.tasks) or '-'})")
    for name in r.skipped:
        click.echo(f"skipped  {name} (already in the library)")
    for name, why in r.not_imported:
        click.echo(f"not imported  {name} ({why})")
    click.echo(
        f"{len(r.added)} added, {len(r.skipped)} skipped"
        + (f", {len(r.not_imported)} not imported (not LoRA)" if r.not_imported else "")
    )


COMMANDS = [remote, push, pull, status_cmd, import_hub, import_mttl]
