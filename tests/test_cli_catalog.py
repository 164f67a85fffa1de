"""Issue 3 through the command line: every catalog command end to end, exit codes, --json."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from libstore.cli import cli
from tests.conftest import cli_invoker
from tests.factories import make_adapter


@pytest.fixture
def run(tmp_path: Path, db_url: str | None):  # type: ignore[no-untyped-def]
    """The CLI on a library in tmp_path (SQLite, or PostgreSQL through --db)."""
    return cli_invoker("-L", str(tmp_path / "lib"), *(["--db", db_url] if db_url else []))


def test_catalog_commands_end_to_end(run, base_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run("init")
    run("base", "add", "tiny", "--from", str(base_dir))
    bases = json.loads(run("base", "ls", "--json").stdout)
    assert bases[0]["name"] == "tiny" and bases[0]["architecture"] == "LlamaForCausalLM"

    arc = make_adapter(base_dir, tmp_path / "adapters" / "arc_easy", seed=1)
    out = run(
        "add", str(arc), "--name", "arc_easy", "--kind", "task", "--task", "arc_easy", "--tag", "v1"
    ).stdout
    assert "Added arc_easy" in out
    for i in range(2):
        make_adapter(base_dir, tmp_path / "adapters" / f"wiki{i}", seed=10 + i)
    (tmp_path / "adapters" / "arc_easy" / "adapter_config.json").unlink()  # only wiki0/1 left
    assert "2 added" in run("import-dir", str(tmp_path / "adapters"), "--kind", "general").stdout

    listing = json.loads(run("ls", "--json").stdout)
    assert [e["name"] for e in listing] == ["arc_easy", "wiki0", "wiki1"]
    assert [e["name"] for e in json.loads(run("ls", "--kind", "general", "--json").stdout)] == [
        "wiki0",
        "wiki1",
    ]
    assert [e["name"] for e in json.loads(run("ls", "kind=task", "--tag", "v1", "--json").stdout)] == [
        "arc_easy"
    ]
    table = run("ls").stdout
    assert "arc_easy" in table and "sha256" in table.splitlines()[0]

    shown = json.loads(run("show", "arc_easy", "--json").stdout)
    assert shown["rank"] == 4 and shown["tasks"] == ["arc_easy"] and len(shown["sha256"]) == 64
    assert "model.layers.0.self_attn.q_proj: 32 -> 32, r=4" in run("show", "arc_easy").stdout

    run("export", "arc_easy", str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "adapter_model.safetensors").exists()

    run("tag", "kind=general", "wiki")
    assert json.loads(run("show", "wiki0", "--json").stdout)["tags"] == ["wiki"]
    run("untag", "wiki0", "wiki")
    assert json.loads(run("tags", "--json").stdout) == [
        {"tag": "v1", "experts": 1},
        {"tag": "wiki", "experts": 1},
    ]
    run("rename", "wiki1", "wiki_one")
    run("rm", "wiki0")
    assert [e["name"] for e in json.loads(run("ls", "--json").stdout)] == ["arc_easy", "wiki_one"]

    assert "head" in run("db", "current").stdout
    assert "(head)" in run("db", "upgrade").stdout


def test_cli_errors_have_messages_and_exit_codes(run, base_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert "libstore init" in run("ls", code=3).stderr
    run("init")
    run("init", code=3)
    assert "no expert named 'nope'" in run("show", "nope", code=4).stderr
    bad = make_adapter(base_dir, tmp_path / "bad", seed=1)
    assert "register one first" in run("add", str(bad), code=4).stderr
    run("base", "add", "tiny", "--from", str(base_dir))
    assert "allowed" in run("add", str(bad), "--name", "../evil", code=2).stderr
    (bad / "adapter_model.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    assert "git-LFS pointer" in run("add", str(bad), code=6).stderr
    assert "unknown query field" in run("ls", "colour=red", code=2).stderr
    assert json.loads(run("ls", "--json").stdout) == []


def test_catalog_commands_do_not_import_torch(base_dir: Path, tmp_path: Path) -> None:
    """The torch-free commands stay fast: listing a library must not load torch."""
    lib = tmp_path / "lib"
    adapter = make_adapter(base_dir, tmp_path / "a", seed=1)
    CliRunner().invoke(cli, ["-L", str(lib), "init"], catch_exceptions=False)
    CliRunner().invoke(
        cli, ["-L", str(lib), "base", "add", "tiny", "--from", str(base_dir)], catch_exceptions=False
    )
    script = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from libstore.cli import cli
        lib = {str(lib)!r}
        for args in (["add", {str(adapter)!r}, "--name", "a"], ["import-dir", {str(adapter.parent)!r}],
                     ["ls"], ["ls", "--json"], ["show", "a"], ["tag", "a", "t"], ["untag", "a", "t"],
                     ["tags"], ["export", "a", {str(tmp_path / "out")!r}], ["rename", "a", "b"],
                     ["rm", "b"], ["base", "ls"], ["db", "current"]):
            r = CliRunner().invoke(cli, ["-L", lib, *args])
            assert r.exit_code == 0, (args, r.output)
            assert "torch" not in sys.modules, args
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr + done.stdout
