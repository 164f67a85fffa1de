"""Settings, read when used (never at import time): flags first, then environment, then defaults."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "~/.libstore"
CATALOG_FILE = "catalog.db"
BLOBS_DIR = "blobs"
#: A team library's per-machine read-through cache of the object store, inside the library folder.
CACHE_DIR = "cache"
#: How long a catalog statement waits for another process's lock before the catalog counts as busy.
BUSY_TIMEOUT_MS = 30_000
#: PostgreSQL: seconds to wait for a connection before the catalog counts as unreachable.
CONNECT_TIMEOUT_S = 10


def library_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``-L/--library`` if given, else ``$LIBSTORE_HOME``, else ``~/.libstore``."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get("LIBSTORE_HOME")
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_HOME).expanduser()


def db_url(library: Path, explicit: str | None = None) -> str:
    """``--db`` if given, else ``$LIBSTORE_DB_URL``, else the SQLite file inside the library."""
    if explicit:
        return explicit
    env = os.environ.get("LIBSTORE_DB_URL")
    if env:
        return env
    return f"sqlite:///{(library / CATALOG_FILE).resolve()}"


DEFAULT_MAX_FILE_BYTES = 64 << 30


def max_file_bytes(explicit: int | None = None) -> int:
    """Largest adapter weights file an import accepts: ``explicit``, else
    ``$LIBSTORE_MAX_FILE_BYTES``, else 64 GiB (a rank-256 LoRA on every Linear of a 400B model is
    about 20 GB). Refusing bigger files early keeps a wrong path (a whole model, a disk image) from
    being hashed and copied into the store."""
    if explicit is not None:
        return int(explicit)
    env = os.environ.get("LIBSTORE_MAX_FILE_BYTES")
    if env:
        return int(env)
    return DEFAULT_MAX_FILE_BYTES


def hub_token(explicit: str | None = None) -> str | None:
    """``--token`` if given, else ``$HF_TOKEN``, else whatever ``huggingface_hub`` login stored."""
    if explicit:
        return explicit
    env = os.environ.get("HF_TOKEN")
    if env:
        return env
    return None  # huggingface_hub falls back to its own stored login


def hub_endpoint() -> str | None:
    """``$HF_ENDPOINT`` at the time of the call."""
    return os.environ.get("HF_ENDPOINT") or None


DEFAULT_HUB_STALL_TIMEOUT = 60.0
DEFAULT_HUB_MIN_RATE = 64 * 1024


def hub_stall_timeout() -> float:
    """Seconds a Hub download may go without receiving a byte before it is abandoned:
    ``$LIBSTORE_HUB_STALL_TIMEOUT``, else 60."""
    return _positive_float("LIBSTORE_HUB_STALL_TIMEOUT", DEFAULT_HUB_STALL_TIMEOUT)


def hub_min_rate() -> float:
    """Slowest average rate (bytes/s) a Hub download may have: a file of N bytes is abandoned after
    ``stall timeout + N / rate`` seconds. ``$LIBSTORE_HUB_MIN_RATE``, else 64 KiB/s."""
    return _positive_float("LIBSTORE_HUB_MIN_RATE", DEFAULT_HUB_MIN_RATE)


class SettingError(ValueError):
    """An environment setting that cannot be used; ``variable`` names it (callers raise their own
    error with the text: config stays below every other layer)."""

    def __init__(self, message: str, *, variable: str) -> None:
        super().__init__(message)
        self.variable = variable


def _positive_float(variable: str, default: float) -> float:
    text = os.environ.get(variable)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise SettingError(f"${variable} must be a positive number, got {text!r}", variable=variable)
    return value


DEFAULT_CACHE_MAX_BYTES = 50 << 30


def cache_max_bytes() -> int:
    """Size limit of a team library's local blob cache: ``$LIBSTORE_CACHE_MAX_BYTES``, else 50 GiB
    (least recently used blobs are evicted beyond it)."""
    return int(_positive_float("LIBSTORE_CACHE_MAX_BYTES", DEFAULT_CACHE_MAX_BYTES))
