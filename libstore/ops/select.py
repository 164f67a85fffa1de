"""The one way an operation turns what the caller named into experts.

Every operation that takes "some experts" (prototypes, similarity, clustering, GenKnowSub, merge,
routed models) accepts a :data:`Target` and calls :func:`resolve_experts`: a query string or
:class:`ExpertQuery` selects by the catalog (in name order), a list names experts exactly (in the
order given), an :class:`Expert` stands for itself. Nothing matched, or a name asked for explicitly
that does not exist, is a :class:`NotFoundError` whose ``name`` is what was asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

from libstore.catalog import derivations as deriv
from libstore.catalog import repo
from libstore.errors import NotFoundError
from libstore.ops.context import Context
from libstore.ops.query import format_query, parse_query
from libstore.store.adapter import validate_name
from libstore.types import Expert, ExpertQuery

Target = str | ExpertQuery | Expert | Sequence[str | Expert] | None
"""A query (``"kind=task tag=v1"``; ``None`` or ``""``: every expert), an ``ExpertQuery``, an
``Expert``, or a list of names and ``Expert``\\ s."""


def resolve_experts(ctx: Context, target: Target, *, what: str = "expert") -> list[Expert]:
    """The experts ``target`` names, without lineage (one catalog read).

    ``what`` says in errors what the experts are for (``"general expert"``). Raises
    :class:`NotFoundError` (``what="expert"``, ``name`` = the query or the missing name) when a query
    matches nothing or a name given explicitly does not exist.
    """
    if isinstance(target, Expert):
        return [target]
    if target is None or isinstance(target, str | ExpertQuery):
        q = parse_query(target)
        shown = target if isinstance(target, str) else format_query(q)
        with ctx.catalog.read() as s:
            experts = repo.find_experts(s, q, with_lineage=False)
        if not experts:
            raise NotFoundError(
                f"no {what} matches {shown!r}; list them with: libstore ls", what="expert", name=shown
            )
        found = {e.name for e in experts}
        missing = [n for n in q.names if "*" not in n and "?" not in n and n not in found]
        if missing:  # a name asked for explicitly must not drop out silently
            raise NotFoundError(
                f"no {what} named {missing[0]!r} matches {shown!r}; list them with: libstore ls",
                what="expert",
                name=missing[0],
            )
        return experts
    items = list(target)
    names = [validate_name(i) for i in items if not isinstance(i, Expert)]
    with ctx.catalog.read() as s:
        named = deriv.experts_named(s, names)
    for n in names:
        if n not in named:
            raise NotFoundError(f"no {what} named {n!r}; list them with: libstore ls", what="expert", name=n)
    return [i if isinstance(i, Expert) else named[i] for i in items]
