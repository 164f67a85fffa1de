"""Output helpers shared by commands: ``--json`` or a readable table."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import PurePath
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
#: Rows per write when streaming (and the rows a streamed table sizes its columns from).
_CHUNK = 1000


def json_option(fn: F) -> F:
    """The ``--json`` flag every listing and show command has."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)


_PLAIN = (str, int, float, bool)
#: field names per dataclass type (``dataclasses.fields`` per object is most of a listing's cost)
_FIELDS: dict[type, tuple[str, ...]] = {}


def to_jsonable(obj: Any) -> Any:
    kind = type(obj)
    if obj is None or kind in _PLAIN:
        return obj
    names = _FIELDS.get(kind)
    if names is None and dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = _FIELDS[kind] = tuple(f.name for f in dataclasses.fields(obj))
    if names is not None:
        return {n: to_jsonable(getattr(obj, n)) for n in names}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dt.datetime):
        return obj.isoformat()
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


def echo_json(obj: Any) -> None:
    """``obj`` as JSON: indented, except that a list has one item per line (written in chunks as
    they come; Python's indenting encoder is pure Python and would make a large listing slow)."""
    if not isinstance(obj, list | tuple):
        click.echo(json.dumps(to_jsonable(obj), indent=2, sort_keys=False))
        return
    out = sys.stdout
    out.write("[")
    for i in range(0, len(obj), _CHUNK):
        sep = "\n  " if i == 0 else ",\n  "
        out.write(sep + ",\n  ".join(json.dumps(to_jsonable(item)) for item in obj[i : i + _CHUNK]))
    out.write("\n]\n" if obj else "]\n")
    out.flush()


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table (no colours, pipes or wrapping: safe to grep)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            click.echo("  ".join("-" * w for w in widths))


def echo_jsonl(items: Iterable[Any]) -> None:
    """One JSON object per line (for pipelines), written in chunks as the items come."""
    out = sys.stdout
    chunk: list[str] = []
    for item in items:
        chunk.append(json.dumps(to_jsonable(item)))
        if len(chunk) == _CHUNK:
            out.write("\n".join(chunk) + "\n")
            chunk = []
    if chunk:
        out.write("\n".join(chunk) + "\n")
    out.flush()


def echo_table_stream(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """:func:`echo_table` that streams: column widths come from the header and the first
    rows, and later rows are written as they come (a wider cell just pushes its line right)."""
    it = iter(rows)
    first = [["" if c is None else str(c) for c in r] for r in itertools.islice(it, _CHUNK)]
    widths = [max([len(h)] + [len(r[i]) for r in first]) for i, h in enumerate(headers)]
    out = sys.stdout

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out.write(line(headers) + "\n" + "  ".join("-" * w for w in widths) + "\n")
    batch = first
    while batch:
        out.write("".join(line(r) + "\n" for r in batch))
        batch = [["" if c is None else str(c) for c in r] for r in itertools.islice(it, _CHUNK)]
    out.flush()


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
