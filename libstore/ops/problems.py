"""What ``verify`` finds and does, and what ``gc`` removes: typed records with fields.

A :class:`Problem` has a ``code`` (its kind) and a severity: an *error* makes ``verify`` fail; a
*warning* is something normal after a crash or during concurrent writes (temp files, blobs stored by
an import that has not committed yet, orphaned caches) that ``gc`` collects.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from libstore.catalog.maintenance import DanglingRow


@dataclass(frozen=True)
class Problem:
    """Something ``verify`` found. ``code`` names the kind; errors make verify fail."""

    code: ClassVar[str] = "problem"
    severity: ClassVar[str] = "error"

    @property
    def message(self) -> str:
        return self.code

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "severity": self.severity, "message": self.message}
        out.update({k: v for k, v in self.__dict__.items()})
        return out


def _refs(referenced_by: tuple[str, ...]) -> str:
    shown = ", ".join(referenced_by[:3])
    return shown + (f" and {len(referenced_by) - 3} more" if len(referenced_by) > 3 else "")


@dataclass(frozen=True)
class MissingBlob(Problem):
    """A blob some row references is not in the store."""

    code: ClassVar[str] = "missing_blob"
    sha256: str
    referenced_by: tuple[str, ...]

    @property
    def message(self) -> str:
        return (
            f"blob {self.sha256} is missing from the store but {_refs(self.referenced_by)} "
            f"needs it; re-add or pull that expert (prototype caches are recomputed)"
        )


@dataclass(frozen=True)
class CorruptBlob(Problem):
    """A blob whose bytes no longer hash to its name."""

    code: ClassVar[str] = "corrupt_blob"
    sha256: str
    actual_sha256: str
    size: int
    referenced_by: tuple[str, ...]

    @property
    def severity(self) -> str:  # type: ignore[override]  # a field elsewhere, computed here
        return "error" if self.referenced_by else "warning"

    @property
    def message(self) -> str:
        who = f"used by {_refs(self.referenced_by)}" if self.referenced_by else "unreferenced"
        return f"blob {self.sha256} is corrupt: its {self.size} bytes hash to {self.actual_sha256} ({who})"


@dataclass(frozen=True)
class UnrecordedBlob(Problem):
    """A referenced blob with no ``blobs`` row (foreign keys were off, or the row was deleted)."""

    code: ClassVar[str] = "unrecorded_blob"
    sha256: str
    referenced_by: tuple[str, ...]

    @property
    def message(self) -> str:
        return f"blob {self.sha256} is used by {_refs(self.referenced_by)} but has no blobs row"


@dataclass(frozen=True)
class BlobSizeMismatch(Problem):
    """A ``blobs`` row whose size differs from the file (whose hash is right)."""

    code: ClassVar[str] = "blob_size_mismatch"
    sha256: str
    recorded: int
    actual: int

    @property
    def message(self) -> str:
        return f"blob {self.sha256}: the catalog records {self.recorded} bytes, the file has {self.actual}"


@dataclass(frozen=True)
class BlobRowWithoutFile(Problem):
    """An unreferenced ``blobs`` row whose file is gone (harmless; gc removes it)."""

    code: ClassVar[str] = "blob_row_without_file"
    severity: ClassVar[str] = "warning"
    sha256: str

    @property
    def message(self) -> str:
        return f"blob {self.sha256} is recorded but has no file (nothing uses it)"


@dataclass(frozen=True)
class UntrackedBlob(Problem):
    """A blob file no row records: an import not committed yet, or a leftover of a crash (gc)."""

    code: ClassVar[str] = "untracked_blob"
    severity: ClassVar[str] = "warning"
    sha256: str
    size: int
    age_s: float

    @property
    def message(self) -> str:
        return (
            f"blob {self.sha256} ({self.size} bytes, {self.age_s:.0f} s old) is not recorded; "
            f"an import in flight or a leftover of a crash — gc removes it after the grace period"
        )


@dataclass(frozen=True)
class StrayFile(Problem):
    """A file in the blob store that is neither a blob nor a temp file (not touched)."""

    code: ClassVar[str] = "stray_file"
    severity: ClassVar[str] = "warning"
    path: str

    @property
    def message(self) -> str:
        return f"{self.path} does not belong in the blob store (left alone; move it away)"


@dataclass(frozen=True)
class TempLeftover(Problem):
    """A temp file or folder of a write in flight or of a crashed one."""

    code: ClassVar[str] = "temp_leftover"
    severity: ClassVar[str] = "warning"
    path: str
    age_s: float

    @property
    def message(self) -> str:
        return f"temp {self.path} ({self.age_s:.0f} s old): a write in flight or a crash leftover"


@dataclass(frozen=True)
class ExpertMismatch(Problem):
    """An expert whose stored files disagree with its catalog record."""

    code: ClassVar[str] = "expert_mismatch"
    expert: str
    what: str
    recorded: str
    found: str

    @property
    def message(self) -> str:
        return (
            f"expert {self.expert!r}: {self.what} is recorded as {self.recorded} but the stored "
            f"files say {self.found}"
        )


@dataclass(frozen=True)
class DanglingReference(DanglingRow, Problem):
    """A row whose foreign key points at a row that does not exist (fields: :class:`DanglingRow`)."""

    code: ClassVar[str] = "dangling_reference"

    @property
    def message(self) -> str:
        row = ", ".join(f"{k}={v}" for k, v in self.key)
        return f"{self.table} row ({row}): {self.column}={self.value} points at no {self.target} row"


@dataclass(frozen=True)
class BadPrototypeCache(Problem):
    """A prototype cache entry whose blob is not a prototype file for its expert hash."""

    code: ClassVar[str] = "bad_prototype_cache"
    expert_sha256: str
    method: str
    blob_sha256: str
    reason: str

    @property
    def message(self) -> str:
        return (
            f"prototype cache {self.method} of weights {self.expert_sha256[:12]} (blob "
            f"{self.blob_sha256[:12]}): {self.reason}; repair drops it so it is recomputed"
        )


@dataclass(frozen=True)
class OrphanedPrototypeCache(Problem):
    """A prototype cache of weights no expert has any more (gc removes it)."""

    code: ClassVar[str] = "orphaned_prototype_cache"
    severity: ClassVar[str] = "warning"
    expert_sha256: str
    method: str
    blob_sha256: str

    @property
    def message(self) -> str:
        return (
            f"prototype cache {self.method} of weights {self.expert_sha256[:12]}: no expert has "
            f"these weights any more (gc removes it)"
        )


@dataclass(frozen=True)
class Repair:
    """What ``verify --repair`` did about one problem; ``fixed`` says whether it is gone."""

    problem: Problem
    action: str
    fixed: bool


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found (and, with ``repair``, did).

    Attributes:
        problems: everything found, errors and warnings.
        repairs: what repair did, per problem it acted on.
        experts, blobs, bytes_hashed: how much was checked.
    """

    problems: tuple[Problem, ...]
    repairs: tuple[Repair, ...] = ()
    experts: int = 0
    blobs: int = 0
    bytes_hashed: int = 0

    @property
    def errors(self) -> tuple[Problem, ...]:
        fixed = {id(r.problem) for r in self.repairs if r.fixed}
        return tuple(p for p in self.problems if p.severity == "error" and id(p) not in fixed)

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    @property
    def ok(self) -> bool:
        """No error is left (warnings do not count)."""
        return not self.errors


def iter_problem_dicts(report: VerifyReport) -> Iterator[dict[str, Any]]:
    """The report's problems as JSON-ready dicts, each with what repair did to it."""
    actions = {id(r.problem): r for r in report.repairs}
    for p in report.problems:
        d = p.as_dict()
        r = actions.get(id(p))
        d["repair"] = None if r is None else {"action": r.action, "fixed": r.fixed}
        yield d
