"""Base models from their config: Linear shapes (checked against a real model), fingerprints."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, T5Config

from libstore.errors import InvalidNameError, ValidationError
from libstore.store.basemodel import canonical_config, fingerprint_config, inspect_base_model
from libstore.types import LinearShape
from tests.factories import build_model, make_base_model, tiny_llama_config, tiny_phi3_config


def real_linears(model: torch.nn.Module) -> dict[str, LinearShape]:
    """Independent oracle: walk an instantiated model with real weights."""
    out = {}
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear:
            w = m.weight
            out[name] = LinearShape(in_features=w.shape[1], out_features=w.shape[0])
    return out


@pytest.mark.parametrize(
    ("arch", "architecture", "expected"),
    [
        (
            "llama",
            "LlamaForCausalLM",
            {
                "model.layers.0.self_attn.q_proj": (32, 32),
                "model.layers.1.mlp.gate_proj": (32, 64),
                "model.layers.1.mlp.down_proj": (64, 32),
                "lm_head": (32, 128),
            },
        ),
        (
            "phi3",
            "Phi3ForCausalLM",
            {
                "model.layers.0.self_attn.qkv_proj": (32, 96),
                "model.layers.0.self_attn.o_proj": (32, 32),
                "model.layers.1.mlp.gate_up_proj": (32, 128),
                "model.layers.1.mlp.down_proj": (64, 32),
            },
        ),
    ],
)
def test_linear_shapes_match_a_real_model(
    tmp_path: Path, arch: str, architecture: str, expected: dict[str, tuple[int, int]]
) -> None:
    folder = make_base_model(tmp_path / arch, arch=arch)  # type: ignore[arg-type]
    base = inspect_base_model(str(folder), name=arch)
    real = AutoModelForCausalLM.from_pretrained(folder)
    assert base.linear_shapes == real_linears(real)
    for name, (i, o) in expected.items():
        assert base.linear_shapes[name] == LinearShape(i, o)
    assert (base.name, base.architecture, base.model_type) == (arch, architecture, arch)
    assert base.source == str(folder.resolve()) and base.revision is None
    assert len(base.fingerprint) == 64
    assert base.fingerprint == fingerprint_config(real.config)


def test_relative_source_is_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_base_model(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert inspect_base_model("m", name="m").source == str((tmp_path / "m").resolve())


def test_fingerprint_stable_across_save_and_load(tmp_path: Path) -> None:
    in_memory = tiny_llama_config()
    assert not in_memory.architectures  # filled in only by save_pretrained
    folder = make_base_model(tmp_path / "m")
    loaded = AutoConfig.from_pretrained(folder)
    assert loaded.architectures == ["LlamaForCausalLM"]
    fp = fingerprint_config(in_memory.to_dict())
    assert fingerprint_config(loaded.to_dict()) == fp
    assert fingerprint_config(loaded) == fp  # a PretrainedConfig works too
    assert inspect_base_model(str(folder), name="m").fingerprint == fp
    # saved again elsewhere, in another dtype, with runtime switches flipped
    model = build_model()
    model.config.use_cache = False
    model.to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(tmp_path / "again")
    again = AutoConfig.from_pretrained(tmp_path / "again")
    assert again.to_dict()["dtype"] != loaded.to_dict()["dtype"]
    assert fingerprint_config(again) == fp


def test_fingerprint_ignores_provenance_and_runtime_keys() -> None:
    d = tiny_llama_config().to_dict()
    fp = fingerprint_config(d)
    noisy = {
        **d,
        "_name_or_path": "/somewhere/else",
        "transformers_version": "4.40.0",
        "dtype": "bfloat16",
        "torch_dtype": "float16",
        "use_cache": False,
        "_attn_implementation": "eager",
        "architectures": ["LlamaForCausalLM"],
        "eos_token_id": [2, 7],
        "max_length": 4096,
        "temperature": 0.7,
        "id2label": {"0": "x"},
    }
    assert fingerprint_config(noisy) == fp
    assert fingerprint_config(dict(reversed(list(d.items())))) == fp  # key order
    rope = json.loads(json.dumps(d))
    rope["rope_parameters"]["rope_theta"] = 10000  # int vs float spelling of one value
    assert fingerprint_config(rope) == fp
    assert "dtype" not in canonical_config(d) and "hidden_size" in canonical_config(d)


@pytest.mark.parametrize(
    "change",
    [
        {"hidden_size": 64, "head_dim": 16},
        {"num_hidden_layers": 3},
        {"intermediate_size": 96},
        {"vocab_size": 256},
        {"rms_norm_eps": 1e-5},
        {"tie_word_embeddings": True},
        {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}},
    ],
)
def test_fingerprint_changes_with_the_function(change: dict[str, object]) -> None:
    base = fingerprint_config(tiny_llama_config())
    assert fingerprint_config(tiny_llama_config(**change)) != base


def test_fingerprint_differs_between_architectures() -> None:
    assert fingerprint_config(tiny_llama_config()) != fingerprint_config(tiny_phi3_config())


def test_hidden_size_change_via_folder(tmp_path: Path) -> None:
    a = inspect_base_model(str(make_base_model(tmp_path / "a")), name="a")
    b = inspect_base_model(str(make_base_model(tmp_path / "b", hidden_size=64, head_dim=16)), name="b")
    assert a.fingerprint != b.fingerprint
    assert b.linear_shapes["model.layers.0.self_attn.q_proj"] == LinearShape(64, 64)


def test_big_config_builds_on_meta_without_weights(tmp_path: Path) -> None:
    # Llama-2-7B geometry: ~27 GB in fp32 if anything were allocated
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        architectures=["LlamaForCausalLM"],
    )
    cfg.save_pretrained(tmp_path / "big")
    t = time.perf_counter()
    base = inspect_base_model(str(tmp_path / "big"), name="big")
    assert time.perf_counter() - t < 20
    assert len(base.linear_shapes) == 32 * 7 + 1
    assert base.linear_shapes["model.layers.31.mlp.down_proj"] == LinearShape(11008, 4096)


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read a model config from"):
        inspect_base_model(str(tmp_path / "nope"), name="x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match="cannot read a model config"):
        inspect_base_model(str(tmp_path / "empty"), name="x")


def test_not_a_causal_lm(tmp_path: Path) -> None:
    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64).save_pretrained(
        tmp_path / "t5"
    )
    with pytest.raises(ValidationError, match="causal language model"):
        inspect_base_model(str(tmp_path / "t5"), name="t5")


def test_bad_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidNameError):
        inspect_base_model(str(make_base_model(tmp_path / "m")), name="../m")
