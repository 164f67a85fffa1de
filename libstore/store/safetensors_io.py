"""safetensors: header validation (no torch), NaN/Inf scans (numpy), load/save (torch, lazily).

Loading a safetensors file runs no code, but a hostile or broken file can still make a loader
allocate a huge header, read out of bounds or silently alias tensors. So :func:`read_header` checks
every byte of the layout itself before any loader sees the file, and explains the usual impostors: a
git-LFS pointer committed instead of the weights (the classic "header too large"), a pickle or
``torch.save`` archive renamed to ``.safetensors``, an HTML error page from a failed download.

Layout: 8 bytes little-endian header length N, N bytes of UTF-8 JSON (an object; ``{`` first, may
be space-padded), then the data region. Each JSON entry is ``name: {dtype, shape, data_offsets}``
with offsets relative to the data region; ``__metadata__`` maps str to str. The entries must tile
the data region exactly: sorted by offset, no gap, no overlap, nothing after the last tensor.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

from libstore.errors import UnsafeFileError, ValidationError
from libstore.store.blob_upkeep import fsync_dir
from libstore.store.sources import open_regular, read_failed
from libstore.store.strict_json import strict_loads

if TYPE_CHECKING:
    import numpy as np
    import torch

MiB = 1 << 20
DEFAULT_MAX_HEADER_BYTES = 100 * MiB
METADATA_KEY = "__metadata__"

#: safetensors dtype name -> bits per element (sub-byte types pack; the byte count must be whole).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}

#: Floating dtypes a LoRA weight may have, with the torch name libstore records for them.
FLOAT_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
}

_LFS_PREFIX = b"version https://git-lfs.github.com/spec/"
_CONVERT = (
    "libstore never unpickles — convert it with safetensors (load it yourself in a trusted "
    "environment and save it with safetensors.torch.save_file)"
)
_MAX_NDIM = 64


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype name, shape, and [start, end) byte offsets within the data region."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header.

    Attributes:
        tensors: name -> :class:`TensorInfo`, in the header's order.
        metadata: the ``__metadata__`` strings (empty if absent).
        data_offset: absolute file offset of the data region (8 + header length).
        file_size: file size in bytes when it was validated.
    """

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int
    file_size: int

    def dtypes(self) -> set[str]:
        return {t.dtype for t in self.tensors.values()}


def _sniff(path: Path, head: bytes) -> None:
    """Raise a specific error if ``head`` looks like a known impostor; return if it does not."""
    if head.startswith(_LFS_PREFIX):
        raise ValidationError(
            f"{path} is a git-LFS pointer file, not the weights: the repository was cloned without "
            f"LFS. Fetch the real file (git lfs install && git lfs pull, or download it with "
            f"huggingface_hub) and try again."
        )
    if head[:4] == b"PK\x03\x04":
        raise UnsafeFileError(
            f"{path} looks like a pickled PyTorch file (a torch.save zip archive), not "
            f"safetensors; {_CONVERT}"
        )
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise UnsafeFileError(
            f"{path} looks like a pickled PyTorch file (pickle protocol {head[1]}), not "
            f"safetensors; {_CONVERT}"
        )
    lowered = head.lstrip()[:15].lower()
    if lowered.startswith((b"<!doctype html", b"<html")):
        raise ValidationError(
            f"{path} is an HTML page, not weights: a download probably failed or needed a login. "
            f"Download the file again."
        )


def _is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(
    path: str | os.PathLike[str],
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_file_bytes: int | None = None,
    shown_as: str | os.PathLike[str] | None = None,
) -> SafetensorsHeader:
    """Parse and fully validate a safetensors header without trusting any of it.

    Raises :class:`UnsafeFileError` for pickles and :class:`ValidationError` for anything else that
    is not a well-formed safetensors file (with the reason and what to do), also for a path that is
    not a regular file or cannot be read. Messages name ``shown_as`` (default ``path``): the file
    the user gave when ``path`` is libstore's staged copy of it.
    """
    path = Path(path)
    shown = Path(shown_as) if shown_as is not None else path
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if max_file_bytes is not None and size > max_file_bytes:
            raise ValidationError(
                f"{shown} is {size} bytes, more than the limit of {max_file_bytes} bytes for this file"
            )
        try:
            head = f.read(64)
            n = int.from_bytes(head[:8], "little")
            plausible = size >= 8 and 2 <= n <= max_header_bytes and 8 + n <= size and head[8:9] == b"{"
            raw = b""
            if plausible:
                f.seek(8)
                raw = f.read(n)
        except OSError as e:
            raise read_failed(shown, e) from None
    if size < 8 or len(head) < 8:
        _sniff(shown, head)
        raise ValidationError(
            f"{shown} is {size} bytes: too short to be a safetensors file (8-byte header length "
            f"+ JSON header); it is truncated or not safetensors"
        )
    if not plausible:
        _sniff(shown, head)
        if n > max_header_bytes:
            raise ValidationError(
                f"{shown}: header length {n} bytes exceeds the {max_header_bytes}-byte cap; the "
                f"file is corrupt or not safetensors"
            )
        if 8 + n > size:
            raise ValidationError(
                f"{shown}: header length {n} runs past the end of the {size}-byte file; the "
                f"file is truncated or not safetensors (download it again)"
            )
        raise ValidationError(
            f"{shown}: the header does not start with '{{' (a JSON object); not a safetensors file"
        )
    if len(raw) != n:
        raise ValidationError(f"{shown} changed while it was being read; try again")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValidationError(f"{shown}: header is not valid UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        obj = strict_loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise ValidationError(f"{shown}: header is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(obj, dict):
        raise ValidationError(f"{shown}: header must be a JSON object, got {type(obj).__name__}")

    metadata: dict[str, str] = {}
    if METADATA_KEY in obj:
        meta = obj.pop(METADATA_KEY)
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise ValidationError(f"{shown}: {METADATA_KEY} must map strings to strings")
        metadata = dict(meta)

    data_offset = 8 + n
    data_len = size - data_offset
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        tensors[name] = _entry(shown, name, entry, data_len)

    _check_tiling(shown, tensors, data_len)
    return SafetensorsHeader(tensors, metadata, data_offset, size)


def _entry(path: Path, name: str, entry: object, data_len: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not name:
        raise ValidationError(f"{path}: a tensor has an empty name")
    if not isinstance(entry, dict):
        raise ValidationError(f"{where}: entry must be an object with dtype, shape, data_offsets")
    extra = set(entry) - {"dtype", "shape", "data_offsets"}
    missing = {"dtype", "shape", "data_offsets"} - set(entry)
    if missing or extra:
        raise ValidationError(
            f"{where}: entry must have exactly dtype, shape, data_offsets"
            + (f"; missing {sorted(missing)}" if missing else "")
            + (f"; unexpected {sorted(extra)}" if extra else "")
        )
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ValidationError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPE_BITS))})")
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValidationError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise ValidationError(
            f"{where}: data_offsets must be [start, end] with 0 <= start <= end, got {offsets!r}"
        )
    start, end = offsets
    numel = math.prod(shape)
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise ValidationError(f"{where}: {numel} elements of {dtype} do not fill whole bytes")
    if end - start != bits // 8:
        raise ValidationError(
            f"{where}: shape {shape} of {dtype} needs {bits // 8} bytes but data_offsets "
            f"[{start}, {end}] span {end - start}"
        )
    if end > data_len:
        raise ValidationError(
            f"{where}: data ends at byte {end} of the data region, which is only {data_len} bytes; "
            f"the file is truncated (download it again)"
        )
    return TensorInfo(dtype, tuple(shape), start, end)


def _check_tiling(path: Path, tensors: Mapping[str, TensorInfo], data_len: int) -> None:
    """Entries sorted by offset must cover [0, data_len) exactly once."""
    expected = 0
    prev: str | None = None
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start < expected:
            raise ValidationError(
                f"{path}: tensors {prev!r} and {name!r} overlap (byte {t.start} < {expected}); "
                f"the file is corrupt or crafted"
            )
        if t.start > expected:
            raise ValidationError(
                f"{path}: {t.start - expected} unaccounted bytes before tensor {name!r}; "
                f"the file is corrupt or crafted"
            )
        expected = t.end
        prev = name
    if expected != data_len:
        raise ValidationError(
            f"{path}: {data_len - expected} trailing bytes after the last tensor; the file is "
            f"corrupt or was appended to"
        )


# --- non-finite scan (numpy) -------------------------------------------------------------------

_SCAN_CHUNK_BYTES = 16 * MiB

#: dtypes that can hold NaN/Inf and that :func:`nonfinite_tensors` scans.
SCANNED_DTYPES = frozenset(
    {"F64", "F32", "F16", "BF16", "C64", "F8_E5M2", "F8_E4M3", "F8_E5M2FNUZ", "F8_E4M3FNUZ"}
)


def _has_nonfinite(raw: np.ndarray, dtype: str) -> bool:
    """Whether ``raw`` (the uint8 bytes of one tensor, or a chunk of it) holds a NaN or Inf."""
    import numpy as np

    if dtype in ("F64", "F32", "F16", "C64"):
        view = raw.view({"F64": "<f8", "F32": "<f4", "F16": "<f2", "C64": "<f4"}[dtype])
        return not bool(np.isfinite(view).all())
    if dtype == "BF16":  # bf16 is the top half of an f32: widen by shifting
        as_f32 = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        return not bool(np.isfinite(as_f32).all())
    if dtype == "F8_E5M2":  # exponent all ones: inf or nan
        return bool(((raw & 0x7C) == 0x7C).any())
    if dtype == "F8_E4M3":  # e4m3fn: no inf, nan is S.1111.111
        return bool(((raw & 0x7F) == 0x7F).any())
    if dtype in ("F8_E5M2FNUZ", "F8_E4M3FNUZ"):  # the only nan is 0x80 (negative zero's pattern)
        return bool((raw == 0x80).any())
    return False  # not a scanned dtype


def nonfinite_tensors(path: str | os.PathLike[str], header: SafetensorsHeader | None = None) -> list[str]:
    """Names of floating tensors holding NaN or Inf (numpy, no torch). Integer tensors are skipped.

    A data region of up to one scan chunk is read with one ``read`` (a memory map costs more than
    the scan of a small adapter); a larger one is memory-mapped and scanned in chunks, so a
    multi-GB file needs little memory. Neighbouring tensors of one dtype are scanned as one run
    (an adapter's tensors usually form a single run) and looked at one by one only when the run
    holds a NaN or Inf.
    """
    import numpy as np

    path = Path(path)
    if header is None:
        header = read_header(path)
    todo = sorted(
        ((n, t) for n, t in header.tensors.items() if t.nbytes and t.dtype in SCANNED_DTYPES),
        key=lambda nt: nt[1].start,
    )
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size != header.file_size:
            raise ValidationError(f"{path} changed since its header was read; try again")
        if not todo:
            return []
        data_len = header.file_size - header.data_offset
        if data_len <= _SCAN_CHUNK_BYTES:
            try:
                f.seek(header.data_offset)
                raw = f.read(data_len)
            except OSError as e:
                raise read_failed(path, e) from None
            if len(raw) != data_len:
                raise ValidationError(f"{path} changed since its header was read; try again")
            data: np.ndarray = np.frombuffer(raw, dtype=np.uint8)
        else:
            data = np.memmap(f, dtype=np.uint8, mode="r", offset=header.data_offset, shape=(data_len,))
    bad: list[str] = []
    try:
        for run in _runs(todo):
            if _scan(data, run[0][1].dtype, run[0][1].start, run[-1][1].end):
                bad += [n for n, t in run if len(run) == 1 or _scan(data, t.dtype, t.start, t.end)]
    finally:
        del data
    return bad


def _runs(tensors: list[tuple[str, TensorInfo]]) -> list[list[tuple[str, TensorInfo]]]:
    """``tensors`` (sorted by offset) cut into runs of adjacent tensors of one dtype."""
    runs: list[list[tuple[str, TensorInfo]]] = []
    for name, t in tensors:
        last = runs[-1][-1][1] if runs else None
        if last is not None and last.dtype == t.dtype and last.end == t.start:
            runs[-1].append((name, t))
        else:
            runs.append([(name, t)])
    return runs


def _scan(data: np.ndarray, dtype: str, start: int, end: int) -> bool:
    """Whether bytes [start, end) of ``data``, elements of ``dtype``, hold a NaN or Inf (in chunks)."""
    import numpy as np

    step = DTYPE_BITS[dtype] // 8
    chunk = _SCAN_CHUNK_BYTES - _SCAN_CHUNK_BYTES % step
    return any(
        _has_nonfinite(np.asarray(data[lo : min(lo + chunk, end)]), dtype) for lo in range(start, end, chunk)
    )


# --- torch (imported lazily) -------------------------------------------------------------------


def load_tensors(path: str | os.PathLike[str], names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Validate the header, then load all tensors (or only ``names``, in that order) on CPU."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    header = read_header(path)
    try:
        if names is None:
            return load_file(path)
        wanted = list(names)
        missing = [n for n in wanted if n not in header.tensors]
        if missing:
            have = ", ".join(sorted(header.tensors)[:5])
            raise ValidationError(
                f"{path} has no tensor {missing[0]!r}"
                + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
                + f"; it holds {len(header.tensors)} tensors, e.g. {have}"
            )
        with safe_open(path, framework="pt") as f:
            return {n: f.get_tensor(n) for n in wanted}
    except SafetensorError as e:
        raise ValidationError(f"{path}: safetensors could not load it: {e}") from e


def save_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a safetensors file atomically (temp file in the same folder, fsync, rename).

    Tensors are detached and made contiguous; tensors sharing storage are cloned (safetensors
    refuses aliases). Returns the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValidationError(f"metadata for {path} must map strings to strings")
    prepared: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:
            t = t.clone()
        elif ptr:
            seen.add(ptr)
        prepared[name] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}")
    try:
        save_file(prepared, str(tmp), metadata=dict(metadata) if metadata is not None else None)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path
