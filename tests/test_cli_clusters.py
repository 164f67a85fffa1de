"""Issue 5 through the command line: cluster, clusters ls/show/export/plot/rm, add --cluster, stale."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest

from libstore.cli.clusters import COMMANDS
from tests.factories import make_adapter

K = 3
NAMES = [f"t{j:02d}" for j in range(9)]  # t00, t03, t06 around centre 0; t01, ... around centre 1


@pytest.fixture
def lib(run, base_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    run("init")
    run("base", "add", "tiny", "--from", str(base_dir))
    centres = [make_adapter(base_dir, tmp_path / f"centre{c}", seed=100 + c) for c in range(K)]
    for j, n in enumerate(NAMES):
        folder = make_adapter(base_dir, tmp_path / "src" / n, seed=j, centre=centres[j % K], noise=0.02)
        run("add", str(folder), "--name", n, "--task", f"task_{n}")
    run.centres = centres
    return run


def test_cluster_show_export_plot_link_stale_rm(lib, base_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = lib("cluster", "--experts", "kind=task", "--k", "3", "--seed", "0", "--name", "mbc-k3")
    assert "Recorded clustering mbc-k3" in out.stdout and "within" in out.stdout

    shown = json.loads(lib("clusters", "show", "mbc-k3", "--json").stdout)
    assert (shown["name"], shown["metric"], shown["k"], shown["seed"]) == ("mbc-k3", "flat", 3, 0)
    assert shown["query"] == "kind=task" and shown["stale"] is False
    assert [c["members"] for c in shown["clusters"]] == [
        ["t00", "t03", "t06"],
        ["t01", "t04", "t07"],
        ["t02", "t05", "t08"],
    ]
    assert shown["clusters"][1]["tasks"] == ["task_t01", "task_t04", "task_t07"]
    assert shown["clusters"][0]["size"] == 3 and shown["clusters"][0]["within"] > 0.9
    assert shown["params"]["keep"] == 0.2 and shown["params"]["dim"] == 64
    assert len(shown["inputs"]) == 9 and all(i["status"] == "ok" for i in shown["inputs"])
    text = lib("clusters", "show", "mbc-k3").stdout
    assert "mbc-k3:2 members: t02, t05, t08" in text and "silhouette" in text

    listed = json.loads(lib("clusters", "ls", "--json").stdout)
    assert [c["name"] for c in listed] == ["mbc-k3"]
    assert "mbc-k3" in lib("clusters", "ls").stdout

    doc = json.loads(lib("clusters", "export", "mbc-k3", "--format", "json").stdout)
    assert [c["tasks"] for c in doc["clusters"]][2] == ["task_t02", "task_t05", "task_t08"]
    assert doc["clusters"][0]["cluster"] == "mbc-k3:0"
    lib("clusters", "export", "mbc-k3", "--format", "csv", "--out", str(tmp_path / "c.csv"))
    rows = list(csv.reader(io.StringIO((tmp_path / "c.csv").read_text())))
    assert rows[0] == ["cluster", "task"] and len(rows) == 10 and rows[1] == ["0", "task_t00"]

    png = tmp_path / "plots" / "mbc.png"
    assert "Wrote" in lib("clusters", "plot", "mbc-k3", "--out", str(png)).stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # a trained cluster expert, linked to its cluster and its tasks
    c1 = make_adapter(base_dir, tmp_path / "c1_adapter", seed=77)
    lib("add", str(c1), "--name", "c1", "--kind", "cluster", "--cluster", "mbc-k3:1")
    e = json.loads(lib("show", "c1", "--json").stdout)
    assert e["cluster"] == "mbc-k3:1" and e["tasks"] == ["task_t01", "task_t04", "task_t07"]
    assert "c1" in lib("clusters", "show", "mbc-k3").stdout
    lib("add", str(c1), "--name", "c9", "--kind", "cluster", "--cluster", "mbc-k3:9", code=4)

    # a new task expert makes the run stale: ls, show and libstore stale say so
    late = make_adapter(base_dir, tmp_path / "late", seed=99, centre=lib.centres[0], noise=0.02)
    lib("add", str(late), "--name", "late", "--task", "late")
    assert "STALE" in lib("clusters", "ls").stdout
    assert (
        "STALE: 1 expert(s) matching 'kind=task' added since: 'late'"
        in lib("clusters", "show", "mbc-k3").stdout
    )
    stale = json.loads(lib("stale", "--json").stdout)
    assert [c["name"] for c in stale["clusterings"]] == ["mbc-k3"]
    assert "mbc-k3" in lib("stale").stdout

    r = lib("clusters", "rm", "mbc-k3", code=12)  # c1 is linked: in use
    assert "--force" in r.stderr and "c1" in r.stderr
    assert "unlinked cluster experts: c1" in lib("clusters", "rm", "mbc-k3", "--force").stdout
    assert json.loads(lib("clusters", "ls", "--json").stdout) == []
    lib("clusters", "show", "mbc-k3", code=4)


def test_auto_k_delta_json_and_errors(lib) -> None:  # type: ignore[no-untyped-def]
    c = json.loads(lib("cluster", "--metric", "delta", "--k-range", "2:5", "--json").stdout)
    assert c["name"] == "mbc-delta-k3" and c["k"] == 3 and c["metric"] == "delta"
    assert c["criterion"]["name"] == "silhouette" and list(c["criterion"]["scores"]) == ["2", "3", "4", "5"]
    assert c["params"]["keep"] is None and c["params"]["k_range"] == [2, 3, 4, 5]
    err = lib("cluster", "--k", "10", code=6)
    assert "k can be at most 9" in err.stderr
    assert (
        "pass another --name"
        in lib("cluster", "--k", "3", "--metric", "delta", "--name", "mbc-delta-k3", code=5).stderr
    )
    assert "no expert matches" in lib("cluster", "--experts", "kind=general", code=4).stderr
    lib("cluster", "--k-range", "a:b", code=2)
    lib("clusters", "export", "nope", code=4)


def test_every_command_has_an_example() -> None:
    def walk(cmd: click.Command):  # type: ignore[no-untyped-def]
        yield cmd
        if isinstance(cmd, click.Group):
            for sub in cmd.commands.values():
                yield from walk(sub)

    cmds = [c for top in COMMANDS for c in walk(top)]
    assert {c.name for c in cmds} == {"cluster", "clusters", "ls", "show", "export", "plot", "rm"}
    for c in cmds:
        assert "Example" in (c.help or ""), c.name


def test_listing_commands_do_not_import_torch(lib, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lib("cluster", "--k", "3")
    code = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from libstore.cli import cli
        for args in (["clusters", "ls", "--json"], ["clusters", "show", "mbc-k3"],
                     ["clusters", "export", "mbc-k3", "--format", "csv"], ["cluster", "--help"]):
            r = CliRunner().invoke(cli, ["-L", {str(tmp_path / "lib")!r}, *args])
            assert r.exit_code == 0, r.output
        assert "torch" not in sys.modules, "torch was imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
