"""Routers from the catalog (SpectR's spectrum cached like Arrow's prototypes), router specs, the
``route --router`` CLI, and ``export-routed``: the exported adapter, loaded with plain PEFT, gives
the logits of libstore's per-sequence routed model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from libstore import Library
from libstore.cli import cli
from libstore.errors import AlreadyExistsError, RouterError, ValidationError
from libstore.ops.routers import parse_spec
from libstore.router.build import ExpertTensors, build_router
from libstore.types import RouterSpec
from tests.factories import load_base, make_adapter

TARGETS = ("q_proj", "v_proj", "up_proj")


def save_tokenizer(base_dir: Path) -> None:
    """A word-level tokenizer (w0 .. w126) saved next to the tiny base model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="w0").save_pretrained(base_dir)


@pytest.fixture
def lib(library: Library, base_dir: Path, tmp_path: Path) -> Library:
    for i in range(4):
        library.add(
            make_adapter(base_dir, tmp_path / f"task{i}", seed=i, targets=TARGETS),
            name=f"task{i}",
            kind="task",
            tasks=[f"t{i}"],
        )
    for i in range(2):
        library.add(
            make_adapter(base_dir, tmp_path / f"gen{i}", seed=50 + i, targets=TARGETS),
            name=f"gen{i}",
            kind="general",
        )
    save_tokenizer(base_dir)
    return library


def test_spectr_from_the_catalog_caches_the_spectrum_and_equals_build_from_factors(
    lib: Library, base_dir: Path
) -> None:
    ids = torch.randint(0, 127, (2, 8), generator=torch.Generator().manual_seed(0))
    ours = lib.routed_model(load_base(base_dir), experts="kind=task", router="spectr", top_k=2)
    spectra = [c for c in lib.prototype_cache() if c.method == "spectrum"]
    assert len(spectra) == 4 and all(c.params == {} for c in spectra)  # one cached set per expert
    report = lib.compute_prototypes("kind=task", method="spectrum")
    assert report.computed == () and len(report.cached) == 4
    cached = lib.prototypes("task0", method="spectrum")["task0"].modules
    assert all(p.vectors.shape[0] == 4 for p in cached.values())  # every singular pair (rank 4)
    tensors = []
    for e in lib.experts("kind=task"):
        from libstore.ops.tensors import load_expert_tensors

        tensors.append(ExpertTensors(e.name, e.scale, load_expert_tensors(lib.context, e)))
    direct = build_router(load_base(base_dir), tensors, router="spectr", top_k=2)  # keys from factors
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, direct(ids).logits, atol=1e-5, rtol=1e-5)
        # GenKnowSub on the fly: SpectR scores the residuals (keys computed at build)
        gks = lib.routed_model(
            load_base(base_dir), experts="kind=task", router="spectr", general="kind=general"
        )
        assert not torch.allclose(gks(ids).logits, ours(ids).logits, atol=1e-4)
    with pytest.raises(RouterError, match="reference row"):
        lib.routed_model(load_base(base_dir), router="oracle")
    with pytest.raises(RouterError, match="Arrow's settings"):
        lib.routed_model(load_base(base_dir), router="spectr", top_n=2)


def test_spectrum_cache_is_keyed_by_weights_and_each_expert_brings_its_own_scale(
    lib: Library, base_dir: Path, tmp_path: Path
) -> None:
    """Two experts with the same weights file but another alpha share one cache entry (its key is the
    weights sha256): SpectR's keys must still scale with each one's own s = alpha/r."""
    twin = lib.add(
        make_adapter(base_dir, tmp_path / "twin", seed=0, targets=TARGETS, alpha=16), name="twin", kind="task"
    )
    assert twin.sha256 == lib.get("task0").sha256 and twin.scale == 2 * lib.get("task0").scale
    routed = lib.routed_model(load_base(base_dir), experts=["task0", "twin"], router="spectr")
    assert len([c for c in lib.prototype_cache() if c.method == "spectrum"]) == 1
    for layer in routed.layers.values():
        keys = layer.prototypes.view(2, 4, -1)
        torch.testing.assert_close(keys[1], 2 * keys[0])


def test_router_specs_parse_and_refuse() -> None:
    s = parse_spec("arrow:top_n=2;granularity=sequence;general=kind=general tag=v1")
    assert s == RouterSpec("arrow", {"top_n": 2, "granularity": "sequence", "general": "kind=general tag=v1"})
    assert s.label == "arrow:general=kind=general tag=v1;granularity=sequence;top_n=2"
    assert parse_spec(s.label) == s and parse_spec("spectr").label == "spectr"
    assert parse_spec("uniform:temperature=0.5").params == {"temperature": 0.5}
    for bad, why in (
        ("nope", "unknown router"),
        ("spectr:top_n=2", "no parameter 'top_n'"),
        ("arrow:top_k=two", "must be a int"),
        ("arrow:granularity=word", "granularity"),
        ("arrow:top_k", "key=value"),
        ("arrow:temperature=0", "temperature"),
    ):
        with pytest.raises(ValidationError, match=why) as err:
            parse_spec(bad)
        assert err.value.field == "router"


def test_cli_route_with_spectr_per_sequence(lib: Library, base_dir: Path) -> None:
    db = [] if lib.context.catalog.is_sqlite else ["--db", lib.context.catalog.url]
    args = ["-L", str(lib.path), *db, "route", "--base", str(base_dir), "--prompt", "w1 w2 w3"]
    for extra in (["--router", "spectr", "--per-sequence"], ["--router", "arrow", "--top-n", "2"]):
        result = CliRunner().invoke(cli, [*args, *extra, "--max-new-tokens", "3"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert len(result.stdout.split()) == 3


@pytest.mark.parametrize(
    ("router", "general", "mixing"),
    [("spectr", None, "output"), ("arrow", "kind=general", "output"), ("arrow", None, "parameter")],
)
def test_exported_adapter_serves_the_per_sequence_routed_model_with_plain_peft(
    lib: Library, base_dir: Path, tmp_path: Path, router: str, general: str | None, mixing: str
) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    prompt = "w5 w17 w3 w99 w42"
    dest = tmp_path / "served"
    report = lib.export_routed(
        dest, prompt=prompt, experts="kind=task", router=router, general=general, top_k=2, mixing=mixing
    )
    assert report.path == dest and (dest / "libstore_routing.json").exists()
    cfg = json.loads((dest / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == report.rank == (8 if mixing == "output" else 4)
    assert set(report.modules) == set(cfg["target_modules"]) and len(report.modules) == 6
    assert all(len(v) == 2 for v in report.routes.values())

    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    full = torch.cat([ids, torch.tensor([[7, 64, 11, 3]])], dim=1)
    routed = lib.routed_model(
        load_base(base_dir), experts="kind=task", router=router, general=general, top_k=2, mixing=mixing
    )
    with torch.no_grad():
        with routed.sequence_routing() as routes:
            routed.model(input_ids=ids)
        with routed.pinned(routes):
            ours = routed.model(input_ids=full).logits
        served = PeftModel.from_pretrained(load_base(base_dir), str(dest)).eval()
        theirs = served(input_ids=full).logits
        torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)
        plain = load_base(base_dir)(input_ids=full).logits
        assert not torch.allclose(plain, ours, atol=1e-3)  # the adapter does something
        routed.configure(granularity="sequence")  # and greedy generation agrees token for token
        a = routed.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        b = served.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    with pytest.raises(AlreadyExistsError):
        lib.export_routed(dest, prompt=prompt, experts="kind=task")


def test_cli_export_routed(lib: Library, tmp_path: Path) -> None:
    dest = tmp_path / "cli-served"
    db = [] if lib.context.catalog.is_sqlite else ["--db", lib.context.catalog.url]
    result = CliRunner().invoke(
        cli,
        [
            "-L",
            str(lib.path),
            *db,
            "export-routed",
            str(dest),
            "--prompt",
            "w1 w2",
            "--router",
            "spectr",
            "--json",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["rank"] == 12 and Path(doc["path"]) == dest  # top_k 3 x rank 4
    again = CliRunner().invoke(cli, ["-L", str(lib.path), *db, "export-routed", str(dest), "--prompt", "w1"])
    assert again.exit_code == 5
