"""Bad input at the store's boundary gets a libstore error with its field, fast — never a traceback
or a hang: regexes in adapter configs, lone surrogates, files that are not files, mttl metadata."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from libstore import Library
from libstore.cli import cli
from libstore.errors import ValidationError
from libstore.hub.manifest import ManifestError
from libstore.hub.manifest_reader import parse_manifest
from libstore.store.adapter import read_adapter
from libstore.store.blobs import BlobStore
from libstore.store.safetensors_io import load_tensors, read_header, save_tensors
from libstore.store.strict_json import check_json_value, strict_loads
from libstore.store.targeting import REGEX_DEADLINE_S, untargeted
from libstore.types import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tests.factories import LLAMA_TARGETS, build_model, make_adapter

# fullmatch of (?:.|.)*X on a 31-character module name takes re about 2^31 steps: hours
CATASTROPHIC = r"(?:.|.)*X"


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def adapter(base_dir: Path, tmp_path: Path) -> Path:
    return make_adapter(base_dir, tmp_path / "a", r=4, alpha=8, seed=1)


@pytest.fixture
def lib(tmp_path: Path, base_dir: Path) -> Library:
    lib = Library.init(tmp_path / "lib")
    lib.add_base("tiny", str(base_dir))
    return lib


def edit_config(folder: Path, **changes: Any) -> None:
    p = folder / ADAPTER_CONFIG
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def refused(fn: Any, field: str | None = None, path: Path | None = None) -> ValidationError:
    with pytest.raises(ValidationError) as e:
        fn()
    if field is not None:
        assert e.value.field == field, e.value
    if path is not None:
        assert str(path) in str(e.value)
    return e.value


# --- item 8: regexes in adapter_config.json -------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"target_modules": r".*\.(q_proj|v_proj"}, "target_modules"),
        ({"target_modules": "*q_proj"}, "target_modules"),
        ({"exclude_modules": r"[unclosed"}, "exclude_modules"),
        ({"exclude_modules": r"(?P<x>a)(?P<x>b)"}, "exclude_modules"),
        ({"layers_to_transform": [0, 1], "layers_pattern": "layers("}, "layers_pattern"),
        ({"layers_to_transform": [0, 1], "layers_pattern": ["layers", r"(?P<idx>h)"]}, "layers_pattern"),
        ({"target_modules": "x" * 20_000}, "target_modules"),
    ],
)
def test_invalid_patterns_are_refused_with_their_field(
    adapter: Path, blobs: BlobStore, changes: dict[str, Any], field: str
) -> None:
    edit_config(adapter, **changes)
    refused(lambda: read_adapter(adapter, into=blobs), field, adapter / ADAPTER_CONFIG)
    assert blobs.temp_files() == [] and list(blobs) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"target_modules": CATASTROPHIC},
        {"exclude_modules": CATASTROPHIC},
        {"layers_to_transform": [0, 1], "layers_pattern": CATASTROPHIC},
    ],
    ids=["target_modules", "exclude_modules", "layers_pattern"],
)
def test_catastrophic_patterns_are_refused_in_bounded_time(
    adapter: Path, blobs: BlobStore, changes: dict[str, Any]
) -> None:
    edit_config(adapter, **changes)
    field = next(iter(k for k in changes if k != "layers_to_transform"))
    t = time.monotonic()
    err = refused(lambda: read_adapter(adapter, into=blobs), field)
    assert time.monotonic() - t < REGEX_DEADLINE_S + 5
    assert "catastrophic backtracking" in str(err) and "model.layers." in str(err)


def test_catastrophic_pattern_through_the_cli_add_exits_6_fast(lib: Library, adapter: Path) -> None:
    edit_config(adapter, exclude_modules=CATASTROPHIC)
    t = time.monotonic()
    result = CliRunner().invoke(cli, ["-L", str(lib.path), "add", str(adapter), "--name", "x"])
    assert result.exit_code == 6, result.output
    assert time.monotonic() - t < REGEX_DEADLINE_S + 10
    edit_config(adapter, exclude_modules="(unclosed")
    result = CliRunner().invoke(cli, ["-L", str(lib.path), "add", str(adapter), "--name", "x"])
    assert result.exit_code == 6 and "not a valid regular expression" in result.output
    assert lib.experts() == [] and lib.context.blobs.temp_files() == []


def test_peft_refused_pattern_combinations(adapter: Path, blobs: BlobStore) -> None:
    edit_config(adapter, layers_pattern="layers")
    refused(lambda: read_adapter(adapter, into=blobs), "layers_pattern")
    edit_config(adapter, target_modules=r".*\.(q_proj|v_proj)", layers_pattern=None, layers_to_transform=[0])
    refused(lambda: read_adapter(adapter, into=blobs), "layers_to_transform")


_PEFT_CONFIGS: list[dict[str, Any]] = [
    {"target_modules": r".*\.(q_proj|v_proj)"},
    {"target_modules": r"model\.layers\.1\.self_attn\.(k|o)_proj"},
    {"target_modules": r".*(mlp|self_attn)\.[a-z]+_proj{,1}"},  # {,1}: re's reading, not RE2's
    {"target_modules": r"(?!.*down).*_proj"},  # a lookahead (RE2 refuses it)
    {"target_modules": r".*layers\.(\d)\.(?=mlp).*"},
    {"target_modules": list(LLAMA_TARGETS), "exclude_modules": r".*layers\.0\.mlp.*"},
    {
        "target_modules": list(LLAMA_TARGETS),
        "exclude_modules": ["up_proj", "model.layers.1.self_attn.q_proj"],
    },
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": 1},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [0], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": ["h", "lay.rs"]},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0], "layers_pattern": "nothing"},
    {"target_modules": ["q_proj"], "layers_to_transform": [], "layers_pattern": None},
]


def test_regex_targeting_equals_peft() -> None:
    """PEFT's own check_target_module_exists is the oracle, on every module name of a real model."""
    names = [n for n, _ in build_model().named_modules() if n]
    answers = set()
    for cfg in _PEFT_CONFIGS:
        want = [n for n in names if not check_target_module_exists(LoraConfig(r=4, **cfg), n)]
        assert untargeted(cfg, names) == want, cfg
        answers.add(tuple(want))
    assert len(answers) == len(_PEFT_CONFIGS), "every config must target a different set of modules"


# --- item 10: lone surrogates -------------------------------------------------------------------


def test_api_metadata_with_a_lone_surrogate_is_refused(lib: Library, adapter: Path) -> None:
    for bad in ({"note": "ok \ud800"}, {"\udfff": 1}, {"x": [1, {"y": "\udc80"}]}):
        refused(lambda b=bad: lib.add(adapter, name="x", metadata=b), "metadata")
    refused(lambda: lib.add(adapter, name="x", metadata={"x": float("nan")}), "metadata")
    refused(lambda: lib.add(adapter, name="x", metadata={1: "int key"}), "metadata")  # type: ignore[dict-item]
    refused(lambda: lib.add(adapter, name="x", metadata={"x": object()}), "metadata")
    assert lib.experts() == [] and list(lib.context.blobs) == [] and lib.context.blobs.temp_files() == []
    assert lib.add(adapter, name="x", metadata={"note": "fine \U0001f600", "n": [1, 2.5, None]}).name == "x"


def test_config_with_a_surrogate_escape_is_refused(adapter: Path, blobs: BlobStore) -> None:
    p = adapter / ADAPTER_CONFIG
    cfg = p.read_text()
    p.write_text(cfg.replace('"peft_type"', '"note": "\\ud800", "peft_type"', 1))
    assert "\\ud800" in p.read_text()
    refused(lambda: read_adapter(adapter, into=blobs), path=p)
    p.write_text(cfg.replace('"peft_type"', '"n\\udfffote": 1, "peft_type"', 1))
    refused(lambda: read_adapter(adapter, into=blobs), path=p)
    p.write_text(cfg.replace('"peft_type"', '"note": "\\ud83d\\ude00", "peft_type"', 1))  # a valid pair
    assert read_adapter(adapter, into=blobs).config["note"] == "\U0001f600"


def test_safetensors_metadata_with_a_surrogate_escape_is_refused(adapter: Path) -> None:
    w = adapter / ADAPTER_WEIGHTS
    save_tensors(load_tensors(w), w, metadata={"format": "pt", "who": "X" * 6})
    raw = w.read_bytes().replace(b'"XXXXXX"', b'"\\ud800"', 1)
    w.write_bytes(raw)
    refused(lambda: read_header(w), path=w)


def test_manifest_with_a_surrogate_escape_is_refused() -> None:
    doc = b'{"format": "libstore-library", "format_version": 1, "generator": "\\ud800"}'
    with pytest.raises(ManifestError, match="surrogate"):
        parse_manifest(doc)


def test_strict_json_and_check_json_value_units() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        strict_loads('["a", {"b": ["\\udc00"]}]')
    with pytest.raises(ValueError, match="surrogate"):
        strict_loads('{"k": "raw \ud800"}')
    assert strict_loads('{"k": "\\u00e9\\ud83d\\ude00"}') == {"k": "é\U0001f600"}
    deep: Any = "leaf"
    for _ in range(500):
        deep = [deep]
    with pytest.raises(ValidationError, match="nested"):
        check_json_value({"d": deep}, "metadata")
    check_json_value(None, "metadata")
    check_json_value({"a": [True, 1, 2.0, None, "s"], "b": {"c": ()}}, "metadata")


# --- item 11: files that are not files, unreadable files, mttl metadata ---------------------------


def test_weights_symlinked_to_proc_self_mem(adapter: Path, blobs: BlobStore, lib: Library) -> None:
    w = adapter / ADAPTER_WEIGHTS
    w.unlink()
    w.symlink_to("/proc/self/mem")
    err = refused(lambda: read_adapter(adapter, into=blobs), path=w)
    assert err.path == str(w) and "could not be read" in str(err)
    assert blobs.temp_files() == []
    result = CliRunner().invoke(cli, ["-L", str(lib.path), "add", str(adapter), "--name", "x"])
    assert result.exit_code == 6 and str(w) in result.output, result.output
    assert lib.experts() == [] and lib.context.blobs.temp_files() == []


def test_config_symlinked_to_proc_self_mem(adapter: Path, blobs: BlobStore) -> None:
    c = adapter / ADAPTER_CONFIG
    c.unlink()
    c.symlink_to("/proc/self/mem")
    refused(lambda: read_adapter(adapter, into=blobs), path=c)


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "dangling"])
def test_weights_that_are_not_regular_files(adapter: Path, blobs: BlobStore, kind: str) -> None:
    w = adapter / ADAPTER_WEIGHTS
    w.unlink()
    if kind == "fifo":
        os.mkfifo(w)  # opening it for reading would block forever
    elif kind == "device":
        w.symlink_to("/dev/zero")  # reading it never ends
    elif kind == "folder":
        w.mkdir()
    else:
        w.symlink_to(adapter / "nowhere")
    refused(lambda: read_adapter(adapter, into=blobs), path=w)
    assert blobs.temp_files() == []


def test_staging_refuses_non_regular_sources_after_the_check(tmp_path: Path, blobs: BlobStore) -> None:
    """The type of the *opened* file decides, so a path flipped after a check cannot slip through."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for src in (fifo, Path("/dev/zero"), Path("/proc/self/mem"), tmp_path):
        refused(lambda s=src: blobs.stage_file(s), path=src)
    assert blobs.temp_files() == []


def _mttl_folder(folder: Path, dropout: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    m = "model.layers.0.self_attn.q_proj"
    torch.save({f"{m}.lora_a": torch.randn(32, 4), f"{m}.lora_b": torch.randn(4, 32)}, folder / "e.ckpt")
    torch.save(
        {
            "expert_name": "e",
            "expert_task_name": "t",
            "expert_config": {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": dropout},
        },
        folder / "e.meta",
    )
    return folder


@pytest.mark.parametrize("dropout", ["0.1", [0.1], {"p": 0.1}, float("nan"), 1.5, -0.1, True])
def test_mttl_lora_dropout_of_the_wrong_type(lib: Library, tmp_path: Path, dropout: object) -> None:
    folder = _mttl_folder(tmp_path / "mttl", dropout)
    refused(lambda: lib.import_mttl(folder, allow_base_mismatch=True), "lora_dropout", folder / "e.meta")
    assert lib.experts() == [] and lib.context.blobs.temp_files() == []


def test_mttl_good_dropout_still_imports(lib: Library, tmp_path: Path) -> None:
    folder = _mttl_folder(tmp_path / "mttl", None)
    assert [e.name for e in lib.import_mttl(folder, allow_base_mismatch=True).added] == ["e"]
