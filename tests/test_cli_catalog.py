"""Issue 3 through the command line: every catalog command end to end, exit codes, --json."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from libstore import Library
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
    # compact by default: module shapes only with --full (and in show)
    assert "modules" not in listing[0] and listing[0]["tasks"] == ["arc_easy"]
    full = json.loads(run("ls", "--full", "--json").stdout)
    assert "model.layers.0.self_attn.q_proj" in full[0]["modules"] and len(full[0]["files"]) == 2
    assert "modules" in run("ls", "--full").stdout.splitlines()[0]
    lines = run("ls", "--jsonl", "--sort", "name", "--desc").stdout.splitlines()
    assert [json.loads(x)["name"] for x in lines] == ["wiki1", "wiki0", "arc_easy"]
    paged = json.loads(run("ls", "--json", "--limit", "1", "--offset", "1").stdout)
    assert [e["name"] for e in paged] == ["wiki0"]
    by_kind = json.loads(run("ls", "--json", "--sort", "kind", "--limit", "2").stdout)
    assert [e["name"] for e in by_kind] == ["wiki0", "wiki1"]  # general < task, then by name
    assert "--offset" in run("ls", "--offset", "-1", code=2).stderr

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


def test_reading_commands_on_a_current_catalog_do_not_import_alembic(base_dir: Path, tmp_path: Path) -> None:
    """Start-up: the schema check on open reads the version row with plain SQL; Alembic (half a second
    of imports) loads only when a catalog needs upgrading."""
    lib = tmp_path / "lib"
    run = cli_invoker("-L", str(lib))
    run("init")
    run("base", "add", "tiny", "--from", str(base_dir))
    run("add", str(make_adapter(base_dir, tmp_path / "a", seed=1)), "--name", "a")
    script = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from libstore.cli import cli
        for args in (["ls"], ["ls", "--json"], ["show", "a"], ["tags"], ["--help"]):
            r = CliRunner().invoke(cli, ["-L", {str(lib)!r}, *args])
            assert r.exit_code == 0, (args, r.output)
            assert "alembic" not in sys.modules, args
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr + done.stdout


# --- storage that cannot be used: read-only, full, unreachable; exit 13, nothing changed ------------


@pytest.fixture
def tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """``mount(name, size)``: a fresh tmpfs of ``size`` at tmp_path/name; ``remount(path, "ro"|"rw")``.

    These tests need root (CI runs as root): they fail, never skip, where mounting is impossible.
    """
    mounted: list[Path] = []

    def mount(name: str, size: str = "4m") -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True
        )
        if done.returncode != 0:
            pytest.fail(f"these tests mount a tmpfs and need root: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    def remount(point: Path, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True)

    yield mount, remount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def _state(lib: Path, *db: str) -> tuple[list, bytes]:
    """What must not change: the experts (as the CLI lists them) and library.json."""
    listing = cli_invoker("-L", str(lib), *db)("ls", "--json").stdout
    return json.loads(listing), (lib / "library.json").read_bytes()


def test_read_only_library_folder_is_a_storage_error(tmpfs, base_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mount, remount = tmpfs
    disk = mount("ro")
    lib = disk / "lib"
    run = cli_invoker("-L", str(lib))
    run("init")
    run("base", "add", "tiny", "--from", str(base_dir))
    adapter = make_adapter(base_dir, tmp_path / "a", seed=1)
    run("add", str(adapter), "--name", "a", "--tag", "v1")
    before = _state(lib)
    listed = run("ls", "--json").stdout
    remount(disk, "ro")
    # reading needs no write: ls and show read a read-only snapshot (catalog/snapshots.py)
    assert run("ls", "--json").stdout == listed
    assert '"name": "a"' in run("show", "a", "--json").stdout
    for args in (
        ["add", str(adapter), "--name", "b"],
        ["tag", "a", "v2"],
        ["rm", "a"],
    ):
        err = run(*args, code=13).stderr
        assert "read-only" in err and "writable" in err and "Traceback" not in err, (args, err)
    err = cli_invoker("-L", str(disk / "new"))("init", code=13).stderr
    assert "read-only" in err
    remount(disk, "rw")
    assert not (disk / "new").exists()
    assert _state(lib) == before
    assert run("verify").exit_code == 0


def test_init_where_the_folder_cannot_be_written_leaves_nothing(tmpfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mount, remount = tmpfs
    disk = mount("ro2")
    (disk / "parent").mkdir()
    remount(disk, "ro")
    from libstore.errors import StorageError

    with pytest.raises(StorageError) as e:
        Library.init(disk / "parent" / "deep" / "lib")
    assert e.value.location == str(disk / "parent" / "deep" / "lib") and "read-only" in str(e.value)
    remount(disk, "rw")
    assert sorted(p.name for p in disk.rglob("*")) == ["parent"]


def test_full_disk_under_the_catalog_is_a_storage_error(tmpfs, base_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mount, _ = tmpfs
    disk = mount("full", "1m")
    db = ("--db", f"sqlite:///{disk / 'catalog.db'}")
    lib = tmp_path / "lib"
    run = cli_invoker("-L", str(lib), *db)
    run("init")
    run("base", "add", "tiny", "--from", str(base_dir))
    adapter = make_adapter(base_dir, tmp_path / "a", seed=1)
    run("add", str(adapter), "--name", "a")
    before = _state(lib, *db)
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):  # fill that disk up
        while True:
            f.write(b"\0" * 4096)
    refused: set[str] = set()
    for i in range(40):  # a few writes may still fit in pages SQLite already holds
        tags = [f"tag{i}_{j}" for j in range(50)]
        result = CliRunner().invoke(cli, ["-L", str(lib), *db, "tag", "a", *tags])
        assert result.exit_code in (0, 13), result.output
        if result.exit_code == 13:
            assert "full disk" in result.stderr and "free some space" in result.stderr, result.stderr
            refused = set(tags)
            break
    assert refused, "the catalog's disk never filled up"
    filler.unlink()
    after = _state(lib, *db)
    assert [e["name"] for e in after[0]] == [e["name"] for e in before[0]] and after[1] == before[1]
    assert not refused & set(after[0][0]["tags"])  # the refused transaction left nothing behind


BAD_DATABASES = [
    pytest.param("postgresql+psycopg://postgres:s3cret@127.0.0.1:1/x", "check --db", id="refused"),
    pytest.param("postgresql+psycopg://postgres@no-such-host.invalid/x", "check --db", id="no-host"),
    pytest.param(
        "postgresql+psycopg://postgres@127.0.0.1:5432/libstore_no_such_db", "does not exist", id="no-db"
    ),
    pytest.param(
        "postgresql+psycopg://s3cret-user:s3cret@@/x?host=/nonexistent", "check --db", id="no-socket"
    ),
    pytest.param("not a url", "does not parse", id="bad-url"),
    pytest.param("postgresql+pg8000://postgres:s3cret@127.0.0.1/x", "pip install pg8000", id="no-driver"),
    pytest.param("nosuchdb://postgres:s3cret@h/x", "does not know", id="unknown-kind"),
    pytest.param("sqlite:////nonexistent-dir/x/catalog.db", "cannot be opened", id="sqlite-no-dir"),
]


@pytest.mark.parametrize(("url", "says"), BAD_DATABASES)
def test_unusable_database_is_a_storage_error(url: str, says: str, tmp_path: Path) -> None:
    """Every way ``--db`` can be unusable: exit 13 with what to do, no traceback, nothing created."""
    Library.init(tmp_path / "lib").close()
    before = _state(tmp_path / "lib")
    for lib, args in ((tmp_path / "lib", ["ls"]), (tmp_path / "new", ["init"])):
        result = CliRunner().invoke(cli, ["-L", str(lib), "--db", url, *args], catch_exceptions=False)
        assert result.exit_code == 13, result.output
        assert says in result.stderr and result.stderr.startswith("Error: "), result.stderr
    assert not (tmp_path / "new").exists()
    assert _state(tmp_path / "lib") == before


def test_database_passwords_never_show(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Not in CLI output, not in any log record (DEBUG, every logger), not in the exception chain."""
    import logging
    import traceback

    from libstore.errors import StorageError

    url = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/x"
    caplog.set_level(logging.DEBUG)
    logging.getLogger("sqlalchemy").setLevel(logging.DEBUG)
    try:
        out = []
        for args in (["init"], ["ls"], ["db", "current"], ["base", "ls"]):
            Library.init(tmp_path / "lib").close() if not (tmp_path / "lib").exists() and args != [
                "init"
            ] else None
            r = CliRunner().invoke(
                cli, ["-L", str(tmp_path / "lib"), "--db", url, *args], catch_exceptions=False
            )
            assert r.exit_code in (3, 13), (args, r.output)
            out.append(r.output + r.stderr)
        with pytest.raises(StorageError) as e:
            Library.init(tmp_path / "other", db_url=url)
        chain = "".join(traceback.format_exception(e.value))
    finally:
        logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    assert e.value.location == "postgresql+psycopg://postgres:***@127.0.0.1:1/x"
    assert "***" in "".join(out)
    for text in (*out, caplog.text, chain, repr(e.value)):
        assert "s3cret" not in text


def test_base_rm_in_use_show_lineage_and_import_dir_nonfinite(run, base_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    run("init")
    run("base", "add", "tiny", "--from", str(base_dir))
    for i, name in enumerate(["p", "q"]):
        run("add", str(make_adapter(base_dir, tmp_path / "src" / name, seed=i)), "--name", name)
    err = run("base", "rm", "tiny", code=12).stderr
    assert "still has experts (p, q)" in err
    assert [b["name"] for b in json.loads(run("base", "ls", "--json").stdout)] == ["tiny"]

    run("merge", "p", "q", "--name", "pq")
    shown = run("show", "pq").stdout
    assert "derived by" in shown and "  expert" in shown and "p (" in shown and "q (" in shown

    folder = make_adapter(base_dir, tmp_path / "nan" / "bad", seed=3)
    weights = folder / "adapter_model.safetensors"
    save_file(
        {k: v * float("nan") for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"}
    )
    assert "--allow-nonfinite" in run("import-dir", str(tmp_path / "nan"), code=6).stderr
    assert "1 added" in run("import-dir", str(tmp_path / "nan"), "--allow-nonfinite").stdout
