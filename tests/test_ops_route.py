"""Catalog query -> routed model: equals PEFT's create_arrow_model, reads each blob once, uses the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from libstore import Library
from libstore.cli import cli
from libstore.errors import BaseModelMismatchError, NotFoundError
from libstore.ops import tensors as tensors_mod
from tests.factories import load_base, make_adapter, make_base_model

SEED = 0


@pytest.fixture
def routed_lib(library: Library, base_dir: Path, tmp_path: Path) -> Library:
    for i in range(4):
        library.add(
            make_adapter(base_dir, tmp_path / f"task{i}", seed=i, targets=("q_proj", "v_proj", "up_proj")),
            name=f"task{i}",
            kind="task",
        )
    for i in range(2):
        library.add(
            make_adapter(
                base_dir, tmp_path / f"gen{i}", seed=50 + i, targets=("q_proj", "v_proj", "up_proj")
            ),
            name=f"gen{i}",
            kind="general",
        )
    return library


def _peft_arrow(base_dir: Path, lib: Library, tmp_path: Path, *, top_k: int, gks: bool) -> torch.nn.Module:
    from peft import ArrowConfig, create_arrow_model

    tasks = [str(lib.export(e.name, tmp_path / "peft" / e.name)) for e in lib.experts("kind=task")]
    general = [str(lib.export(e.name, tmp_path / "peft" / e.name)) for e in lib.experts("kind=general")]
    cfg = ArrowConfig(top_k=top_k, router_temperature=1.0, use_gks=gks, rng_seed=SEED)
    return create_arrow_model(
        load_base(base_dir),
        task_specific_adapter_paths=tasks,
        general_adapter_paths=general if gks else None,
        arrow_config=cfg,
    ).eval()


@pytest.mark.parametrize(("top_k", "gks"), [(1, False), (2, True), (4, False)])
def test_routed_model_from_catalog_matches_peft(
    routed_lib: Library, base_dir: Path, tmp_path: Path, top_k: int, gks: bool
) -> None:
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    ours = routed_lib.routed_model(
        load_base(base_dir),
        experts="kind=task",
        top_k=top_k,
        method="peft",
        general="kind=general" if gks else None,
    )
    ref = _peft_arrow(base_dir, routed_lib, tmp_path, top_k=top_k, gks=gks)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_build_reads_each_blob_once_and_caches_prototypes(
    routed_lib: Library, base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    real = tensors_mod.load_tensors

    def counting(path, names=None):  # type: ignore[no-untyped-def]
        reads.append(Path(path).name)
        return real(path, names)

    monkeypatch.setattr(tensors_mod, "load_tensors", counting)
    routed_lib.routed_model(load_base(base_dir), experts="kind=task")
    assert sorted(reads) == sorted(e.sha256 for e in routed_lib.experts("kind=task"))
    report = routed_lib.compute_prototypes("kind=task")
    assert report.computed == () and len(report.cached) == 4  # the build cached them


def test_routed_model_checks_base_identity(routed_lib: Library, tmp_path: Path) -> None:
    other = make_base_model(tmp_path / "other", num_hidden_layers=3)
    with pytest.raises(BaseModelMismatchError, match="does not match base model 'tiny'"):
        routed_lib.routed_model(str(other), experts="kind=task")
    with pytest.raises(NotFoundError):
        routed_lib.routed_model(None, experts="kind=merged")


def test_routed_model_default_base_and_explain(routed_lib: Library) -> None:
    model = routed_lib.routed_model(experts=["task0", "task2"], top_k=1)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), model.explain() as trace:
        model(input_ids=ids)
    counts = trace.counts("model.layers.0.self_attn.q_proj")
    assert int(counts.sum()) == 6  # every token chose exactly one expert at that module
    assert model.experts == ("task0", "task2")


def test_cli_route_generates_and_explains(routed_lib: Library, base_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(base_dir)
    png = tmp_path / "routing.png"
    db = [] if routed_lib.context.catalog.is_sqlite else ["--db", routed_lib.context.catalog.url]
    args = [
        "-L",
        str(routed_lib.path),
        *db,
        "route",
        "--base",
        str(base_dir),
        "--prompt",
        "w1 w2 w3",
        "--top-k",
        "2",
        "--max-new-tokens",
        "4",
        "--explain",
        str(png),
    ]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split()) == 4 and png.stat().st_size > 1000


def test_missing_prototypes_come_from_the_tensors_in_hand(
    routed_lib: Library, base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build computes the missing prototypes on the router's device from the weights it already
    read, caches them once and never reads them back; a second build reads each cached set once."""
    from libstore.store import safetensors_io

    tasks = routed_lib.experts("kind=task")
    cache_blobs: list[str] = []
    real = safetensors_io.load_tensors

    def counting(path, names=None):  # type: ignore[no-untyped-def]
        if Path(path).name not in {e.sha256 for e in tasks}:
            cache_blobs.append(Path(path).name)
        return real(path, names)

    monkeypatch.setattr(safetensors_io, "load_tensors", counting)
    first = routed_lib.routed_model(load_base(base_dir), experts="kind=task", device="cpu")
    assert cache_blobs == []  # computed from the tensors in hand, not read back from the blobs
    entries = routed_lib.prototype_cache()
    assert sorted(e.expert_sha256 for e in entries) == sorted(e.sha256 for e in tasks)
    second = routed_lib.routed_model(load_base(base_dir), experts="kind=task", device="cpu")
    assert sorted(cache_blobs) == sorted(e.blob_sha256 for e in entries)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(first(ids).logits, second(ids).logits, atol=1e-6, rtol=0)
