"""Every ``huggingface_hub`` call libstore makes, with errors translated to :class:`HubError`.

The endpoint is read when a client is made (``$HF_ENDPOINT``, see ``libstore.config``) and passed
to every call explicitly, because ``huggingface_hub`` reads its own copy once at import. The token
comes from ``--token``, then ``$HF_TOKEN``, then the client's stored login; it is handed to the client
and never appears in a message, a log line, the catalog or a manifest: every error text passes
through :meth:`HubClient._scrub` and is raised ``from`` the original exception.

Downloads land in a caller-given folder inside the library (a unique temp folder) and are *not*
trusted: the caller checks each file's sha256 before it enters the blob store, because the client
does not check plain downloads. They are bounded while they stream: never more bytes than the size
the caller expects (an endless body is cut off at that size, not after it filled the disk), no
longer than a deadline that grows with the size (``$LIBSTORE_HUB_MIN_RATE``), and no longer than
``$LIBSTORE_HUB_STALL_TIMEOUT`` without a byte (see :class:`DownloadLimits`).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libstore import config
from libstore.errors import (
    HubError,
    IntegrityError,
    LibstoreError,
    RemoteMovedError,
    ValidationError,
)

log = logging.getLogger(__name__)

#: Most files per commit (the Hub recommends well under 25k; its own large-folder upload uses 75
#: regular / 150 LFS files per commit). Pushes above this are split into bounded batches.
MAX_FILES_PER_COMMIT = 100


@dataclass(frozen=True)
class RemoteFile:
    """A file in a commit's tree: size, git blob id, and sha256 when it is stored with LFS."""

    path: str
    size: int
    blob_id: str
    sha256: str | None = None


@dataclass(frozen=True)
class DownloadLimits:
    """How long one file may take to arrive.

    Attributes:
        stall_s: longest wait for the connection or the next bytes (``$LIBSTORE_HUB_STALL_TIMEOUT``,
            default 60 s).
        min_rate: slowest average rate accepted, bytes/s (``$LIBSTORE_HUB_MIN_RATE``, default 64 KiB/s):
            a file of ``size`` bytes must be complete within ``stall_s + size / min_rate`` seconds.
        retries: further attempts after a connection failure or a 5xx answer.
    """

    stall_s: float
    min_rate: float
    retries: int = 2

    def deadline_s(self, size: int) -> float:
        return self.stall_s + size / self.min_rate

    @classmethod
    def from_config(cls) -> DownloadLimits:
        try:
            return cls(stall_s=config.hub_stall_timeout(), min_rate=config.hub_min_rate())
        except config.SettingError as e:
            raise ValidationError(str(e), field=e.variable) from None


class _Retryable(Exception):
    """A download attempt that failed in a way worth another try (never leaves this module)."""

    def __init__(self, error: HubError) -> None:
        super().__init__(str(error))
        self.error = error


def git_blob_id(data: bytes) -> str:
    """The git object id of a regular (non-LFS) file, as the Hub reports it."""
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubClient:
    """A thin, typed wrapper over ``HfApi`` for one endpoint and one token.

    >>> client = HubClient(token=None)          # HF_TOKEN or the stored login
    >>> client.resolve("org/lib", "main")       # the commit id main points at
    """

    def __init__(
        self, *, token: str | None = None, endpoint: str | None = None, limits: DownloadLimits | None = None
    ) -> None:
        from huggingface_hub import HfApi

        self._token = config.hub_token(token)
        self.endpoint = (endpoint or config.hub_endpoint() or "").rstrip("/") or None
        self.limits = limits or DownloadLimits.from_config()
        self._api = HfApi(
            endpoint=self.endpoint, token=self._token, library_name="libstore", library_version=_version()
        )

    def __repr__(self) -> str:  # never the token
        return f"HubClient(endpoint={self.endpoint or 'default'!r})"

    # --- error translation ---------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        tok = self._token
        if tok:
            text = text.replace(tok, "***")
        try:
            from huggingface_hub import get_token

            stored = get_token()
        except Exception:
            stored = None
        if stored:
            text = text.replace(stored, "***")
        return text

    @contextlib.contextmanager
    def _errors(self, what: str, repo_id: str, revision: str | None = None) -> Iterator[None]:
        """Turn any client or network failure into :class:`HubError` (or a subclass) that carries
        ``repo_id`` and the HTTP ``status`` (``None``: no answer)."""
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"{repo_id}" + (f"@{revision}" if revision else "")

        def err(cls: type[HubError], text: str, status: int | None) -> HubError:
            return cls(self._scrub(text), repo_id=repo_id, status=status)

        try:
            yield
        except LibstoreError:
            raise
        except RepositoryNotFoundError as e:
            raise err(
                HubError,
                f"{what}: repo {repo_id!r} not found on {self.endpoint or 'the Hub'}, or it is "
                f"private and the token cannot see it (log in with `hf auth login`, set HF_TOKEN "
                f"or pass --token)",
                _status(e),
            ) from e
        except RevisionNotFoundError as e:
            raise err(
                HubError, f"{what}: {repo_id!r} has no branch, tag or commit {revision!r}", _status(e)
            ) from e
        except EntryNotFoundError as e:
            raise err(
                HubError, f"{what}: a file is missing from {where}: {_first_line(e)}", _status(e)
            ) from e
        except HfHubHTTPError as e:
            status = _status(e)
            detail = e.server_message or _first_line(e)
            if status == 412 or (status == 409 and "commit" in what):
                raise err(
                    RemoteMovedError,
                    f"{what}: {where} moved while this push was running (someone else pushed); "
                    f"run `libstore pull` and push again",
                    status,
                ) from e
            if status in (401, 403):
                raise err(
                    HubError,
                    f"{what}: not allowed on {where} (HTTP {status}: {detail}); log in with "
                    f"`hf auth login`, set HF_TOKEN or pass --token with write access",
                    status,
                ) from e
            raise err(HubError, f"{what} failed on {where}: HTTP {status}: {detail}", status) from e
        except Exception as e:
            raise err(
                HubError, f"{what} failed on {where}: {type(e).__name__}: {_first_line(e)}", None
            ) from e

    # --- repos and revisions -------------------------------------------------------------------

    def repo_exists(self, repo_id: str) -> bool:
        from huggingface_hub.errors import RepositoryNotFoundError

        with self._errors("checking the repo", repo_id):
            try:
                self._api.repo_info(repo_id, repo_type="model")
            except RepositoryNotFoundError:
                return False
        return True

    def create_repo(self, repo_id: str, *, private: bool) -> None:
        with self._errors("creating the repo", repo_id):
            self._api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)

    def resolve(self, repo_id: str, revision: str) -> str:
        """The commit id that ``revision`` (branch, tag, ``refs/...`` or commit id) points at."""
        with self._errors("resolving the revision", repo_id, revision):
            info = self._api.repo_info(repo_id, repo_type="model", revision=revision)
        if not info.sha:
            raise HubError(f"{repo_id}@{revision} has no commit yet", repo_id=repo_id)
        return str(info.sha)

    def list_files(self, repo_id: str, commit: str) -> dict[str, RemoteFile]:
        """Every file of a commit: path -> size, git blob id, LFS sha256 (one paged listing)."""
        from huggingface_hub.hf_api import RepoFile

        out: dict[str, RemoteFile] = {}
        with self._errors("listing files", repo_id, commit):
            for item in self._api.list_repo_tree(repo_id, recursive=True, revision=commit, repo_type="model"):
                if isinstance(item, RepoFile):
                    out[item.path] = RemoteFile(
                        item.path,
                        int(item.size),
                        item.blob_id,
                        item.lfs.sha256 if item.lfs is not None else None,
                    )
        return out

    def path_info(self, repo_id: str, path: str, commit: str) -> RemoteFile | None:
        """One file of a commit (``None`` if the commit has no such file), without downloading it."""
        from huggingface_hub.hf_api import RepoFile

        with self._errors(f"looking up {path}", repo_id, commit):
            infos = self._api.get_paths_info(repo_id, [path], revision=commit, repo_type="model")
        for item in infos:
            if isinstance(item, RepoFile) and item.path == path:
                return RemoteFile(
                    item.path, int(item.size), item.blob_id, item.lfs.sha256 if item.lfs is not None else None
                )
        return None

    def create_tag(self, repo_id: str, tag: str, commit: str) -> None:
        with self._errors(f"creating tag {tag!r}", repo_id, commit):
            self._api.create_tag(repo_id, tag=tag, revision=commit, repo_type="model")

    def ensure_branch(self, repo_id: str, branch: str) -> None:
        """Create ``branch`` (from the default branch) if the repo does not have it yet."""
        with self._errors("listing branches", repo_id):
            refs = self._api.list_repo_refs(repo_id, repo_type="model")
        if any(b.name == branch for b in refs.branches):
            return
        with self._errors(f"creating branch {branch!r}", repo_id):
            self._api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)

    def tag_target(self, repo_id: str, tag: str) -> str | None:
        """The commit a tag points at, or ``None`` if there is no such tag."""
        with self._errors("listing tags", repo_id):
            refs = self._api.list_repo_refs(repo_id, repo_type="model")
        for t in refs.tags:
            if t.name == tag:
                return str(t.target_commit)
        return None

    # --- files ---------------------------------------------------------------------------------

    def download(self, repo_id: str, path: str, commit: str, dest: Path, *, size: int) -> Path:
        """Download one file of ``commit`` into folder ``dest`` (inside the library); unverified.

        ``size`` is the size the caller was told (manifest, listing): more bytes are refused as they
        arrive (:class:`IntegrityError`), and the download is abandoned with :class:`HubError` when
        it stalls or misses its deadline (:class:`DownloadLimits`). Connection failures and 5xx
        answers are retried from the start, within the deadline.
        """
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(repo_id, path, revision=commit, repo_type="model", endpoint=self.endpoint)
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / f"{uuid.uuid4().hex}.part"
        deadline = time.monotonic() + self.limits.deadline_s(size)
        attempt = 0
        while True:
            try:
                self._stream(url, repo_id, path, commit, out, size, deadline)
                return out
            except _Retryable as r:
                attempt += 1
                wait = 0.2 * 2 ** (attempt - 1)
                if attempt > self.limits.retries or time.monotonic() + wait > deadline:
                    raise r.error from r.error.__cause__
                log.info("retrying the download of %s from %s: %s", path, repo_id, r.error)
                time.sleep(wait)
            finally:
                if out.exists() and out.stat().st_size != size:
                    out.unlink()

    def _stream(
        self, url: str, repo_id: str, path: str, commit: str, out: Path, size: int, deadline: float
    ) -> None:
        """One attempt: stream ``url`` to ``out``, holding the size and time limits while it streams."""
        import httpx2
        from huggingface_hub import get_session, hf_raise_for_status
        from huggingface_hub.utils._headers import (
            build_hf_headers,
        )  # the lazy utils facade hides it from mypy

        where = f"{repo_id}@{commit[:12]}:{path}"
        headers = build_hf_headers(token=self._token, library_name="libstore", library_version=_version())
        headers["Accept-Encoding"] = "identity"
        limits = self.limits
        try:
            with (
                self._errors(f"downloading {path}", repo_id, commit),
                get_session().stream(
                    "GET", url, headers=headers, timeout=limits.stall_s, follow_redirects=True
                ) as response,
            ):
                announced = response.headers.get("Content-Length")
                small = announced is not None and announced.isdigit() and int(announced) <= 1 << 20
                if response.status_code >= 400 and not small:
                    raise HubError(  # an error page too big to read is not worth reading
                        f"downloading {path} failed on {repo_id}@{commit}: HTTP {response.status_code}",
                        repo_id=repo_id,
                        status=response.status_code,
                    )
                hf_raise_for_status(response)
                if announced is not None and announced.isdigit() and int(announced) > size:
                    raise IntegrityError(
                        f"{where}: the server announces {announced} bytes, but it is {size} bytes; "
                        f"the remote is inconsistent — nothing was changed",
                        path=path,
                    )
                got = 0
                with open(out, "wb") as f:
                    for chunk in response.iter_bytes():
                        got += len(chunk)
                        if got > size:
                            raise IntegrityError(
                                f"{where}: the server sends more than the {size} bytes the file has; "
                                f"stopped reading — nothing was changed",
                                path=path,
                            )
                        f.write(chunk)
                        if time.monotonic() > deadline:
                            raise HubError(
                                f"{where}: {got} of {size} bytes after {limits.deadline_s(size):.0f} s, "
                                f"slower than LIBSTORE_HUB_MIN_RATE={limits.min_rate:.0f} bytes/s; "
                                f"nothing was changed — pull again later (or raise the limit)",
                                repo_id=repo_id,
                            )
                if got < size:
                    raise IntegrityError(
                        f"{where} has {got} bytes, the manifest says {size}; the download is incomplete "
                        f"or the remote is inconsistent — nothing was changed, pull again to resume",
                        path=path,
                    )
        except HubError as e:
            cause = e.__cause__
            if isinstance(cause, httpx2.TimeoutException):
                raise HubError(
                    f"{where}: no data for {limits.stall_s:.0f} s (LIBSTORE_HUB_STALL_TIMEOUT); the "
                    f"download was abandoned — nothing was changed, pull again later",
                    repo_id=repo_id,
                ) from None
            if type(e) is HubError and (
                isinstance(cause, httpx2.TransportError) or (e.status is not None and is_transient(e))
            ):
                raise _Retryable(e) from None
            raise

    def read_small(self, repo_id: str, path: str, commit: str, dest: Path, *, size: int) -> bytes:
        """Download and read a small file (the manifest, a config) of the given size."""
        p = self.download(repo_id, path, commit, dest, size=size)
        try:
            return p.read_bytes()
        finally:
            p.unlink(missing_ok=True)

    # --- commits -------------------------------------------------------------------------------

    def commit(
        self,
        repo_id: str,
        *,
        adds: Sequence[tuple[str, Path | bytes, str | None]],
        deletes: Sequence[str] = (),
        message: str,
        description: str = "",
        branch: str,
        parent_commit: str | None,
    ) -> str:
        """One commit on ``branch`` that must sit on ``parent_commit``; returns its id.

        ``adds`` are ``(path in repo, file or bytes, expected sha256 or None)``; a file whose bytes
        no longer hash as expected is refused before anything is sent. 412 (the branch moved) raises
        :class:`RemoteMovedError`. Any other failure raises
        :class:`HubError`: the commit may still have been applied (the answer can be lost after
        the server applied it), so callers check the head before retrying.
        """
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ops: list[Any] = []
        for path, src, expected in adds:
            op = CommitOperationAdd(
                path_in_repo=path, path_or_fileobj=str(src) if isinstance(src, Path) else src
            )
            if expected is not None and op.upload_info.sha256.hex() != expected:
                raise IntegrityError(
                    f"{path}: the local copy ({src if isinstance(src, Path) else 'in memory'}) no "
                    f"longer hashes to {expected}; the store is "
                    f"damaged — run `libstore verify`; nothing was pushed"
                )
            ops.append(op)
        ops += [CommitOperationDelete(path_in_repo=p, is_folder=False) for p in deletes]
        if len(ops) > MAX_FILES_PER_COMMIT:
            raise ValueError(
                f"{len(ops)} operations in one commit; split into batches of {MAX_FILES_PER_COMMIT}"
            )
        with self._errors("committing", repo_id, branch):
            info = self._api.create_commit(
                repo_id,
                operations=ops,
                commit_message=message,
                commit_description=description,
                repo_type="model",
                revision=branch,
                parent_commit=parent_commit,
            )
        return str(info.oid)


def is_transient(error: BaseException) -> bool:
    """Whether a :class:`HubError` came from a failure worth retrying: no answer at all (network) or
    HTTP 5xx, 408, 429. A moved branch is not transient: it needs a pull."""
    if not isinstance(error, HubError) or isinstance(error, RemoteMovedError):
        return False
    return error.status is None or error.status >= 500 or error.status in (408, 429)


def check_repo_id(repo_id: str) -> str:
    """``namespace/name`` as the Hub accepts it, else :class:`ValidationError`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils._validators import validate_repo_id  # the lazy utils facade hides it from mypy

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValidationError(
            f"{repo_id!r} is not a Hub repo id; use NAMESPACE/NAME, e.g. my-org/phi3-experts"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValidationError(f"{repo_id!r} is not a valid Hub repo id: {_first_line(e)}") from None
    return repo_id


def _status(e: BaseException) -> int | None:
    status = getattr(getattr(e, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:500]


def _version() -> str:
    from libstore import __version__

    return __version__
