"""A Hugging Face Hub-compatible HTTP server for tests (standard library only).

libstore syncs with the Hub through the real ``huggingface_hub`` client; the tests run that client against
this
server so that pushes, pulls, conflicts and network faults are exercised end to end without a network.
The server is a git-like store kept in memory: per repo, immutable commits (40-hex ids) holding a flat tree
``{path: Entry}``, branches and tags pointing at commits, regular blobs keyed by their git sha1 and LFS
objects
keyed by their sha256. Like the Hub, a new repo starts with an "initial commit" holding ``.gitattributes``.

Endpoints (model repos only; ``{repo}`` is ``namespace/name``; revisions may be a branch, a tag,
``refs/heads/x``,
``refs/tags/x``, a full commit id or a unique prefix of at least 7 hex digits):

    GET    /api/whoami-v2                                  user name and orgs of the token
    GET    /api/agent-harnesses                            empty registry (the client fetches it once per
    process)
    POST   /api/validate-yaml                              accepts any README metadata
    POST   /api/repos/create        DELETE /api/repos/delete
    PUT    /api/models/{repo}/settings                     private / visibility
    GET    /api/models/{repo}[/revision/{rev}]             info: sha, private, siblings (+ size/blobId/lfs if
    blobs=1)
    GET    /api/models/{repo}/tree/{rev}[/{path}]          listing; recursive=1, expand=1 (lastCommit), Link
    pages
    POST   /api/models/{repo}/paths-info/{rev}             form: paths=..., expand=...
    GET    /api/models/{repo}/refs                         branches, tags, converts, pullRequests
    (include_prs=1)
    GET    /api/models/{repo}/commits/{rev}                history, newest first, Link pages
    POST   /api/models/{repo}/preupload/{rev}              uploadMode lfs|regular, shouldIgnore, remote oid
    POST   /api/models/{repo}/commit/{branch}              ndjson:
    header/file/lfsFile/deletedFile/deletedFolder;
                                                           header.parentCommit must be the branch head (else
                                                           412)
    POST|DELETE /api/models/{repo}/tag/{rev | tag}         create (json {"tag"}) / delete a tag
    POST|DELETE /api/models/{repo}/branch/{branch}         create (json {"startingPoint"}) / delete a branch
    POST   /{repo}.git/info/lfs/objects/batch              LFS batch API, basic transfer, upload and download
    PUT    /_lfs/{repo}/{oid}?sig=...                      upload href (signed: the client sends no token
    there)
    POST   /_lfs/{repo}/{oid}/verify                       verify href
    GET    /_lfs/{repo}/{oid}?sig=...                      download href
    HEAD|GET /{repo}/resolve/{rev}/{path}                  X-Repo-Commit, ETag, X-Linked-Etag/-Size (LFS),
    Range

Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound), ``X-Error-Message`` and a JSON
``{"error": ...}`` body, which the client maps to RepositoryNotFoundError, RevisionNotFoundError and
RemoteEntryNotFoundError. Auth: writes need some ``Authorization: Bearer`` token; a server started with
``token=...`` answers 401 to any request without exactly that token; private repos are invisible without a
token.

Fault injection and counters (see :class:`Faults`, ``HubServer.counts`` and ``HubServer.log``) let tests
simulate
5xx answers (also after the request was applied, optionally holding the answer until the test releases
it, so another client can act in between), dropped connections, commits applied whose answer is lost,
truncated, corrupted, endless and trickling downloads.

Client setup (what a fixture must do). ``huggingface_hub`` reads its configuration when it is imported, so
setting
``HF_ENDPOINT`` later is not enough: :func:`patch_hf_client` sets the environment (:func:`client_env`) *and*
patches
``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (used by ``hf_hub_download`` and so by PEFT
and
transformers), ``constants.HF_HUB_DISABLE_XET`` (``hf_xet`` is installed and would otherwise be used), the
cache and
token paths, and ``huggingface_hub.hf_api.api.endpoint`` (the instance behind module-level functions such as
``file_exists``, built at import time)::

    @pytest.fixture
    def hub(tmp_path, monkeypatch):
        with HubServer() as server:
            patch_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
            yield server

Subprocesses (the CLI) only need ``env={**os.environ, **client_env(server.url, home)}``. Beware that the
client
retries 408/429/500/502/503/504 (preupload, LFS batch/upload/verify, tree and commit listings, the HEAD of a
download; not commits nor model_info) with sleeps of 1, 2, 4,
8, 8 s and restarts broken downloads after 1 s: to see an error at once inject another status (e.g. 507), or
call
:func:`skip_client_backoff`. A broken download only resumes with a Range request from the last whole chunk
(``constants.DOWNLOAD_CHUNK_SIZE``, 10 MiB); smaller files are fetched again from the start.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

DEFAULT_TOKEN = "hf_libstore_test_token"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".pkl", ".gguf", ".zip")
LFS_THRESHOLD = 10 * 1024 * 1024
_BAD_TOKEN = "Invalid credentials in Authorization header"
_LFS_JSON = "application/vnd.git-lfs+json"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, which the Hub reports as ``oid``/``blobId`` and uses as ETag of regular
    files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file that git stores in place of an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Entry:
    """A file in a commit's tree: git oid (of the content, or of the pointer for LFS), size, sha256 if LFS."""

    oid: str
    size: int
    sha256: str | None = None

    def as_json(self, path: str) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size, "path": path}
        if self.sha256 is not None:
            pointer_size = len(lfs_pointer(self.sha256, self.size))
            item["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": pointer_size}
        return item


@dataclass(frozen=True)
class Commit:
    id: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    tree: Mapping[str, Entry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)  # git oid -> content of regular files
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content of LFS objects


class HubError(Exception):
    """An error answer, shaped like the Hub's so that the client raises its specific exception classes."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers or {})

    def reply(self) -> Reply:
        headers = {**self.headers, "X-Error-Message": self.message}
        if self.code:
            headers["X-Error-Code"] = self.code
        return Reply.json({"error": self.message}, self.status, headers)


def _repo_not_found() -> HubError:
    return HubError(404, "Repository not found", "RepoNotFound")


def _revision_not_found(rev: str) -> HubError:
    return HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None  # send this many body bytes, then close the connection
    endless: bool = False  # no Content-Length; after the body, send zeros until the client hangs up
    trickle: tuple[int, float] | None = None  # send the body in pieces of n bytes, one every s seconds

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
        return cls(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass
class Pause:
    """A held answer: ``reached`` is set when the request was applied and its answer is being held;
    the answer goes out when the test sets ``release`` (or after ``timeout`` seconds)."""

    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    timeout: float = 60.0

    def hold(self) -> None:
        self.reached.set()
        self.release.wait(self.timeout)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    params: dict[str, str]
    headers: Message
    body: bytes

    @property
    def token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def flag(self, name: str) -> bool:
        return (self.arg(name) or "").lower() in ("1", "true")

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it, for assertions such as "the resumed download sent a Range header"."""

    method: str
    path: str
    query: str
    kind: str
    headers: dict[str, str]


@dataclass
class _Rule:
    kind: str
    action: str  # "fail" | "drop" | "cut" | "corrupt" | "endless" | "trickle"
    remaining: int | None  # None: until cleared
    status: int = 500
    message: str = ""
    glob: str = "*"
    after_bytes: int = 0
    after_apply: bool = False
    pause: Pause | None = None
    every_s: float = 0.0


class Faults:
    """Thread-safe fault injection; each rule fires for the next ``count`` matching requests
    (None: until cleared).

    Kinds are the request kinds of :data:`KINDS` (``lfs_upload`` is the PUT of an LFS object, ``download`` a
    GET on
    ``/resolve``, ``head`` a HEAD on it), the same keys as ``HubServer.counts``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []

    def fail_next(
        self,
        kind: str,
        status: int = 500,
        count: int | None = 1,
        message: str = "injected failure",
        *,
        after_apply: bool = False,
        hold: bool = False,
    ) -> Pause | None:
        """Answer ``status`` with an error body instead of handling the request — or, with
        ``after_apply``, after applying it (a gateway error the server's work survived). ``hold``
        keeps that answer back until the returned :class:`Pause` is released."""
        pause = Pause() if hold else None
        rule = _Rule(
            _check_kind(kind), "fail", count, status=status, message=message, after_apply=after_apply
        )
        rule.pause = pause
        self._add(rule)
        return pause

    def drop_next(self, kind: str, count: int | None = 1, *, after_apply: bool = False) -> None:
        """Close the connection without any answer, before handling the request or after applying it."""
        self._add(_Rule(_check_kind(kind), "drop", count, after_apply=after_apply))

    def commit_succeeds_but_times_out(self, count: int | None = 1) -> None:
        """Apply the next commit(s) but lose the answer, as when the client times out on a slow Hub."""
        self.drop_next("commit", count, after_apply=True)

    def cut_download(self, path_glob: str, after_bytes: int, count: int | None = 1) -> None:
        """Send headers announcing the full length, then only ``after_bytes`` bytes, then close the
        connection."""
        self._add(_Rule("download", "cut", count, glob=path_glob, after_bytes=after_bytes))

    def endless_download(self, path_glob: str, count: int | None = None) -> None:
        """Serve the file without a Content-Length, then zeros without end (until the client hangs up,
        at most :data:`ENDLESS_LIMIT` bytes); ``HubServer.counts["endless_bytes"]`` counts what was sent."""
        self._add(_Rule("download", "endless", count, glob=path_glob))

    def trickle_download(
        self, path_glob: str, chunk: int = 2048, every_s: float = 0.5, count: int | None = None
    ) -> None:
        """Serve the file (announcing its full length) ``chunk`` bytes at a time, one piece every
        ``every_s`` seconds."""
        self._add(_Rule("download", "trickle", count, glob=path_glob, after_bytes=chunk, every_s=every_s))

    def wrong_bytes(self, path_glob: str, count: int | None = None) -> None:
        """Serve corrupted bytes of the right length with the right headers (ETag, X-Linked-Etag, size)."""
        self._add(_Rule("download", "corrupt", count, glob=path_glob))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def take(self, kind: str, action: str, path: str = "", *, after_apply: bool = False) -> _Rule | None:
        """Consume one use of the first rule matching this request, if any."""
        with self._lock:
            for rule in self._rules:
                if (rule.kind, rule.action, rule.after_apply) == (
                    kind,
                    action,
                    after_apply,
                ) and fnmatch.fnmatchcase(path, rule.glob):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining == 0:
                            self._rules.remove(rule)
                    return rule
        return None


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown request kind {kind!r}; expected one of {sorted(KINDS)}")
    return kind


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_OID = r"(?P<oid>[0-9a-f]{64})"
_ROUTES: list[tuple[frozenset[str], re.Pattern[str], str, str]] = [
    (frozenset(methods.split("|")), re.compile(pattern), kind, handler)
    for methods, pattern, kind, handler in [
        ("GET", r"/api/whoami-v2", "whoami", "_whoami"),
        ("GET", r"/api/agent-harnesses", "meta", "_agent_harnesses"),
        ("POST", r"/api/validate-yaml", "meta", "_validate_yaml"),
        ("POST", r"/api/repos/create", "create_repo", "_create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo", "_delete_repo"),
        ("PUT", rf"/api/models/{_REPO}/settings", "settings", "_settings"),
        ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "info", "_info"),
        ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree", "_tree"),
        ("POST", rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)", "paths_info", "_paths_info"),
        ("GET", rf"/api/models/{_REPO}/refs", "refs", "_refs"),
        ("GET", rf"/api/models/{_REPO}/commits/(?P<rev>[^/]+)", "commits", "_commits"),
        ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload", "_preupload"),
        ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit", "_commit"),
        ("POST|DELETE", rf"/api/models/{_REPO}/tag/(?P<rev>[^/]+)", "tag", "_tag"),
        ("POST|DELETE", rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)", "branch", "_branch"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch", "_lfs_batch"),
        ("PUT", rf"/_lfs/{_REPO}/{_OID}", "lfs_upload", "_lfs_upload"),
        ("POST", rf"/_lfs/{_REPO}/{_OID}/verify", "lfs_verify", "_lfs_verify"),
        ("GET", rf"/_lfs/{_REPO}/{_OID}", "lfs_download", "_lfs_download"),
        ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "head", "_serve_file"),
        ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "download", "_serve_file"),
    ]
]
KINDS = frozenset(kind for _, _, kind, _ in _ROUTES)
_SIGNED_KINDS = frozenset({"lfs_upload", "lfs_download"})  # hrefs authorised by their signature, not a token
_CORRUPT = bytes(b ^ 0x5A for b in range(256))  # translation table that changes every byte
ENDLESS_LIMIT = 256 << 20  # an "endless" body stops here, so that a client that never hangs up ends


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP layer: parse, record, apply faults, delegate to the HubServer, write the reply."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    disable_nagle_algorithm = (
        True  # headers and body go out in separate writes: avoid 40 ms delayed-ACK stalls
    )
    server: _HTTPServer
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean."""

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        body = self._read_body()
        route = next(
            (
                (kind, name, match)
                for methods, pattern, kind, name in _ROUTES
                if self.command in methods and (match := pattern.fullmatch(url.path))
            ),
            None,
        )
        if route is None:
            self._send(HubError(404, f"No route for {self.command} {url.path}").reply())
            return
        kind, name, match = route
        params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        request = Request(self.command, url.path, parse_qs(url.query), params, self.headers, body)
        hub._record(request, url.query, kind)
        path = params.get("path", "")
        if rule := hub.faults.take(kind, "fail", path):
            self._send(HubError(rule.status, rule.message).reply())
            return
        if hub.faults.take(kind, "drop", path):
            self.close_connection = True
            return
        try:
            hub._authorize(request, kind)
            reply: Reply = getattr(hub, name)(request)
        except HubError as error:
            reply = error.reply()
        except (KeyError, TypeError, ValueError) as error:  # a payload the Hub would also refuse
            reply = HubError(400, f"Malformed request: {error!r}").reply()
        if reply.status < 400 and hub.faults.take(kind, "drop", path, after_apply=True):
            self.close_connection = True
            return
        if reply.status < 400 and (rule := hub.faults.take(kind, "fail", path, after_apply=True)):
            if rule.pause is not None:
                rule.pause.hold()
            reply = HubError(rule.status, rule.message).reply()
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        if reply.endless and self.command != "HEAD":
            self.send_header("Connection", "close")  # the body ends when the connection does
        else:
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if reply.cut_after is not None:
            self.wfile.write(reply.body[: reply.cut_after])
            self.close_connection = True
        elif reply.endless:
            self.close_connection = True
            self._send_endless(reply.body)
        elif reply.trickle is not None:
            size, every = reply.trickle
            with contextlib.suppress(OSError):
                for i in range(0, len(reply.body), size):
                    self.wfile.write(reply.body[i : i + size])
                    self.wfile.flush()
                    time.sleep(every)
        else:
            self.wfile.write(reply.body)

    def _send_endless(self, body: bytes) -> None:
        sent = 0
        zeros = bytes(64 << 10)
        with contextlib.suppress(OSError):
            self.wfile.write(body)
            sent = len(body)
            while sent < ENDLESS_LIMIT:
                self.wfile.write(zeros)
                sent += len(zeros)
        with self.server.hub._lock:
            self.server.hub.counts["endless_bytes"] += sent


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not block stop()

    def __init__(self, hub: HubServer) -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut the client's pooled keep-alive connections, so that a stopped server is really unreachable."""
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class HubServer:
    """The Hub stand-in: start()/stop() or ``with HubServer() as server:``; ``server.url`` is the endpoint.

    ``counts`` counts requests by kind (see :data:`KINDS`; faulted ones included) plus, per successful
    commit, its
    operations by ndjson key (``file``, ``lfsFile``, ``deletedFile``, ``deletedFolder``); ``log`` keeps every
    request.
    ``page_size`` caps tree and commit pages. Files are LFS when their name ends with one of
    ``lfs_suffixes``, they
    exceed ``lfs_threshold`` bytes or their first 512 bytes hold a NUL (the Hub refuses binary regular files).
    """

    def __init__(
        self,
        *,
        user: str = "tester",
        orgs: tuple[str, ...] = ("libstore-org",),
        token: str | None = None,
        page_size: int = 1000,
        lfs_suffixes: tuple[str, ...] = LFS_SUFFIXES,
        lfs_threshold: int = LFS_THRESHOLD,
    ) -> None:
        self.user, self.orgs, self.required_token = user, orgs, token
        self.page_size, self.lfs_suffixes, self.lfs_threshold = page_size, lfs_suffixes, lfs_threshold
        self.faults = Faults()
        self.counts: Counter[str] = Counter()
        self.log: list[RequestRecord] = []
        self._repos: dict[str, Repo] = {}
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(16)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    # -----------------------------------------------------------------------------------------------

    def start(self) -> Self:
        self._httpd = _HTTPServer(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="hubserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.close_connections()
            self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- inspection for tests
    # -------------------------------------------------------------------------------------

    def head(self, repo_id: str, branch: str = "main") -> str:
        """The commit id a branch points at."""
        with self._lock:
            return self._repos[repo_id].branches[branch]

    def read_file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """A file's true content, bypassing HTTP and faults."""
        with self._lock:
            repo = self._repos[repo_id]
            entry = self._resolve(repo, revision).tree[path]
            return repo.lfs[entry.sha256] if entry.sha256 else repo.blobs[entry.oid]

    def lfs_objects(self, repo_id: str) -> set[str]:
        """The sha256 of every LFS object stored for a repo (committed or merely uploaded)."""
        with self._lock:
            return set(self._repos[repo_id].lfs)

    def reset_stats(self) -> None:
        with self._lock:
            self.counts.clear()
            self.log.clear()

    # -- plumbing
    # --------------------------------------------------------------------------------------------------

    def _record(self, request: Request, query: str, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            self.log.append(
                RequestRecord(request.method, request.path, query, kind, dict(request.headers.items()))
            )

    def _authorize(self, request: Request, kind: str) -> None:
        if (
            self.required_token is not None
            and kind not in _SIGNED_KINDS
            and request.token != self.required_token
        ):
            raise HubError(401, _BAD_TOKEN)

    def _sign(self, repo_id: str, oid: str) -> str:
        return hmac.new(self._secret, f"{repo_id}/{oid}".encode(), "sha256").hexdigest()

    def _check_signature(self, request: Request) -> None:
        expected = self._sign(request.params["repo"], request.params["oid"])
        if not hmac.compare_digest(request.arg("sig") or "", expected):
            raise HubError(403, "Invalid or missing signature")

    def _repo(self, request: Request, *, write: bool = False) -> Repo:
        if write and request.token is None:
            raise HubError(401, _BAD_TOKEN)
        repo = self._repos.get(request.params["repo"])
        if repo is None or (repo.private and request.token is None):
            raise _repo_not_found()
        return repo

    def _resolve(self, repo: Repo, rev: str) -> Commit:
        for refs, prefix in ((repo.branches, "refs/heads/"), (repo.tags, "refs/tags/")):
            name = rev.removeprefix(prefix)
            if name in refs:
                return repo.commits[refs[name]]
        if rev in repo.commits:
            return repo.commits[rev]
        if re.fullmatch(r"[0-9a-f]{7,39}", rev):
            matches = [cid for cid in repo.commits if cid.startswith(rev)]
            if len(matches) == 1:
                return repo.commits[matches[0]]
        raise _revision_not_found(rev)

    def _is_lfs(self, path: str, size: int) -> bool:
        return path.lower().endswith(self.lfs_suffixes) or size > self.lfs_threshold

    def _new_commit(
        self, repo: Repo, parent: str | None, tree: dict[str, Entry], title: str, message: str
    ) -> Commit:
        date = _now()
        material = {
            "parent": parent,
            "tree": {p: [e.oid, e.size, e.sha256] for p, e in sorted(tree.items())},
            "title": title,
            "message": message,
            "author": self.user,
            "date": date,
            "nonce": len(repo.commits),
        }
        cid = hashlib.sha1(json.dumps(material, sort_keys=True).encode()).hexdigest()
        commit = Commit(cid, parent, title, message, self.user, date, dict(tree))
        repo.commits[cid] = commit
        return commit

    def _paginate(self, request: Request, items: list[dict[str, Any]]) -> Reply:
        """One page of ``items`` with a GitHub-style ``Link: <...>; rel="next"`` header, as the client
        follows."""
        start = int(request.arg("cursor") or 0)
        end = start + self.page_size
        headers = {}
        if end < len(items):
            query = {k: v[-1] for k, v in request.query.items()}
            query["cursor"] = str(end)
            headers["Link"] = f'<{self.url}{request.path}?{urlencode(query)}>; rel="next"'
        return Reply.json(items[start:end], headers=headers)

    def _last_commit(self, repo: Repo, commit: Commit, path: str) -> dict[str, str]:
        """The most recent commit that changed ``path`` (a file or a folder), reachable from ``commit``."""

        def state(c: Commit) -> object:
            return c.tree.get(path) or sorted((p, e) for p, e in c.tree.items() if p.startswith(path + "/"))

        current, value = commit, state(commit)
        while current.parent is not None and state(repo.commits[current.parent]) == value:
            current = repo.commits[current.parent]
        return {"id": current.id, "title": current.title, "date": current.date}

    def _entries(self, repo: Repo, commit: Commit, paths: list[str], expand: bool) -> list[dict[str, Any]]:
        items = []
        for path in paths:
            if path in commit.tree:
                item = commit.tree[path].as_json(path)
            else:
                under = sorted((p, e.oid) for p, e in commit.tree.items() if p.startswith(path + "/"))
                tree_oid = hashlib.sha1(json.dumps(under).encode()).hexdigest()
                item = {"type": "directory", "oid": tree_oid, "path": path}
            if expand:
                item["lastCommit"] = self._last_commit(repo, commit, path)
            items.append(item)
        return items

    # -- endpoints
    # ---------------------------------------------------------------------------------------------------

    def _whoami(self, request: Request) -> Reply:
        if request.token is None:
            raise HubError(401, _BAD_TOKEN)
        orgs = [{"type": "org", "name": org} for org in self.orgs]
        auth = {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}
        return Reply.json({"type": "user", "name": self.user, "orgs": orgs, "auth": auth})

    def _agent_harnesses(self, request: Request) -> Reply:
        return Reply.json({"standardEnvVars": [], "harnesses": {}})

    def _validate_yaml(self, request: Request) -> Reply:
        return Reply.json({"errors": [], "warnings": []})

    def _repo_id_from_payload(self, request: Request) -> str:
        if request.token is None:
            raise HubError(401, _BAD_TOKEN)
        payload = request.json()
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "This test server only hosts model repos")
        return f"{payload.get('organization') or self.user}/{payload['name']}"

    def _create_repo(self, request: Request) -> Reply:
        repo_id = self._repo_id_from_payload(request)
        payload = request.json()
        if repo_id.split("/")[0] not in (self.user, *self.orgs):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {repo_id}")
        url = f"{self.url}/{repo_id}"
        with self._lock:
            if repo_id in self._repos:
                return Reply.json({"error": "You already created this model repo", "url": url}, 409)
            repo = Repo(
                repo_id, payload.get("visibility") == "private" or bool(payload.get("private")), _now()
            )
            attributes = "".join(
                f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in self.lfs_suffixes
            )
            content = attributes.encode()
            repo.blobs[git_blob_oid(content)] = content
            tree = {".gitattributes": Entry(git_blob_oid(content), len(content))}
            repo.branches["main"] = self._new_commit(repo, None, tree, "initial commit", "").id
            self._repos[repo_id] = repo
        return Reply.json(
            {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}
        )

    def _delete_repo(self, request: Request) -> Reply:
        repo_id = self._repo_id_from_payload(request)
        with self._lock:
            if self._repos.pop(repo_id, None) is None:
                raise _repo_not_found()
        return Reply.json({})

    def _settings(self, request: Request) -> Reply:
        payload = request.json()
        with self._lock:
            repo = self._repo(request, write=True)
            if "visibility" in payload:
                repo.private = payload["visibility"] == "private"
            elif "private" in payload:
                repo.private = bool(payload["private"])
        return Reply.json({})

    def _info(self, request: Request) -> Reply:
        with self._lock:
            repo = self._repo(request)
            commit = self._resolve(repo, request.params.get("rev", "main"))
            with_blobs = request.flag("blobs")
            siblings = []
            for path, entry in sorted(commit.tree.items()):
                sibling: dict[str, Any] = {"rfilename": path}
                if with_blobs:
                    sibling.update(size=entry.size, blobId=entry.oid)
                    if entry.sha256:
                        sibling["lfs"] = {**entry.as_json(path)["lfs"], "sha256": entry.sha256}
                siblings.append(sibling)
            info = {
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.id,
                "private": repo.private,
            }
            dates = {"lastModified": commit.date, "createdAt": repo.created_at}
            return Reply.json({**info, **dates, "gated": False, "disabled": False, "siblings": siblings})

    def _tree(self, request: Request) -> Reply:
        with self._lock:
            repo = self._repo(request)
            commit = self._resolve(repo, request.params["rev"])
            folder = request.params.get("path", "").strip("/")
            base = f"{folder}/" if folder else ""
            recursive = request.flag("recursive")
            paths: set[str] = set()
            for path in commit.tree:
                if not path.startswith(base):
                    continue
                parts = path[len(base) :].split("/")
                depth = len(parts) if recursive else 1
                paths.update(base + "/".join(parts[: i + 1]) for i in range(depth))
            if folder and not paths:
                raise HubError(
                    404, f"Entry not found: {folder}", "EntryNotFound", {"X-Repo-Commit": commit.id}
                )
            items = self._entries(repo, commit, sorted(paths), request.flag("expand"))
        return self._paginate(request, items)

    def _paths_info(self, request: Request) -> Reply:
        form = parse_qs(request.body.decode())
        expand = (form.get("expand") or ["false"])[-1].lower() in ("1", "true")
        with self._lock:
            repo = self._repo(request)
            commit = self._resolve(repo, request.params["rev"])
            wanted = [p.strip("/") for p in form.get("paths", [])]
            found = [p for p in wanted if p in commit.tree or any(q.startswith(p + "/") for q in commit.tree)]
            return Reply.json(self._entries(repo, commit, found, expand))

    def _refs(self, request: Request) -> Reply:
        with self._lock:
            repo = self._repo(request)

            def refs(names: dict[str, str], prefix: str) -> list[dict[str, str]]:
                return [{"name": n, "ref": prefix + n, "targetCommit": c} for n, c in sorted(names.items())]

            data = {
                "branches": refs(repo.branches, "refs/heads/"),
                "tags": refs(repo.tags, "refs/tags/"),
                "converts": [],
            }
            if request.flag("include_prs"):
                data["pullRequests"] = []
            return Reply.json(data)

    def _commits(self, request: Request) -> Reply:
        with self._lock:
            repo = self._repo(request)
            commit: Commit | None = self._resolve(repo, request.params["rev"])
            items = []
            while commit is not None:
                text = {"title": commit.title, "message": commit.message}
                authors = [{"user": commit.author, "avatar": None}]
                items.append(
                    {"id": commit.id, **text, "authors": authors, "date": commit.date, "formatted": text}
                )
                commit = repo.commits[commit.parent] if commit.parent else None
        return self._paginate(request, items)

    def _preupload(self, request: Request) -> Reply:
        payload = request.json()
        with self._lock:
            repo = self._repo(request, write=True)
            commit = self._resolve(repo, request.params["rev"])
            files = []
            for item in payload.get("files", []):
                path, entry = item["path"], commit.tree.get(item["path"])
                binary = b"\0" in base64.b64decode(
                    item.get("sample", "")
                )  # the Hub refuses binary regular files
                mode = "lfs" if binary or self._is_lfs(path, int(item["size"])) else "regular"
                oid = (
                    (entry.sha256 or entry.oid) if entry else None
                )  # compared by the client to skip unchanged files
                files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            return Reply.json({"files": files, "commitOid": commit.id})

    def _commit(self, request: Request) -> Reply:
        if request.flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by this test server")
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        with self._lock:
            repo = self._repo(request, write=True)
            branch = request.params["rev"].removeprefix("refs/heads/")
            if branch not in repo.branches:
                raise _revision_not_found(request.params["rev"])
            head = repo.branches[branch]
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[head].tree)
            received: Counter[str] = Counter()
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = _clean_path(value.get("path", ""))
                received[key] += 1
                if key == "file":
                    content = base64.b64decode(value["content"])
                    repo.blobs[git_blob_oid(content)] = content
                    tree[path] = Entry(git_blob_oid(content), len(content))
                elif key == "lfsFile":
                    data = repo.lfs.get(value["oid"])
                    if data is None or value.get("size", len(data)) != len(data):
                        raise HubError(400, f"LFS object {value['oid']} of {path} has not been uploaded")
                    tree[path] = Entry(
                        git_blob_oid(lfs_pointer(value["oid"], len(data))), len(data), value["oid"]
                    )
                elif key == "deletedFile" and path in tree:
                    del tree[path]
                elif key == "deletedFolder" and any(p.startswith(path + "/") for p in tree):
                    tree = {p: e for p, e in tree.items() if not p.startswith(path + "/")}
                elif key in ("deletedFile", "deletedFolder"):
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            folders = {p.rsplit("/", 1)[0] for p in tree if "/" in p}
            if clash := folders & tree.keys():
                raise HubError(400, f"A file and a folder would share the path {min(clash)}")
            description = header.get("description") or ""
            message = header["summary"] + (f"\n\n{description}" if description else "")
            commit = self._new_commit(repo, head, tree, header["summary"], message)
            repo.branches[branch] = commit.id
            self.counts.update(received)
        commit_url = f"{self.url}/{repo.repo_id}/commit/{commit.id}"
        return Reply.json(
            {"success": True, "commitOid": commit.id, "commitUrl": commit_url, "pullRequestUrl": None}
        )

    def _tag(self, request: Request) -> Reply:
        with self._lock:
            repo = self._repo(request, write=True)
            if request.method == "DELETE":
                if repo.tags.pop(request.params["rev"], None) is None:
                    raise _revision_not_found(request.params["rev"])
                return Reply.json({})
            tag = request.json()["tag"]
            commit = self._resolve(repo, request.params["rev"])
            if tag in repo.tags or tag in repo.branches:
                raise HubError(409, f"A tag or branch named {tag} already exists")
            repo.tags[tag] = commit.id
        return Reply.json({})

    def _branch(self, request: Request) -> Reply:
        branch = request.params["rev"]
        with self._lock:
            repo = self._repo(request, write=True)
            if request.method == "DELETE":
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                if repo.branches.pop(branch, None) is None:
                    raise _revision_not_found(branch)
                return Reply.json({})
            if branch.startswith("refs/") or not re.fullmatch(r"[\w.\-/]+", branch):
                raise HubError(400, f"Invalid branch name {branch!r}")
            if branch in repo.branches or branch in repo.tags:
                raise HubError(409, f"A branch or tag named {branch} already exists")
            repo.branches[branch] = self._resolve(repo, request.json().get("startingPoint") or "main").id
        return Reply.json({})

    def _lfs_batch(self, request: Request) -> Reply:
        payload = request.json()
        operation = payload.get("operation")
        if operation not in ("upload", "download"):
            raise HubError(400, f"Unknown LFS operation {operation!r}")
        with self._lock:
            repo = self._repo(request, write=operation == "upload")
            objects = []
            for obj in payload.get("objects", []):
                oid, size = obj.get("oid"), obj.get("size")
                item: dict[str, Any] = {"oid": oid, "size": size}
                href = f"{self.url}/_lfs/{repo.repo_id}/{oid}"
                stored = repo.lfs.get(oid)
                if not (
                    isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)
                ):
                    item["error"] = {"code": 422, "message": "Invalid object"}
                elif stored is not None and len(stored) != size:
                    item["error"] = {"code": 422, "message": f"Object exists with size {len(stored)}"}
                elif operation == "upload" and stored is None:
                    item["authenticated"] = True
                    item["actions"] = {
                        "upload": {"href": f"{href}?sig={self._sign(repo.repo_id, oid)}"},
                        "verify": {"href": f"{href}/verify"},
                    }
                elif operation == "download" and stored is None:
                    item["error"] = {"code": 404, "message": "Object does not exist"}
                elif operation == "download":
                    item["actions"] = {"download": {"href": f"{href}?sig={self._sign(repo.repo_id, oid)}"}}
                objects.append(item)  # an upload of a stored object gets no actions: the client skips it
        return Reply.json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            headers={"Content-Type": _LFS_JSON},
        )

    def _lfs_upload(self, request: Request) -> Reply:
        self._check_signature(request)
        oid = request.params["oid"]
        if hashlib.sha256(request.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match sha256 {oid}")
        with self._lock:
            self._repo_by_id(request.params["repo"]).lfs[oid] = request.body
        return Reply()

    def _lfs_verify(self, request: Request) -> Reply:
        payload = request.json()
        with self._lock:
            data = self._repo(request, write=True).lfs.get(request.params["oid"])
        if data is None or len(data) != payload.get("size"):
            raise HubError(404, "Object not found or of another size")
        return Reply.json({})

    def _lfs_download(self, request: Request) -> Reply:
        self._check_signature(request)
        with self._lock:
            data = self._repo_by_id(request.params["repo"]).lfs.get(request.params["oid"])
        if data is None:
            raise HubError(404, "Object does not exist")
        return Reply(200, data, {"Content-Type": "application/octet-stream"})

    def _repo_by_id(self, repo_id: str) -> Repo:
        if repo_id not in self._repos:
            raise _repo_not_found()
        return self._repos[repo_id]

    def _serve_file(self, request: Request) -> Reply:
        path = request.params["path"]
        with self._lock:
            repo = self._repo(request)
            commit = self._resolve(repo, request.params["rev"])
            entry = commit.tree.get(path)
            if entry is None:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.id})
            data = repo.lfs[entry.sha256] if entry.sha256 else repo.blobs[entry.oid]
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{entry.sha256 or entry.oid}"',
            "Accept-Ranges": "bytes",
        }
        if entry.sha256:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        if request.method == "GET" and self.faults.take("download", "corrupt", path):
            data = data.translate(_CORRUPT)
        status = 200
        if request.method == "GET" and (spec := request.headers.get("Range")):
            start, stop = _parse_range(spec, len(data))
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            data, status = data[start:stop], 206
        reply = Reply(status, data, headers)
        if request.method == "GET" and (rule := self.faults.take("download", "cut", path)):
            reply.cut_after = rule.after_bytes
        if request.method == "GET" and self.faults.take("download", "endless", path):
            reply.endless = True
        if request.method == "GET" and (rule := self.faults.take("download", "trickle", path)):
            reply.trickle = (rule.after_bytes, rule.every_s)
        return reply


def _parse_range(spec: str, size: int) -> tuple[int, int]:
    """Parse a single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range into a half-open interval."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", spec)
    if match is None or match.groups() == ("", ""):
        raise HubError(416, f"Unsupported range {spec!r}", headers={"Content-Range": f"bytes */{size}"})
    first, last = match.groups()
    if first:
        start, stop = int(first), (min(int(last) + 1, size) if last else size)
    else:
        start, stop = max(size - int(last), 0), size
    if start >= size or start >= stop:
        raise HubError(416, f"Range {spec!r} not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, stop


def _clean_path(path: str) -> str:
    """Reject paths that could escape the repo or be ambiguous, as the Hub does."""
    path = path.strip("/")
    if not path or any(part in ("", ".", "..") for part in path.split("/")) or path.startswith(".git/"):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def client_env(url: str, home: str | os.PathLike[str], token: str = DEFAULT_TOKEN) -> dict[str, str]:
    """Environment that points a fresh ``huggingface_hub`` process (e.g. the CLI) at ``url``, isolated in
    ``home``."""
    home = Path(home)
    return {
        "HF_ENDPOINT": url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN": token,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


def patch_hf_client(
    monkeypatch: Any, url: str, home: str | os.PathLike[str], token: str = DEFAULT_TOKEN
) -> None:
    """Point this process's ``huggingface_hub`` at ``url``, even if it was imported before the server started.

    ``monkeypatch`` is pytest's fixture (anything with ``setenv``/``setattr``); everything is undone after
    the test.
    """
    home = Path(home)
    for key, value in client_env(url, home, token).items():
        monkeypatch.setenv(key, value)
    from huggingface_hub import constants, hf_api

    patches: dict[str, object] = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for attribute, patched in patches.items():
        monkeypatch.setattr(constants, attribute, patched)
    monkeypatch.setattr(hf_api.api, "endpoint", url)


def skip_client_backoff(monkeypatch: Any) -> None:
    """Make the client's retry sleeps (1-8 s between retries of 5xx and broken downloads) instant."""
    from types import SimpleNamespace

    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    for module in (_http, file_download):
        monkeypatch.setattr(module, "time", SimpleNamespace(sleep=lambda seconds: None))
