"""What every part of ``Library`` shares: the open context, and the argument types of selections."""

from __future__ import annotations

import os
from collections.abc import Iterable

from libstore.ops.context import Context
from libstore.types import ExpertQuery

PathLike = str | os.PathLike[str]
#: What selects experts: a query string (``"kind=task tag=v1"``), a parsed query, or names.
Selection = str | ExpertQuery | Iterable[str]


def selection(target: Selection) -> str | ExpertQuery | list[str]:
    """A selection the operations take: queries as they are, an iterable of names as a list."""
    return target if isinstance(target, str | ExpertQuery) else list(target)


class Facade:
    """The state a ``Library`` part works on: the open catalog and blob store."""

    _ctx: Context
