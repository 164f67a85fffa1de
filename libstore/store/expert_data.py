"""Data attached to an expert besides its adapter (:class:`~libstore.types.ExpertData`), as files.

Each data type is one or two of the expert's files, stored as blobs like its adapter (so push and
pull, gc, verify, export and the team object store carry them, and the expert's identity, the sha256
of its weights, does not change):

- ``mttl/<data_type>.json``: strict JSON ``{"format": "libstore-expert-data", "format_version": 1,
  "source", "data_type", "config", "values", "tensors": [keys], "arrays": [keys]}``;
- ``mttl/<data_type>.safetensors``: the tensors (absent when there are none).

Nothing here unpickles: the data arrives already loaded (``torch.load(weights_only=True)``) and
leaves as safetensors and JSON, which load without running code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from libstore.errors import ValidationError
from libstore.store.adapter import validate_name
from libstore.store.backend import BlobBackend
from libstore.store.safetensors_io import load_tensors
from libstore.store.strict_json import check_json_value, strict_loads
from libstore.types import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXPERT_DATA_DIR,
    EXPERT_DATA_FILE,
    ExpertData,
    StoredFile,
)

if TYPE_CHECKING:
    import torch

DATA_FORMAT = "libstore-expert-data"
DATA_FORMAT_VERSION = 1
#: the key of data that is one array or value rather than a dict
ROOT_KEY = "data"
MAX_JSON_BYTES = 64 << 20
MAX_DEPTH = 32
#: numpy dtypes a safetensors file holds exactly (kind + item size): bool, ints, uints, floats
NUMPY_DTYPES = ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")


def data_path(data_type: str, ext: str) -> str:
    """``mttl/<data_type>.<ext>``, the path of a data file inside the expert's folder."""
    validate_name(data_type)
    return f"{EXPERT_DATA_DIR}/{data_type}.{ext}"


def check_files(paths: Iterable[str], *, where: str) -> None:
    """Refuse a set of expert file paths that is not the adapter's two files plus whole data types
    (a ``.json`` each, a ``.safetensors`` only beside its ``.json``), each named validly."""
    paths = set(paths)
    lacking = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if f not in paths]
    if lacking:
        raise ValidationError(f"{where} is missing {', '.join(lacking)}")
    for p in sorted(paths - {ADAPTER_CONFIG, ADAPTER_WEIGHTS}):
        m = EXPERT_DATA_FILE.fullmatch(p)
        if m is None:
            raise ValidationError(
                f"{where} has the unknown file {p!r:.80}; an expert holds {ADAPTER_CONFIG}, "
                f"{ADAPTER_WEIGHTS} and attached data ({EXPERT_DATA_DIR}/<data_type>.json, .safetensors) only"
            )
        validate_name(m["data_type"])
        if m["ext"] == "safetensors" and data_path(m["data_type"], "json") not in paths:
            raise ValidationError(f"{where} has {p!r} without {data_path(m['data_type'], 'json')!r}")


def data_files(files: Iterable[StoredFile], data_type: str) -> tuple[StoredFile | None, StoredFile | None]:
    """The ``.json`` and ``.safetensors`` files of ``data_type`` among an expert's ``files``."""
    by_path = {f.path: f for f in files}
    return by_path.get(data_path(data_type, "json")), by_path.get(data_path(data_type, "safetensors"))


def encode(
    data_type: str, *, source: str, config: Mapping[str, Any], data: Any, where: str
) -> list[tuple[str, bytes]]:
    """The files (path, bytes) that store ``data`` (nested dicts and lists of tensors, numpy arrays
    and plain values, as ``torch.load(weights_only=True)`` returns them) pickle-free.

    Raises :class:`ValidationError` naming ``where`` and the key for what the files cannot hold
    exactly: non-string or '/'-holding dict keys, complex or object arrays, NaN/Infinity as plain
    numbers, other objects.
    """
    from safetensors.torch import save

    validate_name(data_type)
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    arrays: list[str] = []
    _flatten(data, (), tensors, values, arrays, where)
    doc = {
        "format": DATA_FORMAT,
        "format_version": DATA_FORMAT_VERSION,
        "source": source,
        "data_type": data_type,
        "config": dict(config),
        "values": values,
        "tensors": sorted(tensors),
        "arrays": sorted(arrays),
    }
    check_json_value(doc, f"{where}: {data_type}")
    out = [(data_path(data_type, "json"), (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode())]
    if tensors:
        out.append((data_path(data_type, "safetensors"), save(tensors)))
    return out


def _flatten(
    value: Any,
    key: tuple[str, ...],
    tensors: dict[str, torch.Tensor],
    values: dict[str, Any],
    arrays: list[str],
    where: str,
) -> None:
    import numpy as np
    import torch

    name = "/".join(key) or ROOT_KEY
    at = f"{where}: key {name!r}"
    if len(key) > MAX_DEPTH:
        raise ValidationError(f"{at} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        if not key and not value:
            return
        for k, v in value.items():
            if not isinstance(k, str) or not k or "/" in k:
                raise ValidationError(
                    f"{at} holds the key {k!r:.80}; only non-empty string keys without '/' can be stored"
                )
            _flatten(v, (*key, k), tensors, values, arrays, where)
    elif isinstance(value, list | tuple) and any(
        isinstance(v, dict | list | tuple | torch.Tensor | np.ndarray) for v in value
    ):
        for i, v in enumerate(value):
            _flatten(v, (*key, str(i)), tensors, values, arrays, where)
    elif isinstance(value, torch.Tensor):
        if value.is_complex() or value.is_quantized or value.layout != torch.strided:
            raise ValidationError(
                f"{at} is a {value.dtype} {value.layout} tensor; safetensors cannot hold it"
            )
        tensors[name] = value.detach().cpu().contiguous().clone()  # tied entries may share storage
    elif isinstance(value, np.ndarray):
        if value.dtype.newbyteorder("=").str[1:] not in NUMPY_DTYPES:
            raise ValidationError(f"{at} is a numpy array of {value.dtype}; safetensors cannot hold it")
        native = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("="))
        tensors[name] = torch.from_numpy(native.copy())
        arrays.append(name)
    elif isinstance(value, np.generic):
        values[name] = value.item()
    else:
        values[name] = list(value) if isinstance(value, tuple) else value  # checked as JSON by the caller


def decode(
    data_type: str, json_bytes: bytes, tensors_path: Path | None, *, where: str, load: bool = True
) -> ExpertData:
    """Read the files of one data type back (``tensors_path``: its ``.safetensors``, if any),
    checking that they agree; ``load=False`` checks the safetensors header only (verify)."""
    from libstore.store.safetensors_io import read_header

    if len(json_bytes) > MAX_JSON_BYTES:
        raise ValidationError(f"{where}: {data_path(data_type, 'json')} is over {MAX_JSON_BYTES} bytes")
    try:
        doc = strict_loads(json_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValidationError(f"{where}: {data_path(data_type, 'json')} is not valid JSON ({e})") from None
    keys = {"format", "format_version", "source", "data_type", "config", "values", "tensors", "arrays"}
    if (
        not isinstance(doc, dict)
        or set(doc) != keys
        or doc["format"] != DATA_FORMAT
        or doc["format_version"] != DATA_FORMAT_VERSION
        or doc["data_type"] != data_type
        or not isinstance(doc["source"], str)
        or not isinstance(doc["config"], dict)
        or not isinstance(doc["values"], dict)
        or not all(
            isinstance(k, list) and all(isinstance(n, str) for n in k)
            for k in (doc["tensors"], doc["arrays"])
        )
        or not set(doc["arrays"]) <= set(doc["tensors"])
    ):
        raise ValidationError(
            f"{where}: {data_path(data_type, 'json')} is not a libstore expert-data file of type "
            f"{data_type!r} (format {DATA_FORMAT} v{DATA_FORMAT_VERSION})"
        )
    names = set(doc["tensors"])
    if (tensors_path is None) != (not names):
        raise ValidationError(
            f"{where}: {data_path(data_type, 'json')} lists {len(names)} tensors but "
            f"{data_path(data_type, 'safetensors')} is {'missing' if tensors_path is None else 'there'}"
        )
    tensors: dict[str, torch.Tensor] = {}
    if tensors_path is not None:
        shown = f"{where}/{data_path(data_type, 'safetensors')}"
        found = set(read_header(tensors_path, shown_as=shown).tensors)
        if found != names:
            raise ValidationError(f"{shown} holds other tensors than its .json lists")
        if load:
            tensors = load_tensors(tensors_path)
    return ExpertData(
        data_type=data_type,
        source=doc["source"],
        config=doc["config"],
        tensors=tensors,
        values=doc["values"],
        arrays=tuple(doc["arrays"]),
    )


def check_stored(blobs: BlobBackend, files: Iterable[StoredFile], *, where: str) -> list[str]:
    """Check the stored data files among an expert's ``files`` (blobs of ``blobs``) read back as
    :func:`decode` reads them (headers only); returns the data types checked."""
    files = list(files)
    check_files((f.path for f in files), where=where)
    types = sorted(
        m["data_type"] for f in files if (m := EXPERT_DATA_FILE.fullmatch(f.path)) and m["ext"] == "json"
    )
    for data_type in types:
        meta, tensors = data_files(files, data_type)
        assert meta is not None  # a data type is named by its .json
        decode(
            data_type,
            blobs.read_bytes(meta.sha256),
            None if tensors is None else blobs.path(tensors.sha256),
            where=where,
            load=False,
        )
    return types
