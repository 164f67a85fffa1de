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
from collections.abc import Iterable
from pathlib import Path

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
from libstore.store.adapter import PICKLE_WEIGHTS, read_adapter, validate_name
from libstore.store.blobs import sha256_file
from libstore.types import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFile, BaseModel, Expert

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
    Hub repo, optionally below ``subfolder``, and add it like ``libstore add``."""
    check_repo_id(repo_id)
    sub = _check_subfolder(subfolder)
    name = validate_name(name or (sub.rsplit("/", 1)[-1] if sub else repo_id.split("/")[1]))
    client = HubClient(token=token)
    commit = client.resolve(repo_id, revision or "main")
    files = client.list_files(repo_id, commit)
    prefix = f"{sub}/" if sub else ""
    where = f"{repo_id}@{commit[:12]}" + (f" under {sub}/" if sub else "")
    if prefix + ADAPTER_CONFIG not in files:
        found = sorted({p.rsplit("/", 1)[0] for p in files if p.endswith("/" + ADAPTER_CONFIG)})
        hint = f"; adapters are in: {', '.join(found[:10])} (pass --subfolder)" if found else ""
        raise ValidationError(f"{where} has no {ADAPTER_CONFIG}, so it holds no PEFT adapter{hint}")
    if prefix + ADAPTER_WEIGHTS not in files:
        pickled = [prefix + p for p in PICKLE_WEIGHTS if prefix + p in files]
        if pickled:
            raise UnsafeFileError(
                f"{where} holds its weights only as {pickled[0].rsplit('/', 1)[-1]} (a pickle); libstore "
                f"never unpickles. Convert the adapter to safetensors (load it with PEFT in a trusted "
                f"environment and save_pretrained(..., safe_serialization=True)), then import that"
            )
        raise ValidationError(f"{where} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    _check_sizes(repo_id, commit, [files[prefix + f] for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)])
    with temp_dir(ctx, "import-hub") as tmp:
        folder = tmp / "adapter"
        folder.mkdir()
        for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            path = prefix + fname
            local = _fetch_checked(client, repo_id, path, commit, files[path], tmp / "dl")
            os.replace(local, folder / fname)
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

    Each ``<expert>.ckpt`` / ``.meta`` pair is read with ``torch.load(weights_only=True)`` only,
    converted to a PEFT folder (A = lora_aᵀ, B = lora_bᵀ), validated like ``libstore add`` and
    added with its tasks; all experts in one transaction. ``experts`` limits the import to these
    names (globs allowed). Soft-deleted experts are skipped, as mttl does; so are experts already
    in the library with the same weights.
    """
    tags = [validate_name(t) for t in tags]
    patterns = list(experts) if experts is not None else None
    prepared: list[tuple[mttl.MttlExpert, AdapterFile]] = []
    with temp_dir(ctx, "import-mttl") as tmp, ctx.blobs.discarding(a.weights for _, a in prepared):
        if _is_local(source):
            folder = Path(source).expanduser()
            label = str(folder.resolve())
        else:
            repo_id = str(source).removeprefix("hf://")
            folder, commit = _download_mttl(repo_id, revision, token, tmp, patterns)
            label = f"hf://{repo_id}@{commit}"
        found = mttl.scan(folder)
        if patterns is not None:
            found = [f for f in found if any(fnmatch.fnmatchcase(f.name, p) for p in patterns)]
            if not found:
                raise ValidationError(f"no expert of {source} matches {', '.join(patterns)}")
        with ctx.catalog.read() as s:
            base_model = repo.to_base(repo.resolve_base_row(s, base))
        for files in found:
            try:
                validate_name(files.name)
                info = mttl.read_meta(files)
                if info.deleted:
                    continue
                if not allow_base_mismatch:
                    _check_trained_on(info, base_model)
                weights = mttl.read_weights(files)
                out = mttl.to_peft(info, weights, base_model, tmp / "peft" / files.name)
                adapter = read_adapter(out, into=ctx.blobs)
            except LibstoreError as e:
                raise e.add_context(f"mttl expert {files.name!r}") from None
            prepared.append((info, adapter))
        added, skipped = [], []
        with ctx.catalog.write() as s:
            for info, adapter in prepared:
                if (
                    repo.expert_exists(s, info.name)
                    and repo.expert_row(s, info.name).sha256 == adapter.weights_sha256
                ):
                    skipped.append(info.name)
                    continue
                row = experts_ops.insert_adapter(
                    ctx,
                    s,
                    adapter,
                    name=info.name,
                    kind=kind,
                    base=base_model.name,
                    tasks=list(info.tasks),
                    tags=tags,
                    metadata={"mttl": info.metadata},
                    cluster=None,
                    source=f"{label}/{info.name}.ckpt",
                    allow_base_mismatch=True,
                )
                added.append(row)
            report = tuple(added)
    return experts_ops.ImportReport(added=report, skipped=tuple(skipped))


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
        if "/" in path or not path.endswith((mttl.META_SUFFIX, mttl.CKPT_SUFFIX)):
            continue
        stem = path.rsplit(".", 1)[0]
        if patterns is not None and not any(fnmatch.fnmatchcase(stem, p) for p in patterns):
            continue
        wanted.append((path, rf))
    if not any(p.endswith(mttl.META_SUFFIX) for p, _ in wanted):
        raise HubError(
            f"{repo_id}@{commit[:12]} holds no mttl experts (<expert>.meta files at its root)",
            repo_id=repo_id,
        )
    _check_sizes(repo_id, commit, [rf for _, rf in wanted])
    folder = tmp / "mttl"
    folder.mkdir()
    for path, rf in wanted:
        local = _fetch_checked(client, repo_id, path, commit, rf, tmp / "dl")
        os.replace(local, folder / path)
    return folder, commit
