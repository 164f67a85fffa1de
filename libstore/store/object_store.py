"""An object-store blob backend (``s3://bucket/prefix``), through boto3, read via a local cache.

Keys are ``<prefix>/sha256/<2 hex>/<64 hex>``, the folder store's layout. Endpoint and credentials
come only from boto3's standard chain (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws``): nothing here stores, prints or puts them in
an error (botocore's messages carry the access key id at most, never the secret; we show the
error code and the bucket only).

* **Writes.** Bytes are staged in the cache folder while hashed (the importer validates that very
  copy), the blob is claimed in the catalog (:class:`Claims`), and only then uploaded with
  ``If-None-Match: *``: the final key appears complete or not at all, and a second writer of the same
  content gets ``PreconditionFailed``, which is success (content addressing). The staged copy then
  becomes the cache entry, so the writer never downloads what it wrote.
* **Claims** live in the shared catalog, so gc on any machine honours them. ``claim_all`` (called
  inside the writer's transaction, which gc's deletions are serialised with) checks that every blob
  is still there.
* **Reads** (:meth:`path`) go through :class:`~libstore.store.blob_cache.BlobCache`: a miss downloads
  the object while hashing it; wrong bytes raise :class:`IntegrityError` and are not cached.
* ``verify`` re-hashes the objects themselves (:meth:`digest` streams them, bypassing the cache).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from libstore.errors import BlobsRemovedError, IntegrityError, NotFoundError, StorageError, ValidationError
from libstore.store.blob_cache import BlobCache
from libstore.store.blob_upkeep import _DIGEST, ALGORITHM, BlobStat, StoreScan
from libstore.store.blobs import BlobRef, check_digest, sha256_bytes
from libstore.store.leftovers import Leftover
from libstore.types import StagedBlob

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CHUNK = 1 << 20
#: Parallel requests of one operation (fetch, claim checks, verify).
WORKERS = 16
_URL = re.compile(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/([^\s]*))?")
_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}


class Claims(Protocol):
    """The catalog's claim ledger (:class:`libstore.catalog.team.ClaimLedger`), without SQL here."""

    def claim(self, sha256s: Iterable[str], at: float) -> None: ...
    def claimed_at(self, sha256s: Iterable[str] | None = None) -> dict[str, float]: ...
    def forget(self, sha256s: Iterable[str]) -> None: ...


def parse_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket[/prefix]`` (prefix without slashes at the ends)."""
    m = _URL.fullmatch(url.strip())
    if m is None:
        raise ValidationError(
            f"{url!r} is not an object store URL; use s3://BUCKET or s3://BUCKET/PREFIX", field="blob_store"
        )
    return m.group(1), (m.group(2) or "").strip("/")


def make_client() -> S3Client:
    """A thread-safe S3 client from the standard AWS environment and files, failing fast."""
    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=WORKERS * 2,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", config=config)


class ObjectBlobStore:
    """A :class:`~libstore.store.backend.BlobBackend` over an S3-compatible bucket (module docstring)."""

    def __init__(self, url: str, cache: BlobCache, claims: Claims, client: Any = None) -> None:
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        self.cache = cache
        self.claims = claims
        self._client: S3Client | None = client
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ObjectBlobStore({self.url!r})"

    @property
    def client(self) -> S3Client:
        """The client, made on first use, after one check that the bucket exists and lets us in (an
        S3 server may otherwise create a missing bucket on the first put)."""
        with self._lock:  # one client (and one bucket check) for all the threads of a fetch
            return self._connect()

    def _connect(self) -> S3Client:
        if self._client is None:
            with self._errors("connect to"):
                client = make_client()
                try:
                    client.head_bucket(Bucket=self.bucket)
                except ClientError as e:
                    if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                        e.response["Error"]["Code"] = "NoSuchBucket"
                    raise
            self._client = client
        return self._client

    @property
    def root(self) -> Path:
        return self.cache.root

    @property
    def location(self) -> str:
        return self.url

    @property
    def shared(self) -> bool:
        return True

    # --- addressing and errors ---------------------------------------------------------------

    def key(self, sha256: str) -> str:
        digest = check_digest(sha256)
        rel = f"{ALGORITHM}/{digest[:2]}/{digest}"
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _shown(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """botocore failures as :class:`StorageError` naming the bucket and the reason, never a secret."""
        try:
            yield
        except NoCredentialsError:
            raise StorageError(
                f"could not {doing} {self.url}: no object store credentials; set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) on this machine. Nothing was changed.",
                location=self.url,
            ) from None
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", "unknown"))
            if code in _CREDENTIALS or code == "403":
                advice = "the object store refused the credentials: check AWS_ACCESS_KEY_ID / AWS_PROFILE"
            elif code == "NoSuchBucket":
                advice = f"bucket {self.bucket!r} does not exist: create it, or fix the blob store URL"
            else:
                advice = f"the object store answered {code}"
            raise StorageError(
                f"could not {doing} {self.url}: {advice}. Nothing was changed.", location=self.url
            ) from None
        except BotoCoreError as e:
            raise StorageError(
                f"could not {doing} {self.url}: the object store is unreachable ({type(e).__name__}); "
                f"check AWS_ENDPOINT_URL and the network. Nothing was changed.",
                location=self.url,
            ) from None

    def _head(self, sha256: str) -> tuple[int, float] | None:
        """(size, last modified) of the object, or None if there is none."""
        with self._errors("read"):
            try:
                r = self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        return int(r["ContentLength"]), r["LastModified"].timestamp()

    def _missing(self, sha256: str) -> NotFoundError:
        return NotFoundError(
            f"blob {sha256} is not in the object store ({self._shown(self.key(sha256))}); it was deleted "
            f"or never stored — run: libstore verify, then re-add or pull the expert that needs it"
        )

    # --- reading -----------------------------------------------------------------------------

    def exists(self, sha256: str) -> bool:
        return self._head(sha256) is not None

    def __contains__(self, sha256: object) -> bool:
        return isinstance(sha256, str) and _DIGEST.fullmatch(sha256) is not None and self.exists(sha256)

    def size(self, sha256: str) -> int:
        head = self._head(sha256)
        if head is None:
            raise self._missing(sha256)
        return head[0]

    def stat(self, sha256: str) -> BlobStat | None:
        head = self._head(sha256)
        if head is None:
            return None
        claimed = self.claims.claimed_at([sha256]).get(sha256, 0.0)
        return BlobStat(sha256, head[0], max(head[1], claimed))

    def _chunks(self, sha256: str) -> Iterator[bytes]:
        with self._errors("read"):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))["Body"]
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    raise self._missing(sha256) from None
                raise
            with contextlib.closing(body):
                yield from body.iter_chunks(CHUNK)

    def path(self, sha256: str) -> Path:
        """The cached file of the blob, downloaded (and hash-checked) first on a miss."""
        hit = self.cache.hit(sha256)
        if hit is not None:
            return hit
        return self.cache.fill(self._chunks(sha256), sha256, what=self._shown(self.key(sha256)))

    def fetch(self, sha256s: Iterable[str]) -> None:
        """Download the blobs the cache lacks, in parallel."""
        wanted = [sha for sha in dict.fromkeys(sha256s) if self.cache.hit(sha) is None]
        if not wanted:
            return
        from tqdm.auto import tqdm

        with (
            cf.ThreadPoolExecutor(max_workers=min(WORKERS, len(wanted))) as pool,
            tqdm(total=len(wanted), unit="blob", desc="fetching", disable=None, leave=False) as bar,
        ):
            for _ in pool.map(self.path, wanted):
                bar.update()

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path(sha256), "rb")

    def read_bytes(self, sha256: str) -> bytes:
        with self.open(sha256) as f:
            return f.read()

    def digest(self, sha256: str) -> str:
        """The sha256 of the object's bytes as stored now (streamed from the store, not the cache)."""
        h = hashlib.new(ALGORITHM)
        for chunk in self._chunks(sha256):
            h.update(chunk)
        return h.hexdigest()

    def verify(self, sha256: str) -> bool:
        try:
            return self.digest(sha256) == sha256
        except NotFoundError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.scan().blobs))

    # --- writing -----------------------------------------------------------------------------

    def _upload(self, sha256: str, size: int, body: BinaryIO | bytes) -> None:
        """Claim, then create the final key only if absent (an existing one holds the same bytes)."""
        self.claims.claim([sha256], time.time())
        head = self._head(sha256)
        if head is not None and head[0] == size:
            return
        with self._errors("upload to"):
            try:
                kw: dict[str, Any] = {} if head is not None else {"IfNoneMatch": "*"}  # wrong size: replace
                self.client.put_object(
                    Bucket=self.bucket, Key=self.key(sha256), Body=body, ContentLength=size, **kw
                )
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                    raise

    def put_file(self, path: str | os.PathLike[str], *, expected_sha256: str | None = None) -> BlobRef:
        """Store a file's bytes (hash-checked against ``expected_sha256``); idempotent."""
        staged = self.stage_file(path, expected_sha256=expected_sha256)
        with self.discarding([staged]):
            return self.commit_staged(staged)

    def put_bytes(
        self, data: bytes | bytearray | memoryview, *, expected_sha256: str | None = None
    ) -> BlobRef:
        data = bytes(data)
        digest = sha256_bytes(data)
        if expected_sha256 is not None and digest != check_digest(expected_sha256):
            raise IntegrityError(
                f"bytes have sha256 {digest} but {expected_sha256} was expected; nothing was stored",
                sha256=expected_sha256,
            )
        self._upload(digest, len(data), data)
        return BlobRef(digest, len(data))

    def put_bytes_many(self, datas: Sequence[bytes | bytearray | memoryview]) -> list[BlobRef]:
        """:meth:`put_bytes` of each, uploaded in parallel."""
        with cf.ThreadPoolExecutor(max_workers=max(1, min(WORKERS, len(datas)))) as pool:
            return list(pool.map(self.put_bytes, datas))

    def stage_file(
        self,
        src: str | os.PathLike[str],
        *,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
        durable: bool = True,
    ) -> StagedBlob:
        """Copy ``src`` into the cache folder while hashing it (see :meth:`BlobStore.stage_file`)."""
        return self.cache.store.stage_file(
            src, expected_sha256=expected_sha256, max_bytes=max_bytes, durable=durable
        )

    def make_durable(self, staged: Sequence[StagedBlob]) -> list[StagedBlob]:
        """fsync the local staged copies (they become cache entries); see :meth:`BlobStore.make_durable`."""
        return self.cache.store.make_durable(staged)

    def commit_staged(self, staged: StagedBlob) -> BlobRef:
        """Upload a staged copy under its final key (claimed first), then keep it as a cache entry."""
        check_digest(staged.sha256)
        tmp = Path(staged.path)
        if tmp == self.cache.store.path(staged.sha256):  # names a blob already in place
            if not self.claim(staged.sha256):
                raise self._missing(staged.sha256)
            return BlobRef(staged.sha256, staged.size)
        try:
            with open(tmp, "rb") as f:  # hashed as it was staged (a read-only temp only we name)
                self._upload(staged.sha256, staged.size, f)
            self.cache.adopt(staged)
        except (FileNotFoundError, BlobsRemovedError):
            raise BlobsRemovedError.staged_copy_gone(str(tmp), staged.sha256) from None
        return BlobRef(staged.sha256, staged.size)

    def commit_staged_many(self, staged: Sequence[StagedBlob]) -> list[BlobRef]:
        """:meth:`commit_staged` for many copies, uploaded in parallel; all are in place on return."""
        if not staged:
            return []
        with cf.ThreadPoolExecutor(max_workers=max(1, min(WORKERS, len(staged)))) as pool:
            return list(pool.map(self.commit_staged, staged))

    def discard(self, staged: StagedBlob) -> None:
        self.cache.store.discard(staged)

    def discarding(self, staged: Iterable[StagedBlob]) -> contextlib.AbstractContextManager[None]:
        return self.cache.store.discarding(staged)

    # --- claims ------------------------------------------------------------------------------

    def claim(self, sha256: str) -> bool:
        """Claim a stored blob in the catalog for a write that will reference it; False if absent."""
        self.claims.claim([sha256], time.time())
        return self.exists(sha256)

    def claim_all(self, sha256s: Iterable[str]) -> None:
        """Check, inside the writer's transaction, that gc took none of the blobs it will record
        (gc deletes inside its own write transaction, so what is here now stays until commit)."""
        wanted = sorted(set(sha256s))
        with cf.ThreadPoolExecutor(max_workers=max(1, min(WORKERS, len(wanted)))) as pool:
            gone = [sha for sha, ok in zip(wanted, pool.map(self.exists, wanted), strict=True) if not ok]
        if gone:
            raise BlobsRemovedError.taken_before_recorded(gone)

    # --- upkeep ------------------------------------------------------------------------------

    def scan(self) -> StoreScan:
        """Every object under the prefix (blobs and stray keys) with its claim time, and this
        machine's leftover staging files."""
        blobs: dict[str, BlobStat] = {}
        stray: list[str] = []
        root = f"{self.prefix}/" if self.prefix else ""
        with self._errors("list"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root)
            objects = [o for page in pages for o in page.get("Contents", [])]
        claims = self.claims.claimed_at()
        for o in objects:
            key = o["Key"]
            parts = key[len(root) :].split("/")
            sha = parts[-1]
            if len(parts) == 3 and parts[0] == ALGORITHM and _DIGEST.fullmatch(sha) and parts[1] == sha[:2]:
                blobs[sha] = BlobStat(
                    sha, int(o["Size"]), max(o["LastModified"].timestamp(), claims.get(sha, 0))
                )
            else:
                stray.append(self._shown(key))
        local = self.cache.store.scan()
        leftovers = tuple(lo for lo in local.leftovers if lo.kind == "temp")
        return StoreScan(dict(sorted(blobs.items())), leftovers, tuple(stray))

    def delete(self, sha256: str, *, unless_claimed_within_s: float | None = None) -> bool:
        """Delete the object unless claimed within ``unless_claimed_within_s`` (gc calls this inside
        its write transaction); True if it was there and is now gone."""
        head = self._head(sha256)
        if head is None:
            return False
        if unless_claimed_within_s is not None:
            claimed = max(head[1], self.claims.claimed_at([sha256]).get(sha256, 0.0))
            if time.time() - claimed < unless_claimed_within_s:
                return False
        with self._errors("delete from"):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        self.claims.forget([sha256])
        return True

    def settle(self, leftover: Leftover, *, grace_s: float, now: float | None = None) -> str | None:
        """Leftovers are this machine's staging files only (the object store never holds partial
        objects)."""
        return self.cache.store.settle(leftover, grace_s=grace_s, now=now)

    def quarantine(self, sha256: str, folder: str | os.PathLike[str]) -> Path | None:
        """Move a corrupt object out of the store into the local ``folder`` (kept for inspection),
        so that storing its digest again uploads the right bytes; None if it was not there."""
        dest_dir = Path(folder)
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"{sha256}.{int(time.time())}"
        try:
            with open(dest, "wb") as out:
                for chunk in self._chunks(sha256):
                    out.write(chunk)
        except NotFoundError:
            dest.unlink(missing_ok=True)
            return None
        with self._errors("delete from"):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        with contextlib.suppress(OSError):
            self.cache.store.delete(sha256)
        return dest

    def temp_files(self) -> list[Path]:
        return self.cache.store.temp_files()

    def remove_temp_files(self, older_than_s: float = 3600.0) -> list[Path]:
        return self.cache.store.remove_temp_files(older_than_s)
