"""Issue 4 through the command line: prototypes, gks, similarity, merge, lineage, stale."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from libstore.cli.lowrank import COMMANDS
from tests.factories import make_adapter


@pytest.fixture
def lib(run, base_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    run("init")
    run("base", "add", "tiny", "--from", str(base_dir))
    for i, n in enumerate(("arc_easy", "boolq")):
        run("add", str(make_adapter(base_dir, tmp_path / "src" / n, seed=1 + i)), "--name", n, "--task", n)
    for i, n in enumerate(("wiki_en", "wiki_fr")):
        run(
            "add",
            str(make_adapter(base_dir, tmp_path / "src" / n, seed=10 + i)),
            "--name",
            n,
            "--kind",
            "general",
        )
    return run


def test_prototypes_compute_show_ls(lib) -> None:  # type: ignore[no-untyped-def]
    first = json.loads(lib("prototypes", "compute", "kind=task", "--json").stdout)
    assert first["computed"] == ["arc_easy", "boolq"] and first["batched_calls"] == 1
    second = json.loads(lib("prototypes", "compute", "kind=task", "--json").stdout)
    assert second["computed"] == [] and second["cached"] == ["arc_easy", "boolq"]
    assert second["batched_calls"] == 0
    assert "0 computed, 2 already cached" in lib("prototypes", "compute", "kind=task").stdout

    m = "model.layers.0.self_attn.q_proj"
    shown = json.loads(lib("prototypes", "show", "arc_easy", "--module", m, "--json").stdout)
    assert shown["expert"] == "arc_easy" and shown["method"] == "exact"
    assert list(shown["modules"]) == [m]
    vec = shown["modules"][m]["vectors"]
    assert len(vec) == 1 and len(vec[0]) == 32
    assert sum(x * x for x in vec[0]) == pytest.approx(1.0, abs=1e-5)
    text = lib("prototypes", "show", "arc_easy").stdout
    assert "model.layers.1.self_attn.v_proj" in text and "exact v2" in text

    entries = json.loads(lib("prototypes", "ls", "--json").stdout)
    assert sorted(e["experts"][0] for e in entries) == ["arc_easy", "boolq"]
    r = lib("prototypes", "show", "arc_easy", "--module", "nope", code=4)
    assert "no LoRA module 'nope'" in r.stderr


def test_gks_lineage_stale_refresh(lib, base_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = json.loads(lib("gks", "--general", "kind=general", "--experts", "kind=task", "--json").stdout)
    assert out["created"] == ["arc_easy_res", "boolq_res"] and out["general"] == ["wiki_en", "wiki_fr"]
    text = lib("gks", "--general", "kind=general", "--experts", "kind=task").stdout
    assert "0 created, 0 refreshed, 2 reused" in text
    ls = json.loads(lib("ls", "kind=residual", "--json").stdout)
    assert [e["name"] for e in ls] == ["arc_easy_res", "boolq_res"]

    lin = json.loads(lib("lineage", "arc_easy_res", "--json").stdout)
    assert lin["derivation"]["method"] == "gks-param" and lin["stale"] is False
    assert [(p["role"], p["name"]) for p in lin["derivation"]["parents"]] == [
        ("expert", "arc_easy"),
        ("general", "wiki_en"),
        ("general", "wiki_fr"),
    ]
    text = lib("lineage", "arc_easy").stdout
    assert "not derived" in text and "arc_easy_res (gks-param, as expert)" in text
    assert lib("stale").stdout.strip() == "Nothing is stale."

    lib("rm", "arc_easy")
    lib("add", str(make_adapter(base_dir, tmp_path / "src" / "arc2", seed=50)), "--name", "arc_easy")
    stale = json.loads(lib("stale", "--json").stdout)
    assert [e["name"] for e in stale["experts"]] == ["arc_easy_res"]
    assert "arc_easy_res" in lib("stale").stdout
    assert "CHANGED" in lib("lineage", "arc_easy_res").stdout

    r = lib("gks", "--general", "kind=general", "--experts", "kind=task", code=5)
    assert "--refresh" in r.stderr
    text = lib("gks", "--general", "kind=general", "--experts", "kind=task", "--refresh").stdout
    assert "refreshed  arc_easy_res" in text
    assert json.loads(lib("stale", "--json").stdout)["experts"] == []

    text = lib(
        "gks",
        "--general",
        "kind=general",
        "--experts",
        "boolq",
        "--mode",
        "delta",
        "--rank",
        "3",
        "--suffix",
        "_d",
    ).stdout
    assert "created    boolq_d" in text and "energy kept" in text
    shown = json.loads(lib("show", "boolq_d", "--json").stdout)
    assert shown["rank"] == 3 and shown["lineage"]["params"]["rank"] == 3


def test_similarity_and_merge(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim = json.loads(lib("similarity", "kind=task", "--json").stdout)
    assert sim["names"] == ["arc_easy", "boolq"] and sim["metric"] == "delta"
    assert sim["values"][0][0] == pytest.approx(1.0) and sim["values"][0][1] == sim["values"][1][0]
    png = tmp_path / "sim.png"
    text = lib("similarity", "--metric", "flat", "--plot", str(png)).stdout
    assert "wiki_fr" in text and png.read_bytes()[:4] == b"\x89PNG"

    merged = json.loads(
        lib(
            "merge", "arc_easy", "boolq", "--name", "qa", "--rank", "2", "--weights", "0.6,0.4", "--json"
        ).stdout
    )
    assert merged["kind"] == "merged" and merged["rank"] == 2
    assert merged["lineage"]["params"]["weights"] == [0.6, 0.4]
    text = lib("merge", "arc_easy", "boolq", "--name", "qa", "--rank", "2", "--weights", "0.6,0.4").stdout
    assert "Merged arc_easy, boolq into qa (rank 2" in text
    r = lib("merge", "arc_easy", "boolq", "--name", "qa2", "--weights", "1,x", code=2)
    assert "comma-separated numbers" in r.stderr
    assert "qa (merge, as expert)" in lib("lineage", "boolq").stdout
    assert "merge v1" in lib("lineage", "qa").stdout


def test_error_messages_and_exit_codes(lib, base_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lib("add", str(make_adapter(base_dir, tmp_path / "src" / "r8", r=8, seed=3)), "--name", "r8")
    r = lib("gks", "--general", "kind=general", "--experts", "r8", code=6)
    assert "rank" in r.stderr and "--mode delta" in r.stderr
    assert (
        "created    r8_res"
        in lib("gks", "--general", "kind=general", "--experts", "r8", "--mode", "delta").stdout
    )
    r = lib("gks", "--general", "kind=general", "--experts", "arc_easy", "--rank", "2", code=6)
    assert "--mode delta --rank" in r.stderr
    lib(
        "add",
        str(make_adapter(base_dir, tmp_path / "src" / "k", targets=("k_proj",), seed=4)),
        "--name",
        "konly",
    )
    r = lib("similarity", code=6)
    assert "adapt different modules" in r.stderr
    r = lib("merge", "arc_easy", "konly", "--name", "x", code=6)
    assert "adapt different modules" in r.stderr
    r = lib("prototypes", "compute", "kind=cluster", code=4)
    assert "no expert matches" in r.stderr
    r = lib("lineage", "nope", code=4)
    assert "no expert named 'nope'" in r.stderr


def test_every_lowrank_command_has_an_example() -> None:
    def walk(cmd):  # type: ignore[no-untyped-def]
        yield cmd
        for sub in getattr(cmd, "commands", {}).values():
            yield from walk(sub)

    cmds = [c for top in COMMANDS for c in walk(top)]
    assert {c.name for c in cmds} >= {
        "prototypes",
        "compute",
        "show",
        "ls",
        "gks",
        "similarity",
        "merge",
        "lineage",
        "stale",
    }
    for c in cmds:
        assert "Example" in (c.help or ""), c.name


def test_lineage_and_stale_do_not_import_torch(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from libstore.cli import cli
        for args in (["stale", "--json"], ["lineage", "arc_easy"], ["gks", "--help"]):
            r = CliRunner().invoke(cli, ["-L", {str(tmp_path / "lib")!r}, *args])
            assert r.exit_code == 0, r.output
        assert "torch" not in sys.modules, "torch was imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
