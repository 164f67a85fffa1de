"""Read microsoft/mttl's expert-library format and convert its LoRA experts to PEFT folders.

An mttl library (``mttl.models.library.expert_library``, local or on the Hub) is a folder of
experts; an expert named ``sub/e_nested`` (mttl allows '/' in names, not '.') lives in a
sub-folder, and mttl lists it on the Hub (its local engine lists the top level only). libstore
imports it as ``sub.e_nested`` (no mttl name has a '.', so no two names meet) and records the mttl
name. Per expert:

- ``<expert>.meta``: ``torch.save`` of ``MetadataEntry.asdict()``: ``expert_name``,
  ``expert_task_name``, ``expert_model`` (base model), ``parent_node``, ``expert_deleted`` and
  ``expert_config`` (the modifier config: ``lora_rank``, ``lora_alpha``, ``lora_dropout``,
  ``modify_modules``, ``modify_layers``, ``class_name``), plus ``training_config``;
- ``<expert>.ckpt``: ``torch.save`` of the weights dict, ``<module>.lora_a`` of shape (in, r) and
  ``<module>.lora_b`` of shape (r, out); mttl's update is ``scaling · (lora_a @ lora_b)ᵀ`` with
  ``scaling = lora_alpha / lora_rank``, i.e. PEFT's ``A = lora_aᵀ`` (r, in), ``B = lora_bᵀ`` (out, r)
  and the same ``lora_alpha``;
- ``<expert>.<data>.bin``: auxiliary data, ``torch.save`` of ``{"data": ..., "config": ...}``
  (``ExpertLibrary.add_auxiliary_data``). mttl's Arrow writes ``<save_name>_protos`` (module ->
  tensor), ``_vectors`` (module -> numpy array) and ``_eigvals`` (module -> float), with the
  transform's config; ``add_embeddings`` and the SVD embedding transform write numpy arrays, the
  hidden-state computer module -> tensor. Every type is read (:func:`read_aux`) and imported as data
  attached to the expert (``libstore.store.expert_data``: safetensors + JSON); the Arrow ones are
  also compared with libstore's own prototypes at import.

``expert_config.tie_params`` (a regex over parameter names, e.g. ``q_proj.*\\.lora_a|k_proj...``)
is recorded: mttl trains those ``lora_a`` shared within one attention block and its Arrow gives the
tied modules one joint prototype. Experts of other mttl modifiers (``class_name`` not LoRA) are
listed, not imported (:attr:`MttlExpert.lora` is False).

Every file is read with ``torch.load(..., weights_only=True)`` only: plain containers, numbers,
strings and tensors load, and in auxiliary data numpy arrays of numeric dtypes (numpy's array and
scalar reconstruction functions, ``ndarray`` and those dtype classes are allowed for that file only,
:func:`numpy_globals`); anything that would need other classes (pickled objects, code) is refused
with :class:`UnsafeFileError` and nothing of it runs.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from libstore.errors import BaseModelMismatchError, UnsafeFileError, ValidationError
from libstore.store.adapter import validate_name
from libstore.store.expert_data import NUMPY_DTYPES
from libstore.store.safetensors_io import save_tensors
from libstore.store.strict_json import check_json_value
from libstore.store.targeting import search_matches
from libstore.types import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BaseModel

if TYPE_CHECKING:
    import torch

META_SUFFIX = ".meta"
CKPT_SUFFIX = ".ckpt"
AUX_SUFFIX = ".bin"
MAX_FILE_BYTES = 8 << 30


@dataclass(frozen=True)
class MttlFiles:
    """One expert's files in an mttl library folder."""

    name: str  # mttl's name: the path below the library without suffix (``sub/e_nested``)
    meta: Path
    ckpt: Path
    aux: tuple[str, ...] = ()  # auxiliary data types present (``<name>.<type>.bin``)

    @property
    def libstore_name(self) -> str:
        """The expert's name in libstore: mttl's with '/' read as '.' (``sub.e_nested``)."""
        return self.name.replace("/", ".")


@dataclass(frozen=True)
class MttlExpert:
    """An mttl LoRA expert read safely: metadata facts and PEFT-oriented factors."""

    name: str
    tasks: tuple[str, ...]
    base_model: str | None
    rank: int
    alpha: float
    dropout: float
    deleted: bool
    metadata: dict[str, Any]
    modifier: str = "lora"
    lora: bool = True  # False: another mttl modifier; rank and alpha are then 0 and it is not imported
    tie_params: str | None = None


def scan(folder: Path) -> list[MttlFiles]:
    """The experts of a local mttl library folder (one ``.meta`` + ``.ckpt`` pair each), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValidationError(f"{folder} is not a folder holding an mttl library (<expert>.meta/.ckpt files)")
    out = []
    for meta in sorted(folder.rglob(f"*{META_SUFFIX}")):
        name = meta.relative_to(folder).as_posix()[: -len(META_SUFFIX)]
        leaf = meta.name[: -len(META_SUFFIX)]
        ckpt = meta.with_name(f"{leaf}{CKPT_SUFFIX}")
        if not ckpt.is_file():
            raise ValidationError(f"{meta} has no weights file {ckpt.name}; the mttl library is incomplete")
        aux = tuple(
            sorted(
                p.name[len(leaf) + 1 : -len(AUX_SUFFIX)]
                for p in meta.parent.glob(f"{leaf}.*{AUX_SUFFIX}")
                if p.name.count(".") == 2
            )
        )
        out.append(MttlFiles(name=name, meta=meta, ckpt=ckpt, aux=aux))
    if not out:
        raise ValidationError(
            f"{folder} holds no mttl experts (<expert>.meta with <expert>.ckpt); is it an mttl expert "
            f"library?"
        )
    return out


def numpy_globals() -> list[Any]:
    """What unpickling a numpy array of a numeric dtype needs and nothing else: the array and
    scalar reconstruction functions (under numpy 1's and 2's module names: mttl 1.0.2 ran on
    numpy 1), ``ndarray``, ``dtype`` and the dtype classes of :data:`NUMPY_DTYPES`."""
    import numpy as np

    reconstruct: Any = np.zeros(0).__reduce__()[0]
    scalar: Any = np.float64(0).__reduce__()[0]
    out: list[Any] = [np.ndarray, np.dtype, *(type(np.dtype(c)) for c in NUMPY_DTYPES)]
    for fn in (reconstruct, scalar):
        out += [(fn, f"{mod}.multiarray.{fn.__name__}") for mod in ("numpy.core", "numpy._core")]
    return out


def safe_load(path: Path, *, arrays: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; refuses (never runs) anything beyond plain data
    (and numpy arrays of numbers with ``arrays``)."""
    import contextlib

    import torch

    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValidationError(
            f"{path} is {size} bytes, over the {MAX_FILE_BYTES}-byte limit for an mttl file"
        )
    allowed = torch.serialization.safe_globals(numpy_globals()) if arrays else contextlib.nullcontext()
    try:
        with allowed:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        why = next(
            (ln for ln in lines if "Unsupported" in ln or "WeightsUnpickler" in ln), lines[0] if lines else ""
        )
        first = why.split(". ")[0][:300] or type(e).__name__
        raise UnsafeFileError(
            f"{path} needs more than plain tensors and containers to load (torch.load with "
            f"weights_only=True refused it: {first}); libstore never unpickles arbitrary objects. "
            f"Re-save it in a trusted environment as a dict of tensors / a dict of plain values."
        ) from None
    except Exception as e:
        raise ValidationError(f"{path} is not a readable torch.save file: {type(e).__name__}: {e}") from None


def _plain(value: Any) -> Any:
    """JSON-safe scalars only (for metadata records)."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return None


def read_meta(files: MttlFiles) -> MttlExpert:
    """The expert's metadata (``.meta``), checked to describe a plain LoRA expert."""
    meta = safe_load(files.meta)
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise ValidationError(f"{files.meta} does not hold an mttl metadata dict")
    cfg = meta.get("expert_config") or {}
    training = meta.get("training_config") or {}
    if not isinstance(cfg, dict) or not isinstance(training, dict):
        raise ValidationError(f"{files.meta}: expert_config / training_config must be dicts")
    cls = str(
        cfg.get("class_name") or cfg.get("__model_modifier__") or training.get("model_modifier") or "lora"
    )
    name = meta.get("expert_name") or files.name
    if name != files.name:
        raise ValidationError(f"{files.meta} names expert {name!r} but the file is {files.name!r}")
    if cls.rsplit(".", 1)[-1] not in ("LoRAConfig", "lora"):
        return MttlExpert(
            name=files.name,
            tasks=(),
            base_model=None,
            rank=0,
            alpha=0.0,
            dropout=0.0,
            deleted=bool(meta.get("expert_deleted", False)),
            metadata={"format": "mttl", "modifier": cls},
            modifier=cls,
            lora=False,
        )
    tie = cfg.get("tie_params")
    if tie is not None and not (isinstance(tie, str) and tie):
        raise ValidationError(f"{files.meta}: tie_params must be a regex string or null, got {tie!r:.80}")
    rank = cfg.get("lora_rank", training.get("lora_rank"))
    alpha = cfg.get("lora_alpha", training.get("lora_alpha"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValidationError(f"{files.meta}: lora_rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < math.inf:
        raise ValidationError(
            f"{files.meta}: lora_alpha must be a positive number, got {alpha!r}",
            path=str(files.meta),
            field="lora_alpha",
        )
    dropout = cfg.get("lora_dropout")
    if dropout is None:
        dropout = 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValidationError(
            f"{files.meta}: lora_dropout must be a number in [0, 1) or absent, got {dropout!r:.80}; "
            f"the metadata is corrupt or not mttl's — fix expert_config.lora_dropout",
            path=str(files.meta),
            field="lora_dropout",
        )
    task_text = meta.get("expert_task_name") or training.get("finetune_task_name") or ""
    if not isinstance(task_text, str):
        raise ValidationError(f"{files.meta}: expert_task_name must be a string, got {task_text!r}")
    tasks = tuple(dict.fromkeys(t.strip() for t in task_text.split(",") if t.strip()))
    for t in tasks:
        validate_name(t)
    model = meta.get("expert_model") or training.get("model")
    record = {
        "format": "mttl",
        "expert_model": _plain(model),
        "expert_task_name": _plain(task_text) or None,
        "parent_node": _plain(meta.get("parent_node")),
        "modify_modules": _plain(cfg.get("modify_modules")),
        "modify_layers": _plain(cfg.get("modify_layers")),
        "lora_dropout": _plain(cfg.get("lora_dropout")),
        "modifier": cls,
        "expert_name": files.name if files.name != files.libstore_name else None,
        "tie_params": tie,
    }
    check_json_value(record, f"{files.meta} metadata")
    return MttlExpert(
        name=files.name,
        tasks=tasks,
        base_model=model if isinstance(model, str) else None,
        rank=rank,
        alpha=float(alpha),
        dropout=float(dropout),
        deleted=bool(meta.get("expert_deleted", False)),
        metadata={k: v for k, v in record.items() if v is not None},
        modifier=cls,
        tie_params=tie,
    )


def read_weights(files: MttlFiles) -> dict[str, torch.Tensor]:
    """The expert's ``.ckpt`` weights dict (a Lightning checkpoint's ``state_dict`` also works)."""
    import torch

    obj = safe_load(files.ckpt)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = {str(k).replace("model.", "", 1): v for k, v in obj["state_dict"].items()}
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise ValidationError(f"{files.ckpt} must hold a non-empty dict of name -> tensor")
    return obj


PROTOS_SUFFIX = "_protos"
VECTORS_SUFFIX = "_vectors"
EIGVALS_SUFFIX = "_eigvals"
#: the data types of mttl's ArrowTransform (``<save_name><suffix>``)
ARROW_SUFFIXES = (PROTOS_SUFFIX, VECTORS_SUFFIX, EIGVALS_SUFFIX)


def tie_groups(tie_params: str, modules: Iterable[str], *, where: str) -> list[list[str]]:
    """The module groups whose ``lora_a`` mttl ties under ``tie_params``, as
    ``mttl.models.modifiers.base.get_target_2_source_param_mapping`` forms them: parameters
    ``<module>.lora_a`` the regex finds (``re.search``) that share the text before the match (one
    attention block). Groups of one are left out; modules in the order given."""
    params = [f"{m}.lora_a" for m in modules]
    found = search_matches(tie_params, params, where=where, field="tie_params")
    groups: dict[str, list[str]] = {}
    for p in params:
        matched = found[p]
        if matched:
            groups.setdefault(p.split(matched)[0], []).append(p.removesuffix(".lora_a"))
    return [g for g in groups.values() if len(g) > 1]


def aux_path(files: MttlFiles, data_type: str) -> Path:
    """The file ``<expert>.<data_type>.bin`` beside the expert's ``.meta``."""
    return files.meta.with_name(f"{files.meta.name[: -len(META_SUFFIX)]}.{data_type}{AUX_SUFFIX}")


def read_aux(files: MttlFiles, data_type: str) -> tuple[dict[str, Any], Any]:
    """One auxiliary data file, pickle-free: (its config, its data) of mttl's ``{"data", "config"}``
    payload; a file of another shape (mttl's ``<expert>.scores.bin``) is all data, config ``{}``."""
    path = aux_path(files, data_type)
    payload = safe_load(path, arrays=True)
    if isinstance(payload, dict) and "data" in payload and set(payload) <= {"data", "config"}:
        config = payload.get("config")
        if config is not None and not isinstance(config, dict):
            raise ValidationError(f"{path}: its config must be a dict, got {type(config).__name__}")
        return dict(config or {}), payload["data"]
    return {}, payload


def arrow_vectors(
    data_type: str, config: Mapping[str, Any], data: Any, *, where: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor | float]]:
    """mttl Arrow data as :func:`read_aux` returns it: ``_protos`` (module -> (in,) tensor),
    ``_vectors`` (module -> (in,) numpy array, made a tensor) or ``_eigvals`` (module -> float);
    the transform's config (plain values) and mttl module name -> vector or value."""
    import numpy as np
    import torch

    eigvals = data_type.endswith(EIGVALS_SUFFIX)
    out: dict[str, torch.Tensor | float] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            if eigvals and isinstance(v, int | float | np.floating) and not isinstance(v, bool):
                out[str(k)] = float(v)
            elif not eigvals and isinstance(v, torch.Tensor | np.ndarray) and v.ndim == 1:
                out[str(k)] = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))
    if not isinstance(data, dict) or len(out) != len(data):
        what = "module: eigenvalue" if eigvals else "module: vector"
        raise ValidationError(f"{where} does not hold mttl Arrow data ({{'data': {{{what}}}}})")
    plain = {str(k): _plain(v) for k, v in config.items()}
    return {k: v for k, v in plain.items() if v is not None}, out


def expand_tied(weights: dict[str, torch.Tensor], tie_params: str, *, where: str) -> dict[str, torch.Tensor]:
    """``weights`` with the tied parameters a checkpoint left out put back, as mttl's
    ``Expert.expert_weights`` does (``get_target_2_source_param_mapping(...,
    expand_if_targets_are_missing=True)``): the first parameter ``tie_params`` finds in a block is
    the source, and each alternative of the regex (``\\`` and ``.*`` removed) missing there is it."""
    found = search_matches(tie_params, list(weights), where=where, field="tie_params")
    alternatives = tie_params.replace("\\", "").replace(".*", "").split("|")
    out = dict(weights)
    sources: set[str] = set()
    for name in weights:
        matched = found[name]
        if not matched:
            continue
        parent = name.split(matched)[0]
        if parent in sources:
            continue
        sources.add(parent)
        for alt in alternatives:
            if alt not in name:
                out.setdefault(f"{parent}{alt}", weights[name])
    return out


def module_name(key: str, base: BaseModel) -> str | None:
    """The base model's module an mttl weight stem names (mttl may drop or keep ``model.``)."""
    for cand in (key, f"model.{key}", key.removeprefix("model.")):
        if cand in base.linear_shapes:
            return cand
    return None


def to_peft(expert: MttlExpert, weights: Mapping[str, torch.Tensor], base: BaseModel, dest: Path) -> Path:
    """Write ``expert`` as a PEFT LoRA folder at ``dest`` (A = lora_aᵀ, B = lora_bᵀ, same alpha)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in weights.items():
        stem, _, part = key.rpartition(".")
        if part not in ("lora_a", "lora_b") or not stem:
            raise ValidationError(
                f"expert {expert.name!r}: tensor {key!r} is not an mttl LoRA weight "
                f"(<module>.lora_a / <module>.lora_b); only plain LoRA experts can be imported"
            )
        pairs.setdefault(stem, {})[part] = t
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    for stem, ab in sorted(pairs.items()):
        if set(ab) != {"lora_a", "lora_b"}:
            raise ValidationError(f"expert {expert.name!r}: module {stem!r} lacks lora_a or lora_b")
        module = module_name(stem, base)
        if module is None:
            raise BaseModelMismatchError(
                f"expert {expert.name!r}: module {stem!r} is not an nn.Linear of base model "
                f"{base.name!r}; import it into a library whose base is the model it was trained on"
            )
        a, b = ab["lora_a"], ab["lora_b"]
        lin = base.linear_shapes[module]
        if (
            a.ndim != 2
            or b.ndim != 2
            or a.shape[1] != b.shape[0]
            or tuple(a.shape) != (lin.in_features, a.shape[1])
            or tuple(b.shape) != (b.shape[0], lin.out_features)
        ):
            raise BaseModelMismatchError(
                f"expert {expert.name!r}: module {stem!r} has lora_a {list(a.shape)} and lora_b "
                f"{list(b.shape)}; mttl stores lora_a as (in, r) and lora_b as (r, out) and base "
                f"{base.name!r} has Linear(in={lin.in_features}, out={lin.out_features})"
            )
        if a.shape[1] != expert.rank:
            raise ValidationError(
                f"expert {expert.name!r}: module {stem!r} has rank {a.shape[1]} but its metadata says "
                f"lora_rank={expert.rank}"
            )
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.T.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.T.contiguous()
        modules.append(module)
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    covered = {m for m in base.linear_shapes if m.rsplit(".", 1)[-1] in leaves}
    targets: list[str] = leaves if covered == set(modules) else sorted(modules)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": expert.rank,
        "lora_alpha": expert.alpha,
        "lora_dropout": expert.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": base.source,
        "revision": base.revision,
    }
    dest.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, dest / ADAPTER_WEIGHTS)
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dest
