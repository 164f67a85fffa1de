"""Describe a base model from its config alone: architecture, adaptable layer shapes, fingerprint.

The layers LoRA can adapt are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's ``c_attn``,
``c_proj``, ``c_fc``: a Linear whose weight is stored transposed, (in, out)); PEFT adapts both with
the same ``lora_A`` (r, in) / ``lora_B`` (out, r) factors, so both are recorded as (in, out) shapes.

The model is built on the meta device, so registering a 70B base reads one JSON file and allocates
no weights. torch and transformers are imported inside the functions, so importing this is cheap.

**Fingerprint.** sha256 of the canonical JSON of ``config.to_dict()`` without the keys that do not
change the function the network computes (see :data:`FINGERPRINT_IGNORED_KEYS`): where it was loaded
from, which transformers wrote it, the dtype and attention kernel chosen at load time, caching and
output switches, generation and tokenizer settings, classification-head labels. ``architectures`` is
ignored too: a config made in memory has none until ``save_pretrained`` fills it in, so keeping it
would make the same model fingerprint differently before and after a save; the head class is
recorded separately as ``BaseModel.architecture`` and ``model_type`` stays in the fingerprint. The
fingerprint is of the config only, not of the weights: two fine-tunes of one architecture share it.
It depends on how transformers normalises configs (e.g. v5's ``rope_parameters``), so compare
fingerprints made by the same major transformers version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from libstore.errors import ValidationError
from libstore.store.adapter import validate_name
from libstore.types import BaseModel, LinearShape

if TYPE_CHECKING:
    import torch

#: Top-level (and sub-config) keys left out of the fingerprint; see the module docstring.
FINGERPRINT_IGNORED_KEYS: frozenset[str] = frozenset(
    {
        # provenance
        "_name_or_path",
        "transformers_version",
        "_commit_hash",
        "architectures",
        # load-time choices
        "torch_dtype",
        "dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "attn_implementation",
        "_experts_implementation",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
        "chunk_size_feed_forward",
        "tf_legacy_loss",
        "use_bfloat16",
        # generation and tokenizer settings (v4 kept them in the model config)
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "generation_config",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        # classification-head bookkeeping, irrelevant to a causal LM
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "finetuning_task",
    }
)


def _canonical(value: Any, *, top: bool) -> Any:
    """Drop ignored keys (in the config and nested sub-configs) and normalise numbers."""
    if isinstance(value, Mapping):
        is_config = top or "model_type" in value
        return {
            str(k): _canonical(v, top=False)
            for k, v in value.items()
            if not (is_config and k in FINGERPRINT_IGNORED_KEYS)
        }
    if isinstance(value, list | tuple):
        return [_canonical(v, top=False) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 10000 and 10000.0 are the same setting
    return value


def canonical_config(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The config dict the fingerprint is computed from (``config`` may be a PretrainedConfig)."""
    d = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(d, Mapping):
        raise TypeError(f"expected a config dict or PretrainedConfig, got {type(config).__name__}")
    return _canonical(d, top=True)  # type: ignore[no-any-return]  # a dict at the top level


def fingerprint_config(config: Mapping[str, Any] | Any) -> str:
    """sha256 hex of the canonical JSON of a config dict (or a ``PretrainedConfig``).

    Use it to check that a loaded ``PreTrainedModel`` is the base a catalog entry was made for:
    ``fingerprint_config(model.config) == base.fingerprint``.
    """
    text = json.dumps(
        canonical_config(config),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        default=str,
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def linear_shapes(model: torch.nn.Module) -> dict[str, LinearShape]:
    """Every ``nn.Linear`` and ``Conv1D`` of ``model`` by its module name (as PEFT targets it), in
    module order. A ``Conv1D``'s weight is (in, out) (PEFT's ``fan_in_fan_out``)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    shapes: dict[str, LinearShape] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            shapes[name] = LinearShape(in_features=m.in_features, out_features=m.out_features)
        elif isinstance(m, Conv1D):
            n_in, n_out = m.weight.shape
            shapes[name] = LinearShape(in_features=int(n_in), out_features=int(n_out))
    return shapes


def inspect_base_model(source: str, *, name: str, revision: str | None = None) -> BaseModel:
    """Read a base model's config (local folder or Hub id) and describe it without loading weights.

    ``source`` is recorded as an absolute path when it is a local folder, so adapters that name the
    same folder by another relative path still match it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    validate_name(name)
    local = Path(source).expanduser()
    recorded = str(local.resolve()) if local.is_dir() else source
    try:
        config = AutoConfig.from_pretrained(
            str(local) if local.is_dir() else source, revision=revision, trust_remote_code=False
        )
    except (OSError, ValueError) as e:
        raise ValidationError(
            f"cannot read a model config from {source!r}"
            + (f" at revision {revision!r}" if revision else "")
            + f": {e}. Pass a local folder holding config.json or a Hub model id; models that need "
            f"trust_remote_code are not supported."
        ) from e
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]  # untyped HF
    except (ValueError, KeyError, TypeError) as e:
        raise ValidationError(
            f"{source!r} (model_type {getattr(config, 'model_type', None)!r}) cannot be built as a "
            f"causal language model (AutoModelForCausalLM): {e}"
        ) from e
    shapes = linear_shapes(model)
    if not shapes:
        raise ValidationError(f"{source!r} has no nn.Linear or Conv1D modules for LoRA to target")
    architectures = getattr(config, "architectures", None) or []
    return BaseModel(
        name=name,
        source=recorded,
        revision=revision,
        architecture=architectures[0] if architectures else type(model).__name__,
        model_type=str(config.model_type),
        fingerprint=fingerprint_config(config.to_dict()),
        linear_shapes=shapes,
    )


def module_types(base: BaseModel, names: list[str]) -> dict[str, str]:
    """``module.Class`` of each of ``names`` the base has (rebuilt on the meta device from its
    config), for errors that must say why a module cannot be adapted. Empty when the base is not a
    local folder (no network on an error path) or its config cannot be read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not Path(base.source).is_dir():
        return {}
    try:
        config = AutoConfig.from_pretrained(base.source, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]  # untyped HF
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    named = dict(model.named_modules())
    return {n: f"{type(named[n]).__module__}.{type(named[n]).__name__}" for n in names if n in named}


__all__ = [
    "FINGERPRINT_IGNORED_KEYS",
    "canonical_config",
    "fingerprint_config",
    "inspect_base_model",
    "linear_shapes",
    "module_types",
]
