"""Shared fixtures: a fresh library per test, on SQLite and on the real PostgreSQL server.

PostgreSQL tests each create their own schema in database ``test`` and drop it afterwards, so the
suite can run twice and in parallel (``pytest -n``). Set ``LIBSTORE_TEST_PG_URL`` to point them at
another server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("LIBSTORE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the user's library, catalog URL, token or Hub cache."""
    monkeypatch.delenv("LIBSTORE_DB_URL", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("LIBSTORE_HOME", str(tmp_path / "default-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One SeaweedFS S3 server for the session (see tests/s3_support.py)."""
    from tests.s3_support import start_seaweedfs

    yield from start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))


@pytest.fixture
def s3_url(s3_server, monkeypatch: pytest.MonkeyPatch) -> str:  # type: ignore[no-untyped-def]
    """A fresh ``s3://bucket/prefix``, with this process's AWS variables pointing at the server."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return str(s3_server.new_url())


def _pg_schema_url() -> Iterator[str]:
    from sqlalchemy import create_engine, text

    schema = f"ls_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as e:
        admin.dispose()
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required for this test: {e}")
    sep = "&" if "?" in PG_ADMIN_URL else "?"
    try:
        yield f"{PG_ADMIN_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL whose search_path is a fresh, private schema of the test database."""
    yield from _pg_schema_url()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """None for the embedded SQLite default, or a PostgreSQL URL with a private schema."""
    if request.param == "sqlite":
        yield None
    else:
        yield from _pg_schema_url()


def cli_invoker(*prefix: str):  # type: ignore[no-untyped-def]
    """``run(*args, code=0)``: invoke the CLI with ``prefix`` first and assert the exit code."""
    from click.testing import CliRunner

    from libstore.cli import cli

    runner = CliRunner()

    def _run(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
        result = runner.invoke(cli, [*prefix, *args], catch_exceptions=False)
        assert result.exit_code == code, (args, result.output, result.stderr)
        return result

    return _run


@pytest.fixture
def run(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The CLI on a SQLite library at tmp_path/lib (test files may override with other databases)."""
    return cli_invoker("-L", str(tmp_path / "lib"))


@pytest.fixture
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-style model saved with save_pretrained (config + random weights)."""
    from tests.factories import make_base_model

    return make_base_model(tmp_path_factory.mktemp("base"))


@pytest.fixture
def library(tmp_path: Path, db_url: str | None, base_dir: Path):  # type: ignore[no-untyped-def]
    """A fresh library with the tiny base model registered as ``tiny``."""
    from libstore import Library

    lib = Library.init(tmp_path / "lib", db_url=db_url)
    lib.add_base("tiny", str(base_dir))
    yield lib
    lib.close()


@pytest.fixture
def durability_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """``("fsync", path)`` and ``("replace", "src dst")`` in the order the process does them (after
    the real call), to check that a blob is durable before it is named and its folder after."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_replace(src, dst)
        events.append(("replace", f"{src} {dst}"))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events
