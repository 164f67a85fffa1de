"""Alembic environment shared by the ``alembic`` command and libstore's own upgrade on open.

libstore passes its open connection in ``config.attributes["connection"]``; the ``alembic`` command
gets the URL from ``-x url=...`` or ``LIBSTORE_DB_URL``. SQLite ALTERs run in batch mode, and the
version table is libstore's own so a host application's ``alembic_version`` is left alone.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from libstore.catalog.engine import make_engine
from libstore.catalog.models import Base

VERSION_TABLE = "libstore_alembic_version"
config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("LIBSTORE_DB_URL")
    if not url:
        raise SystemExit("pass the catalog URL: alembic -x url=sqlite:///path/catalog.db upgrade head")
    engine = make_engine(url)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("libstore migrations run online only")
run_migrations_online()
