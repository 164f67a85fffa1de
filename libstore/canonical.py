"""The one canonical JSON encoding, for everything that is hashed: cache keys, derivation keys, record
digests. Sorted keys, no whitespace, ASCII, no NaN/Infinity: the same value gives the same bytes in
every process and on every machine. No dependencies: safe to import from any layer."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    """``obj`` as canonical JSON text (raises ``ValueError`` for NaN/Infinity)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_sha256(obj: Any) -> str:
    """sha256 hex digest of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()
