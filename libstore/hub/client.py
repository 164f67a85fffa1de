"""Every ``huggingface_hub`` call libstore makes, with errors translated to :class:`HubError`.

The endpoint is read when a client is made (``$HF_ENDPOINT``, see ``libstore.config``) and passed
to every call explicitly, because ``huggingface_hub`` reads its own copy once at import. The token
comes from ``--token``, then ``$HF_TOKEN``, then the client's stored login; it is handed to the client
and never appears in a message, a log line, the catalog or a manifest: every error text passes
through :meth:`HubClient._scrub` and is raised ``from`` the original exception.

Downloads land in a caller-given folder inside the library (a unique temp folder) and are *not*
trusted: the caller checks each file's sha256 before it enters the blob store, because the client
does not check plain downloads.
"""

from __future__ import annotations

import contextlib
import logging
import os
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


def git_blob_id(data: bytes) -> str:
    """The git object id of a regular (non-LFS) file, as the Hub reports it."""
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubClient:
    """A thin, typed wrapper over ``HfApi`` for one endpoint and one token.

    >>> client = HubClient(token=None)          # HF_TOKEN or the stored login
    >>> client.resolve("org/lib", "main")       # the commit id main points at
    """

    def __init__(self, *, token: str | None = None, endpoint: str | None = None) -> None:
        from huggingface_hub import HfApi

        self._token = config.hub_token(token)
        self.endpoint = (endpoint or config.hub_endpoint() or "").rstrip("/") or None
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
        """Turn any client or network failure into :class:`HubError` (or a subclass)."""
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"{repo_id}" + (f"@{revision}" if revision else "")
        try:
            yield
        except LibstoreError:
            raise
        except RepositoryNotFoundError as e:
            raise HubError(
                self._scrub(
                    f"{what}: repo {repo_id!r} not found on {self.endpoint or 'the Hub'}, or it is "
                    f"private and the token cannot see it (log in with `hf auth login`, set HF_TOKEN "
                    f"or pass --token)"
                )
            ) from e
        except RevisionNotFoundError as e:
            raise HubError(
                self._scrub(f"{what}: {repo_id!r} has no branch, tag or commit {revision!r}")
            ) from e
        except EntryNotFoundError as e:
            raise HubError(self._scrub(f"{what}: a file is missing from {where}: {_first_line(e)}")) from e
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            detail = e.server_message or _first_line(e)
            if status == 412 or (status == 409 and "commit" in what):
                raise RemoteMovedError(
                    self._scrub(
                        f"{what}: {where} moved while this push was running (someone else pushed); "
                        f"run `libstore pull` and push again"
                    )
                ) from e
            if status in (401, 403):
                raise HubError(
                    self._scrub(
                        f"{what}: not allowed on {where} (HTTP {status}: {detail}); log in with "
                        f"`hf auth login`, set HF_TOKEN or pass --token with write access"
                    )
                ) from e
            err = HubError(self._scrub(f"{what} failed on {where}: HTTP {status}: {detail}"))
            err.transient = status is None or status >= 500 or status in (408, 429)  # type: ignore[attr-defined]
            raise err from e
        except Exception as e:
            err = HubError(self._scrub(f"{what} failed on {where}: {type(e).__name__}: {_first_line(e)}"))
            err.transient = True  # type: ignore[attr-defined]
            raise err from e

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
            raise HubError(f"{repo_id}@{revision} has no commit yet")
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

    def download(self, repo_id: str, path: str, commit: str, dest: Path) -> Path:
        """Download one file of ``commit`` below folder ``dest`` (inside the library); unverified."""
        from huggingface_hub import hf_hub_download

        with self._errors(f"downloading {path}", repo_id, commit):
            out = hf_hub_download(
                repo_id,
                path,
                revision=commit,
                repo_type="model",
                local_dir=dest,
                token=self._token,
                endpoint=self.endpoint,
                library_name="libstore",
                library_version=_version(),
            )
        return Path(out)

    def read_small(self, repo_id: str, path: str, commit: str, dest: Path, *, max_bytes: int) -> bytes:
        """Download and read a small file (the manifest, a config) with a size cap."""
        p = self.download(repo_id, path, commit, dest)
        size = p.stat().st_size
        if size > max_bytes:
            raise HubError(
                f"{repo_id}@{commit[:12]}: {path} is {size} bytes, over the {max_bytes}-byte limit"
            )
        data = p.read_bytes()
        with contextlib.suppress(OSError):
            os.unlink(p)
        return data

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
    """Whether a :class:`HubError` came from a failure worth retrying (network, 5xx, 429)."""
    return bool(getattr(error, "transient", False))


def check_repo_id(repo_id: str) -> str:
    """``namespace/name`` as the Hub accepts it, else :class:`ValidationError`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValidationError(
            f"{repo_id!r} is not a Hub repo id; use NAMESPACE/NAME, e.g. my-org/phi3-experts"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValidationError(f"{repo_id!r} is not a valid Hub repo id: {_first_line(e)}") from None
    return repo_id


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:500]


def _version() -> str:
    from libstore import __version__

    return __version__
