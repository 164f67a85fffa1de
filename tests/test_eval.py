"""``libstore eval``: held-out loss, exact match and routing accuracy per router and task, checked
against independent computations (the oracle against plain PEFT with the task's own adapter, Arrow's
routing accuracy against scores recomputed from the cached prototypes), recorded in the catalog,
listed, compared, plotted, and stale once an expert changes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from libstore import Library
from libstore.catalog import repo
from libstore.cli import cli
from libstore.errors import AlreadyExistsError, NotFoundError, ValidationError
from libstore.ops.evaluate import ALL, read_examples
from libstore.ops.experts import store_adapter_files
from libstore.store.adapter import read_adapter
from libstore.types import ADAPTER_WEIGHTS
from tests.factories import load_base, make_adapter
from tests.test_ops_routers import TARGETS, save_tokenizer

ROUTERS = [
    "arrow",
    "spectr",
    "uniform",
    "oracle",
    "spectr:granularity=sequence",
    "arrow:general=kind=general",
]


@pytest.fixture
def lib(library: Library, base_dir: Path, tmp_path: Path) -> Library:
    for i in range(3):
        library.add(
            make_adapter(base_dir, tmp_path / f"task{i}", seed=i, targets=TARGETS),
            name=f"task{i}",
            kind="task",
            tasks=[f"t{i}"],
        )
    library.add(make_adapter(base_dir, tmp_path / "gen", seed=9, targets=TARGETS), name="gen", kind="general")
    save_tokenizer(base_dir)
    return library


@pytest.fixture
def data(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(10):
        words = [
            f"w{int(x)}"
            for x in torch.randint(1, 127, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen)
        ]
        target = [f"w{int(x)}" for x in torch.randint(1, 127, (1 + i % 3,), generator=gen)]
        lines.append({"input": " ".join(words), "target": " ".join(target), "task": f"t{i % 3}"})
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def _nll_and_exact(model: torch.nn.Module, tok: object, ex: dict[str, str]) -> tuple[float, int, bool]:
    a = tok(ex["input"])["input_ids"]  # type: ignore[operator]  # a tokenizer
    b = tok(ex["target"], add_special_tokens=False)["input_ids"]  # type: ignore[operator]  # a tokenizer
    ids = torch.tensor([a + b])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    pred = logits[len(a) - 1 : len(a) + len(b) - 1]
    nll = torch.nn.functional.cross_entropy(pred, torch.tensor(b), reduction="sum").item()
    return nll, len(b), bool((pred.argmax(-1) == torch.tensor(b)).all())


def test_metrics_per_router_and_task_match_independent_computations(
    lib: Library, data: Path, base_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    rec = lib.evaluate(data, experts="kind=task", routers=ROUTERS, top_k=2, batch_size=4)
    assert rec.name == "eval-1" and rec.routers == tuple(ROUTERS) and rec.examples == 10
    assert rec.tasks == ("t0", "t1", "t2") and set(rec.metrics["arrow"]) == {ALL, "t0", "t1", "t2"}
    assert [e.name for e in rec.experts] == ["task0", "task1", "task2"]
    assert rec.data_sha256 == read_examples(data)[1]

    # the oracle: each task's own adapter alone, as plain PEFT computes it
    tok = AutoTokenizer.from_pretrained(base_dir)
    examples = [json.loads(x) for x in data.read_text().splitlines()]
    for i in range(3):
        peft = PeftModel.from_pretrained(load_base(base_dir), str(lib.export(f"task{i}", tmp_path / f"x{i}")))
        got = [_nll_and_exact(peft.eval(), tok, ex) for ex in examples if ex["task"] == f"t{i}"]
        m = rec.metrics["oracle"][f"t{i}"]
        assert m.examples == len(got) and m.tokens == sum(n for _, n, _ in got)
        assert m.loss == pytest.approx(sum(x for x, _, _ in got) / m.tokens, rel=1e-5)
        assert m.exact_match == pytest.approx(sum(e for *_, e in got) / len(got))
        assert m.routing_token is None and m.routing_sequence is None  # the oracle does not choose

    # Arrow's routing accuracy, recomputed from the cached prototypes and each module's inputs
    routed = lib.routed_model(load_base(base_dir), experts="kind=task", top_k=2)
    protos = lib.prototypes("kind=task")
    names = list(routed.experts)
    hits = pairs = 0
    seq_ok = 0
    for k, ex in enumerate(examples):
        ids = torch.tensor(
            [tok(ex["input"])["input_ids"] + tok(ex["target"], add_special_tokens=False)["input_ids"]]
        )
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            layer.register_forward_pre_hook(lambda _m, a, n=name, s=seen: s.__setitem__(n, a[0][0]))
            for name, layer in routed.layers.items()
        ]
        with torch.no_grad():
            routed.model(input_ids=ids)
        for h in hooks:
            h.remove()
        own = names.index(f"task{k % 3}")
        votes = torch.zeros(len(names), dtype=torch.long)
        for name, x in seen.items():
            P = torch.stack([protos[n].modules[name].vectors[0] for n in names])
            top1 = (x.float() @ P.T).abs().argmax(-1)
            hits += int((top1 == own).sum())
            pairs += top1.numel()
            votes += torch.bincount(top1, minlength=len(names))
        seq_ok += int(votes.argmax()) == own
    arrow = rec.metrics["arrow"][ALL]
    assert arrow.routing_token == pytest.approx(hits / pairs) and arrow.routing_sequence == pytest.approx(
        seq_ok / 10
    )
    for label in ("spectr", "spectr:granularity=sequence", "arrow:general=kind=general"):
        assert rec.metrics[label][ALL].routing_token is not None
    assert rec.metrics["uniform"][ALL].routing_token is None
    # per-sequence routing is a different model from per-token routing
    assert rec.metrics["spectr"][ALL].loss != pytest.approx(
        rec.metrics["spectr:granularity=sequence"][ALL].loss
    )

    # recorded, listed, and stale once an expert's weights change
    (view,) = lib.evals()
    assert view.name == "eval-1" and not view.stale and view.record.metrics == rec.metrics
    ctx = lib.context
    new = make_adapter(base_dir, tmp_path / "new", seed=77, targets=TARGETS)
    files = store_adapter_files(ctx, read_adapter(new, into=ctx.blobs))
    with ctx.catalog.write() as s:
        repo.replace_files(s, repo.expert_row(s, "task1"), files, ADAPTER_WEIGHTS)
    view = lib.evaluation("eval-1")
    assert view.stale and [(e.name, e.status) for e in view.experts if e.status != "ok"] == [
        ("task1", "changed")
    ]
    lib.remove("task2")
    assert [e.status for e in lib.evaluation("eval-1").experts] == ["ok", "changed", "gone"]


def test_errors_change_nothing(lib: Library, data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "w1", "target": "w2"}\n{"input": "w1"}\n')
    with pytest.raises(ValidationError) as err:
        lib.evaluate(bad)
    assert err.value.field == "line 2" and err.value.path == str(bad)
    bad.write_text('{"input": "w1", "target": "w2", "task": "nobody"}\n')
    with pytest.raises(ValidationError) as err:
        lib.evaluate(bad, routers=["oracle"])
    assert err.value.field == "task"
    with pytest.raises(ValidationError) as err:
        lib.evaluate(data, routers=["arrow", "arrow"])
    assert err.value.field == "router"
    with pytest.raises(NotFoundError):
        lib.evaluate(data, experts="kind=merged")
    assert lib.evals() == []
    rec = lib.evaluate(data, routers=["uniform"], name="mine")
    with pytest.raises(AlreadyExistsError):
        lib.evaluate(data, routers=["uniform"], name="mine")
    assert [v.name for v in lib.evals()] == [rec.name] == ["mine"]
    with pytest.raises(NotFoundError) as nf:
        lib.evaluation("nope")
    assert nf.value.what == "evaluation"


def test_cli_eval_and_evals(lib: Library, data: Path, tmp_path: Path) -> None:
    db = [] if lib.context.catalog.is_sqlite else ["--db", lib.context.catalog.url]

    def run(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(cli, ["-L", str(lib.path), *db, *args])
        assert result.exit_code == code, result.output
        return result.stdout

    png = tmp_path / "eval.png"
    out = run(
        "eval", str(data), "--router", "arrow", "--router", "oracle", "--top-k", "2", "--plot", str(png)
    )
    assert "oracle" in out and "t2" in out and png.read_bytes()[:4] == b"\x89PNG"
    doc = json.loads(
        run("eval", str(data), "--router", "spectr", "--router", "oracle", "--json", "--name", "second")
    )
    assert doc["name"] == "second" and doc["metrics"]["oracle"]["all"]["examples"] == 10
    listing = json.loads(run("evals", "ls", "--json"))
    assert [e["name"] for e in listing] == ["eval-1", "second"] and listing[0]["stale"] is False
    assert "routing (tokens)" in run("evals", "show", "eval-1")
    cmp = json.loads(run("evals", "compare", "eval-1", "second", "--metric", "loss", "--json"))
    oracle_all = next(r for r in cmp["rows"] if r[0] == "oracle" and r[1] == "all")
    assert oracle_all[2][0] == pytest.approx(oracle_all[2][1])  # same data, same oracle: same loss
    assert cmp["notes"] == []
    run("evals", "show", "second", "--plot", str(tmp_path / "second.png"), "--metric", "routing_token")
    run("evals", "rm", "second")
    run("evals", "show", "second", code=4)
    run("eval", str(data), "--router", "bogus", code=6)


def test_evals_listing_does_not_import_torch(base_dir: Path, data: Path, tmp_path: Path) -> None:
    lib = Library.init(tmp_path / "sqlite-lib")  # the subprocess below opens it by path
    lib.add_base("tiny", str(base_dir))
    lib.add(make_adapter(base_dir, tmp_path / "a", targets=TARGETS), name="a", tasks=["t0"])
    save_tokenizer(base_dir)
    lib.evaluate(data, routers=["uniform"])
    lib.close()
    script = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from libstore.cli import cli
        for args in (["evals", "ls"], ["evals", "ls", "--json"], ["evals", "show", "eval-1"],
                     ["evals", "compare", "eval-1"], ["eval", "--help"]):
            r = CliRunner().invoke(cli, ["-L", {str(lib.path)!r}, *args])
            assert r.exit_code == 0, (args, r.output)
            assert "torch" not in sys.modules, args
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr + done.stdout
