"""PEFT adapter folders: what passes, every refusal (with its message), base checks, names."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from libstore.errors import (
    BaseModelMismatchError,
    InvalidNameError,
    UnsafeFileError,
    ValidationError,
)
from libstore.store.adapter import check_against_base, read_adapter, validate_name
from libstore.store.basemodel import inspect_base_model
from libstore.store.blobs import BlobStore
from libstore.store.safetensors_io import load_tensors, save_tensors
from libstore.store.targeting import is_targeted
from libstore.types import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BaseModel, ModuleShape
from tests.factories import LLAMA_TARGETS, PHI3_TARGETS, make_adapter, make_base_model

WEIGHTS = ADAPTER_WEIGHTS


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base_model(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama_base(llama: Path) -> BaseModel:
    return inspect_base_model(str(llama), name="tiny")


@pytest.fixture
def adapter(llama: Path, tmp_path: Path) -> Path:
    return make_adapter(llama, tmp_path / "a", r=4, alpha=8, seed=1)


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    """The store read_adapter stages weights into (a library's blob store in real use)."""
    return BlobStore(tmp_path / "blobs")


def edit_config(folder: Path, **changes: Any) -> None:
    p = folder / ADAPTER_CONFIG
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def edit_tensors(folder: Path, fn: Any) -> None:
    tensors = load_tensors(folder / WEIGHTS)
    save_tensors(fn(dict(tensors)), folder / WEIGHTS, metadata={"format": "pt"})


def key(module: str, part: str) -> str:
    return f"base_model.model.{module}.lora_{part}.weight"


Q0 = "model.layers.0.self_attn.q_proj"


# --- what passes -------------------------------------------------------------------------------


def test_real_peft_adapter_passes(adapter: Path, llama: Path, blobs: BlobStore) -> None:
    a = read_adapter(adapter, into=blobs)
    assert set(a.modules) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert all(s == ModuleShape(in_features=32, out_features=32, rank=4) for s in a.modules.values())
    assert (a.rank, a.alpha, a.use_rslora, a.dtype) == (4, 8.0, False, "float32")
    assert a.target_modules == ("q_proj", "v_proj")
    w = adapter / WEIGHTS
    assert a.folder == str(adapter)
    assert a.weights_sha256 == hashlib.sha256(w.read_bytes()).hexdigest()
    assert a.weights_size == w.stat().st_size
    staged = Path(a.weights.path)  # the validated copy, inside the store, not yet at its address
    assert staged.parent.parent == blobs.root / "sha256" and staged.read_bytes() == w.read_bytes()
    assert list(blobs) == [] and blobs.temp_files() == [staged]
    assert blobs.commit_staged(a.weights).sha256 == a.weights_sha256
    assert list(blobs) == [a.weights_sha256] and blobs.temp_files() == []
    assert a.config_bytes == (adapter / ADAPTER_CONFIG).read_bytes()
    assert a.config["peft_type"] == "LORA"
    assert a.base_model_name_or_path == str(llama.resolve())
    assert ADAPTER_CONFIG not in a.extra_files and WEIGHTS not in a.extra_files
    assert "README.md" in a.extra_files


def test_all_targets_bf16_rslora(llama: Path, tmp_path: Path, blobs: BlobStore) -> None:
    folder = make_adapter(
        llama,
        tmp_path / "a",
        r=8,
        alpha=16,
        targets=LLAMA_TARGETS,
        use_rslora=True,
        dtype=torch.bfloat16,
    )
    a = read_adapter(folder, into=blobs)
    assert (a.rank, a.alpha, a.use_rslora, a.dtype) == (8, 16.0, True, "bfloat16")
    assert len(a.modules) == 14
    assert a.modules["model.layers.1.mlp.down_proj"] == ModuleShape(64, 32, 8)
    assert a.modules["model.layers.1.mlp.up_proj"] == ModuleShape(32, 64, 8)


def test_phi3_fused_modules(tmp_path: Path, blobs: BlobStore) -> None:
    base = make_base_model(tmp_path / "phi3", arch="phi3")
    a = read_adapter(make_adapter(base, tmp_path / "a", targets=PHI3_TARGETS), into=blobs)
    assert a.modules["model.layers.0.self_attn.qkv_proj"] == ModuleShape(32, 96, 4)
    assert a.modules["model.layers.0.mlp.gate_up_proj"] == ModuleShape(32, 128, 4)
    check_against_base(a, inspect_base_model(str(base), name="phi3"))


def test_regex_targets_and_layers_to_transform(llama: Path, tmp_path: Path, blobs: BlobStore) -> None:
    a = read_adapter(make_adapter(llama, tmp_path / "re", targets=r".*\.(k_proj|o_proj)"), into=blobs)
    assert a.target_modules == ("k_proj", "o_proj") and len(a.modules) == 4
    b = read_adapter(make_adapter(llama, tmp_path / "l0", layers_to_transform=[0]), into=blobs)
    assert set(b.modules) == {Q0, "model.layers.0.self_attn.v_proj"}


def test_is_targeted_mirrors_peft() -> None:
    cfg = {"target_modules": ["q_proj", "v_proj"], "exclude_modules": None}
    assert is_targeted(Q0, cfg)
    assert not is_targeted("model.layers.0.self_attn.k_proj", cfg)
    assert not is_targeted(Q0, {**cfg, "exclude_modules": ["q_proj"]})
    assert not is_targeted(Q0, {**cfg, "exclude_modules": r".*layers\.0.*"})
    assert is_targeted(Q0, {**cfg, "layers_to_transform": 0})
    assert not is_targeted(Q0, {**cfg, "layers_to_transform": [1]})
    assert is_targeted(Q0, {**cfg, "layers_to_transform": [0], "layers_pattern": "layers"})
    assert is_targeted(Q0, {"target_modules": "all-linear"})
    assert is_targeted(Q0, {"target_modules": [Q0]})


def test_allow_nonfinite(adapter: Path, blobs: BlobStore) -> None:
    def plant(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t[key(Q0, "B")][0, 0] = float("nan")
        return t

    edit_tensors(adapter, plant)
    with pytest.raises(ValidationError, match=r"NaN or Inf.*q_proj.*--allow-nonfinite"):
        read_adapter(adapter, into=blobs)
    assert read_adapter(adapter, into=blobs, allow_nonfinite=True).rank == 4


def test_adapter_module_does_not_import_torch() -> None:
    code = (
        "import sys; import libstore.store.adapter, libstore.store.blobs, "
        "libstore.store.safetensors_io, libstore.store.basemodel; "
        "heavy = ('torch', 'transformers', 'peft', 'safetensors.torch'); "
        "bad = [m for m in heavy if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_reading_an_adapter_does_not_import_torch(adapter: Path) -> None:
    code = (
        "import sys; from libstore.store.adapter import read_adapter; "
        "from libstore.store.blobs import BlobStore; "
        f"a = read_adapter({str(adapter)!r}, into=BlobStore({str(adapter.parent / 'blobs')!r})); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# --- folder-level refusals ---------------------------------------------------------------------


def test_missing_folder_and_files(tmp_path: Path, adapter: Path, blobs: BlobStore) -> None:
    with pytest.raises(
        ValidationError, match=r"does not exist.*adapter_config.json and adapter_model.safetensors"
    ):
        read_adapter(tmp_path / "nope", into=blobs)
    with pytest.raises(ValidationError, match="is a file, not a folder"):
        read_adapter(adapter / WEIGHTS, into=blobs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValidationError, match=r"no adapter_config.json; a PEFT LoRA folder holds"):
        read_adapter(empty, into=blobs)
    (adapter / WEIGHTS).unlink()
    with pytest.raises(ValidationError, match="no adapter_model.safetensors"):
        read_adapter(adapter, into=blobs)


@pytest.fixture
def _never_unpickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("libstore tried to unpickle a file")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.usefixtures("_never_unpickle")
@pytest.mark.parametrize(
    "name", ["adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt"]
)
def test_pickled_weights_refused(adapter: Path, name: str, blobs: BlobStore) -> None:
    (adapter / WEIGHTS).unlink()
    (adapter / name).write_bytes(pickle.dumps({"w": 1}, protocol=2))
    with pytest.raises(
        UnsafeFileError, match=rf"only as {name} \(a pickle\).*never unpickles.*safe_serialization"
    ):
        read_adapter(adapter, into=blobs)


@pytest.mark.usefixtures("_never_unpickle")
def test_torch_save_weights_refused(adapter: Path, blobs: BlobStore) -> None:
    (adapter / WEIGHTS).unlink()
    torch.save({"w": torch.zeros(2)}, adapter / "adapter_model.bin")
    with pytest.raises(UnsafeFileError, match="torch.save zip archive"):
        read_adapter(adapter, into=blobs)


@pytest.mark.usefixtures("_never_unpickle")
def test_pickle_disguised_as_safetensors(adapter: Path, blobs: BlobStore) -> None:
    (adapter / WEIGHTS).write_bytes(pickle.dumps({"w": 1}, protocol=4))
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        read_adapter(adapter, into=blobs)


def test_lfs_pointer_weights(adapter: Path, blobs: BlobStore) -> None:
    (adapter / WEIGHTS).write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    with pytest.raises(ValidationError, match="git-LFS pointer"):
        read_adapter(adapter, into=blobs)


# --- config refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (b"[1, 2]", "must hold a JSON object, got list"),
        (b'{"r": 4, "r": 8}', "duplicate key"),
    ],
)
def test_config_not_an_object(adapter: Path, raw: bytes, match: str, blobs: BlobStore) -> None:
    (adapter / ADAPTER_CONFIG).write_bytes(raw)
    with pytest.raises(ValidationError, match=match):
        read_adapter(adapter, into=blobs)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"peft_type": "IA3"}, "peft_type is 'IA3'; libstore stores LoRA adapters only"),
        ({"peft_type": None}, "no 'peft_type'"),
        ({"r": "4"}, "'r' must be a positive integer"),
        ({"r": 0}, "'r' must be a positive integer"),
        ({"r": 4.0}, "'r' must be a positive integer"),
        ({"r": True}, "'r' must be a positive integer"),
        ({"lora_alpha": "8"}, "'lora_alpha' must be a positive number"),
        ({"lora_alpha": None}, "'lora_alpha' must be a positive number"),
        ({"lora_alpha": False}, "'lora_alpha' must be a positive number"),
        ({"lora_alpha": -8}, "'lora_alpha' must be a positive number"),
        ({"target_modules": 5}, "'target_modules' must be"),
        ({"target_modules": [1, 2]}, "'target_modules' must be"),
        ({"target_modules": []}, "'target_modules' must be"),
        ({"target_modules": None}, "'target_modules' must be"),
        ({"use_rslora": "yes"}, "'use_rslora' must be true or false"),
        ({"task_type": 5}, "'task_type' must be a string or null"),
        ({"base_model_name_or_path": 3}, "'base_model_name_or_path' must be a string"),
        ({"exclude_modules": 3}, "'exclude_modules' must be"),
        ({"layers_to_transform": "0"}, "'layers_to_transform' must be"),
        ({"rank_pattern": [1]}, "'rank_pattern' must be an object"),
        ({"use_dora": True}, r"use_dora=true \(DoRA.*not supported"),
        ({"rank_pattern": {"q_proj": 8}}, r"rank_pattern=.*per-module ranks.*not supported"),
        ({"alpha_pattern": {"q_proj": 8}}, r"alpha_pattern=.*not supported"),
        ({"lora_bias": True}, r"lora_bias=true.*not supported"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\[\"lm_head\"\].*not supported"),
        ({"bias": "all"}, r"bias=\"all\".*not supported"),
        ({"alora_invocation_tokens": [1, 2]}, "aLoRA"),
        ({"target_parameters": ["w"]}, "target_parameters"),
        ({"use_qalora": True}, "QALoRA"),
        ({"init_lora_weights": "pissa_niter_4"}, "changes the base model's weights"),
        ({"init_lora_weights": "loftq"}, "path_initial_model_for_weight_conversion"),
        (
            {"target_modules": ["q_proj"]},
            r"module 'model.layers.0.self_attn.v_proj' \(and 1 more\).*PEFT would ignore",
        ),
        ({"layers_to_transform": [1]}, "does not target it"),
        ({"exclude_modules": ["v_proj"]}, "does not target it"),
    ],
)
def test_config_refusals(adapter: Path, changes: dict[str, Any], match: str, blobs: BlobStore) -> None:
    edit_config(adapter, **changes)
    with pytest.raises(ValidationError, match=match) as e:
        read_adapter(adapter, into=blobs)
    assert str(adapter / ADAPTER_CONFIG) in str(e.value)


def test_harmless_config_variants_pass(adapter: Path, blobs: BlobStore) -> None:
    edit_config(
        adapter,
        init_lora_weights="gaussian",
        rank_pattern={},
        alpha_pattern={},
        modules_to_save=None,
        task_type="CAUSAL_LM",
        lora_alpha=8.5,
        future_peft_field={"x": 1},
    )
    a = read_adapter(adapter, into=blobs)
    assert a.alpha == 8.5 and a.config["future_peft_field"] == {"x": 1}


def test_nan_alpha_refused(adapter: Path, blobs: BlobStore) -> None:
    p = adapter / ADAPTER_CONFIG
    p.write_text(p.read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN'))
    with pytest.raises(ValidationError, match="NaN is not valid JSON"):
        read_adapter(adapter, into=blobs)


def test_real_dora_adapter_refused(llama: Path, tmp_path: Path, blobs: BlobStore) -> None:
    folder = make_adapter(llama, tmp_path / "dora", use_dora=True)
    with pytest.raises(ValidationError, match="use_dora"):
        read_adapter(folder, into=blobs)


# --- tensor refusals ---------------------------------------------------------------------------


def _rename(old: str, new: str) -> Any:
    def fn(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.replace(old, new): v for k, v in t.items()}

    return fn


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (
            _rename(".lora_A.weight", ".lora_A.default.weight"),
            "still carries the adapter name 'default'",
        ),
        (
            _rename("base_model.model.", ""),
            "is not a PEFT LoRA weight; expected base_model.model.<module>",
        ),
        (
            lambda t: {
                **t,
                "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 128),
            },
            "LoRA on embedding layers",
        ),
        (lambda t: {**t, f"base_model.model.{Q0}.lora_magnitude_vector": torch.zeros(32)}, "DoRA"),
        (lambda t: {**t, f"base_model.model.{Q0}.lora_B.bias": torch.zeros(32)}, "lora_bias"),
        (
            lambda t: {k: v for k, v in t.items() if k != key(Q0, "B")},
            rf"module '{Q0}' has lora_A but no lora_B",
        ),
        (
            lambda t: {k: v for k, v in t.items() if k != key(Q0, "A")},
            rf"module '{Q0}' has lora_B but no lora_A",
        ),
        (
            lambda t: {**t, key(Q0, "B"): torch.zeros(32, 3)},
            r"lora_A is \[4, 32\] \(rank 4\) but lora_B is \[32, 3\]",
        ),
        (lambda t: {**t, key(Q0, "A"): torch.zeros(128)}, "must both be matrices"),
        (lambda t: {**t, key(Q0, "A"): t[key(Q0, "A")].half()}, r"mixes dtypes \(F16: 1 .*F32: 7"),
        (
            lambda t: {k: v.to(torch.int8) for k, v in t.items()},
            "I8; libstore stores floating weights only",
        ),
        (lambda t: {}, "holds no tensors"),
        (lambda t: {**t, key(Q0, "A"): torch.zeros(4, 0)}, "empty dimension"),
    ],
)
def test_tensor_refusals(adapter: Path, fn: Any, match: str, blobs: BlobStore) -> None:
    edit_tensors(adapter, fn)
    with pytest.raises(ValidationError, match=match) as e:
        read_adapter(adapter, into=blobs)
    assert str(adapter / WEIGHTS) in str(e.value)


def test_rank_must_match_config(adapter: Path, blobs: BlobStore) -> None:
    edit_config(adapter, r=8)
    with pytest.raises(ValidationError, match=r"has rank 4 but adapter_config.json says r=8"):
        read_adapter(adapter, into=blobs)


# --- against the base model --------------------------------------------------------------------


def test_check_against_base_passes(adapter: Path, llama_base: BaseModel, blobs: BlobStore) -> None:
    check_against_base(read_adapter(adapter, into=blobs), llama_base)


def test_shape_mismatch_is_never_overridable(llama_base: BaseModel, tmp_path: Path, blobs: BlobStore) -> None:
    wide = make_base_model(tmp_path / "wide", hidden_size=48)
    a = read_adapter(make_adapter(wide, tmp_path / "a"), into=blobs)
    for allow in (False, True):
        with pytest.raises(BaseModelMismatchError) as e:
            check_against_base(a, llama_base, allow_base_mismatch=allow)
        msg = str(e.value)
        assert "model.layers.0.self_attn.q_proj" in msg
        assert "(4, 48)" in msg and "in=48 out=48" in msg
        assert "has a layer with in_features=32, out_features=32" in msg
        assert "and 3 more problems" in msg


def test_module_missing_from_base(llama_base: BaseModel, tmp_path: Path, blobs: BlobStore) -> None:
    phi = make_base_model(tmp_path / "phi3", arch="phi3")
    a = read_adapter(make_adapter(phi, tmp_path / "a", targets=["qkv_proj"]), into=blobs)
    with pytest.raises(
        BaseModelMismatchError,
        match=r"'model.layers.0.self_attn.qkv_proj' is not an nn.Linear or Conv1D layer of base model 'tiny'",
    ):
        check_against_base(a, llama_base, allow_base_mismatch=True)


def test_recorded_base_mismatch(adapter: Path, llama_base: BaseModel, blobs: BlobStore) -> None:
    edit_config(adapter, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    a = read_adapter(adapter, into=blobs)
    with pytest.raises(
        BaseModelMismatchError, match=r"trained on 'meta-llama/Llama-3.1-8B'.*--allow-base-mismatch"
    ):
        check_against_base(a, llama_base)
    check_against_base(a, llama_base, allow_base_mismatch=True)


def test_recorded_base_matches_by_name_path_or_hub_id(
    adapter: Path,
    llama: Path,
    llama_base: BaseModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    blobs: BlobStore,
) -> None:
    a = read_adapter(adapter, into=blobs)
    for recorded in ("tiny", str(llama), str(llama) + "/", None, ""):
        check_against_base(replace(a, base_model_name_or_path=recorded), llama_base)
    monkeypatch.chdir(llama.parent)
    check_against_base(replace(a, base_model_name_or_path=f"./{llama.name}"), llama_base)
    link = tmp_path / "link"
    link.symlink_to(llama)
    check_against_base(replace(a, base_model_name_or_path=str(link)), llama_base)
    hub = replace(llama_base, source="microsoft/Phi-3-mini-4k-instruct")
    check_against_base(replace(a, base_model_name_or_path="microsoft/phi-3-mini-4k-instruct"), hub)
    with pytest.raises(BaseModelMismatchError):
        check_against_base(replace(a, base_model_name_or_path=str(tmp_path)), llama_base)


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["arc_easy", "a", "A1", "wiki-en", "v1.2", "0abc", "x" * 96, "mbc-k10.3", "Phi3_mini-4k"],
)
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "it is empty"),
        ("x" * 97, "it has 97 characters"),
        ("../x", "it contains a path separator '/'"),
        ("a/b", "path separator '/'"),
        ("a\\b", "path separator"),
        ("x\x00", "control character U\\+0000"),
        ("a\nb", "control character U\\+000A"),
        ("\u0430rc", "non-ASCII character 'а' \\(U\\+0430 CYRILLIC SMALL LETTER A\\)"),
        ("caf\u00e9", "non-ASCII"),
        ("a b", "it contains ' '"),
        ("a:b", "it contains ':'"),
        (".", "it starts with '.'"),
        ("..", "it starts with '.'"),
        (".hidden", "it starts with '.'"),
        ("-rf", "it starts with '-'"),
        ("_x", "it starts with '_'"),
        ("a..b", "it contains '..'"),
        ("a*", "it contains '\\*'"),
    ],
)
def test_bad_names(name: str, why: str) -> None:
    with pytest.raises(InvalidNameError, match=why) as e:
        validate_name(name)
    assert "allowed are 1-96 characters from ASCII letters, digits, '.', '_' and '-'" in str(e.value)


def test_name_must_be_a_string() -> None:
    with pytest.raises(InvalidNameError, match="must be a string"):
        validate_name(None)  # type: ignore[arg-type]


# --- the factories every test relies on --------------------------------------------------------


def test_factory_adapters_are_deterministic(llama: Path, tmp_path: Path) -> None:
    one = make_adapter(llama, tmp_path / "one", seed=5)
    two = make_adapter(llama, tmp_path / "two", seed=5)
    other = make_adapter(llama, tmp_path / "other", seed=6)
    for name in (ADAPTER_CONFIG, WEIGHTS):
        assert (one / name).read_bytes() == (two / name).read_bytes()
    assert (one / WEIGHTS).read_bytes() != (other / WEIGHTS).read_bytes()
    noop = load_tensors(make_adapter(llama, tmp_path / "noop", init="peft") / WEIGHTS)
    assert all(not t.any() for k, t in noop.items() if ".lora_B." in k)  # PEFT's init: B = 0


def test_factory_planted_structure(llama: Path, tmp_path: Path) -> None:
    centre = make_adapter(llama, tmp_path / "centre", seed=1)
    near = make_adapter(llama, tmp_path / "near", centre=centre, noise=1e-3, seed=2)
    c, n = load_tensors(centre / WEIGHTS), load_tensors(near / WEIGHTS)
    assert set(c) == set(n)
    assert all(0 < float((c[k] - n[k]).abs().max()) < 1e-2 for k in c)

    sv = [4.0, 2.0, 1.0, 0.5]
    folder = make_adapter(llama, tmp_path / "sv", singular_values=sv, alpha=8, r=4)
    t = load_tensors(folder / WEIGHTS)
    a, b = t[key(Q0, "A")].double(), t[key(Q0, "B")].double()
    got = torch.linalg.svdvals((8 / 4) * b @ a)[:4]
    assert torch.allclose(got, torch.tensor(sv, dtype=torch.float64), atol=1e-5)
