"""``library.json``: the marker that makes a folder a libstore library, read and checked.

Opening reads and checks it first and never writes it, so a library written by a newer libstore, or
a folder that only looks like one, is refused before its catalog is touched. It lives here, apart
from opening the catalog, because ``ls``/``show`` read it before deciding how to read the catalog.
"""

from __future__ import annotations

import json
from pathlib import Path

from libstore.errors import LibraryNotFoundError, SchemaError, StorageError

MARKER = "library.json"
#: The folder layout this libstore writes and reads; a newer one is refused on open.
FORMAT_VERSION = 1
_MARKER_MAX_BYTES = 1 << 20


def read_marker(path: Path) -> dict[str, object]:
    """The checked contents of ``path/library.json``.

    :class:`LibraryNotFoundError` if it is missing or is not a libstore marker, :class:`SchemaError`
    if a newer libstore wrote the library, :class:`StorageError` if it cannot be read.
    """
    marker = path / MARKER
    try:
        with open(marker, "rb") as f:
            raw = f.read(_MARKER_MAX_BYTES + 1)
    except FileNotFoundError:
        raise LibraryNotFoundError(
            f"no libstore library at {path}; create one with: libstore init {path}", path=str(path)
        ) from None
    except OSError as e:
        raise StorageError(
            f"cannot read {marker} ({e.strerror}); check that the library folder is readable",
            location=str(path),
        ) from None
    data: object = None
    try:
        if len(raw) <= _MARKER_MAX_BYTES:
            data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    fmt = data.get("format") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise LibraryNotFoundError(
            f"{marker} is not a libstore library marker (expected a JSON object with an integer "
            f'"format", e.g. {{"format": {FORMAT_VERSION}}}); if {path} is a libstore library, restore '
            f"that file, otherwise point -L/--library at the library folder",
            path=str(path),
        )
    if fmt > FORMAT_VERSION:
        raise SchemaError(
            f"the library at {path} has format {fmt}, written by a newer libstore (this one reads "
            f"format {FORMAT_VERSION}); upgrade libstore: pip install -U libstore",
            revision=str(fmt),
        )
    return data
