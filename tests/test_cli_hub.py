"""Issue 6 through the command line: remote, push, pull, status, import-hub, import-mttl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi

from libstore.cli import cli
from tests import hub_support as support
from tests.factories import make_adapter
from tests.hub_support import REPO
from tests.hubserver import DEFAULT_TOKEN, HubServer, client_env

hub = support.hub  # fixture

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def run(tmp_path: Path, hub: HubServer):  # type: ignore[no-untyped-def]
    runner = CliRunner()

    def _run(lib: str, *args: str, code: int = 0):  # type: ignore[no-untyped-def]
        result = runner.invoke(cli, ["-L", str(tmp_path / lib), *args], catch_exceptions=False)
        assert result.exit_code == code, (args, result.output)
        assert DEFAULT_TOKEN not in result.output
        return result

    return _run


def test_sync_commands_end_to_end(run, hub: HubServer, base_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for lib in ("a", "b"):
        run(lib, "init")
        run(lib, "base", "add", "tiny", "--from", str(base_dir))
    for i, name in enumerate(["arc", "boolq"]):
        run(
            "a",
            "add",
            str(make_adapter(base_dir, tmp_path / "src" / name, seed=i)),
            "--name",
            name,
            "--task",
            name,
            "--tag",
            "v1",
        )

    assert (
        "Added remote origin -> tester/phi3-experts@main (private)"
        in run("a", "remote", "add", "origin", REPO, "--private").stdout
    )
    run("a", "remote", "add", "origin", REPO, code=5)  # name taken
    run("a", "remote", "add", "bad", "not a repo", code=6)
    remotes = json.loads(run("a", "remote", "ls", "--json").stdout)
    assert remotes[0]["repo_id"] == REPO and remotes[0]["last_commit"] is None and remotes[0]["private"]

    st = json.loads(run("a", "status", "--json").stdout)
    assert st["head"] is None and {e["state"] for e in st["experts"]} == {"local_only"}
    out = run("a", "push", "-m", "first", "--tag", "v1").stdout
    assert "2 expert(s) uploaded" in out and "Tagged" in out
    assert "Nothing to push" in run("a", "push").stdout
    assert "2 in sync" in run("a", "status").stdout

    run("b", "remote", "add", "origin", REPO)
    out = run("b", "pull").stdout
    assert "2 added" in out and "file(s) downloaded" in out
    pulled = json.loads(run("b", "pull", "--revision", "v1", "--json").stdout)
    assert pulled["added"] == [] and pulled["files_downloaded"] == 0

    run("b", "tag", "arc", "gold")
    run("b", "push")
    run("a", "tag", "boolq", "silver")
    out = run("a", "push", code=10)  # the remote moved: a Hub error with the way out
    assert "pull" in out.output
    table = run("a", "status").stdout
    assert "changed on remote" in table and "changed locally" in table and "push is refused" in table
    run("a", "pull")
    run("a", "push")
    assert "gold" in json.loads(run("a", "show", "arc", "--json").stdout)["tags"]

    run("a", "tag", "arc", "mine")
    run("b", "pull")
    run("b", "untag", "arc", "gold")
    run("b", "push")
    res = run("a", "pull")
    assert "CONFLICT" in res.stderr and "arc" in res.stderr
    run("a", "push", code=10)
    run("a", "pull", "--force")
    run("a", "remote", "rm", "origin")
    assert json.loads(run("a", "remote", "ls", "--json").stdout) == []


def test_import_commands(run, hub: HubServer, base_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run("lib", "init")
    run("lib", "base", "add", "tiny", "--from", str(base_dir))
    api = HfApi(endpoint=hub.url, token=DEFAULT_TOKEN)
    api.create_repo("libstore-org/adapters")
    api.upload_folder(
        repo_id="libstore-org/adapters",
        path_in_repo="arc",
        folder_path=make_adapter(base_dir, tmp_path / "arc", seed=3),
    )
    e = json.loads(
        run(
            "lib", "import-hub", "libstore-org/adapters", "--subfolder", "arc", "--task", "arc", "--json"
        ).stdout
    )
    assert e["name"] == "arc" and e["tasks"] == ["arc"]
    run("lib", "import-hub", "libstore-org/adapters", "--subfolder", "../x", code=6)
    every = json.loads(run("lib", "import-hub", "libstore-org/adapters", "--all", "--json").stdout)
    assert every["added"] == [] and every["skipped"] == ["arc"]  # the one folder, already imported
    run("lib", "import-hub", "libstore-org/adapters", "--all", "--name", "x", code=2)

    folder = tmp_path / "mttl"
    folder.mkdir()
    mods = [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    torch.save(
        {
            **{f"{m}.lora_a": torch.randn(32, 2) for m in mods},
            **{f"{m}.lora_b": torch.randn(2, 32) for m in mods},
        },
        folder / "t1.ckpt",
    )
    torch.save(
        {
            "expert_name": "t1",
            "expert_task_name": "t1",
            "expert_model": str(base_dir),
            "expert_config": {
                "lora_rank": 2,
                "lora_alpha": 4.0,
                "class_name": "mttl.models.modifiers.lora.LoRAConfig",
            },
        },
        folder / "t1.meta",
    )
    out = run("lib", "import-mttl", str(folder), "--tag", "mttl").stdout
    assert "added    t1 (rank 2, tasks t1)" in out and "1 added" in out
    assert "1 skipped" in run("lib", "import-mttl", str(folder)).stdout


def test_cli_in_a_fresh_process_reads_endpoint_and_token_from_the_environment(
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
) -> None:
    """The CLI as users run it: HF_ENDPOINT / HF_TOKEN set in the environment before it starts."""
    env = {**os.environ, **client_env(hub.url, tmp_path / "hf")}

    def cli_run(*args: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "from libstore.cli import main; main()",
                "-L",
                str(tmp_path / "lib"),
                *args,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        assert DEFAULT_TOKEN not in r.stdout + r.stderr
        return r

    from libstore import Library

    with Library.init(tmp_path / "lib") as lib:  # set up in-process; sync in a fresh process
        lib.add_base("tiny", str(base_dir))
        lib.add(make_adapter(base_dir, tmp_path / "src", seed=1), name="x")
        lib.add_remote("origin", REPO)
    assert "1 expert(s) uploaded" in cli_run("push").stdout
    assert hub.counts["commit"] == 1
    assert json.loads(cli_run("status", "--json").stdout)["experts"][0]["state"] == "in_sync"
