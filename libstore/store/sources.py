"""Opening files libstore did not write: regular files only, every read failure a ValidationError.

A path a user (or a downloaded folder) names may be a symlink to anything: a FIFO (``open`` would
block forever), a device (``/dev/zero`` never ends), ``/proc/self/mem`` (a "regular" file of size 0
whose reads fail with EIO), or a file on a failing disk. :func:`open_regular` opens without blocking
and checks the *opened* file (``fstat``), so a symlink flipped between a check and the open cannot
slip anything else in; :func:`read_chunks` turns read errors into :class:`ValidationError` naming
the file. No torch here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from libstore.errors import ValidationError

CHUNK = 1 << 20

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def read_failed(path: str | os.PathLike[str], e: OSError) -> ValidationError:
    """The error for a file that could not be read (EIO, permissions, vanished...)."""
    return ValidationError(
        f"{path} could not be read ({e.strerror or e}); if it is a symlink, point it at the real "
        f"file, otherwise copy the file from an intact source and try again",
        path=str(path),
    )


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for reading if it is (or a symlink resolves to) a regular file.

    Raises :class:`ValidationError` for anything else, a missing file or an open that fails.
    """
    nonblock = getattr(os, "O_NONBLOCK", 0)  # POSIX: a FIFO must not block the open
    flags = os.O_RDONLY | nonblock | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ValidationError(f"{path} does not exist", path=str(path)) from None
    except OSError as e:
        raise read_failed(path, e) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValidationError(
                f"{path} is {_kind(mode)}, not a regular file; point it at the real file",
                path=str(path),
            )
        if nonblock:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_chunks(f: BinaryIO, path: str | os.PathLike[str], *, limit: int | None = None) -> Iterator[bytes]:
    """The bytes of ``f`` in chunks; a read error or more than ``limit`` bytes is a ValidationError."""
    total = 0
    while True:
        try:
            chunk = f.read(CHUNK)
        except OSError as e:
            raise read_failed(path, e) from None
        if not chunk:
            return
        total += len(chunk)
        if limit is not None and total > limit:
            raise ValidationError(
                f"{path} is more than {limit} bytes, over the limit for this file", path=str(path)
            )
        yield chunk


def read_small(path: str | os.PathLike[str], *, limit: int) -> bytes:
    """All bytes of a small regular file (a config), at most ``limit`` of them."""
    with open_regular(path) as f:
        return b"".join(read_chunks(f, path, limit=limit))


def sniff(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of a regular file (magic numbers); never more."""
    with open_regular(path) as f:
        try:
            return f.read(n)
        except OSError as e:
            raise read_failed(path, e) from None
