"""Temp entries that writes leave while they run (and after a crash), found and removed by age.

Every module that writes through a temp file or folder names it with a prefix of its own and exports
it; ``libstore verify`` reports what it finds, ``gc`` and ``verify --repair`` remove entries older than
the grace period. A younger entry may be a write in flight. Age decides, never the pid in a name: the
library may be shared by several hosts.

No torch here: the CLI's torch-free commands use this module.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

LeftoverKind = Literal["temp", "tombstone"]


@dataclass(frozen=True)
class Leftover:
    """A temp file or folder of a write in flight or of a crashed one, or a tombstone of a gc.

    Attributes:
        location: where it is (a path here; an object store names its key).
        kind: ``temp`` (what a write stages) or ``tombstone`` (a blob a gc is deleting).
        modified_at: epoch seconds of the newest change in it (a folder in use has recently changed
            entries); for a tombstone, when its blob was last written or claimed.
    """

    location: str
    kind: LeftoverKind
    modified_at: float


def newest_mtime(path: Path) -> float:
    """The newest mtime in a file or folder tree; ``inf`` if it is gone (treated as young)."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return math.inf
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for n in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(root, n)).st_mtime)
    return newest


def remove_path(path: Path) -> bool:
    """Remove a file (read-only ones too) or a folder tree; False if it was already gone."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(OSError):
                os.chmod(path, 0o644)  # Windows refuses to delete read-only files
            path.unlink()
    except FileNotFoundError:
        return False
    return True


def find(root: Path, *, prefixes: Iterable[str] = (), folders: Iterable[str] = ()) -> list[Leftover]:
    """Entries of ``root`` whose names start with one of ``prefixes``, and each entry inside the
    sub-folders ``folders`` (where a module keeps one temp folder per run), sorted."""
    starts = tuple(prefixes)
    found = [p for p in root.iterdir() if starts and p.name.startswith(starts)] if root.is_dir() else []
    for name in folders:
        sub = root / name
        if sub.is_dir():
            found.extend(sub.iterdir())
    return [Leftover(str(p), "temp", newest_mtime(p)) for p in sorted(found)]


def remove_if_older(leftover: Leftover, older_than_s: float, now: float) -> bool:
    """Remove a temp leftover untouched for ``older_than_s`` seconds (its age is read again here:
    a write may have resumed since it was found). True if this call removed it."""
    path = Path(leftover.location)
    return now - newest_mtime(path) >= older_than_s and remove_path(path)
