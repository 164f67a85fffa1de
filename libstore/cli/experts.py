"""Commands on the library and its experts: init, add, import-dir, ls, show, data, export, rm, rename,
tag."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from libstore.cli.app import State
from libstore.cli.output import (
    echo_json,
    echo_jsonl,
    echo_table,
    echo_table_stream,
    human_bytes,
    json_option,
)
from libstore.types import EXPERT_KINDS, EXPERT_SORTS, Expert, ExpertSummary

KIND = click.Choice(EXPERT_KINDS)


@click.command()
@click.argument("path", required=False)
@click.option(
    "--blob-store",
    metavar="URL",
    help="Keep blobs in this object store (s3://BUCKET/PREFIX), recorded in the catalog for the team; "
    "endpoint and credentials come from the AWS environment (AWS_ENDPOINT_URL, AWS_PROFILE, ...).",
)
@click.pass_obj
def init(state: State, path: str | None, blob_store: str | None) -> None:
    """Create a library: PATH/catalog.db (SQLite, unless --db) and PATH/blobs/.

    On a catalog that names an object store (a team library), the new library uses it.

    \b
    Example:
      libstore init ./mylib
      libstore --db postgresql+psycopg://me@db/team init ./mylib --blob-store s3://team-bucket/lib
    """
    from libstore.library import Library

    lib = Library.init(path or state.library_path, db_url=state.db_url, blob_store=blob_store)
    where = f" (blobs in {lib.context.blobs.location})" if lib.context.blobs.shared else ""
    click.echo(f"Initialised library at {lib.path}{where}")
    lib.close()


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--name", help="Expert name (default: the folder name).")
@click.option("--kind", type=KIND, default="task", show_default=True)
@click.option("--base", help="Base model name (default: the only registered one).")
@click.option("--task", "tasks", multiple=True, help="Task the expert was trained on (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Tag (repeatable).")
@click.option("--cluster", help="For --kind cluster: the cluster it was trained on, CLUSTERING:INDEX.")
@click.option(
    "--allow-base-mismatch",
    is_flag=True,
    help="Accept an adapter whose config names another base model (shapes must still fit).",
)
@click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf weights.")
@json_option
@click.pass_obj
def add(state: State, /, folder: str, as_json: bool, **kw: Any) -> None:
    """Import one PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

    \b
    Example:
      libstore add ./adapters/arc_easy --name arc_easy --kind task --task arc_easy --tag v1
    """
    expert = state.lib.add(folder, **kw)
    if as_json:
        echo_json(expert)
    else:
        click.echo(
            f"Added {expert.name} ({expert.kind}, rank {expert.rank}, "
            f"{len(expert.modules)} modules, {human_bytes(expert.bytes)})"
        )


@click.command("import-dir")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--kind", type=KIND, default="task", show_default=True)
@click.option("--base", help="Base model name (default: the only registered one).")
@click.option("--tag", "tags", multiple=True, help="Tag every imported expert (repeatable).")
@click.option("--task-from-name", is_flag=True, help="Record each folder name as the expert's task.")
@click.option(
    "--allow-base-mismatch",
    is_flag=True,
    help="Accept adapters whose config names another base model (shapes must still fit).",
)
@click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf weights.")
@json_option
@click.pass_obj
def import_dir(state: State, /, root: str, as_json: bool, **kw: Any) -> None:
    """Import every PEFT folder below ROOT, named after its folder, all or nothing.

    \b
    Example:
      libstore import-dir ./adapters --kind task --task-from-name
    """
    report = state.lib.import_dir(root, **kw)
    if as_json:
        echo_json(report)
        return
    for e in report.added:
        click.echo(f"added    {e.name}")
    for name in report.skipped:
        click.echo(f"skipped  {name} (already in the library)")
    click.echo(f"{len(report.added)} added, {len(report.skipped)} skipped")


def _query(query: tuple[str, ...], **fields: tuple[str, ...]) -> str:
    terms = list(query)
    for key, values in fields.items():
        terms += [f"{key}={v}" for v in values]
    return " ".join(terms)


@click.command("ls")
@click.argument("query", nargs=-1)
@click.option("--kind", "kinds", multiple=True, type=KIND)
@click.option("--base", "bases", multiple=True)
@click.option("--tag", "tags", multiple=True)
@click.option("--task", "tasks", multiple=True)
@click.option("--sort", type=click.Choice(EXPERT_SORTS), default="name", show_default=True)
@click.option("--desc", "descending", is_flag=True, help="Largest / newest / last first.")
@click.option("--limit", type=click.IntRange(min=0), help="Show at most this many experts.")
@click.option("--offset", type=click.IntRange(min=0), default=0, help="Skip this many first.")
@click.option("--full", is_flag=True, help="Whole records: module shapes, files, metadata, lineage.")
@json_option
@click.option("--jsonl", is_flag=True, help="One JSON object per line, streamed (for pipelines).")
@click.pass_obj
def ls(
    state: State,
    /,
    query: tuple[str, ...],
    kinds: tuple[str, ...],
    bases: tuple[str, ...],
    tags: tuple[str, ...],
    tasks: tuple[str, ...],
    full: bool,
    as_json: bool,
    jsonl: bool,
    **page: Any,
) -> None:
    """List experts, optionally filtered by a QUERY such as 'kind=task tag=v1' or 'arc_*'.

    A compact summary per expert; module shapes are in `show NAME` or `ls --full`.

    \b
    Example:
      libstore ls --kind task --tag v1
      libstore ls 'kind=residual base=phi3' --json
      libstore ls --sort created --desc --limit 20
      libstore ls --jsonl | jq -r .name
    """
    q = _query(query, kind=kinds, base=bases, tag=tags, task=tasks)
    experts: Sequence[Expert | ExpertSummary] = (
        state.reader().experts(q, **page) if full else state.reader().summaries(q, **page)
    )
    if jsonl:
        echo_jsonl(experts)
    elif as_json:
        echo_json(experts)
    elif full:
        echo_table_stream(
            [*_COLUMNS, "modules"], ([*_row(e), len(e.modules)] for e in experts if isinstance(e, Expert))
        )
    else:
        echo_table_stream(_COLUMNS, (_row(e) for e in experts))


_COLUMNS = ["name", "kind", "base", "rank", "tasks", "tags", "size", "sha256"]


def _row(e: Expert | ExpertSummary) -> list[Any]:
    return [
        e.name,
        e.kind,
        e.base_model,
        e.rank,
        ",".join(e.tasks),
        ",".join(e.tags),
        human_bytes(e.bytes),
        e.sha256[:12],
    ]


@click.command()
@click.argument("name")
@json_option
@click.pass_obj
def show(state: State, name: str, as_json: bool) -> None:
    """Everything recorded about one expert: shapes, hashes, tasks, tags, lineage."""
    e = state.reader().get(name)
    if as_json:
        echo_json(e)
        return
    rows: list[tuple[str, Any]] = [
        ("name", e.name),
        ("kind", e.kind),
        ("base model", e.base_model),
        ("rank", e.rank),
        ("alpha", e.alpha),
        ("rslora", e.use_rslora),
        ("scale", f"{e.scale:g}"),
        ("dtype", e.dtype),
        ("target modules", ", ".join(e.target_modules)),
        ("LoRA modules", len(e.modules)),
        ("sha256", e.sha256),
        ("size", human_bytes(e.bytes)),
        ("tasks", ", ".join(e.tasks) or "-"),
        ("tags", ", ".join(e.tags) or "-"),
        ("cluster", e.cluster or "-"),
        ("source", e.source or "-"),
        ("created", e.created_at.isoformat() if e.created_at else "-"),
        ("attached data", ", ".join(e.data_types) or "-"),
    ]
    if e.lineage is not None:
        rows.append(("derived by", f"{e.lineage.method} v{e.lineage.method_version} {e.lineage.params}"))
        rows += [(f"  {p.role}", f"{p.name} ({p.sha256[:12]})") for p in e.lineage.parents]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k.ljust(width)}  {v}")
    click.echo("\nmodule shapes (in -> out, rank):")
    for m, s in sorted(e.modules.items()):
        click.echo(f"  {m}: {s.in_features} -> {s.out_features}, r={s.rank}")


@click.command()
@click.argument("name")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder.")
@click.pass_obj
def export(state: State, name: str, dest: str, overwrite: bool) -> None:
    """Write expert NAME as a PEFT folder at DEST (PeftModel.from_pretrained loads it)."""
    path = state.lib.export(name, dest, overwrite=overwrite)
    click.echo(f"Exported {name} to {path}")


@click.command("data")
@click.argument("name")
@click.argument("data_type")
@click.option(
    "--out", type=click.Path(dir_okay=False), help="Also write its tensors to this .safetensors file."
)
@json_option
@click.pass_obj
def data_cmd(state: State, name: str, data_type: str, out: str | None, as_json: bool) -> None:
    """Show the data of type DATA_TYPE attached to expert NAME (mttl's auxiliary data; `libstore
    show NAME` lists the types): its config, plain values and tensors.

    Example: libstore data arc_easy embeddings --out arc_easy.embeddings.safetensors
    """
    d = state.lib.expert_data(name, data_type)
    if out is not None:
        from safetensors.torch import save_file

        save_file(d.tensors, out, metadata={"data_type": d.data_type, "source": d.source})
    tensors = {
        k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "numpy": k in d.arrays}
        for k, t in sorted(d.tensors.items())
    }
    if as_json:
        echo_json(
            {
                "data_type": d.data_type,
                "source": d.source,
                "config": d.config,
                "values": d.values,
                "tensors": tensors,
            }
        )
        return
    click.echo(f"{d.data_type} (from {d.source}), config {d.config}")
    rows = [
        [k, "numpy array" if t["numpy"] else "tensor", f"{t['dtype']} {t['shape']}"]
        for k, t in tensors.items()
    ]
    rows += [[k, "value", v] for k, v in sorted(d.values.items())]
    echo_table(["key", "kind", "value"], rows)
    if out is not None:
        click.echo(f"Wrote {len(d.tensors)} tensors to {out}")


@click.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.pass_obj
def rm(state: State, names: tuple[str, ...]) -> None:
    """Remove experts from the catalog (blobs go at the next `libstore gc`)."""
    for name in names:
        state.lib.remove(name)
        click.echo(f"Removed {name}")


@click.command()
@click.argument("old")
@click.argument("new")
@click.pass_obj
def rename(state: State, old: str, new: str) -> None:
    """Rename expert OLD to NEW."""
    state.lib.rename(old, new)
    click.echo(f"Renamed {old} to {new}")


@click.command()
@click.argument("query")
@click.argument("tags", nargs=-1, required=True)
@click.pass_obj
def tag(state: State, query: str, tags: tuple[str, ...]) -> None:
    """Add TAGS to the experts matching QUERY (a name or a query such as 'kind=task')."""
    names = state.lib.tag(query, *tags)
    click.echo(f"Tagged {len(names)} expert(s): {', '.join(names)}")


@click.command()
@click.argument("query")
@click.argument("tags", nargs=-1, required=True)
@click.pass_obj
def untag(state: State, query: str, tags: tuple[str, ...]) -> None:
    """Remove TAGS from the experts matching QUERY."""
    names = state.lib.untag(query, *tags)
    click.echo(f"Untagged {len(names)} expert(s): {', '.join(names)}")


@click.command("tags")
@json_option
@click.pass_obj
def tags_cmd(state: State, as_json: bool) -> None:
    """List tags and how many experts carry each."""
    rows = state.lib.tags()
    if as_json:
        echo_json([{"tag": t, "experts": n} for t, n in rows])
    else:
        echo_table(["tag", "experts"], rows)


COMMANDS = [init, add, import_dir, ls, show, data_cmd, export, rm, rename, tag, untag, tags_cmd]
