"""``import-hub`` (any PEFT adapter repo) and ``import-mttl`` (microsoft/mttl's expert-library format)."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors.torch import load_file

from libstore import Library
from libstore.errors import (
    BaseModelMismatchError,
    InvalidNameError,
    UnsafeFileError,
    ValidationError,
)
from libstore.store.blobs import sha256_file
from tests import hub_support as support
from tests.factories import make_adapter
from tests.hub_support import snapshot
from tests.hubserver import DEFAULT_TOKEN, HubServer

hub = support.hub  # fixture

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.parametrize("db_url", [None], ids=["sqlite"]),
]


def _api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.url, token=DEFAULT_TOKEN)


# --- import-hub ------------------------------------------------------------------------------------


def test_import_hub_from_a_subfolder(
    library: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    src = make_adapter(base_dir, tmp_path / "arc", seed=4)
    api = _api(hub)
    api.create_repo("libstore-org/adapters")
    api.upload_folder(repo_id="libstore-org/adapters", folder_path=src, path_in_repo="tasks/arc_easy")
    e = library.import_hub(
        "libstore-org/adapters", subfolder="tasks/arc_easy", kind="task", tasks=["arc_easy"]
    )
    assert e.name == "arc_easy" and e.tasks == ("arc_easy",)
    assert e.sha256 == sha256_file(src / "adapter_model.safetensors")
    assert e.source.startswith("hf://libstore-org/adapters/tasks/arc_easy@")
    with pytest.raises(ValidationError, match="--subfolder"):
        library.import_hub("libstore-org/adapters", name="x")  # nothing at the root: says where adapters are
    with pytest.raises(ValidationError, match="relative path"):
        library.import_hub("libstore-org/adapters", subfolder="../etc")
    assert not list((library.path / ".tmp").glob("*"))


def test_import_hub_refuses_pickles_and_invalid_adapters(
    library: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    src = make_adapter(base_dir, tmp_path / "a", seed=1)
    api = _api(hub)
    api.create_repo("libstore-org/pickled")
    api.create_commit(
        "libstore-org/pickled",
        [
            CommitOperationAdd("adapter_config.json", (src / "adapter_config.json").read_bytes()),
            CommitOperationAdd("adapter_model.bin", b"\x80\x04K\x01."),
        ],
        commit_message="pickle",
    )
    before = snapshot(library)
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        library.import_hub("libstore-org/pickled")
    other_base = make_adapter(
        base_dir, tmp_path / "wide", seed=2, targets=("q_proj",), config_overrides={"r": 8}
    )  # config says r=8, weights have rank 4
    api.create_repo("libstore-org/broken")
    api.upload_folder(repo_id="libstore-org/broken", folder_path=other_base)
    with pytest.raises(ValidationError, match="rank"):
        library.import_hub("libstore-org/broken")
    assert snapshot(library) == before


def test_a_hub_id_with_a_subfolder_works_like_subfolder(
    library: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    src = make_adapter(base_dir, tmp_path / "arc", seed=4)
    api = _api(hub)
    api.create_repo("libstore-org/pasted")
    api.upload_folder(repo_id="libstore-org/pasted", folder_path=src, path_in_repo="tasks/arc_easy")
    e = library.import_hub("libstore-org/pasted/tasks/arc_easy")  # as people paste it
    assert e.name == "arc_easy" and e.source.startswith("hf://libstore-org/pasted/tasks/arc_easy@")
    again = library.import_hub("hf://libstore-org/pasted/tasks", subfolder="arc_easy", name="again")
    assert again.sha256 == e.sha256
    with pytest.raises(ValidationError, match="relative path"):
        library.import_hub("libstore-org/pasted/../etc")


def test_import_hub_all_imports_every_adapter_folder_named_by_path(
    library: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    api = _api(hub)
    api.create_repo("libstore-org/runs")
    layout = {"": 0, "a/checkpoint-17": 1, "b/checkpoint-17": 2, "b/checkpoint-34": 3}
    for path, seed in layout.items():
        folder = make_adapter(base_dir, tmp_path / f"src{seed}", seed=seed)
        api.upload_folder(repo_id="libstore-org/runs", folder_path=folder, path_in_repo=path or None)
    report = library.import_hub_all("libstore-org/runs", tasks=["t"])
    names = {e.name: e for e in report.added}
    assert set(names) == {"runs", "a.checkpoint-17", "b.checkpoint-17", "b.checkpoint-34"}  # no collision
    for path, seed in layout.items():
        e = names[path.replace("/", ".") or "runs"]
        assert e.sha256 == sha256_file(tmp_path / f"src{seed}" / "adapter_model.safetensors")
        assert e.source.startswith("hf://libstore-org/runs" + (f"/{path}@" if path else "@"))
        assert e.tasks == ("t",)
    below = library.import_hub_all("libstore-org/runs/b")  # names relative to the subfolder
    assert {e.name for e in below.added} == {"checkpoint-17", "checkpoint-34"}
    assert set(library.import_hub_all("libstore-org/runs").skipped) == set(names)


def test_import_hub_all_is_all_or_nothing_and_refuses_colliding_names(
    library: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    api = _api(hub)
    api.create_repo("libstore-org/mixed")
    good = make_adapter(base_dir, tmp_path / "good", seed=1)
    bad = make_adapter(base_dir, tmp_path / "bad", seed=2, config_overrides={"r": 8})
    api.upload_folder(repo_id="libstore-org/mixed", folder_path=good, path_in_repo="x/good")
    api.upload_folder(repo_id="libstore-org/mixed", folder_path=bad, path_in_repo="x/bad")
    before = snapshot(library)
    with pytest.raises(ValidationError, match="adapter folder 'x/bad'.*rank"):
        library.import_hub_all("libstore-org/mixed")
    assert snapshot(library) == before  # the valid one was not added either
    api.create_repo("libstore-org/clash")
    api.upload_folder(repo_id="libstore-org/clash", folder_path=good, path_in_repo="a.b/c")
    api.upload_folder(repo_id="libstore-org/clash", folder_path=good, path_in_repo="a/b.c")
    with pytest.raises(ValidationError, match="would both be named 'a.b.c'"):
        library.import_hub_all("libstore-org/clash")
    with pytest.raises(ValidationError, match="no PEFT adapter"):
        library.import_hub_all("libstore-org/clash/zzz")
    assert snapshot(library) == before


# --- import-mttl -----------------------------------------------------------------------------------


MODULES = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]


def _write_mttl_library(
    folder: Path,
    names: dict[str, str],
    *,
    rank: int = 4,
    alpha: float = 16.0,
    seed: int = 0,
    tie_params: str | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """What mttl's ExpertLibrary writes: <name>.ckpt (weights dict) and <name>.meta (metadata dict);
    a name with '/' in a sub-folder (LocalExpertLibrary.add_expert makes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, task in names.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        weights = {}
        for m in MODULES:  # tiny llama: hidden 32, q/v 32 -> 32
            weights[f"{m}.lora_a"] = torch.randn(32, rank, generator=gen)  # (in, r)
            weights[f"{m}.lora_b"] = torch.randn(rank, 32, generator=gen)  # (r, out)
        torch.save(weights, folder / f"{name}.ckpt")
        torch.save(
            {
                "expert_name": name,
                "expert_task_name": task,
                "parent_node": None,
                "expert_model": "tiny-llama",
                "expert_deleted": False,
                "expert_config": {
                    "modify_modules": ".*",
                    "modify_layers": "q_proj|v_proj",
                    "tie_params": tie_params,
                    "lora_rank": rank,
                    "lora_alpha": alpha,
                    "lora_dropout": 0.05,
                    "lora_init_b_random": False,
                    "class_name": "mttl.models.modifiers.lora.LoRAConfig",
                },
                "training_config": {"model": "tiny-llama", "finetune_task_name": task, "learning_rate": 1e-3},
            },
            folder / f"{name}.meta",
        )
        torch.save({"config": {"name": "arrow"}, "data": {"x": torch.ones(2)}}, folder / f"{name}.arrow.bin")
        out[name] = weights
    return out


def _delta_w(weights: dict[str, torch.Tensor], module: str, scale: float) -> torch.Tensor:
    return scale * (weights[f"{module}.lora_a"] @ weights[f"{module}.lora_b"]).T  # mttl's merge_with_layer


def test_import_mttl_folder_keeps_every_delta_w(library: Library, tmp_path: Path) -> None:
    src = _write_mttl_library(tmp_path / "mttl", {"niv2_qa": "niv2_qa", "cluster_3": "arc_easy,boolq"})
    r = library.import_mttl(tmp_path / "mttl", tags=["mttl"], allow_base_mismatch=True)
    assert sorted(e.name for e in r.added) == ["cluster_3", "niv2_qa"]
    e = library.get("cluster_3")
    assert e.tasks == ("arc_easy", "boolq") and e.tags == ("mttl",) and e.rank == 4 and e.alpha == 16.0
    assert e.metadata["mttl"]["aux_data"] == ["arrow"] and e.data_types == ("arrow",)
    assert "aux_data_not_imported" not in e.metadata["mttl"]
    assert set(e.modules) == set(MODULES)
    for name, weights in src.items():
        ex = library.get(name)
        t = load_file(library.context.blobs.path(ex.file("adapter_model.safetensors").sha256))
        for m in MODULES:
            a, b = t[f"base_model.model.{m}.lora_A.weight"], t[f"base_model.model.{m}.lora_B.weight"]
            torch.testing.assert_close(ex.scale * b @ a, _delta_w(weights, m, 16.0 / 4), rtol=1e-6, atol=1e-6)
    # running it again is harmless; the exported expert is a PEFT folder PEFT can load
    assert library.import_mttl(tmp_path / "mttl", allow_base_mismatch=True).skipped == (
        "cluster_3",
        "niv2_qa",
    )


def test_import_mttl_refuses_pickled_objects_without_running_them(library: Library, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # what a hostile checkpoint does: call something on load
            return (builtins.exec, (f"open({str(marker)!r}, 'w').write('x')",))

    _write_mttl_library(tmp_path / "mttl", {"good": "good", "evil": "evil"})
    torch.save({"model.layers.0.self_attn.q_proj.lora_a": Evil()}, tmp_path / "mttl" / "evil.ckpt")
    before = snapshot(library)
    with pytest.raises(UnsafeFileError, match="weights_only"):
        library.import_mttl(tmp_path / "mttl", allow_base_mismatch=True)
    assert not marker.exists() and snapshot(library) == before  # all or nothing: 'good' not added either
    torch.save(Evil(), tmp_path / "mttl" / "evil.ckpt")
    torch.save({"expert_name": Evil()}, tmp_path / "mttl" / "good.meta")
    with pytest.raises(UnsafeFileError):
        library.import_mttl(tmp_path / "mttl", experts=["good"], allow_base_mismatch=True)
    assert not marker.exists() and snapshot(library) == before


def test_import_mttl_checks_modifier_base_and_names(library: Library, tmp_path: Path) -> None:
    folder = tmp_path / "mttl"
    _write_mttl_library(folder, {"a": "task_a"})
    with pytest.raises(BaseModelMismatchError, match="allow-base-mismatch"):
        library.import_mttl(folder)  # the metadata names another base
    meta = torch.load(folder / "a.meta", weights_only=True)
    meta["expert_config"]["class_name"] = "mttl.models.modifiers.lora.SkilledLoRAConfig"
    torch.save(meta, folder / "a.meta")
    with pytest.raises(ValidationError, match="holds no LoRA experts: a .*SkilledLoRAConfig"):
        library.import_mttl(folder, allow_base_mismatch=True)
    _write_mttl_library(folder, {"a": "bad task/name"})
    with pytest.raises(InvalidNameError):
        library.import_mttl(folder, allow_base_mismatch=True)
    wide = {f"{m}.lora_a": torch.zeros(64, 4) for m in MODULES} | {
        f"{m}.lora_b": torch.zeros(4, 32) for m in MODULES
    }
    _write_mttl_library(folder, {"a": "a"})
    torch.save(wide, folder / "a.ckpt")
    with pytest.raises(BaseModelMismatchError, match=r"\(in, r\)"):
        library.import_mttl(folder, allow_base_mismatch=True)
    assert library.experts() == []


def _write_mlp_expert(folder: Path, name: str) -> None:
    """An expert of another mttl modifier (MLPConfig), as ExpertLibrary.add_expert writes it."""
    torch.save({"model.layers.0.mlp.down_proj.mlp.weight": torch.zeros(4, 4)}, folder / f"{name}.ckpt")
    config = {"modify_modules": ".*mlp", "modify_layers": "", "tie_params": None, "n_embd": 32}
    config["class_name"] = "mttl.models.modifiers.mlp.MLPConfig"
    meta = {"expert_name": name, "expert_task_name": name, "parent_node": None, "expert_model": "tiny-llama"}
    meta |= {"expert_deleted": False, "expert_config": config, "training_config": {"model": "tiny-llama"}}
    torch.save(meta, folder / f"{name}.meta")


def test_import_mttl_imports_nested_experts_records_tie_params_and_reports_other_types(
    library: Library, hub: HubServer, tmp_path: Path
) -> None:
    folder = tmp_path / "mttl"
    tie = "q_proj.*\\.lora_a|v_proj.*\\.lora_a"
    src = _write_mttl_library(folder, {"top": "t1", "sub/e_nested": "t2"}, tie_params=tie)
    _write_mlp_expert(folder, "mlp_expert")
    assert (folder / "sub" / "e_nested.ckpt").is_file() and (folder / "sub" / "e_nested.arrow.bin").is_file()
    r = library.import_mttl(folder, allow_base_mismatch=True)
    assert sorted(e.name for e in r.added) == ["sub.e_nested", "top"]  # nothing skipped silently
    assert r.not_imported == (
        (
            "mlp_expert",
            "mttl modifier 'mttl.models.modifiers.mlp.MLPConfig': libstore stores LoRA experts only",
        ),
    )
    nested = library.get("sub.e_nested")
    assert nested.metadata["mttl"]["expert_name"] == "sub/e_nested" and nested.tasks == ("t2",)
    assert nested.metadata["mttl"]["tie_params"] == tie
    assert nested.source.endswith("/sub/e_nested.ckpt")
    t = load_file(library.context.blobs.path(nested.file("adapter_model.safetensors").sha256))
    m = MODULES[1]
    torch.testing.assert_close(
        nested.scale * t[f"base_model.model.{m}.lora_B.weight"] @ t[f"base_model.model.{m}.lora_A.weight"],
        _delta_w(src["sub/e_nested"], m, 4.0),
        rtol=1e-6,
        atol=1e-6,
    )
    api = _api(hub)  # the Hub lists sub-folders too (mttl's HFExpertLibrary sees 'sub/e_nested')
    api.create_repo("libstore-org/mttl-nested")
    api.upload_folder(repo_id="libstore-org/mttl-nested", folder_path=folder)
    lib2 = Library.init(tmp_path / "lib2")
    lib2.add_base("tiny", library.base("tiny").source)
    r2 = lib2.import_mttl("libstore-org/mttl-nested", allow_base_mismatch=True)
    assert sorted(e.name for e in r2.added) == ["sub.e_nested", "top"] and len(r2.not_imported) == 1
    assert lib2.get("sub.e_nested").sha256 == nested.sha256
    lib2.close()


ARROW_SAVE = "arrowtransformconfig-5f1c2a"  # ArrowTransformConfig().save_name: class name + param hash
ARROW_CONFIG = {"ab_only": True, "scale": False, "tie_params": "default", "tie_op": "concat"}


def _write_arrow_protos(folder: Path, name: str, weights: dict[str, torch.Tensor], tied: bool) -> None:
    """What mttl's ArrowTransform.transform persists (add_auxiliary_data, config = the transform
    config's __dict__): <name>.<save_name>_vectors.bin (module -> numpy top eigenvector of
    (lora_a @ lora_b)), _eigvals.bin (module -> float, σ₁²) and _protos.bin (module -> tensor, from
    the numpy vector); with tied lora_a (tie_op "concat") one joint vector from [B_q B_v] for q and v."""
    vectors, eigvals, protos = {}, {}, {}
    for layer in (0, 1):
        q, v = (f"model.layers.{layer}.self_attn.{m}" for m in ("q_proj", "v_proj"))
        groups = [[q, v]] if tied else [[q], [v]]
        for group in groups:
            A = weights[f"{group[0]}.lora_a"].float()
            B = torch.cat([weights[f"{p}.lora_b"] for p in group], dim=1).float()
            U, S, _ = torch.linalg.svd(A @ B)  # U_W, Sigma_W of mttl's _low_rank_svd (up to sign)
            top = U[:, 0]
            for p in group:
                vectors[p] = top.real.cpu().numpy()
                eigvals[p] = (S[0] ** 2).item()
                protos[p] = torch.from_numpy(vectors[p])
    config = {"name": None, **ARROW_CONFIG}
    for kind, data in (("vectors", vectors), ("eigvals", eigvals), ("protos", protos)):
        torch.save({"data": data, "config": config}, folder / f"{name}.{ARROW_SAVE}_{kind}.bin")


def test_import_mttl_compares_mttls_arrow_prototypes_with_libstores(
    library: Library, hub: HubServer, tmp_path: Path
) -> None:
    folder = tmp_path / "mttl"
    tie = "q_proj.*\\.lora_a|v_proj.*\\.lora_a"
    src = _write_mttl_library(folder, {"plain": "t1", "sub/tied": "t2"}, tie_params=tie)
    tied = src["sub/tied"]
    for layer in (0, 1):  # trained with tie_params: q and v of a layer share lora_a
        prefix = f"model.layers.{layer}.self_attn"
        tied[f"{prefix}.v_proj.lora_a"] = tied[f"{prefix}.q_proj.lora_a"]
    torch.save(tied, folder / "sub" / "tied.ckpt")
    _write_arrow_protos(folder, "plain", src["plain"], tied=False)
    _write_arrow_protos(folder / "sub", "tied", tied, tied=True)
    library.import_mttl(folder, allow_base_mismatch=True)
    plain = library.get("plain").metadata["mttl"]["arrow_prototypes"][f"{ARROW_SAVE}_protos"]
    assert plain["config"] == {"ab_only": True, "scale": False, "tie_params": "default", "tie_op": "concat"}
    assert plain["modules"] == 4 and plain["min_abs_cos"] > 0.9999 and plain["differ"] == []
    joint = library.get("sub.tied").metadata["mttl"]["arrow_prototypes"][f"{ARROW_SAVE}_protos"]
    assert joint["min_abs_cos"] < 0.9999 and set(joint["differ"]) <= set(MODULES) and joint["differ"]
    compared = {n: library.get(n).metadata["mttl"]["arrow_prototypes"] for n in ("plain", "sub.tied")}
    vectors, eigvals = f"{ARROW_SAVE}_vectors", f"{ARROW_SAVE}_eigvals"  # mttl's numpy vectors, σ₁²
    assert compared["plain"][vectors] == plain  # the same vectors as the prototypes (scale False)
    assert compared["plain"][eigvals]["max_rel_diff"] < 1e-4 and compared["plain"][eigvals]["differ"] == []
    assert compared["sub.tied"][eigvals]["differ"] and compared["sub.tied"][vectors]["differ"]
    api = _api(hub)  # from the Hub: the _protos files are downloaded and compared too
    api.create_repo("libstore-org/mttl-arrow")
    api.upload_folder(repo_id="libstore-org/mttl-arrow", folder_path=folder)
    lib2 = Library.init(tmp_path / "lib2")
    lib2.add_base("tiny", library.base("tiny").source)
    lib2.import_mttl("libstore-org/mttl-arrow", allow_base_mismatch=True)
    assert (
        lib2.get("sub.tied").metadata["mttl"]["arrow_prototypes"]
        == library.get("sub.tied").metadata["mttl"]["arrow_prototypes"]
    )
    lib2.close()


def test_joint_prototypes_route_tied_modules_as_mttl_does(library: Library, tmp_path: Path) -> None:
    from tests.factories import load_base

    folder = tmp_path / "mttl"
    tie = "q_proj.*\\.lora_a|v_proj.*\\.lora_a"
    src = _write_mttl_library(folder, {"plain": "t1", "tied": "t2"}, seed=3)
    tied = src["tied"]
    for layer in (0, 1):
        prefix = f"model.layers.{layer}.self_attn"
        tied[f"{prefix}.v_proj.lora_a"] = tied[f"{prefix}.q_proj.lora_a"]
    torch.save(tied, folder / "tied.ckpt")
    meta = torch.load(folder / "tied.meta", weights_only=True)
    meta["expert_config"]["tie_params"] = tie
    torch.save(meta, folder / "tied.meta")
    _write_arrow_protos(folder, "tied", tied, tied=True)
    library.import_mttl(folder, allow_base_mismatch=True)
    base = library.base("tiny").source
    per_module = library.routed_model(load_base(base), experts=["plain", "tied"])
    with pytest.warns(UserWarning, match="joint prototypes .* change the routing of 4 expert-modules"):
        joint = library.routed_model(load_base(base), experts=["plain", "tied"], joint_prototypes=True)
    mttl_protos = torch.load(folder / f"tied.{ARROW_SAVE}_protos.bin", weights_only=True)["data"]
    for m in MODULES:
        plain_row, tied_row = joint.layers[m].prototypes
        assert torch.equal(plain_row, per_module.layers[m].prototypes[0])  # untied: unchanged
        cos = torch.nn.functional.cosine_similarity(tied_row, mttl_protos[m], dim=0)
        assert float(cos.abs()) > 1 - 1e-5  # mttl's joint prototype
    with pytest.raises(ValidationError, match="joint_prototypes is mttl's Arrow"):
        library.routed_model(load_base(base), experts=["tied"], joint_prototypes=True, router="spectr")


def test_import_mttl_puts_back_tied_weights_a_checkpoint_left_out(library: Library, tmp_path: Path) -> None:
    """mttl's Expert.expert_weights re-ties what tie_params shares; a .ckpt may hold the source only."""
    folder = tmp_path / "mttl"
    src = _write_mttl_library(folder, {"tied": "t"}, tie_params="q_proj.*\\.lora_a|v_proj.*\\.lora_a")
    stored = {k: v for k, v in src["tied"].items() if not k.endswith("v_proj.lora_a")}
    torch.save(stored, folder / "tied.ckpt")
    e = library.import_mttl(folder, allow_base_mismatch=True).added[0]
    t = load_file(library.context.blobs.path(e.file("adapter_model.safetensors").sha256))
    for layer in (0, 1):
        q, v = (f"model.layers.{layer}.self_attn.{m}" for m in ("q_proj", "v_proj"))
        want = 4.0 * (stored[f"{q}.lora_a"] @ stored[f"{v}.lora_b"]).T  # v's B with q's (tied) A
        got = e.scale * t[f"base_model.model.{v}.lora_B.weight"] @ t[f"base_model.model.{v}.lora_A.weight"]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_import_mttl_from_the_hub_skips_deleted_experts(
    library: Library, hub: HubServer, tmp_path: Path
) -> None:
    folder = tmp_path / "mttl"
    src = _write_mttl_library(folder, {"keep": "keep", "gone": "gone"})
    meta = torch.load(folder / "gone.meta", weights_only=True)
    meta["expert_deleted"] = True
    torch.save(meta, folder / "gone.meta")
    api = _api(hub)
    api.create_repo("libstore-org/mttl-lib")
    api.upload_folder(repo_id="libstore-org/mttl-lib", folder_path=folder)
    r = library.import_mttl("libstore-org/mttl-lib", allow_base_mismatch=True)
    assert [e.name for e in r.added] == ["keep"]
    e = library.get("keep")
    assert e.source.startswith("hf://libstore-org/mttl-lib@") and e.tasks == ("keep",)
    t = load_file(library.context.blobs.path(e.file("adapter_model.safetensors").sha256))
    m = MODULES[0]
    torch.testing.assert_close(
        e.scale * t[f"base_model.model.{m}.lora_B.weight"] @ t[f"base_model.model.{m}.lora_A.weight"],
        _delta_w(src["keep"], m, 4.0),
        rtol=1e-6,
        atol=1e-6,
    )
