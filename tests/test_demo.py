"""The end-to-end demo (examples/demo.py) in its quick form: trains, catalogs, clusters, syncs through the
Hub stand-in and routes, in a subprocess, as ``./dev.sh demo --quick`` would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHOOSING = (  # the routers that choose experts (oracle and uniform do not)
    "arrow",
    "spectr",
    "arrow+gks",
    "spectr+gks",
    "arrow, per sequence",
    "spectr, per sequence",
    "arrow+gks(ΔW)",
    "spectr+gks(ΔW)",
)


@pytest.mark.slow
def test_quick_demo_routes_tasks_to_their_experts(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo.py"), "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Routing accuracy" in proc.stdout and str(out) in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert {
        "settings",
        "tasks",
        "library",
        "hub",
        "routing_accuracy",
        "accuracy",
        "confusion",
        "evaluations",
        "checks",
        "table",
        "pngs",
        "timings_s",
    } <= set(results)
    tasks = results["tasks"]
    assert results["settings"]["quick"] is True and len(tasks) == 4
    assert set(results["accuracy"]) == {"base", "oracle", "uniform", *CHOOSING}
    assert set(results["routing_accuracy"]) == set(CHOOSING)  # libstore eval's numbers
    for label, r in results["routing_accuracy"].items():
        assert set(r["token"]) == set(r["sequence"]) == set(tasks), label
    for label, c in results["confusion"].items():  # the demo's own count from explain()
        assert len(c["tokens"]) == len(c["sequences"]) == len(tasks), label
    assert results["evaluations"] == ["tasks", "residuals-dw"]  # recorded in the clone's catalog

    # the library went through the Hub: the clone holds every expert, with the cached prototypes
    assert sorted(results["hub"]["pulled_experts"]) == sorted(results["library"]["experts"])
    assert results["hub"]["pulled_prototypes"] > 0 and results["hub"]["status"] == {
        "in_sync": len(results["library"]["experts"])
    }
    assert results["library"]["clustering"]["k"] >= 2

    # Arrow sends held-out inputs to their own task's expert, far above chance (1/4) ...
    arrow = results["routing_accuracy"]["arrow"]
    assert arrow["sequence_mean"] >= 0.8, arrow
    assert arrow["token_mean"] >= 0.4, arrow
    assert results["routing_accuracy"]["spectr"]["token_mean"] > 0.25, results["routing_accuracy"]["spectr"]
    # ... and that shows in the answers: better than the base model and than the uniform average
    acc = {label: a["exact_mean"] for label, a in results["accuracy"].items()}
    assert acc["arrow"] >= acc["uniform"] + 0.15 and acc["arrow"] >= acc["base"] + 0.3, acc
    assert acc["oracle"] >= 0.8, acc
    loss = {label: a["loss_mean"] for label, a in results["accuracy"].items()}
    assert loss["oracle"] < loss["arrow"] < loss["uniform"] < loss["base"], loss

    # GenKnowSub on the fly (general=...) routes exactly like the stored parameter-mode residuals
    assert results["checks"]["gks_on_the_fly_vs_residuals_max_abs_diff"] < 1e-4
    # the demo's own count of top-1 choices is libstore eval's sequence routing accuracy
    assert results["checks"]["routing_sequence_demo_vs_eval_max_abs_diff"] < 1e-6

    for png in results["pngs"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
