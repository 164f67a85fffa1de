"""Hostile inputs, end to end through ``Library`` and the CLI: each is refused with a libstore error,
runs no code, writes nothing outside the library, and leaves what is stored exactly as it was
(catalog rows and every file of the library compared before and after).

Unit-level refusals live beside the code they test — safetensors layouts in
``test_store_safetensors.py``, adapter configs and tensors in ``test_store_adapter.py``, names in
``test_store_adapter.py::test_bad_names``, blob paths in ``test_store_blobs.py``, manifests in
``test_hub_manifest.py``, pickled Hub/mttl files in ``test_hub_import.py``, tampered remotes in
``test_hub_sync.py::test_hostile_manifest_is_refused_and_nothing_changes``. This file drives the same
attacks through the public entry points with the guards above.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors.torch import load_file, save_file
from sqlalchemy import select

from libstore import Library
from libstore.catalog.models import Base
from libstore.cli import cli
from libstore.errors import (
    IntegrityError,
    InvalidNameError,
    LibstoreError,
    UnsafeFileError,
    ValidationError,
)
from libstore.hub.manifest import MANIFEST_FILE, ManifestError
from tests import hub_support as support
from tests.factories import make_adapter
from tests.hub_support import REPO
from tests.hubserver import DEFAULT_TOKEN, HubServer

hub = support.hub  # fixture

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SQLITE_ONLY = pytest.mark.parametrize("db_url", [None], ids=["sqlite"])
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_DB_FILES = ("catalog.db", "catalog.db-wal", "catalog.db-shm", "catalog.db-journal")


# --- the guard: nothing stored changes, nothing is written outside, no code runs ---------------------


def catalog_rows(lib: Library) -> dict[str, list[tuple]]:
    out = {}
    with lib.context.catalog.read() as s:
        for table in Base.metadata.sorted_tables:
            out[table.name] = sorted(map(tuple, s.execute(select(table))), key=repr)
    return out


def library_files(lib: Library) -> dict[str, str]:
    """Every file of the library folder (bar the SQLite files themselves) -> sha256."""
    out = {}
    for p in sorted(lib.path.rglob("*")):
        if p.is_file() and p.name not in _DB_FILES:
            out[str(p.relative_to(lib.path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def outside_files(root: Path, lib: Library) -> dict[str, tuple[int, int]]:
    """Files under ``root`` outside the library (Hub client homes excluded) -> (size, mtime)."""
    skip = (lib.path, root / "hf-home", root / "hf_home")
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(p.is_relative_to(s) for s in skip):
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@contextlib.contextmanager
def untouched(lib: Library, root: Path, *markers: Path, new_blobs_ok: bool = False) -> Iterator[None]:
    """The attack inside must change no catalog row, no library file, nothing outside; no marker.

    ``new_blobs_ok``: a pull stores each file it downloaded once its hash checks out, before the
    whole pull is validated (so the next pull resumes); such blobs are whole, stay unreferenced,
    are never loaded, and ``gc`` removes them.
    """
    before = catalog_rows(lib), library_files(lib), outside_files(root, lib)
    yield
    assert catalog_rows(lib) == before[0]
    files = library_files(lib)
    if new_blobs_ok:
        new = set(files) - set(before[1])
        assert all(f.startswith("blobs/sha256/") for f in new), new
        assert all(files[f] == Path(f).name for f in new), "a blob that does not hash to its name"
        files = {k: v for k, v in files.items() if k not in new}
    assert files == before[1]
    assert outside_files(root, lib) == before[2]
    for m in markers:
        assert not m.exists(), f"{m} exists: hostile code ran"
    escape = root.parent / "evil"
    assert not escape.exists()


def _refused(fn: Callable[[], Any], error: type[BaseException], match: str | None = None) -> LibstoreError:
    with pytest.raises(error, match=match) as e:
        fn()
    assert isinstance(e.value, LibstoreError)
    return e.value


def _cli(lib: Library, *args: str) -> Any:
    return CliRunner().invoke(cli, ["-L", str(lib.path), *args])


@pytest.fixture
def stocked(library: Library, base_dir: Path, tmp_path: Path) -> Library:
    """A library that already holds something to protect: two experts and their prototypes."""
    for i, name in enumerate(["keep1", "keep2"]):
        library.add(make_adapter(base_dir, tmp_path / "stock" / name, seed=90 + i), name=name, tags=["v1"])
    library.compute_prototypes()
    return library


def _good_adapter(base_dir: Path, tmp_path: Path, name: str = "incoming") -> Path:
    return make_adapter(base_dir, tmp_path / "in" / name, seed=7)


# --- code execution: pickles ---------------------------------------------------------------------


class _Boom:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Boom(marker)}, protocol=4
    )


def _torch_save_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"state": _Boom(marker)}, buf)
    return buf.getvalue()


def test_the_payloads_are_live(tmp_path: Path) -> None:
    """The pickles used below really run code when unpickled (else the tests prove nothing)."""
    for make in (_pickle_bytes, _torch_save_bytes):
        proof = tmp_path / f"proof-{make.__name__}"
        data = make(proof)
        if data[:2] == b"PK":
            torch.load(io.BytesIO(data), weights_only=False)
        else:
            pickle.loads(data)
        assert proof.exists()


def test_pickle_named_safetensors_runs_nothing(stocked: Library, base_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    folders = []
    for i, payload in enumerate((_pickle_bytes(marker), _torch_save_bytes(marker))):
        folder = _good_adapter(base_dir, tmp_path / str(i))
        (folder / WEIGHTS).write_bytes(payload)
        folders.append(folder)
    bin_only = _good_adapter(base_dir, tmp_path / "bin")
    (bin_only / WEIGHTS).unlink()
    (bin_only / "adapter_model.bin").write_bytes(_pickle_bytes(marker))  # the PEFT pickle name
    with untouched(stocked, tmp_path, marker):
        for folder in [*folders, bin_only]:
            _refused(lambda f=folder: stocked.add(f, name="evil"), UnsafeFileError, "never unpickles")
            _refused(lambda f=folder: stocked.import_dir(f.parent), UnsafeFileError)


@SQLITE_ONLY
def test_pickle_through_the_cli(stocked: Library, base_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    folder = _good_adapter(base_dir, tmp_path)
    (folder / WEIGHTS).write_bytes(_torch_save_bytes(marker))
    with untouched(stocked, tmp_path, marker):
        result = _cli(stocked, "add", str(folder), "--name", "evil")
        assert result.exit_code == 6 and "never unpickles" in result.output


@SQLITE_ONLY
def test_pulled_pickle_with_the_right_hash_runs_nothing(
    stocked: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
) -> None:
    """A remote whose manifest truthfully lists a pickle as an expert's weights."""
    marker = tmp_path / "PWNED"
    source = Library.init(tmp_path / "source")
    source.add_base("tiny", str(base_dir))
    source.add(_good_adapter(base_dir, tmp_path, "x"), name="x")
    source.add_remote("origin", REPO)
    source.push()
    manifest = json.loads(hub.read_file(REPO, MANIFEST_FILE))
    evil = _pickle_bytes(marker)
    manifest["experts"]["x"]["files"][WEIGHTS].update(sha256=hashlib.sha256(evil).hexdigest(), size=len(evil))
    _commit(hub, {MANIFEST_FILE: json.dumps(manifest).encode(), f"experts/x/{WEIGHTS}": evil})
    stocked.add_remote("origin", REPO)
    with untouched(stocked, tmp_path, marker, new_blobs_ok=True):
        _refused(stocked.pull, UnsafeFileError, "pickle")
    assert stocked.verify().ok
    stocked.gc(grace_s=0)
    assert hashlib.sha256(evil).hexdigest() not in stocked.context.blobs
    source.close()


# --- safetensors files that lie ------------------------------------------------------------------


def _header_file(header: bytes, n: int | None = None, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if n is None else n) + header + data


@pytest.mark.parametrize(
    "content, match",
    [
        (_header_file(b"{}", n=1 << 62), "exceeds"),  # "huge" header length
        (_header_file(b'{"a":' + b" " * 64, n=(100 << 20) + 1), "exceeds"),  # just over the cap
        (_header_file(b"{" + os.urandom(64).hex().encode()), "not valid JSON"),  # garbage
        (
            _header_file(b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', data=b"\0" * 8),
            "truncated",
        ),
        (
            _header_file(
                b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
                b' "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}',
                data=b"\0" * 12,
            ),
            "overlap",
        ),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 9\n", "LFS"),
    ],
    ids=["huge-length", "over-cap", "garbage", "truncated", "overlap", "lfs-pointer"],
)
@SQLITE_ONLY
def test_lying_safetensors_headers(
    stocked: Library, base_dir: Path, tmp_path: Path, content: bytes, match: str
) -> None:
    folder = _good_adapter(base_dir, tmp_path)
    (folder / WEIGHTS).write_bytes(content)
    with untouched(stocked, tmp_path):
        _refused(lambda: stocked.add(folder, name="evil"), ValidationError, match)


def _rewrite_tensors(folder: Path, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    tensors = {k: fn(k, v) for k, v in load_file(folder / WEIGHTS).items()}
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def test_nonfinite_weights_refused_unless_allowed(stocked: Library, base_dir: Path, tmp_path: Path) -> None:
    folder = _good_adapter(base_dir, tmp_path)
    first = sorted(load_file(folder / WEIGHTS))[:2]

    def poison(k: str, v: torch.Tensor) -> torch.Tensor:
        v = v.clone()
        if k == first[0]:
            v[0, 0] = float("nan")
        elif k == first[1]:
            v[-1, -1] = float("inf")
        return v

    _rewrite_tensors(folder, poison)
    with untouched(stocked, tmp_path):
        err = _refused(lambda: stocked.add(folder, name="nan"), ValidationError, "NaN or Inf")
        assert "--allow-nonfinite" in str(err)
    e = stocked.add(folder, name="nan", allow_nonfinite=True)
    assert e.name == "nan" and stocked.verify().ok


@SQLITE_ONLY
def test_nonfinite_through_the_cli(stocked: Library, base_dir: Path, tmp_path: Path) -> None:
    folder = _good_adapter(base_dir, tmp_path)
    _rewrite_tensors(folder, lambda k, v: v * float("inf"))
    with untouched(stocked, tmp_path):
        result = _cli(stocked, "add", str(folder), "--name", "inf")
        assert result.exit_code == 6 and "--allow-nonfinite" in result.output
    assert _cli(stocked, "add", str(folder), "--name", "inf", "--allow-nonfinite").exit_code == 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.float8_e4m3fn])
@SQLITE_ONLY
def test_non_float_lora_weights_refused(
    stocked: Library, base_dir: Path, tmp_path: Path, dtype: torch.dtype
) -> None:
    folder = _good_adapter(base_dir, tmp_path)
    _rewrite_tensors(folder, lambda k, v: (v * 100).to(dtype))
    with untouched(stocked, tmp_path):
        _refused(lambda: stocked.add(folder, name="ints"), ValidationError, "floating weights only")


# --- names ---------------------------------------------------------------------------------------


HOSTILE_NAMES = [
    "../evil",
    "../../evil",
    "a/../../evil",
    "/abs",
    "C:\\evil",
    "..",
    ".hidden",
    "a/b",
    "аrc_easy",  # Cyrillic а
    "arc\u200beasy",  # zero-width space
    "ａｒｃ",  # fullwidth
    "arc\u202eysae",  # right-to-left override
    "nul\x00byte",
    "new\nline",
    "x" * 97,
    "",
    " spaced ",
]


def test_hostile_names_refused_everywhere(stocked: Library, base_dir: Path, tmp_path: Path) -> None:
    folder = _good_adapter(base_dir, tmp_path)
    with untouched(stocked, tmp_path):
        for name in HOSTILE_NAMES:
            for attempt in (
                lambda n=name: stocked.add(folder, name=n),
                lambda n=name: stocked.add(folder, name="fine", tags=[n]),
                lambda n=name: stocked.add(folder, name="fine", tasks=[n]),
                lambda n=name: stocked.rename("keep1", n),
                lambda n=name: stocked.tag("keep1", n),
                lambda n=name: stocked.add_remote(n, REPO),
                lambda n=name: stocked.add_base(n, str(base_dir)),
            ):
                _refused(attempt, InvalidNameError)
        for suffix in ("/../../evil", "_\u0430", "\x00"):
            _refused(
                lambda s=suffix: stocked.subtract_general(general=["keep1"], experts=["keep2"], suffix=s),
                InvalidNameError,
            )


@SQLITE_ONLY
def test_hostile_folder_names_and_cli(stocked: Library, base_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "imports"
    make_adapter(base_dir, root / "ok", seed=3)
    make_adapter(base_dir, root / "аrc_easy", seed=4)  # a look-alike folder name
    with untouched(stocked, tmp_path):
        _refused(lambda: stocked.import_dir(root), InvalidNameError, "U\\+0430")
        result = _cli(stocked, "add", str(root / "ok"), "--name", "../evil")
        assert result.exit_code == 2 and "path separator" in result.output
        result = _cli(stocked, "import-hub", REPO, "--subfolder", "../../etc")
        assert result.exit_code != 0


# --- adapter configs of the wrong shape ----------------------------------------------------------


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"r": "4"}, "'r' must be"),
        ({"r": 4.0}, "'r' must be"),
        ({"r": True}, "'r' must be"),
        ({"r": -4}, "'r' must be"),
        ({"lora_alpha": "16"}, "lora_alpha"),
        ({"lora_alpha": None}, "lora_alpha"),
        ({"target_modules": 5}, "target_modules"),
        ({"target_modules": [1, 2]}, "target_modules"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"peft_type": "PICKLE"}, "peft_type"),
        ({"base_model_name_or_path": ["../evil"]}, "base_model_name_or_path"),
        ({"rank_pattern": "x"}, "rank_pattern"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else None,
)
@SQLITE_ONLY
def test_config_with_wrong_types(
    stocked: Library, base_dir: Path, tmp_path: Path, edit: dict, match: str
) -> None:
    folder = _good_adapter(base_dir, tmp_path)
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(edit)
    (folder / CONFIG).write_text(json.dumps(cfg))
    with untouched(stocked, tmp_path):
        _refused(lambda: stocked.add(folder, name="cfg"), ValidationError, match)


@pytest.mark.parametrize(
    "raw",
    [b"[1, 2]", b"\xff\xfe{}", b'{"r": 4, "r": 8}', b"{" * 100_000, b'{"r": NaN}'],
    ids=["list", "utf16", "dupkey", "deep", "nan"],
)
@SQLITE_ONLY
def test_config_that_is_not_a_config(stocked: Library, base_dir: Path, tmp_path: Path, raw: bytes) -> None:
    folder = _good_adapter(base_dir, tmp_path)
    (folder / CONFIG).write_bytes(raw)
    with untouched(stocked, tmp_path):
        _refused(lambda: stocked.add(folder, name="cfg"), ValidationError)


# --- oversized files -----------------------------------------------------------------------------


@SQLITE_ONLY
def test_oversized_files_refused_before_they_are_read(
    stocked: Library, base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _good_adapter(base_dir, tmp_path / "small")
    sparse = _good_adapter(base_dir, tmp_path / "sparse")
    with open(sparse / WEIGHTS, "r+b") as f:  # 80 GiB, sparse: refused by its size, never read
        f.truncate(80 << 30)
    big_config = _good_adapter(base_dir, tmp_path / "config")
    (big_config / CONFIG).write_bytes(b" " * (17 << 20))  # a 17 MB "config"
    with untouched(stocked, tmp_path):
        monkeypatch.setenv("LIBSTORE_MAX_FILE_BYTES", "4096")
        _refused(lambda: stocked.add(folder, name="big"), ValidationError, "LIBSTORE_MAX_FILE_BYTES")
        monkeypatch.delenv("LIBSTORE_MAX_FILE_BYTES")
        _refused(lambda: stocked.add(sparse, name="big"), ValidationError, "limit")
        _refused(lambda: stocked.add(big_config, name="big"), ValidationError, "a few KB")


# --- the Hub: manifests pointing outside or at nothing, servers sending wrong bytes ----------------


def _commit(hub: HubServer, files: dict[str, bytes]) -> None:
    HfApi(endpoint=hub.url, token=DEFAULT_TOKEN).create_commit(
        REPO, [CommitOperationAdd(p, b) for p, b in files.items()], commit_message="tamper"
    )


def _pushed(hub: HubServer, base_dir: Path, tmp_path: Path) -> dict:
    source = Library.init(tmp_path / "source")
    source.add_base("tiny", str(base_dir))
    source.add(_good_adapter(base_dir, tmp_path, "x"), name="x", tags=["v1"])
    source.compute_prototypes()
    source.add_remote("origin", REPO)
    source.push()
    source.close()
    return json.loads(hub.read_file(REPO, MANIFEST_FILE))


def _tamper_proto_path(m: dict) -> None:
    m["prototypes"][0]["path"] = "../../../evil.safetensors"


def _tamper_expert_name(m: dict) -> None:
    m["experts"]["../../evil"] = m["experts"].pop("x")
    m["prototypes"] = []


def _tamper_lookalike(m: dict) -> None:
    m["experts"]["х"] = m["experts"].pop("x")  # Cyrillic х
    m["prototypes"] = []


def _tamper_absolute_file(m: dict) -> None:
    m["experts"]["x"]["files"][WEIGHTS]["path"] = "/etc/passwd"


def _tamper_missing_file(m: dict) -> None:
    ghost = json.loads(json.dumps(m["experts"]["x"]))
    for f in ghost["files"].values():
        f.pop("path", None)
    m["experts"]["ghost"] = ghost  # experts/ghost/... is not in the commit


def _tamper_base_source(m: dict) -> None:
    (b,) = m["base_models"].values()
    b["linear_shapes"]["../../evil"] = [1, 1]


@pytest.mark.parametrize(
    "tamper, error, match",
    [
        (_tamper_proto_path, ManifestError, "is not"),
        (_tamper_expert_name, ManifestError, "invalid name"),
        (_tamper_lookalike, ManifestError, "U\\+0445"),
        (_tamper_absolute_file, ManifestError, "is not"),
        (_tamper_missing_file, IntegrityError, "missing from"),
        (_tamper_base_source, ManifestError, "module name"),
    ],
    ids=["proto-path", "expert-name", "lookalike", "absolute", "missing-file", "base-module"],
)
@SQLITE_ONLY
def test_manifest_pointing_outside_or_at_nothing(
    stocked: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
    tamper: Callable[[dict], None],
    error: type[Exception],
    match: str,
) -> None:
    manifest = _pushed(hub, base_dir, tmp_path)
    tamper(manifest)
    _commit(hub, {MANIFEST_FILE: json.dumps(manifest).encode()})
    stocked.add_remote("origin", REPO)
    with untouched(stocked, tmp_path):
        _refused(stocked.pull, error, match)
        if error is ManifestError:
            _refused(stocked.status, error, match)


@SQLITE_ONLY
def test_server_sending_wrong_bytes(stocked: Library, hub: HubServer, base_dir: Path, tmp_path: Path) -> None:
    """Corrupted weights, prototypes or manifest from the server never enter the store."""
    _pushed(hub, base_dir, tmp_path)
    stocked.add_remote("origin", REPO)
    for glob in ("experts/x/" + WEIGHTS, "prototypes/*", MANIFEST_FILE):
        hub.faults.clear()
        hub.faults.wrong_bytes(glob)
        with untouched(stocked, tmp_path, new_blobs_ok=True):
            _refused(stocked.pull, IntegrityError)
        stocked.gc(grace_s=0)  # so the next round downloads everything again
    api = HfApi(endpoint=hub.url, token=DEFAULT_TOKEN)  # a plain PEFT repo for import-hub
    api.create_repo("libstore-org/plain")
    api.upload_folder(repo_id="libstore-org/plain", folder_path=_good_adapter(base_dir, tmp_path, "p"))
    for glob in (WEIGHTS, CONFIG):
        hub.faults.clear()
        hub.faults.wrong_bytes(glob)
        with untouched(stocked, tmp_path):
            _refused(lambda: stocked.import_hub("libstore-org/plain"), LibstoreError)
    hub.faults.clear()
    assert stocked.pull().added == ("x",) and stocked.verify().ok


@SQLITE_ONLY
def test_hub_refusals_reach_the_cli_as_errors(
    stocked: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    manifest = _pushed(hub, base_dir, tmp_path)
    _tamper_expert_name(manifest)
    _commit(hub, {MANIFEST_FILE: json.dumps(manifest).encode()})
    stocked.add_remote("origin", REPO)
    with untouched(stocked, tmp_path):
        result = _cli(stocked, "pull")
        assert result.exit_code == 6 and "invalid name" in result.output
        assert "Traceback" not in result.output
