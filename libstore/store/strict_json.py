"""Strict JSON for files libstore did not write: duplicate keys and NaN/Infinity are refused.

A duplicate key lets two readers disagree about one file (the last one wins in Python, the first in
others); NaN is not JSON. Raises ``ValueError``; callers turn it into their own error with context.
"""

from __future__ import annotations

import json
from typing import Any


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def strict_loads(text: str) -> Any:
    """``json.loads`` refusing duplicate keys and NaN/Infinity (``ValueError``)."""
    return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
