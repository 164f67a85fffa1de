"""safetensors validation, NaN/Inf scans, atomic load/save. Impostor files are never loaded."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from libstore.errors import UnsafeFileError, ValidationError
from libstore.store import safetensors_io as sio
from libstore.store.safetensors_io import (
    TensorInfo,
    load_tensors,
    nonfinite_tensors,
    read_header,
    save_tensors,
)


def raw_file(header: dict[str, Any], data: bytes, *, length: int | None = None, pad: int = 0) -> bytes:
    """A safetensors file built by hand, so broken ones can be made on purpose."""
    text = json.dumps(header, separators=(",", ":")).encode() + b" " * pad
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def write(tmp_path: Path, content: bytes, name: str = "w.safetensors") -> Path:
    p = tmp_path / name
    p.write_bytes(content)
    return p


@pytest.fixture(autouse=True)
def _never_unpickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to unpickle during these tests fails them."""

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("libstore tried to unpickle a file")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_valid_file_roundtrip(tmp_path: Path) -> None:
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(4, dtype=torch.bfloat16),
        "c": torch.zeros(0, 5, dtype=torch.float16),  # empty tensors are legal
        "d": torch.tensor([1, 2, 3], dtype=torch.int64),
        "e": torch.tensor([True, False]),
    }
    p = save_tensors(tensors, tmp_path / "x.safetensors", metadata={"format": "pt", "k": "v"})
    h = read_header(p)
    assert set(h.tensors) == set(tensors)
    assert h.tensors["a"].dtype == "F32" and h.tensors["a"].shape == (2, 3)
    assert h.tensors["a"].nbytes == 24 and h.tensors["a"].numel == 6
    assert h.tensors["b"].dtype == "BF16" and h.tensors["c"].shape == (0, 5)
    assert h.metadata == {"format": "pt", "k": "v"}
    assert h.file_size == p.stat().st_size
    assert h.dtypes() == {"F32", "BF16", "F16", "I64", "BOOL"}
    loaded = load_tensors(p)
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t)
    sub = load_tensors(p, ["d", "a"])
    assert list(sub) == ["d", "a"]
    assert [f.name for f in tmp_path.iterdir()] == ["x.safetensors"]  # no temp left


def test_load_missing_name(tmp_path: Path) -> None:
    p = save_tensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ValidationError, match="no tensor 'zz'"):
        load_tensors(p, ["a", "zz"])


def test_save_is_atomic_and_overwrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = save_tensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    save_tensors({"a": torch.ones(3)}, p)
    assert torch.equal(load_tensors(p)["a"], torch.ones(3))

    def boom(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_tensors({"a": torch.full((5,), 7.0)}, p)
    monkeypatch.undo()
    assert torch.equal(load_tensors(p)["a"], torch.ones(3))  # old file intact
    assert [f.name for f in tmp_path.iterdir()] == ["x.safetensors"]


def test_save_handles_views_and_shared_storage(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"t": base.T, "row0": base[0], "row1": base[1], "same": base}
    p = save_tensors(tensors, tmp_path / "x.safetensors")
    loaded = load_tensors(p)
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t)


def test_save_rejects_bad_metadata(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="metadata"):
        bad: Any = {"n": 1}
        save_tensors({"a": torch.zeros(1)}, tmp_path / "x.safetensors", metadata=bad)


def test_header_length_with_pickle_like_first_byte_is_fine(tmp_path: Path) -> None:
    # header length 0x0280: the file starts with 80 02, exactly like a protocol-2 pickle
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    text_len = len(json.dumps(header, separators=(",", ":")))
    p = write(tmp_path, raw_file(header, b"\0" * 4, pad=0x280 - text_len))
    assert p.read_bytes()[:2] == b"\x80\x02"
    assert read_header(p).data_offset == 8 + 0x280


def test_git_lfs_pointer(tmp_path: Path) -> None:
    pointer = (
        b"version https://git-lfs.github.com/spec/v1\n"
        b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        b"size 12345\n"
    )
    p = write(tmp_path, pointer, "adapter_model.safetensors")
    with pytest.raises(ValidationError, match="git-LFS pointer.*git lfs pull"):
        read_header(p)


def test_pickle_named_safetensors(tmp_path: Path) -> None:
    data = pickle.dumps({"weight": [1.0, 2.0]}, protocol=4)
    p = write(tmp_path, data)
    with pytest.raises(UnsafeFileError, match="pickled PyTorch file.*never unpickles.*safetensors"):
        read_header(p)
    with pytest.raises(UnsafeFileError):
        load_tensors(p)


def test_torch_save_zip_named_safetensors(tmp_path: Path) -> None:
    p = tmp_path / "w.safetensors"
    torch.save({"weight": torch.zeros(3)}, p)  # saving is harmless; loading is what we never do
    assert p.read_bytes()[:4] == b"PK\x03\x04"
    with pytest.raises(UnsafeFileError, match="torch.save zip.*never unpickles"):
        read_header(p)


def test_legacy_torch_save_named_safetensors(tmp_path: Path) -> None:
    p = tmp_path / "w.safetensors"
    torch.save({"weight": torch.zeros(3)}, p, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFileError, match="pickle protocol 2.*never unpickles"):
        read_header(p)


def test_html_error_page(tmp_path: Path) -> None:
    p = write(tmp_path, b"<!DOCTYPE html><html><body>401 Unauthorized</body></html>")
    with pytest.raises(ValidationError, match="HTML page"):
        read_header(p)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "too short"),
        (b"\x02\0\0\0", "too short"),
        (struct.pack("<Q", 1 << 62) + b"{}", "exceeds"),
        (struct.pack("<Q", 1000) + b"{}", "runs past the end"),
        (struct.pack("<Q", 2) + b"[]", "does not start with"),
        (struct.pack("<Q", 0), "too short|does not start"),
        (struct.pack("<Q", 6) + b'{"a":,', "not valid JSON"),
        (struct.pack("<Q", 4) + b"{\xff\xfe}", "not valid UTF-8"),
        (struct.pack("<Q", 16) + b'{"a":1,"a":2}   ', "duplicate key"),
        (struct.pack("<Q", 11) + b'{"a":NaN}  ', "not valid JSON"),
    ],
)
def test_garbage_headers(tmp_path: Path, content: bytes, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        read_header(write(tmp_path, content))


def test_header_cap_and_file_cap(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    p = write(tmp_path, raw_file(header, b"\0" * 4))
    with pytest.raises(ValidationError, match="cap"):
        read_header(p, max_header_bytes=16)
    with pytest.raises(ValidationError, match="limit"):
        read_header(p, max_file_bytes=10)
    assert read_header(p, max_file_bytes=1000).tensors["a"] == TensorInfo("F32", (1,), 0, 4)


def _entry(dtype: str = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    ("header", "data_len", "match"),
    [
        ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, 12, "overlap"),
        ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(0, 8))}, 8, "overlap"),
        ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(12, 20))}, 20, "unaccounted"),
        ({"a": _entry(offsets=(4, 12))}, 12, "unaccounted"),
        ({"a": _entry()}, 12, "trailing"),
        ({"a": _entry(offsets=(0, 8))}, 5, "truncated"),
        ({"a": _entry(offsets=(0, 6))}, 6, "needs 8 bytes"),
        ({"a": _entry(dtype="F31")}, 8, "unknown dtype"),
        ({"a": _entry(shape=(-2,))}, 8, "non-negative"),
        ({"a": _entry(shape=(True, 2))}, 8, "non-negative"),
        ({"a": _entry(offsets=(8, 0))}, 8, "data_offsets"),
        ({"a": _entry(offsets=(0,))}, 8, "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2]}}, 8, "missing"),
        ({"a": {**_entry(), "extra": 1}}, 8, "unexpected"),
        ({"a": [1, 2]}, 8, "must be an object"),
        ({"__metadata__": {"n": 1}, "a": _entry()}, 8, "__metadata__"),
        ({"": _entry()}, 8, "empty name"),
        ({"a": _entry(dtype="F4", shape=(3,), offsets=(0, 2))}, 2, "whole bytes"),
    ],
)
def test_bad_layouts(tmp_path: Path, header: dict[str, Any], data_len: int, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        read_header(write(tmp_path, raw_file(header, b"\0" * data_len)))


def test_truncated_and_appended_real_file(tmp_path: Path) -> None:
    p = save_tensors({"a": torch.randn(8, 8), "b": torch.randn(8)}, tmp_path / "x.safetensors")
    good = p.read_bytes()
    p.write_bytes(good[:-5])
    with pytest.raises(ValidationError, match="truncated"):
        read_header(p)
    p.write_bytes(good + b"\0\0\0")
    with pytest.raises(ValidationError, match="trailing"):
        read_header(p)


def test_empty_file_with_no_tensors_is_valid(tmp_path: Path) -> None:
    p = write(tmp_path, raw_file({}, b""))
    h = read_header(p)
    assert h.tensors == {} and nonfinite_tensors(p, h) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonfinite_detection(tmp_path: Path, dtype: torch.dtype) -> None:
    clean = torch.randn(5, 7).to(dtype)
    with_nan = clean.clone()
    with_nan[3, 2] = float("nan")
    with_inf = clean.clone()
    with_inf[0, 0] = float("-inf")
    huge = torch.tensor([1e4, -3.0]).to(dtype)  # large but finite
    p = save_tensors(
        {
            "clean": clean,
            "nan": with_nan,
            "inf": with_inf,
            "huge": huge,
            "ints": torch.tensor([2**31 - 1, -1], dtype=torch.int32),
        },
        tmp_path / "x.safetensors",
    )
    assert sorted(nonfinite_tensors(p)) == ["inf", "nan"]


def test_nonfinite_scan_crosses_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sio, "_SCAN_CHUNK_BYTES", 64)
    t = torch.zeros(1000, dtype=torch.bfloat16)
    t[-1] = float("inf")
    u = torch.zeros(1000, dtype=torch.float32)
    u[517] = float("nan")
    p = save_tensors({"t": t, "u": u, "ok": torch.zeros(1000)}, tmp_path / "x.safetensors")
    assert sorted(nonfinite_tensors(p)) == ["t", "u"]


def test_nonfinite_float8(tmp_path: Path) -> None:
    tensors = {
        "e5m2_inf": torch.tensor([1.0, float("inf")]).to(torch.float8_e5m2),
        "e5m2_ok": torch.tensor([1.0, -2.0]).to(torch.float8_e5m2),
        "e4m3_nan": torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn),
        "e4m3_ok": torch.tensor([448.0, -448.0]).to(torch.float8_e4m3fn),
    }
    p = save_tensors(tensors, tmp_path / "x.safetensors")
    assert sorted(nonfinite_tensors(p)) == ["e4m3_nan", "e5m2_inf"]


def test_nonfinite_detects_file_changed_since_header(tmp_path: Path) -> None:
    p = save_tensors({"a": torch.zeros(4)}, tmp_path / "x.safetensors")
    h = read_header(p)
    with open(p, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValidationError, match="changed"):
        nonfinite_tensors(p, h)


@settings(max_examples=20, deadline=None)
@given(bits=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=64))
def test_bf16_and_f16_scan_agree_with_torch(
    tmp_path_factory: pytest.TempPathFactory, bits: list[int]
) -> None:
    raw = torch.from_numpy(np.array(bits, dtype=np.uint16).view(np.int16))
    bf, hf = raw.view(torch.bfloat16), raw.view(torch.float16)
    p = save_tensors({"bf": bf, "hf": hf}, tmp_path_factory.mktemp("bits") / "x.safetensors")
    expected = sorted(n for n, t in (("bf", bf), ("hf", hf)) if not bool(torch.isfinite(t).all()))
    assert sorted(nonfinite_tensors(p)) == expected
