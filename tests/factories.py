"""Tiny base models and real PEFT adapters for tests, fast and deterministic.

Every adapter is made the way users make them (``get_peft_model`` + ``save_pretrained``), so tests
exercise PEFT's real file format. Models are built once per process and reused (cached), so making
fifty adapters costs fifty PEFT wraps and saves, not fifty model loads. The same call gives the same
weight bytes; ``adapter_config.json`` is rewritten with a sorted ``target_modules`` (PEFT saves a
set, whose order changes from process to process) so its bytes are stable too.

Planting structure:
  * ``centre=`` + ``noise=``: every LoRA tensor = centre tensor + noise · N(0, 1) (seeded); adapters
    made around the same centre cluster together (MBC tests).
  * ``singular_values=``: every module gets ΔW = s·B·A with exactly these singular values and random
    orthonormal singular vectors (prototype tests that need a clear spectral gap).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
)

Arch = Literal["llama", "phi3", "gpt2"]

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI3_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
#: GPT-2's layers are transformers Conv1D (weight (in, out)), not nn.Linear
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """Llama with hidden 32, intermediate 64, 2 layers, 4 heads (4 kv heads), vocab 128."""
    kwargs: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 128,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_phi3_config(**overrides: Any) -> Phi3Config:
    """Phi-3 (fused qkv_proj and gate_up_proj) of the same tiny size."""
    kwargs: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 128,
        "max_position_embeddings": 256,
        "original_max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    kwargs.update(overrides)
    return Phi3Config(**kwargs)


def tiny_gpt2_config(**overrides: Any) -> GPT2Config:
    """GPT-2 (Conv1D layers: c_attn, c_proj, c_fc) with n_embd 32, 2 layers, 4 heads, vocab 128."""
    kwargs: dict[str, Any] = {
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "vocab_size": 128,
        "n_positions": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def tiny_config(arch: Arch = "llama", **overrides: Any) -> PretrainedConfig:
    if arch == "gpt2":
        return tiny_gpt2_config(**overrides)
    if arch == "llama":
        return tiny_llama_config(**overrides)
    if arch == "phi3":
        return tiny_phi3_config(**overrides)
    raise ValueError(f"unknown arch {arch!r}; use 'llama', 'phi3' or 'gpt2'")


def build_model(arch: Arch = "llama", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A fresh tiny model with seeded random weights (not cached: the caller may change it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            tiny_config(arch, **overrides)
        )
    model.eval()  # type: ignore[no-untyped-call]
    return model


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence deprecation chatter that PEFT triggers inside transformers (not ours to fix)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


_tmp_root: Path | None = None


def _cache_root() -> Path:
    global _tmp_root
    if _tmp_root is None:
        _tmp_root = Path(tempfile.mkdtemp(prefix="libstore-factories-"))
        atexit.register(shutil.rmtree, _tmp_root, ignore_errors=True)
    return _tmp_root


@functools.lru_cache(maxsize=32)
def _saved_base(arch: Arch, seed: int, overrides_json: str) -> Path:
    """Build and save a base model once per process; later calls copy the saved files."""
    model = build_model(arch, seed, **json.loads(overrides_json))
    tag = hashlib.sha256(overrides_json.encode()).hexdigest()[:12]
    out = _cache_root() / f"base-{arch}-{seed}-{tag}"
    model.save_pretrained(out)
    return out


def make_base_model(dir: str | Path, arch: Arch = "llama", seed: int = 0, **config_overrides: Any) -> Path:
    """Save a tiny model (``config.json`` + ``model.safetensors``) into ``dir``; returns ``dir``.

    ``config_overrides`` go to the config (e.g. ``hidden_size=64``); they must be JSON values.
    """
    src = _saved_base(arch, seed, json.dumps(config_overrides, sort_keys=True))
    dest = Path(dir)
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copyfile(f, dest / f.name)
    return dest


@functools.lru_cache(maxsize=16)
def _loaded_base(path: str, stamp: tuple[int, ...]) -> PreTrainedModel:
    """The model at ``path``, loaded once per (path, file stamps); callers deep-copy it."""
    del stamp  # part of the cache key only: a rewritten folder is loaded again
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def load_base(base_dir: str | Path) -> PreTrainedModel:
    """A private copy of the model saved in ``base_dir`` (loaded from disk once per process)."""
    path = Path(base_dir).resolve()
    stamp = tuple(
        x for f in sorted(path.iterdir()) if f.is_file() for x in (f.stat().st_mtime_ns, f.stat().st_size)
    )
    return copy.deepcopy(_loaded_base(str(path), stamp))


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{dtype!r} is not a torch dtype name (e.g. 'bfloat16')")
    return value


def adapter_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """A saved adapter's tensors, keyed as in the file (``base_model.model.<m>.lora_A.weight``)."""
    return load_file(Path(folder) / "adapter_model.safetensors")


def make_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    r: int = 4,
    alpha: float = 8,
    targets: Sequence[str] | str = ("q_proj", "v_proj"),
    seed: int = 0,
    init: Literal["random", "peft"] = "random",
    use_rslora: bool = False,
    dtype: torch.dtype | str | None = None,
    centre: Mapping[str, torch.Tensor] | str | Path | None = None,
    noise: float = 0.01,
    singular_values: Sequence[float] | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    **lora_kwargs: Any,
) -> Path:
    """Train-free PEFT LoRA adapter for the base in ``base_dir``, saved to ``out_dir``; returns it.

    Args:
        targets: ``target_modules`` (names, or one regex string as PEFT accepts).
        init: ``"random"``: A and B random (``init_lora_weights=False``), so ΔW ≠ 0;
            ``"peft"``: PEFT's default init (B = 0, a no-op adapter).
        dtype: save the LoRA weights in this dtype (e.g. ``torch.bfloat16`` or ``"float16"``).
        centre: tensors keyed as in the file, or an adapter folder; weights become
            ``centre + noise * N(0, 1)``. Shapes must match (same r and targets).
        singular_values: r values; each module's ΔW gets exactly these singular values.
        config_overrides: keys written into ``adapter_config.json`` after saving (to forge configs
            PEFT would not write, e.g. for validation tests).
        lora_kwargs: passed to ``LoraConfig`` (e.g. ``use_dora=True``, ``layers_to_transform=[0]``).
    """
    if centre is not None and singular_values is not None:
        raise ValueError("centre and singular_values are alternatives; pass one")
    if init not in ("random", "peft"):
        raise ValueError(f"init must be 'random' or 'peft', got {init!r}")
    out = Path(out_dir)
    model = load_base(base_dir)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT takes floats too
        target_modules=targets if isinstance(targets, str) else list(targets),
        use_rslora=use_rslora,
        init_lora_weights=init == "peft",
        **lora_kwargs,
    )
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    params = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        if centre is not None:
            base_t = centre if isinstance(centre, Mapping) else adapter_tensors(centre)
            for key in sorted(params):
                c = base_t[key]
                p = params[key]
                if tuple(c.shape) != tuple(p.shape):
                    raise ValueError(f"centre {key} has shape {tuple(c.shape)}, need {tuple(p.shape)}")
                p.copy_(c.float() + noise * torch.randn(p.shape, generator=gen))
        elif singular_values is not None:
            _plant_spectrum(params, singular_values, gen, alpha=alpha, r=r, use_rslora=use_rslora)
        if dtype is not None:
            want = _as_dtype(dtype)
            for p in params.values():
                p.data = p.data.to(want)
    with _quiet():
        peft_model.save_pretrained(str(out))
    _rewrite_config(out / "adapter_config.json", config_overrides)
    return out


def _plant_spectrum(
    params: Mapping[str, torch.nn.Parameter],
    singular_values: Sequence[float],
    gen: torch.Generator,
    *,
    alpha: float,
    r: int,
    use_rslora: bool,
) -> None:
    if len(singular_values) != r:
        raise ValueError(f"need {r} singular values, got {len(singular_values)}")
    s = alpha / (r**0.5) if use_rslora else alpha / r
    sv = torch.tensor([float(x) for x in singular_values])
    for key in sorted(k for k in params if ".lora_A." in k):
        a = params[key]
        b = params[key.replace(".lora_A.", ".lora_B.")]
        n_in, n_out = a.shape[1], b.shape[0]
        v, _ = torch.linalg.qr(torch.randn(n_in, r, generator=gen))  # in × r, orthonormal columns
        u, _ = torch.linalg.qr(torch.randn(n_out, r, generator=gen))  # out × r
        a.copy_(v.T)  # A = Vᵀ
        b.copy_(u * (sv / s))  # s·B·A = U diag(σ) Vᵀ


def _rewrite_config(path: Path, overrides: Mapping[str, Any] | None) -> None:
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    if overrides:
        config.update(overrides)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
