"""The one error hierarchy of libstore.

Every error a user can cause derives from :class:`LibstoreError`; each also inherits the built-in it
resembles so callers can catch either. Messages say what went wrong *and* what to do about it. The CLI
maps each class to an exit code (see ``exit_code``), documented in the README.
"""

from __future__ import annotations


class LibstoreError(Exception):
    """Base of every libstore error."""

    exit_code: int = 1


class LibraryNotFoundError(LibstoreError, FileNotFoundError):
    """No library at the given path (run ``libstore init``)."""

    exit_code = 3


class LibraryExistsError(LibstoreError, FileExistsError):
    """``init`` on a folder that already holds a library."""

    exit_code = 3


class NotFoundError(LibstoreError, LookupError):
    """An expert, base model, clustering, remote or cache entry with that name does not exist."""

    exit_code = 4


class AlreadyExistsError(LibstoreError, ValueError):
    """A name is already taken."""

    exit_code = 5


class InvalidNameError(LibstoreError, ValueError):
    """A name that is not safe as a file or Hub path."""

    exit_code = 2


class QueryError(LibstoreError, ValueError):
    """A catalog query string that cannot be parsed."""

    exit_code = 2


class ValidationError(LibstoreError, ValueError):
    """Input refused before anything was written: a bad adapter, file, config or tensor."""

    exit_code = 6


class UnsafeFileError(ValidationError):
    """A file that could run code (pickle) or escape the library; never loaded."""


class IntegrityError(LibstoreError):
    """Stored or downloaded bytes that do not match their recorded hash or record."""

    exit_code = 7


class BaseModelMismatchError(ValidationError):
    """Experts, or an expert and a base model, that do not belong together."""


class IncompatibleExpertsError(ValidationError):
    """Experts that one operation cannot combine (different ranks, modules or base models)."""


class SchemaError(LibstoreError):
    """The catalog database has a schema this version cannot use (e.g. created by a newer libstore)."""

    exit_code = 8


class CatalogBusyError(LibstoreError, TimeoutError):
    """The catalog stayed locked by other writers longer than the busy timeout."""

    exit_code = 9


class HubError(LibstoreError, ConnectionError):
    """Talking to the Hub failed; nothing local was changed."""

    exit_code = 10


class RemoteMovedError(HubError):
    """The remote has commits this library has not seen; pull before pushing."""


class SyncConflictError(HubError):
    """Experts changed both in the library and on the remote since the last sync; nothing was
    overwritten. Resolve with ``pull --force`` (take theirs) or ``push --force`` (keep ours)."""


class RouterError(LibstoreError, RuntimeError):
    """A routed model cannot be built from the given base model and experts."""

    exit_code = 11
