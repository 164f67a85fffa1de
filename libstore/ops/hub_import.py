"""Import adapters that were not made by libstore: any PEFT adapter repo on the Hub, and libraries in
microsoft/mttl's expert-library format (a local folder or a Hub repo).

Downloads go to a unique temp folder inside the library, bounded in size and time while they stream,
and are checked against what the Hub lists for each file — the sha256 of LFS files, the git blob id
of small ones (the client checks neither); every adapter is then validated
exactly like ``libstore add`` before anything is written, and an mttl library is imported all or
nothing in one transaction.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from libstore import config
from libstore.catalog import repo
from libstore.errors import (
    BaseModelMismatchError,
    HubError,
    IntegrityError,
    LibstoreError,
    UnsafeFileError,
    ValidationError,
)
from libstore.hub import mttl
from libstore.hub.client import HubClient, RemoteFile, check_repo_id, git_blob_id
from libstore.ops import experts as experts_ops
from libstore.ops.context import Context
from libstore.ops.sync_state import temp_dir
from libstore.store import expert_data
from libstore.store.adapter import PICKLE_WEIGHTS, read_adapter, validate_name
from libstore.store.blobs import sha256_file
from libstore.types import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFile, BaseModel, Expert, StoredFile

_PART = re.compile(r"[A-Za-z0-9._-]+")


def _check_subfolder(subfolder: str | None) -> str:
    if not subfolder:
        return ""
    parts = subfolder.strip("/").split("/")
    if any(p in ("", ".", "..") or not _PART.fullmatch(p) for p in parts):
        raise ValidationError(
            f"--subfolder {subfolder!r} must be a relative path of plain names (letters, digits, '.', "
            f"'_', '-'), without '..'"
        )
    return "/".join(parts)


def _check_sizes(repo_id: str, commit: str, files: Iterable[RemoteFile]) -> None:
    """Refuse, before anything is downloaded, files the Hub lists as over ``$LIBSTORE_MAX_FILE_BYTES``."""
    limit = config.max_file_bytes()
    for rf in files:
        if rf.size > limit:
            raise ValidationError(
                f"{repo_id}@{commit[:12]}:{rf.path} is {rf.size} bytes, over the {limit}-byte limit "
                f"(LIBSTORE_MAX_FILE_BYTES); nothing was downloaded",
                path=rf.path,
            )


def _fetch_checked(
    client: HubClient, repo_id: str, path: str, commit: str, rf: RemoteFile, dest: Path
) -> Path:
    """Download one file (bounded by the Hub's size for it), checked against the Hub's record of it:
    the LFS sha256, else the git blob id."""
    where = f"{repo_id}@{commit[:12]}:{path}"
    local = client.download(repo_id, path, commit, dest, size=rf.size)
    if rf.sha256 is not None:
        good = sha256_file(local) == rf.sha256
    else:
        good = git_blob_id(local.read_bytes()) == rf.blob_id
    if not good:
        local.unlink(missing_ok=True)
        raise IntegrityError(
            f"{where} does not match the {'sha256' if rf.sha256 else 'git blob id'} the Hub lists for "
            f"it; the download was corrupted — nothing was imported, try again",
            sha256=rf.sha256,
            path=path,
        )
    return local


def split_hub_id(repo_id: str, subfolder: str | None = None) -> tuple[str, str]:
    """``user/repo/sub/folder`` (as people paste it, optionally ``hf://``) -> (``user/repo``, the
    sub-folder path), with ``subfolder`` appended; both checked."""
    parts = repo_id.removeprefix("hf://").strip("/").split("/")
    repo = check_repo_id("/".join(parts[:2]))
    sub = "/".join(p for p in ("/".join(parts[2:]), _check_subfolder(subfolder)) if p)
    return repo, _check_subfolder(sub)


def _adapter_files(files: dict[str, RemoteFile], prefix: str, where: str) -> list[RemoteFile]:
    """The Hub's records of the adapter's two files below ``prefix``, checked before any download."""
    if prefix + ADAPTER_WEIGHTS not in files:
        pickled = [prefix + p for p in PICKLE_WEIGHTS if prefix + p in files]
        if pickled:
            raise UnsafeFileError(
                f"{where} holds its weights only as {pickled[0].rsplit('/', 1)[-1]} (a pickle); libstore "
                f"never unpickles. Convert the adapter to safetensors (load it with PEFT in a trusted "
                f"environment and save_pretrained(..., safe_serialization=True)), then import that"
            )
        raise ValidationError(f"{where} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    return [files[prefix + f] for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]


def _download_adapter(
    client: HubClient, repo_id: str, commit: str, files: dict[str, RemoteFile], prefix: str, tmp: Path
) -> Path:
    """Both files of the adapter below ``prefix``, checked, in a new folder of ``tmp``."""
    folder = Path(tempfile.mkdtemp(prefix="adapter-", dir=tmp))
    for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        path = prefix + fname
        local = _fetch_checked(client, repo_id, path, commit, files[path], tmp / "dl")
        os.replace(local, folder / fname)
    return folder


def import_hub(
    ctx: Context,
    repo_id: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    name: str | None = None,
    kind: str = "task",
    base: str | None = None,
    tasks: Iterable[str] = (),
    tags: Iterable[str] = (),
    token: str | None = None,
    allow_base_mismatch: bool = False,
) -> Expert:
    """Download one PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) from a
    Hub repo, optionally below ``subfolder`` (or a sub-folder in the id, ``user/repo/sub``), and add
    it like ``libstore add``."""
    repo_id, sub = split_hub_id(repo_id, subfolder)
    name = validate_name(name or (sub.rsplit("/", 1)[-1] if sub else repo_id.split("/")[1]))
    client = HubClient(token=token)
    commit = client.resolve(repo_id, revision or "main")
    files = client.list_files(repo_id, commit)
    prefix = f"{sub}/" if sub else ""
    where = f"{repo_id}@{commit[:12]}" + (f" under {sub}/" if sub else "")
    if prefix + ADAPTER_CONFIG not in files:
        found = sorted({p.rsplit("/", 1)[0] for p in files if p.endswith("/" + ADAPTER_CONFIG)})
        hint = (
            f"; adapters are in: {', '.join(found[:10])} (pass --subfolder, or --all to import them all)"
            if found
            else ""
        )
        raise ValidationError(f"{where} has no {ADAPTER_CONFIG}, so it holds no PEFT adapter{hint}")
    _check_sizes(repo_id, commit, _adapter_files(files, prefix, where))
    with temp_dir(ctx, "import-hub") as tmp:
        folder = _download_adapter(client, repo_id, commit, files, prefix, tmp)
        source = f"hf://{repo_id}" + (f"/{sub}" if sub else "") + f"@{commit}"
        return experts_ops.add(
            ctx,
            folder,
            name=name,
            kind=kind,
            base=base,
            tasks=tasks,
            tags=tags,
            source=source,
            allow_base_mismatch=allow_base_mismatch,
        )


def hub_adapter_names(repo_id: str, sub: str, folders: Iterable[str]) -> dict[str, str]:
    """Adapter folder (repo path) -> expert name: its path below ``sub`` with '/' read as '.'
    (``arc/checkpoint-17`` -> ``arc.checkpoint-17``), the folder's own name for ``sub`` itself (the
    repo's name at the root). Two folders that would get one name are refused, naming both."""
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    own = sub.rsplit("/", 1)[-1] if sub else repo_id.split("/")[1]
    for folder in folders:
        rel = folder[len(sub) :].strip("/") if sub else folder
        name = rel.replace("/", ".") if rel else own
        try:
            validate_name(name)
        except LibstoreError as e:
            raise e.add_context(f"adapter folder {folder or '/'!r} of {repo_id}") from None
        if name in seen:
            raise ValidationError(
                f"adapter folders {seen[name] or '/'!r} and {folder!r} of {repo_id} would both be named "
                f"{name!r}; import them one at a time with --subfolder and --name"
            )
        seen[name] = folder
        names[folder] = name
    return names


def import_hub_all(
    ctx: Context,
    repo_id: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    kind: str = "task",
    base: str | None = None,
    tasks: Iterable[str] = (),
    tags: Iterable[str] = (),
    token: str | None = None,
    allow_base_mismatch: bool = False,
) -> experts_ops.ImportReport:
    """Import every PEFT adapter folder at or below ``subfolder`` of a Hub repo (a collection
    trained with PEFT/TRL, one folder per adapter or checkpoint), all or nothing.

    Names come from the paths (:func:`hub_adapter_names`). Every adapter is downloaded, checked
    against the Hub's hashes and validated like ``libstore add`` before one transaction adds them
    all; one that is already in the library with the same weights is reported as skipped.
    """
    repo_id, sub = split_hub_id(repo_id, subfolder)
    client = HubClient(token=token)
    commit = client.resolve(repo_id, revision or "main")
    files = client.list_files(repo_id, commit)
    prefix = f"{sub}/" if sub else ""
    where = f"{repo_id}@{commit[:12]}" + (f" under {sub}/" if sub else "")
    folders = sorted(
        p[: -len(ADAPTER_CONFIG)].rstrip("/")
        for p in files
        if p == prefix + ADAPTER_CONFIG or (p.startswith(prefix) and p.endswith("/" + ADAPTER_CONFIG))
    )
    if not folders:
        raise ValidationError(f"{where} holds no PEFT adapter (no {ADAPTER_CONFIG} at or below it)")
    names = hub_adapter_names(repo_id, sub, folders)
    records = {
        f: _adapter_files(files, f"{f}/" if f else "", f"{repo_id}@{commit[:12]}:{f or '/'}") for f in folders
    }
    _check_sizes(repo_id, commit, [rf for rfs in records.values() for rf in rfs])
    tags = [validate_name(t) for t in tags]
    tasks = list(tasks)
    prepared: list[tuple[str, str, AdapterFile]] = []
    with temp_dir(ctx, "import-hub") as tmp, ctx.blobs.discarding(a.weights for _, _, a in prepared):
        for f in folders:
            local = _download_adapter(client, repo_id, commit, files, f"{f}/" if f else "", tmp)
            try:
                adapter = read_adapter(local, into=ctx.blobs)
            except LibstoreError as e:
                raise e.add_context(f"adapter folder {f or '/'!r} of {repo_id}") from None
            prepared.append((f, names[f], adapter))
        added, skipped = [], []
        with ctx.catalog.write() as s:
            for f, name, adapter in prepared:
                if repo.expert_sha256(s, name) == adapter.weights_sha256:
                    skipped.append(name)
                    continue
                try:
                    row = experts_ops.insert_adapter(
                        ctx,
                        s,
                        adapter,
                        name=name,
                        kind=kind,
                        base=base,
                        tasks=tasks,
                        tags=tags,
                        metadata=None,
                        cluster=None,
                        source=f"hf://{repo_id}" + (f"/{f}" if f else "") + f"@{commit}",
                        allow_base_mismatch=allow_base_mismatch,
                    )
                except LibstoreError as e:
                    raise e.add_context(f"adapter folder {f or '/'!r} of {repo_id}") from None
                added.append(row)
    return experts_ops.ImportReport(added=tuple(added), skipped=tuple(skipped))


def _is_local(source: str | os.PathLike[str]) -> bool:
    s = str(source)
    return not s.startswith("hf://") and (Path(s).expanduser().exists() or s.startswith((".", "/", "~")))


def import_mttl(
    ctx: Context,
    source: str | os.PathLike[str],
    *,
    kind: str = "task",
    base: str | None = None,
    tags: Iterable[str] = (),
    experts: Iterable[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
    allow_base_mismatch: bool = False,
) -> experts_ops.ImportReport:
    """Import every LoRA expert of an mttl expert library (local folder or Hub repo ``org/name``).

    Experts in sub-folders (mttl name ``sub/e``) are imported as ``sub.e``; experts of other mttl
    modifiers are reported in ``not_imported``, never silently left out. Each ``<expert>.ckpt`` /
    ``.meta`` pair is read with ``torch.load(weights_only=True)`` only,
    converted to a PEFT folder (A = lora_aᵀ, B = lora_bᵀ), validated like ``libstore add`` and
    added with its tasks; all experts in one transaction. Its auxiliary data files
    (``<expert>.<data_type>.bin``, numpy arrays allowed) are attached to it as data
    (:class:`~libstore.types.ExpertData`), the Arrow ones compared with libstore's prototypes
    (metadata ``mttl.arrow_prototypes``). ``experts`` limits the import to these names (globs
    allowed). Soft-deleted experts are skipped, as mttl does; so are experts already in the library
    with the same weights (their data is not replaced). The data's blobs are stored as each expert
    is read, outside the write transaction; a refused import records nothing and leaves them to gc.
    """
    tags = [validate_name(t) for t in tags]
    patterns = list(experts) if experts is not None else None
    prepared: list[tuple[str, mttl.MttlExpert, AdapterFile, list[StoredFile]]] = []
    not_lora: list[tuple[str, str]] = []
    with temp_dir(ctx, "import-mttl") as tmp, ctx.blobs.discarding(a.weights for _, _, a, _ in prepared):
        if _is_local(source):
            folder = Path(source).expanduser()
            label = str(folder.resolve())
        else:
            repo_id = str(source).removeprefix("hf://")
            folder, commit = _download_mttl(repo_id, revision, token, tmp, patterns)
            label = f"hf://{repo_id}@{commit}"
        found = mttl.scan(folder)
        if patterns is not None:
            found = [
                f
                for f in found
                if any(fnmatch.fnmatchcase(n, p) for n in (f.name, f.libstore_name) for p in patterns)
            ]
            if not found:
                raise ValidationError(f"no expert of {source} matches {', '.join(patterns)}")
        with ctx.catalog.read() as s:
            base_model = repo.resolve_base(s, base)
        for files in found:
            try:
                validate_name(files.libstore_name)
                info = mttl.read_meta(files)
                if info.deleted:
                    continue
                if not info.lora:
                    why = f"mttl modifier {info.modifier!r}: libstore stores LoRA experts only"
                    not_lora.append((files.libstore_name, why))
                    continue
                if not allow_base_mismatch:
                    _check_trained_on(info, base_model)
                weights = mttl.read_weights(files)
                if info.tie_params:
                    weights = mttl.expand_tied(weights, info.tie_params, where=str(files.ckpt))
                aux = {t: mttl.read_aux(files, t) for t in files.aux}
                encoded = [
                    f
                    for t, (cfg, value) in aux.items()
                    for f in expert_data.encode(
                        t, source="mttl", config=cfg, data=value, where=str(mttl.aux_path(files, t))
                    )
                ]
                if aux:
                    info.metadata["aux_data"] = sorted(aux)
                compared = _compare_arrow(files, weights, aux)
                if compared:
                    info.metadata["arrow_prototypes"] = compared
                # stored now (memory stays bounded), recorded in the transaction; a later refusal
                # leaves them unreferenced, for gc
                data = [StoredFile(p, (ref := ctx.blobs.put_bytes(b)).sha256, ref.size) for p, b in encoded]
                out = mttl.to_peft(info, weights, base_model, tmp / "peft" / files.libstore_name)
                adapter = read_adapter(out, into=ctx.blobs)
            except LibstoreError as e:
                raise e.add_context(f"mttl expert {files.name!r}") from None
            prepared.append((files.libstore_name, info, adapter, data))
        if not prepared and not_lora:
            raise ValidationError(
                f"{source} holds no LoRA experts: {', '.join(f'{n} ({why})' for n, why in not_lora[:5])}"
            )
        added, skipped = [], []
        with ctx.catalog.write() as s:
            for name, info, adapter, data in prepared:
                if repo.expert_sha256(s, name) == adapter.weights_sha256:
                    skipped.append(name)
                    continue
                row = experts_ops.insert_adapter(
                    ctx,
                    s,
                    adapter,
                    name=name,
                    kind=kind,
                    base=base_model.name,
                    tasks=list(info.tasks),
                    tags=tags,
                    metadata={"mttl": info.metadata},
                    cluster=None,
                    source=f"{label}/{info.name}.ckpt",
                    allow_base_mismatch=True,
                    data_files=data,
                )
                added.append(row)
            report = tuple(added)
    return experts_ops.ImportReport(added=report, skipped=tuple(skipped), not_imported=tuple(not_lora))


#: |cos| below which an mttl prototype counts as another direction than libstore's
PROTO_AGREE = 1 - 1e-4
#: relative difference above which an mttl eigenvalue counts as another value than libstore's
#: (mttl computes in float32)
EIGVAL_AGREE = 1e-4


def _compare_arrow(
    files: mttl.MttlFiles, weights: Mapping[str, Any], aux: Mapping[str, tuple[dict[str, Any], Any]]
) -> dict[str, Any]:
    """mttl's stored Arrow data of this expert compared with libstore's exact prototypes, per data
    type: ``<save_name>_protos`` and ``_vectors`` by the smallest |cos| with libstore's prototype,
    ``_eigvals`` (σ₁² of mttl's unscaled ``lora_a @ lora_b``) by the largest relative difference
    from libstore's top singular value squared (scale 1); each with its config, the module count
    and the modules where they differ — with ``tie_params`` mttl gives tied modules one joint
    prototype, which libstore's per-module routing does not use."""
    import torch

    from libstore.lowrank.prototypes import exact_prototypes

    out: dict[str, Any] = {}
    for data_type, (cfg, data) in aux.items():
        if not data_type.endswith(mttl.ARROW_SUFFIXES):
            continue
        where = str(mttl.aux_path(files, data_type))
        config, theirs = mttl.arrow_vectors(data_type, cfg, data, where=where)
        eigvals = data_type.endswith(mttl.EIGVALS_SUFFIX)
        diff: dict[str, float] = {}
        for stem, value in sorted(theirs.items()):
            a, b = weights.get(f"{stem}.lora_a"), weights.get(f"{stem}.lora_b")
            if (
                a is None
                or b is None
                or a.ndim != 2
                or (isinstance(value, torch.Tensor) and value.shape[0] != a.shape[0])
            ):
                raise ValidationError(
                    f"mttl expert {files.name!r}: its {data_type} data has an entry for {stem!r}, "
                    f"which its weights do not fit; the library is inconsistent"
                )
            ours = exact_prototypes(a.T.double(), b.T.double())
            if isinstance(value, torch.Tensor):
                cos = torch.nn.functional.cosine_similarity(ours.vectors[0], value.double(), dim=0)
                diff[stem] = float(cos.abs())
            else:
                top = float(ours.values[0]) ** 2
                diff[stem] = abs(value - top) / max(abs(top), 1e-30)
        if eigvals:
            differ = [m for m, d in diff.items() if d > EIGVAL_AGREE]
            stat = {"max_rel_diff": float(f"{max(diff.values()):.3g}") if diff else None}
        else:
            differ = [m for m, c in diff.items() if c < PROTO_AGREE]
            stat = {"min_abs_cos": round(min(diff.values()), 6) if diff else None}
        out[data_type] = {"config": config, "modules": len(diff), **stat, "differ": differ}
    return out


def _check_trained_on(info: mttl.MttlExpert, base: BaseModel) -> None:
    """mttl records the base as a Hub id or a short name (``phi-2``); compare loosely by last part."""
    said = info.base_model
    if not said:
        return
    names = {base.name, base.source, Path(base.source).name}
    if said in names or said.rsplit("/", 1)[-1].casefold() in {
        n.rsplit("/", 1)[-1].casefold() for n in names
    }:
        return
    raise BaseModelMismatchError(
        f"mttl expert {info.name!r} was trained on {said!r}, but base model {base.name!r} was registered "
        f"from {base.source!r}; if they are the same weights pass --allow-base-mismatch (module shapes "
        f"are checked either way)"
    )


def _download_mttl(
    repo_id: str,
    revision: str | None,
    token: str | None,
    tmp: Path,
    patterns: list[str] | None,
) -> tuple[Path, str]:
    check_repo_id(repo_id)
    client = HubClient(token=token)
    commit = client.resolve(repo_id, revision or "main")
    files = client.list_files(repo_id, commit)
    wanted = []
    for path, rf in sorted(files.items()):
        aux = path.endswith(mttl.AUX_SUFFIX) and path.rsplit("/", 1)[-1].count(".") == 2
        if not (aux or path.endswith((mttl.META_SUFFIX, mttl.CKPT_SUFFIX))):  # sub-folders too
            continue
        stem = path.split(".", 1)[0]
        if patterns is not None and not any(fnmatch.fnmatchcase(stem, p) for p in patterns):
            continue
        wanted.append((path, rf))
    if not any(p.endswith(mttl.META_SUFFIX) for p, _ in wanted):
        raise HubError(
            f"{repo_id}@{commit[:12]} holds no mttl experts (<expert>.meta files)",
            repo_id=repo_id,
        )
    _check_sizes(repo_id, commit, [rf for _, rf in wanted])
    folder = tmp / "mttl"
    folder.mkdir()
    for path, rf in wanted:
        local = _fetch_checked(client, repo_id, path, commit, rf, tmp / "dl")
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, folder / path)
    return folder, commit
