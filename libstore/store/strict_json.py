"""Strict JSON at libstore's boundaries: for files libstore did not write, and for JSON-like values
given through the API.

Refused: duplicate keys (two readers could disagree about one file: the last one wins in Python,
the first in others), NaN/Infinity (not JSON), and lone surrogates (``"\\ud800"``: a JSON escape
that decodes to a Python string no UTF-8 encoder accepts, so it would be stored and then crash
every later push, pull or export with ``UnicodeEncodeError``). :func:`strict_loads` raises
``ValueError`` (callers turn it into their own error with context); :func:`check_json_value`
raises :class:`ValidationError` naming the field.
"""

from __future__ import annotations

import json
import math
from typing import Any

from libstore.errors import ValidationError

#: Deepest nesting :func:`check_json_value` accepts (``json`` itself fails near 1,000 levels).
MAX_DEPTH = 200


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate (U+D800-U+DFFF) in ``text``, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _surrogate_error(text: str, at: int, where: str) -> str:
    return (
        f"{where} holds the lone surrogate U+{ord(text[at]):04X} at character {at} of "
        f"{text[max(0, at - 20) : at]!r}...; that is not Unicode text (a broken \\ud800-style escape) "
        f"and cannot be encoded as UTF-8 — fix the text"
    )


def _walk(value: Any, where: str, *, strict_types: bool) -> None:
    """Check every string of a JSON-like value (iteratively: no recursion limit to hit)."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        v, at, depth = stack.pop()
        if isinstance(v, str):
            bad = lone_surrogate(v)
            if bad is not None:
                raise ValueError(_surrogate_error(v, bad, at))
        elif isinstance(v, dict):
            if depth >= MAX_DEPTH:
                raise ValueError(f"{at} is nested more than {MAX_DEPTH} levels deep")
            for k, item in v.items():
                if not isinstance(k, str):
                    raise ValueError(f"{at} has the key {k!r}; JSON object keys must be strings")
                bad = lone_surrogate(k)
                if bad is not None:
                    raise ValueError(_surrogate_error(k, bad, f"a key of {at}"))
                stack.append((item, f"{at}[{k!r}]", depth + 1))
        elif isinstance(v, list | tuple):
            if depth >= MAX_DEPTH:
                raise ValueError(f"{at} is nested more than {MAX_DEPTH} levels deep")
            stack.extend((item, f"{at}[{i}]", depth + 1) for i, item in enumerate(v))
        elif not strict_types:
            continue
        elif isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{at} is {v}, which is not valid JSON; use null or a finite number")
        elif v is not None and not isinstance(v, bool | int | float):
            raise ValueError(
                f"{at} is a {type(v).__name__}; only JSON values are allowed (objects with string "
                f"keys, lists, strings, finite numbers, true/false, null)"
            )


def strict_loads(text: str) -> Any:
    """``json.loads`` refusing duplicate keys, NaN/Infinity and lone surrogates (``ValueError``)."""
    value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    if "\\u" in text or lone_surrogate(text) is not None:  # no escape, no surrogate: nothing to walk
        _walk(value, "the JSON", strict_types=False)
    return value


def check_json_value(value: Any, what: str) -> None:
    """Refuse a value given through the API (``metadata=``, labels) that JSON cannot hold faithfully.

    Raises :class:`ValidationError` with ``field=what``: non-string keys, NaN/Infinity, objects
    that are not JSON values, lone surrogates in any string or key, absurd nesting.
    """
    try:
        _walk(value, what, strict_types=True)
    except ValueError as e:
        raise ValidationError(f"{e}; nothing was changed", field=what) from None
