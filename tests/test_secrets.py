"""The Hub token never leaks: not into logs (every logger at DEBUG), error messages, exception text
(the whole chain, ``repr`` included) — also when the server answers 401 or 500 — nor into the CLI's
output, the catalog (SQLite file bytes, WAL included, or every PostgreSQL row), any other file of the
library, or anything pushed to the server (manifest, model card, expert files).

``test_hub_sync.py::test_token_never_leaks`` covers the basic push/pull paths; this file adds the
stored-login token, ``status``/``import-hub``, PostgreSQL, the CLI, and the server's own copy; and,
for a team library, the object store's secret key and a password in ``--db``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from libstore import Library
from libstore.catalog.models import Base
from libstore.errors import HubError, LibstoreError
from libstore.ops import push
from tests import hub_support as support
from tests.factories import make_adapter
from tests.hub_support import REPO
from tests.hubserver import HubServer, client_env, patch_hf_client, skip_client_backoff

other = support.other  # fixture: a second library on the same kind of catalog

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SECRET = "hf_LibstoreSecretsTest_5e6f7a8b9c0d1e2f"
WRONG = SECRET[:-4] + "0000"  # a near miss must not show either (it is the user's typo of theirs)
NEEDLES = (SECRET, WRONG, SECRET[3:], WRONG[3:])


def _clean(text: str, where: str) -> None:
    for needle in NEEDLES:
        assert needle not in text, f"token leaked into {where}"


def _exception_text(e: BaseException) -> str:
    """Everything a traceback, a log handler or a bug report would show of ``e`` and its causes."""
    parts = ["".join(traceback.format_exception(e))]
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts += [str(e), repr(e), repr(e.args)]
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return "\n".join(parts)


@pytest.fixture
def locked_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A server that answers 401 to any request without exactly SECRET; this process's client
    points at it with no token in the environment (tests pass one, or store a login)."""
    with HubServer(token=SECRET) as server:
        patch_hf_client(monkeypatch, server.url, tmp_path / "hf_home", token=SECRET)
        monkeypatch.delenv("HF_TOKEN")
        skip_client_backoff(monkeypatch)
        monkeypatch.setattr(push.time, "sleep", lambda s: None)
        yield server


def _catalog_text(lib: Library) -> str:
    rows = []
    with lib.context.catalog.read() as s:
        for table in Base.metadata.sorted_tables:
            rows += [repr(tuple(r)) for r in s.execute(select(table))]
    return "\n".join(rows)


def _files_of(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())


def _server_text(server: HubServer) -> str:
    """Every file at the head of every branch, and every stored object."""
    repo = server._repo_by_id(REPO)
    chunks = [repr(c) for c in repo.commits.values()]
    chunks += [b.decode("latin-1") for b in repo.blobs.values()]
    chunks += [b.decode("latin-1") for b in repo.lfs.values()]
    return "\n".join(chunks)


def test_token_stays_secret_through_failures(
    locked_hub: HubServer,
    library: Library,
    other: Library,
    base_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: libstore, huggingface_hub, httpx, urllib3
    lib = library
    support.add_experts(lib, base_dir, tmp_path, ["a", "b"])
    lib.compute_prototypes()
    lib.add_remote("origin", REPO, private=True)
    errors: list[BaseException] = []

    def fails(fn, *args, **kw) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(LibstoreError) as e:
            fn(*args, **kw)
        errors.append(e.value)

    fails(lib.push, token=WRONG)  # 401: not our token
    fails(lib.status, token=WRONG)
    assert lib.push(token=SECRET).commits == 1
    assert lib.status(token=SECRET).experts
    support.add_experts(lib, base_dir, tmp_path, ["c"], seed0=5)
    locked_hub.faults.fail_next("commit", 500, count=None)
    fails(lib.push, token=SECRET)  # 500 from the server, with our token in the request
    locked_hub.faults.clear()
    fails(lib.import_hub, REPO, subfolder="experts/a", token=WRONG)

    # the stored login (`hf auth login`), with nothing in the environment
    token_file = Path(os.environ["HF_HOME"]) / "token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(SECRET)
    from huggingface_hub import constants

    assert str(token_file) == constants.HF_TOKEN_PATH
    locked_hub.faults.fail_next("download", 500, count=None)
    other.add_remote("origin", REPO)
    fails(other.pull)
    locked_hub.faults.clear()
    assert other.pull().added == ("a", "b")
    assert lib.push().commits == 1  # c goes up with the stored login
    assert all(isinstance(e, HubError) for e in errors)

    for e in errors:
        _clean(_exception_text(e), f"the error {type(e).__name__}: {e}")
    _clean(caplog.text, "the logs")
    _clean("\n".join(r.getMessage() + repr(r.args) for r in caplog.records), "log records")
    out = capsys.readouterr()
    _clean(out.out + out.err, "stdout/stderr")
    for each in (lib, other):
        _clean(_catalog_text(each), "the catalog")
        _clean(repr(each.remotes()) + repr(each.status()), "remotes and status")
        for f in _files_of(each.path):
            data = f.read_bytes()
            for needle in NEEDLES:
                assert needle.encode() not in data, f"token leaked into {f}"
    _clean(_server_text(locked_hub), "what was pushed (manifest, model card, files, commits)")

    # a server that echoes the token back in its error: libstore's own message is scrubbed (the
    # HTTP stack's debug log and the client's exception, chained as the cause, show what the
    # server sent — that is the server's doing, not ours)
    support.add_experts(lib, base_dir, tmp_path, ["d"], seed0=9)
    locked_hub.faults.fail_next("preupload", 401, count=None, message=f"bad token {SECRET}")
    with pytest.raises(HubError) as echoed:
        lib.push(token=SECRET)
    _clean(str(echoed.value) + repr(echoed.value), "the error of a server echoing the token")


def _libstore(lib: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from libstore.cli import main; main()", "-L", str(lib), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_token_stays_secret_in_the_cli(locked_hub: HubServer, base_dir: Path, tmp_path: Path) -> None:
    lib = Library.init(tmp_path / "lib")
    lib.add_base("tiny", str(base_dir))
    support.add_experts(lib, base_dir, tmp_path, ["a"])
    lib.close()
    env = {**os.environ, **client_env(locked_hub.url, tmp_path / "cli_home", token=SECRET)}
    outputs = []

    def run(*args: str, code: int, env: dict[str, str] = env) -> None:
        r = _libstore(tmp_path / "lib", env, *args)
        assert r.returncode == code, (args, r.stdout, r.stderr)
        outputs.append(r.stdout + r.stderr)

    run("remote", "add", "origin", REPO, "--private", code=0)
    run("push", "--token", WRONG, code=10)  # 401
    run("push", code=0)  # HF_TOKEN from the environment
    run("remote", "ls", "--json", code=0)
    run("status", "--json", code=0)
    with Library.open(tmp_path / "lib") as again:
        support.add_experts(again, base_dir, tmp_path, ["b"], seed0=4)
    locked_hub.faults.fail_next("commit", 500, count=None)
    run("push", "-m", "will fail", code=10)  # 500
    locked_hub.faults.clear()
    no_env = {k: v for k, v in env.items() if k != "HF_TOKEN"}
    run("pull", "--token", WRONG, code=10, env=no_env)
    for text in outputs:
        _clean(text, "the CLI's output")
    assert any("401" in t or "not allowed" in t or "token" in t.lower() for t in outputs)
    for f in _files_of(tmp_path / "lib"):
        assert SECRET.encode() not in f.read_bytes() and WRONG.encode() not in f.read_bytes(), f
    _clean(_server_text(locked_hub), "what was pushed")


@pytest.mark.postgres
def test_object_store_secret_and_db_password_stay_secret(
    pg_url: str, s3_url: str, s3_server: Any, base_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A team library: the S3 secret (from the AWS environment) and a password in ``--db`` never
    reach the CLI's output, an error, the logs, the catalog or a file of the library folders."""
    from click.testing import CliRunner

    from libstore.cli import cli
    from tests.s3_support import SECRET_KEY

    caplog.set_level(logging.DEBUG)
    password = "PgPassw0rd-LibstoreSecrets"
    db = pg_url.replace("postgres@", f"postgres:{password}@")  # the test server trusts, ignores it
    needles = (SECRET_KEY, password)
    runner = CliRunner()
    outputs = []

    def run(*args: str, env: dict[str, str] | None = None) -> int:
        result = runner.invoke(cli, ["--db", db, *args], env=env)
        outputs.append(result.output + (result.stderr or "") + repr(result.exception))
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            outputs.append(_exception_text(result.exception))
        return result.exit_code

    adapter = make_adapter(base_dir, tmp_path / "src" / "a", seed=1)
    assert run("init", str(tmp_path / "m1"), "--blob-store", s3_url) == 0
    assert run("-L", str(tmp_path / "m1"), "base", "add", "tiny", "--from", str(base_dir)) == 0
    assert run("-L", str(tmp_path / "m1"), "add", str(adapter), "--name", "a") == 0
    assert run("init", str(tmp_path / "m2")) == 0
    wrong = {"AWS_SECRET_ACCESS_KEY": SECRET_KEY[:-2] + "xx"}
    assert run("-L", str(tmp_path / "m2"), "export", "a", str(tmp_path / "out"), env=wrong) == 13
    bad_db = db.replace("/test", "/no_such_database_here")
    assert run("-L", str(tmp_path / "m2"), "--db", bad_db, "ls") != 0
    assert run("-L", str(tmp_path / "m2"), "export", "a", str(tmp_path / "out")) == 0
    assert run("-L", str(tmp_path / "m2"), "verify") == 0
    texts = [*outputs, caplog.text]
    lib = Library.open(tmp_path / "m2", db_url=pg_url)
    texts.append(_catalog_text(lib))
    lib.close()
    for folder in ("m1", "m2"):
        texts += [p.read_bytes().decode("latin-1") for p in _files_of(tmp_path / folder)]
    for text in texts:
        for needle in needles:
            assert needle not in text
