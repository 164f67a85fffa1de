"""The catalog query language shared by the CLI and the Python API.

A query is whitespace-separated ``field=value`` terms; fields are AND-ed, repeated fields and
comma-separated values are OR-ed; a bare word is a name. Names match case-sensitively; ``*`` matches
any run of characters and ``?`` one character (``libstore.types.glob_match``: the same on every
backend and in push/pull selection)::

    "kind=task tag=v1"          task experts tagged v1
    "kind=task,cluster base=phi3"
    "arc_* tag=v2"              experts whose name starts with arc_ and tagged v2
    ""  or  "all"               everything
"""

from __future__ import annotations

from libstore.errors import QueryError, ValidationError
from libstore.types import EXPERT_SORTS, ExpertQuery

_FIELDS = {
    "name": "names",
    "kind": "kinds",
    "base": "bases",
    "tag": "tags",
    "task": "tasks",
    "cluster": "clusters",
}


def parse_query(text: str | ExpertQuery | None) -> ExpertQuery:
    """Parse a query string; an ``ExpertQuery`` passes through unchanged. :class:`QueryError` (with
    ``query`` set to the whole text) for anything malformed."""
    if isinstance(text, ExpertQuery):
        return text
    values: dict[str, list[str]] = {attr: [] for attr in _FIELDS.values()}
    for term in (text or "").split():
        if term == "all":
            continue
        key, sep, raw = term.partition("=")
        if not sep:
            key, raw = "name", term
        attr = _FIELDS.get(key)
        if attr is None:
            raise QueryError(
                f"unknown query field {key!r} in {text!r}; use {', '.join(sorted(_FIELDS))} "
                f"(e.g. 'kind=task tag=v1')",
                query=text,
            )
        items = [v for v in raw.split(",") if v]
        if not items:
            raise QueryError(f"empty value for {key!r} in {text!r}", query=text)
        values[attr].extend(items)
    try:
        return ExpertQuery(**{attr: tuple(dict.fromkeys(v)) for attr, v in values.items()})
    except QueryError as e:
        raise QueryError(f"{e.message} (in the query {text!r})", query=text) from None


def format_query(query: ExpertQuery) -> str:
    """The canonical string of a query (stable: used in records and cache keys)."""
    parts = []
    for key, attr in _FIELDS.items():
        vals = getattr(query, attr)
        if vals:
            parts.append(f"{key}={','.join(vals)}")
    return " ".join(parts) or "all"


def parse_listing(query: str | ExpertQuery | None, sort: str, limit: int | None, offset: int) -> ExpertQuery:
    """The query of a listing, parsed, with its sort, limit and offset checked (before any statement
    runs): what every reader of expert listings (library and snapshot) starts with."""
    parsed = parse_query(query)
    if sort not in EXPERT_SORTS:
        raise ValidationError(
            f"unknown sort {sort!r}; sort by one of {', '.join(EXPERT_SORTS)}", field="sort"
        )
    if limit is not None and limit < 0:
        raise ValidationError(f"limit must be 0 or more, got {limit}", field="limit")
    if offset < 0:
        raise ValidationError(f"offset must be 0 or more, got {offset}", field="offset")
    return parsed
