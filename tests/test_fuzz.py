"""Fuzzing the readers of untrusted files (hypothesis, bounded): the adapter importer and the Hub
manifest reader raise only :class:`libstore.errors.LibstoreError` subclasses on any input — random
bytes, real safetensors files with mutated headers, mutated ``adapter_config.json`` — and never
write anything (the input folder and the library stay exactly as they were).

Runs are derandomized (the same examples every run, so CI is stable); the explicit ``@example``\\ s
pin inputs that once escaped as other exceptions (deeply nested JSON -> ``RecursionError``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from libstore import Library
from libstore.errors import LibstoreError
from libstore.hub.manifest_reader import parse_manifest
from libstore.store.adapter import read_adapter
from libstore.store.blobs import BlobStore
from libstore.types import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tests.factories import make_adapter, make_base_model

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SMALL = settings(FUZZ, max_examples=60)

DEEP_JSON = b'{"a":' * 50_000 + b"1" + b"}" * 50_000


# --- inputs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def real(workdir: Path) -> dict[str, Any]:
    """A real PEFT adapter: its config (dict) and weights (bytes), split into header and data."""
    base = make_base_model(workdir / "base")
    folder = make_adapter(base, workdir / "real", seed=1, targets=("q_proj", "v_proj"))
    weights = (folder / ADAPTER_WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", weights[:8])
    return {
        "base": base,
        "config": json.loads((folder / ADAPTER_CONFIG).read_text()),
        "config_bytes": (folder / ADAPTER_CONFIG).read_bytes(),
        "weights": weights,
        "header": json.loads(weights[8 : 8 + n]),
        "data": weights[8 + n :],
    }


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _slots(doc: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every (path to a container, key or index) in a JSON document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield (path, k)
            yield from _slots(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield (path, i)
            yield from _slots(v, (*path, i))


def _at(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` with one to four structural edits: replace, delete, rename or add a key, or nest."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 4))):
        slots = list(_slots(doc))
        if not slots:
            return draw(json_values)
        path, key = draw(st.sampled_from(slots))
        parent = _at(doc, path)
        action = draw(st.sampled_from(["replace", "replace", "delete", "rename", "add", "wrap"]))
        if action == "replace":
            parent[key] = draw(json_values)
        elif action == "delete":
            del parent[key]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = parent.pop(key)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(json_values)
        elif action == "wrap":
            parent[key] = [parent[key]]
    return doc


@st.composite
def byte_edits(draw: st.DrawFn, data: bytes, lo: int = 0, hi: int | None = None) -> bytes:
    """``data`` with a few bytes flipped, cut short, or extended (edits between ``lo`` and ``hi``)."""
    out = bytearray(data)
    hi = len(out) if hi is None else min(hi, len(out))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "append"]))
        if action == "flip" and hi > lo:
            i = draw(st.integers(lo, hi - 1))
            out[i] = draw(st.integers(0, 255))
        elif action == "truncate":
            del out[draw(st.integers(0, len(out))) :]
            hi = min(hi, len(out))
        elif action == "insert":
            i = draw(st.integers(lo, max(lo, hi)))
            out[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            out += draw(st.binary(min_size=1, max_size=64))
    return bytes(out)


def _safetensors(header: Any, data: bytes, *, length_delta: int = 0) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data


# --- the guard -----------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_only_libstore_errors(folder: Path, config: bytes, weights: bytes) -> None:
    """Write the adapter, read it: a LibstoreError or a result, nothing else, nothing written."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / ADAPTER_CONFIG).write_bytes(config)
    (folder / ADAPTER_WEIGHTS).write_bytes(weights)
    before = _tree(folder.parent)
    store = BlobStore(folder.parent.with_name(folder.parent.name + "-blobs"))
    with contextlib.suppress(LibstoreError):
        store.discard(read_adapter(folder, into=store).weights)
    assert _tree(folder.parent) == before
    assert store.temp_files() == [] and list(store) == []  # a refusal (or a discard) leaves nothing


# --- the adapter importer ------------------------------------------------------------------------


@FUZZ
@given(weights=st.binary(max_size=4096))
@example(weights=b"")
@example(weights=struct.pack("<Q", len(DEEP_JSON)) + DEEP_JSON)
@example(weights=struct.pack("<Q", 2**64 - 1) + b"{}")
def test_random_bytes_as_weights(real: dict[str, Any], workdir: Path, weights: bytes) -> None:
    _read_only_libstore_errors(workdir / "random" / "a", real["config_bytes"], weights)


@FUZZ
@given(data=st.data())
def test_mutated_safetensors_headers(real: dict[str, Any], workdir: Path, data: st.DataObject) -> None:
    how = data.draw(st.sampled_from(["structure", "bytes", "length"]))
    if how == "structure":
        weights = _safetensors(data.draw(mutated(real["header"])), real["data"])
    elif how == "bytes":
        n = len(real["weights"]) - len(real["data"])
        weights = data.draw(byte_edits(real["weights"], 0, n))
    else:
        weights = _safetensors(real["header"], real["data"], length_delta=data.draw(st.integers(-64, 64)))
    _read_only_libstore_errors(workdir / "header" / "a", real["config_bytes"], weights)


@FUZZ
@given(data=st.data())
@example(data=None)
def test_mutated_adapter_configs(real: dict[str, Any], workdir: Path, data: st.DataObject | None) -> None:
    if data is None:
        config = DEEP_JSON
    elif data.draw(st.booleans()):
        config = json.dumps(data.draw(mutated(real["config"]))).encode()
    else:
        config = data.draw(byte_edits(real["config_bytes"]))
    _read_only_libstore_errors(workdir / "config" / "a", config, real["weights"])


@SMALL
@given(data=st.data())
def test_library_add_of_mutated_adapters_changes_nothing_on_refusal(
    real: dict[str, Any],
    workdir: Path,
    data: st.DataObject,
) -> None:
    """The same through ``Library.add``: a refusal leaves catalog and store exactly as they were."""
    lib_path = workdir / "lib"
    if not lib_path.exists():
        with Library.init(lib_path) as lib:
            lib.add_base("tiny", str(real["base"]))
    folder = workdir / "add" / "x"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = (
        json.dumps(data.draw(mutated(real["config"]))).encode()
        if data.draw(st.booleans())
        else real["config_bytes"]
    )
    weights = (
        _safetensors(data.draw(mutated(real["header"])), real["data"])
        if data.draw(st.booleans())
        else real["weights"]
    )
    (folder / ADAPTER_CONFIG).write_bytes(config)
    (folder / ADAPTER_WEIGHTS).write_bytes(weights)
    with Library.open(lib_path) as lib:
        before = [e.name for e in lib.experts()], _tree(lib_path / "blobs")
        try:
            lib.add(folder, name="x")
        except LibstoreError:
            assert ([e.name for e in lib.experts()], _tree(lib_path / "blobs")) == before
        else:
            lib.remove("x")  # accepted: a harmless edit (an unused key, a different path...)
            lib.gc(grace_s=0)


# --- the Hub manifest reader ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    from tests.test_hub_manifest import (
        _manifest,  # a valid manifest using every feature
    )

    return json.loads(_manifest().to_bytes())


@FUZZ
@given(raw=st.binary(max_size=2048))
@example(raw=DEEP_JSON)
@example(raw=b'{"format": "libstore-library", "format_version": 1e999}')
def test_manifest_reader_on_random_bytes(raw: bytes) -> None:
    with contextlib.suppress(LibstoreError):
        parse_manifest(raw)


@FUZZ
@given(data=st.data())
def test_manifest_reader_on_mutated_manifests(manifest: dict[str, Any], data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        raw = json.dumps(data.draw(mutated(manifest))).encode()
    else:
        text = json.dumps(manifest).encode()
        raw = data.draw(byte_edits(text))
    with contextlib.suppress(LibstoreError):
        parse_manifest(raw)
