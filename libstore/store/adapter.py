"""Validate PEFT LoRA adapter folders, check them against a base model, and check names. No torch.

libstore accepts exactly what its math and router implement: plain LoRA (optionally rsLoRA) on
``nn.Linear`` and transformers ``Conv1D`` (GPT-2) modules, one rank for every module, weights in
safetensors. Everything else PEFT can write (DoRA, per-module rank/alpha patterns, LoRA bias,
modules_to_save, activated LoRA, initialisations that modify the base weights such as
PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA, ...) is refused by name: a catalog entry whose math silently
differs from what ``PeftModel.from_pretrained`` computes is worse than no entry. Everything is read
from headers and JSON; tensors are only scanned (numpy, memory-mapped) for NaN/Inf.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeGuard

from libstore import config as config_mod
from libstore.errors import (
    BaseModelMismatchError,
    BlobsRemovedError,
    InvalidNameError,
    LibstoreError,
    UnsafeFileError,
    ValidationError,
)
from libstore.store.backend import BlobBackend
from libstore.store.safetensors_io import (
    FLOAT_DTYPE_NAMES,
    SafetensorsHeader,
    TensorInfo,
    nonfinite_tensors,
    read_header,
)
from libstore.store.sources import read_small, sniff
from libstore.store.strict_json import strict_loads
from libstore.store.targeting import untargeted
from libstore.types import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterFile,
    BaseModel,
    ModuleShape,
    StagedBlob,
)

MAX_CONFIG_BYTES = 16 << 20
KEY_PREFIX = "base_model.model."
PICKLE_WEIGHTS = (
    "adapter_model.bin",
    "adapter_model.pt",
    "adapter_model.pth",
    "adapter_model.ckpt",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_MODULE = r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*"
_LORA_KEY = re.compile(rf"{re.escape(KEY_PREFIX)}(?P<module>{_MODULE})\.lora_(?P<part>[AB])\.weight")
_NAMED_ADAPTER_KEY = re.compile(r".*\.lora_[AB]\.(?P<adapter>[^.]+)\.weight")

#: Config fields that switch on a LoRA variant or feature whose math libstore does not implement.
#: value: (predicate "is this value a use of the feature", what it is).
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "use_dora": (lambda v: bool(v), "DoRA (weight-decomposed LoRA)"),
    "rank_pattern": (lambda v: bool(v), "per-module ranks"),
    "alpha_pattern": (lambda v: bool(v), "per-module alphas"),
    "lora_bias": (lambda v: bool(v), "a bias on lora_B"),
    "modules_to_save": (lambda v: bool(v), "fully trained extra modules"),
    "bias": (lambda v: v not in (None, "none"), "trained base-model biases"),
    "use_qalora": (lambda v: bool(v), "QALoRA"),
    "alora_invocation_tokens": (lambda v: v is not None, "activated LoRA (aLoRA)"),
    "layer_replication": (lambda v: bool(v), "layer replication"),
    "target_parameters": (lambda v: bool(v), "LoRA on nn.Parameter targets"),
    "trainable_token_indices": (lambda v: bool(v), "trainable token embeddings"),
    "use_bdlora": (lambda v: bool(v), "block-diagonal LoRA"),
    "arrow_config": (lambda v: v is not None, "an Arrow router configuration"),
    "velora_config": (lambda v: v is not None, "the VeLoRA variant"),
    "monteclora_config": (lambda v: v is not None, "the MonteCLoRA variant"),
    "kasa_config": (lambda v: v is not None, "the KaSA variant"),
}

#: ``init_lora_weights`` values after which the adapter only works on a *modified* base model.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# --- names -------------------------------------------------------------------------------------

NAME_MAX = 96
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_RULE = (
    f"allowed are 1-{NAME_MAX} characters from ASCII letters, digits, '.', '_' and '-', starting "
    f"with a letter or digit, with no '..'"
)


def validate_name(name: str) -> str:
    """Return ``name`` if it is safe as a file name and a Hub path component, else raise.

    Deliberately narrow (ASCII only): names become folder names on every OS and path components in
    Hub repos, and look-alike Unicode letters would make two different names read the same.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"a name must be a string, got {type(name).__name__}; {NAME_RULE}")
    reason: str | None = None
    if not name:
        reason = "it is empty"
    elif len(name) > NAME_MAX:
        reason = f"it has {len(name)} characters"
    else:
        bad = next((c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))), None)
        if bad is not None:
            if bad in "/\\":
                reason = f"it contains a path separator {bad!r}"
            elif not bad.isprintable():
                reason = f"it contains the control character U+{ord(bad):04X}"
            elif not bad.isascii():
                label = unicodedata.name(bad, "unnamed character")
                reason = f"it contains the non-ASCII character {bad!r} (U+{ord(bad):04X} {label})"
            else:
                reason = f"it contains {bad!r}"
        elif not _NAME.fullmatch(name):
            reason = f"it starts with {name[0]!r}"
        elif ".." in name:
            reason = "it contains '..'"
    if reason is not None:
        raise InvalidNameError(f"invalid name {name!r}: {reason}; {NAME_RULE}")
    return name


# --- adapter folders ---------------------------------------------------------------------------


def read_adapter(
    folder: str | os.PathLike[str],
    *,
    into: BlobBackend,
    allow_nonfinite: bool = False,
    max_file_bytes: int | None = None,
    durable: bool = True,
) -> AdapterFile:
    """Validate a PEFT LoRA folder (config + safetensors header + NaN/Inf scan), staging its weights.

    The weights are read once: copied into ``into`` while they are hashed
    (:meth:`BlobStore.stage_file`), and that copy is what gets validated, so the bytes later stored
    are exactly the validated ones whatever happens to the source meanwhile. The caller owns
    ``result.weights``: ``into.commit_staged`` it to store it, or ``into.discard`` it. On any
    refusal nothing is left in the store.

    Raises :class:`ValidationError` (:class:`UnsafeFileError` for pickled weights) naming the file
    and the fault, :class:`StorageError` if the store cannot be written. ``target_modules`` of the
    result are the module-name suffixes that actually carry weights (the config may hold a regex
    or a superset). Weights larger than ``max_file_bytes`` (default:
    ``libstore.config.max_file_bytes()``) are refused before they are read. ``durable=False``
    stages the weights without their fsync (see :meth:`BlobStore.stage_file`).
    """
    folder = Path(folder)
    _check_folder(folder)
    config_path = folder / ADAPTER_CONFIG
    config_bytes = _read_config_bytes(config_path)
    weights_path = folder / ADAPTER_WEIGHTS
    _check_weights_present(folder, weights_path)
    limit = config_mod.max_file_bytes(max_file_bytes)
    size = weights_path.stat().st_size
    if size > limit:
        raise ValidationError(
            f"{weights_path} is {size} bytes, over the {limit}-byte limit for adapter "
            f"weights: is it a whole model rather than a LoRA adapter? If it really is an adapter, "
            f"raise the limit with LIBSTORE_MAX_FILE_BYTES",
            path=str(weights_path),
        )
    staged = into.stage_file(weights_path, max_bytes=limit, durable=durable)
    try:
        adapter = _describe(
            folder, config_path, config_bytes, weights_path, staged, allow_nonfinite=allow_nonfinite
        )
    except BaseException as e:
        gone = not os.path.lexists(staged.path)  # a gc with too short a grace took the copy mid-check
        into.discard(staged)
        if gone and isinstance(e, LibstoreError):
            raise BlobsRemovedError.staged_copy_gone(staged.path, staged.sha256) from None
        raise
    return adapter


def read_stored_adapter(
    blobs: BlobBackend,
    config_sha256: str,
    weights_sha256: str,
    *,
    where: str,
    allow_nonfinite: bool = False,
) -> AdapterFile:
    """Validate an adapter whose two files are already blobs of ``blobs`` (e.g. pulled ones).

    Checks what :func:`read_adapter` checks, on the stored bytes themselves (no copy); errors name
    ``where`` (e.g. ``expert 'x' from the remote``). ``result.weights`` names the stored blob.
    """
    cfg_path = blobs.path(config_sha256)
    if blobs.size(config_sha256) > MAX_CONFIG_BYTES:
        raise ValidationError(f"{where}: {ADAPTER_CONFIG} is over {MAX_CONFIG_BYTES} bytes")
    staged = StagedBlob(str(blobs.path(weights_sha256)), weights_sha256, blobs.size(weights_sha256))
    return _describe(
        Path(where),
        Path(where) / ADAPTER_CONFIG,
        read_small(cfg_path, limit=MAX_CONFIG_BYTES),
        Path(where) / ADAPTER_WEIGHTS,
        staged,
        allow_nonfinite=allow_nonfinite,
        extra=(),
    )


def _describe(
    folder: Path,
    config_path: Path,
    config_bytes: bytes,
    weights_path: Path,
    staged: StagedBlob,
    *,
    allow_nonfinite: bool,
    extra: tuple[str, ...] | None = None,
) -> AdapterFile:
    """Check a config and the weights copy ``staged`` (errors name ``weights_path``) and describe them."""
    config = _parse_config(config_path, config_bytes)
    rank, alpha, use_rslora = _check_config(config_path, config)
    header = read_header(staged.path, max_file_bytes=staged.size, shown_as=weights_path)
    modules, dtype = _modules_from_header(weights_path, header, rank)
    _check_targeted(config_path, config, modules)
    if not allow_nonfinite:
        bad = nonfinite_tensors(staged.path, header)
        if bad:
            raise ValidationError(
                f"{weights_path}: {len(bad)} tensor(s) hold NaN or Inf, e.g. {bad[0]!r}; the "
                f"training diverged or the file is corrupt. Pass --allow-nonfinite to store it "
                f"anyway.",
                path=str(weights_path),
                field=bad[0],
            )
    if extra is None:
        with os.scandir(folder) as entries:  # is_file from the listing: no stat per entry
            extra = tuple(
                sorted(
                    e.name for e in entries if e.is_file() and e.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
                )
            )
    return AdapterFile(
        folder=str(folder),
        config=config,
        config_bytes=config_bytes,
        weights=staged,
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in modules})),
        modules=modules,
        dtype=dtype,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        extra_files=extra,
    )


_PEFT_FOLDER = (
    f"a PEFT LoRA folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, as written by "
    f"PeftModel.save_pretrained"
)


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise ValidationError(f"{folder} does not exist; {_PEFT_FOLDER}")
    if not folder.is_dir():
        raise ValidationError(
            f"{folder} is a file, not a folder; pass the folder that holds it ({_PEFT_FOLDER})"
        )
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ValidationError(f"{folder} has no {ADAPTER_CONFIG}; {_PEFT_FOLDER}")


def _check_weights_present(folder: Path, weights_path: Path) -> None:
    if weights_path.is_file():
        return
    if os.path.lexists(weights_path):
        what = "a folder" if weights_path.is_dir() else "not a regular file (a FIFO, device or broken link)"
        raise ValidationError(
            f"{weights_path} is {what}; {ADAPTER_WEIGHTS} must be the weights file itself",
            path=str(weights_path),
        )
    pickled = [folder / n for n in PICKLE_WEIGHTS if (folder / n).is_file()]
    if not pickled:
        pickled = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())
    if pickled:
        p = pickled[0]
        magic = sniff(p, 4)  # the magic bytes only: never unpickled
        kind = (
            "a torch.save zip archive"
            if magic == b"PK\x03\x04"
            else "a pickle"
            if magic[:1] == b"\x80"
            else "a pickle-based format"
        )
        raise UnsafeFileError(
            f"{folder} holds its weights only as {p.name} ({kind}); libstore never unpickles. "
            f"Convert to safetensors: load the adapter with PEFT in a trusted environment and run "
            f"model.save_pretrained(folder, safe_serialization=True), which writes "
            f"{ADAPTER_WEIGHTS}"
        )
    raise ValidationError(f"{folder} has no {ADAPTER_WEIGHTS}; {_PEFT_FOLDER}")


def _read_config_bytes(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValidationError(
            f"{path} is {size} bytes; an adapter config is a few KB (limit {MAX_CONFIG_BYTES})"
        )
    return read_small(path, limit=MAX_CONFIG_BYTES)


def _parse_config(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        config = strict_loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # Recursion: absurd nesting
        raise ValidationError(f"{path} is not valid UTF-8 JSON ({e}); re-save the adapter with PEFT") from e
    if not isinstance(config, dict):
        raise ValidationError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def _is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_str_list(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) and s for s in x)


def _check_config(path: Path, c: Mapping[str, Any]) -> tuple[int, float, bool]:
    """Types and supported features; returns (rank, alpha, use_rslora)."""

    def bad(field: str, want: str) -> ValidationError:
        return ValidationError(
            f"{path}: {field!r} must be {want}, got {c.get(field)!r}", path=str(path), field=field
        )

    peft_type = c.get("peft_type")
    if peft_type != "LORA":
        if peft_type is None:
            raise ValidationError(
                f'{path} has no \'peft_type\'; a LoRA adapter config says "peft_type": "LORA"'
            )
        raise ValidationError(
            f"{path}: peft_type is {peft_type!r}; libstore stores LoRA adapters only (peft_type LORA)"
        )
    r = c.get("r")
    if not _is_int(r) or r <= 0:
        raise bad("r", "a positive integer")
    alpha = c.get("lora_alpha")
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise bad("lora_alpha", "a positive number")
    targets = c.get("target_modules")
    if not (isinstance(targets, str) and targets) and not (_is_str_list(targets) and targets):
        raise bad("target_modules", "a module name pattern (string) or a non-empty list of names")
    for field in ("exclude_modules", "layers_pattern"):
        v = c.get(field)
        if v is not None and not isinstance(v, str) and not _is_str_list(v):
            raise bad(field, "a string, a list of strings or null")
    layers = c.get("layers_to_transform")
    if (
        layers is not None
        and not _is_int(layers)
        and not (isinstance(layers, list) and all(_is_int(i) for i in layers))
    ):
        raise bad("layers_to_transform", "an integer, a list of integers or null")
    if isinstance(targets, str):  # PEFT's LoraConfig refuses these combinations when it loads
        for field in ("layers_to_transform", "layers_pattern"):
            if c.get(field) is not None:
                raise ValidationError(
                    f"{path}: {field} cannot be used with a target_modules pattern (a string); PEFT "
                    f"refuses this config — list the target module names instead",
                    path=str(path),
                    field=field,
                )
    if c.get("layers_pattern") and layers is None:
        raise ValidationError(
            f"{path}: layers_pattern is set but layers_to_transform is not; PEFT refuses this config",
            path=str(path),
            field="layers_pattern",
        )
    use_rslora = c.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise bad("use_rslora", "true or false")
    task_type = c.get("task_type")
    if task_type is not None and not isinstance(task_type, str):
        raise bad("task_type", "a string or null")
    base = c.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise bad("base_model_name_or_path", "a string or null")
    for field in ("rank_pattern", "alpha_pattern"):
        v = c.get(field)
        if v is not None and not isinstance(v, dict):
            raise bad(field, "an object")
    for field, (used, what) in _UNSUPPORTED.items():
        if field in c and used(c[field]):
            raise ValidationError(
                f"{path}: {field}={json.dumps(c[field])} ({what}) is not supported; libstore "
                f"stores plain LoRA (optionally rsLoRA) adapters with one rank for all modules"
            )
    init = c.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_MODIFYING_INITS):
        raise ValidationError(
            f"{path}: init_lora_weights={init!r} changes the base model's weights, so this adapter "
            f"does not work on the original base; it is not supported. Convert it to a plain LoRA "
            f"with save_pretrained(..., path_initial_model_for_weight_conversion=...)"
        )
    return r, float(alpha), use_rslora


def _modules_from_header(
    path: Path, header: SafetensorsHeader, rank: int
) -> tuple[dict[str, ModuleShape], str]:
    """Pair lora_A/lora_B tensors per module and check their shapes, rank and dtype."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    for key, info in header.tensors.items():
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            raise ValidationError(f"{path}: {_explain_key(key)}")
        parts.setdefault(m["module"], {})[m["part"]] = info
    if not parts:
        raise ValidationError(f"{path} holds no tensors; a LoRA adapter has lora_A/lora_B weights")

    dtypes: dict[str, list[str]] = {}
    for key, info in header.tensors.items():
        dtypes.setdefault(info.dtype, []).append(key)
    if len(dtypes) > 1:
        summary = ", ".join(f"{d}: {len(ks)} (e.g. {ks[0]})" for d, ks in sorted(dtypes.items()))
        raise ValidationError(f"{path} mixes dtypes ({summary}); save every LoRA tensor in one dtype")
    (st_dtype,) = dtypes
    if st_dtype not in FLOAT_DTYPE_NAMES:
        raise ValidationError(
            f"{path}: LoRA weights are {st_dtype}; libstore stores floating weights only "
            f"({', '.join(FLOAT_DTYPE_NAMES)}) — dequantize them first"
        )

    modules: dict[str, ModuleShape] = {}
    for module in sorted(parts):
        ab = parts[module]
        if set(ab) != {"A", "B"}:
            have, lack = ("lora_A", "lora_B") if "A" in ab else ("lora_B", "lora_A")
            raise ValidationError(
                f"{path}: module {module!r} has {have} but no {lack}; every LoRA module needs both"
            )
        a, b = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise ValidationError(
                f"{path}: module {module!r}: lora_A {list(a.shape)} and lora_B "
                f"{list(b.shape)} must both be matrices (LoRA on nn.Linear only; no conv or "
                f"embedding LoRA)"
            )
        (ra, n_in), (n_out, rb) = a.shape, b.shape
        if ra != rb:
            raise ValidationError(
                f"{path}: module {module!r}: lora_A is {list(a.shape)} (rank {ra}) but lora_B is "
                f"{list(b.shape)} (rank {rb}); A must be (r, in) and B (out, r)"
            )
        if ra != rank:
            raise ValidationError(
                f"{path}: module {module!r} has rank {ra} but adapter_config.json says r={rank}; "
                f"per-module ranks are not supported"
            )
        if n_in == 0 or n_out == 0:
            raise ValidationError(
                f"{path}: module {module!r} has an empty dimension: A {list(a.shape)}, B {list(b.shape)}"
            )
        modules[module] = ModuleShape(in_features=n_in, out_features=n_out, rank=ra)
    return modules, FLOAT_DTYPE_NAMES[st_dtype]


def _explain_key(key: str) -> str:
    expected = (
        f"expected {KEY_PREFIX}<module>.lora_A.weight / .lora_B.weight as "
        f"PeftModel.save_pretrained writes them"
    )
    named = _NAMED_ADAPTER_KEY.fullmatch(key)
    if named:
        return (
            f"tensor {key!r} still carries the adapter name {named['adapter']!r}; this is a raw "
            f"state_dict, not a saved adapter — save it with PeftModel.save_pretrained ({expected})"
        )
    hints = (
        ("lora_embedding_", "LoRA on embedding layers is not supported"),
        ("lora_magnitude_vector", "DoRA weights are not supported"),
        ("modules_to_save", "modules_to_save weights are not supported"),
        ("trainable_tokens", "trainable token embeddings are not supported"),
        (".lora_B.bias", "a bias on lora_B (lora_bias) is not supported"),
    )
    for needle, why in hints:
        if needle in key:
            return f"tensor {key!r}: {why}"
    return f"tensor {key!r} is not a PEFT LoRA weight; {expected}"


def _check_targeted(path: Path, config: Mapping[str, Any], modules: Iterable[str]) -> None:
    stray = untargeted(config, modules, where=str(path))
    if stray:
        raise ValidationError(
            f"{path}: the weights hold module {stray[0]!r}"
            + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else "")
            + f" but target_modules={json.dumps(config.get('target_modules'))} (with "
            f"exclude_modules/layers_to_transform) does not target it, so PEFT would ignore those "
            f"weights when loading; fix target_modules in {ADAPTER_CONFIG}",
            path=str(path),
            field="target_modules",
        )


# --- adapter vs base model ---------------------------------------------------------------------


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def _same_source(a: str, b: str) -> bool:
    """Equal as strings, as the same local folder, or as Hub ids (which are case-insensitive)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() or pb.exists():
        try:
            return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
        except OSError:
            return False
    return bool(_HUB_ID.fullmatch(a) and _HUB_ID.fullmatch(b)) and a.casefold() == b.casefold()


def check_against_base(adapter: AdapterFile, base: BaseModel, *, allow_base_mismatch: bool = False) -> None:
    """Refuse an adapter that does not fit ``base``.

    Shapes are never overridable: every LoRA module must be an ``nn.Linear`` or ``Conv1D`` of the
    base with matching in/out features (``fan_in_fan_out`` does not change the factors' shapes: PEFT
    sets it from the layer type when it loads). The recorded ``base_model_name_or_path`` is advisory
    (the same weights live under many paths and hub ids), so a mismatch there can be overridden
    with ``allow_base_mismatch``.
    """
    where = f"adapter {adapter.folder}"
    problems: list[str] = []
    missing = 0
    for module, shape in adapter.modules.items():
        lin = base.linear_shapes.get(module)
        if lin is None:
            missing += 1
            problems.append(
                f"module {module!r} is not an nn.Linear or Conv1D layer of base model {base.name!r} "
                f"(libstore adapts those two layer types; `libstore base show {base.name}` lists them)"
            )
        elif (lin.in_features, lin.out_features) != (shape.in_features, shape.out_features):
            problems.append(
                f"module {module!r}: the adapter has lora_A ({shape.rank}, {shape.in_features}) "
                f"and lora_B ({shape.out_features}, {shape.rank}), i.e. in={shape.in_features} "
                f"out={shape.out_features}, but base model {base.name!r} has a layer with "
                f"in_features={lin.in_features}, out_features={lin.out_features}"
            )
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        hint = (
            "If it was trained on another model, register that base and add it with --base."
            if missing < len(problems)
            else "If the base has a module of that name of another type, LoRA on it is not supported; "
            "otherwise the adapter was trained on another model: register that base and add it "
            "with --base."
        )
        raise BaseModelMismatchError(
            f"{where} does not fit base model {base.name!r} ({base.architecture}): "
            f"{problems[0]}{more}. {hint}"
        )
    recorded = adapter.base_model_name_or_path
    if not recorded or allow_base_mismatch:
        return
    if not (_same_source(recorded, base.source) or recorded == base.name):
        raise BaseModelMismatchError(
            f"{where} says it was trained on {recorded!r}, but base model {base.name!r} was "
            f"registered from {base.source!r}. If they are the same weights, pass "
            f"--allow-base-mismatch (Python: allow_base_mismatch=True) if you are sure."
        )
