"""The one error hierarchy of libstore.

Every error a user can cause derives from :class:`LibstoreError`; each also inherits the built-in it
resembles so callers can catch either. Messages say what went wrong *and* what to do about it; the
fields say it to programs (``NotFoundError.name``, ``HubError.repo_id``), so callers and tests check
fields, not message text. The CLI maps each class to one exit code (``exit_code``, documented in the
README): one meaning, one code.
"""

from __future__ import annotations

from typing import Literal, Self

#: What a name refers to, for errors about names.
Entity = Literal[
    "expert",
    "base model",
    "clustering",
    "cluster",
    "remote",
    "tag",
    "task",
    "blob",
    "prototype set",
    "expert data",
    "evaluation",
    "file",
    "library",
]


class LibstoreError(Exception):
    """Base of every libstore error. ``message`` is the text shown to users."""

    exit_code: int = 1

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def add_context(self, context: str) -> Self:
        """This same error (class and fields kept) with ``context: `` before its message: for
        batch operations re-raising with the item they were working on."""
        self.message = f"{context}: {self.message}"
        self.args = (self.message,)
        return self


class LibraryNotFoundError(LibstoreError, FileNotFoundError):
    """No library at the given path (run ``libstore init``)."""

    exit_code = 3

    def __init__(self, message: str = "", *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class LibraryExistsError(LibstoreError, FileExistsError):
    """``init`` on a folder that already holds a library."""

    exit_code = 3

    def __init__(self, message: str = "", *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class NotFoundError(LibstoreError, LookupError):
    """An expert, base model, clustering, remote or cache entry with that name does not exist.

    Attributes:
        what: the kind of thing looked for (``"expert"``, ``"base model"``, ...), if known.
        name: the name (or query) looked for, if known.
    """

    exit_code = 4

    def __init__(self, message: str = "", *, what: Entity | None = None, name: str | None = None) -> None:
        super().__init__(message)
        self.what = what
        self.name = name

    @classmethod
    def expert(cls, name: str) -> NotFoundError:
        """No expert is named ``name``."""
        return cls(f"no expert named {name!r}; list them with: libstore ls", what="expert", name=name)


class AlreadyExistsError(LibstoreError, ValueError):
    """A name is already taken (or a destination is not empty).

    Attributes:
        what: the kind of thing whose name is taken, if known.
        name: the name, if known.
    """

    exit_code = 5

    def __init__(self, message: str = "", *, what: Entity | None = None, name: str | None = None) -> None:
        super().__init__(message)
        self.what = what
        self.name = name


class InUseError(LibstoreError, ValueError):
    """Something cannot be removed because other records still use it (a base model with experts,
    a clustering with linked cluster experts); remove those first or pass ``--force`` where offered.

    Attributes:
        what, name: the thing that is still in use.
        used_by: names of (some of) the records that use it.
    """

    exit_code = 12

    def __init__(
        self,
        message: str = "",
        *,
        what: Entity | None = None,
        name: str | None = None,
        used_by: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.what = what
        self.name = name
        self.used_by = used_by


class InvalidNameError(LibstoreError, ValueError):
    """A name that is not safe as a file or Hub path.

    Attributes:
        name: the refused name (``repr``-safe; may hold any character).
    """

    exit_code = 2

    def __init__(self, message: str = "", *, name: object = None) -> None:
        super().__init__(message)
        self.name = name


class QueryError(LibstoreError, ValueError):
    """A catalog query string that cannot be parsed.

    Attributes:
        query: the query text.
    """

    exit_code = 2

    def __init__(self, message: str = "", *, query: str | None = None) -> None:
        super().__init__(message)
        self.query = query


class ValidationError(LibstoreError, ValueError):
    """Input refused before anything was written: a bad adapter, file, config or tensor.

    Attributes:
        path: the file or folder at fault, if any.
        field: the config field or tensor name at fault, if any.
    """

    exit_code = 6

    def __init__(self, message: str = "", *, path: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class UnsafeFileError(ValidationError):
    """A file that could run code (pickle) or escape the library; never loaded."""


class BaseModelMismatchError(ValidationError):
    """Experts, or an expert and a base model, that do not belong together."""


class IncompatibleExpertsError(ValidationError):
    """Experts that one operation cannot combine (different ranks, modules or base models)."""


class IntegrityError(LibstoreError):
    """Stored or downloaded bytes that do not match their recorded hash or record.

    Attributes:
        sha256: the digest that was expected, if any.
        path: the file or repo path at fault, if any.
    """

    exit_code = 7

    def __init__(self, message: str = "", *, sha256: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.sha256 = sha256
        self.path = path


class SchemaError(LibstoreError):
    """The catalog database (or the library folder's ``library.json``) has a format this version
    cannot use, e.g. written by a newer libstore.

    Attributes:
        revision: the schema revision or format version found, if known.
    """

    exit_code = 8

    def __init__(self, message: str = "", *, revision: str | None = None) -> None:
        super().__init__(message)
        self.revision = revision


class CatalogBusyError(LibstoreError, TimeoutError):
    """The catalog stayed locked by other writers longer than the busy timeout."""

    exit_code = 9


class BlobsRemovedError(LibstoreError):
    """Blobs an operation had stored (or found stored) were removed by a concurrent ``gc`` before the
    operation recorded them: it staged them for longer than gc's grace period, or gc ran with
    ``--grace 0``. Nothing was changed; run the operation again. Exit code 9, like a busy catalog:
    both mean "others were working on the library at the same time; try again".

    Attributes:
        sha256s: the blobs that were gone (empty when a temp file vanished before its digest was
            known).
    """

    exit_code = 9

    def __init__(self, message: str = "", *, sha256s: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.sha256s = sha256s

    @classmethod
    def staged_copy_gone(cls, path: str, sha256: str) -> Self:
        """A writer's staged copy of ``sha256`` vanished before it was stored."""
        return cls(
            f"the staged copy {path} of blob {sha256} is gone: a gc with a grace period shorter than "
            f"this operation removed it. Nothing was stored; run the operation again (and give gc a "
            f"longer --grace while imports run)",
            sha256s=(sha256,),
        )

    @classmethod
    def taken_before_recorded(cls, gone: list[str]) -> Self:
        """Blobs a writer stored were gone when it went to record them."""
        return cls(
            f"{len(gone)} blob(s) this operation stored were removed by a concurrent gc before they were "
            f"recorded (e.g. {gone[0]}); nothing was changed — run it again, and give gc a grace period "
            f"(--grace) longer than the operation takes",
            sha256s=tuple(gone),
        )


class StorageError(LibstoreError, OSError):
    """The library folder, the catalog database or the blob store cannot be used: read-only, full,
    unreachable, or refused the credentials. Nothing was changed.

    Attributes:
        location: the folder, database (password removed) or bucket at fault, if known.
    """

    exit_code = 13

    def __init__(self, message: str = "", *, location: str | None = None) -> None:
        super().__init__(message)
        self.location = location


class HubError(LibstoreError, ConnectionError):
    """Talking to the Hub failed; nothing local was changed.

    Attributes:
        repo_id: the repo, if known.
        status: the HTTP status, if there was an answer.
    """

    exit_code = 10

    def __init__(self, message: str = "", *, repo_id: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.status = status


class RemoteMovedError(HubError):
    """The remote has commits this library has not seen; pull before pushing."""


class SyncConflictError(HubError):
    """Experts changed both in the library and on the remote since the last sync; nothing was
    overwritten. Resolve with ``pull --force`` (take theirs) or ``push --force`` (keep ours)."""


class RouterError(LibstoreError, RuntimeError):
    """A routed model cannot be built from the given base model and experts."""

    exit_code = 11
