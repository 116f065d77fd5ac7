"""Engines and sessions. The database URL comes from the argument, else
VOLTGATE_DB, else a SQLite file `voltgate.sqlite` in the working directory
(nothing to install). PostgreSQL URLs use psycopg 3
(`postgresql+psycopg://user:pw@host/db`; a plain `postgresql://` is mapped to
it).

upgrade(url) brings a database to the newest schema with the Alembic
migrations packaged in voltgate/server/migrations (no alembic.ini needed:
alembic_config() builds the configuration in code)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

DEFAULT_URL = "sqlite:///voltgate.sqlite"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# one server process migrates at a time (PostgreSQL advisory lock key)
_MIGRATE_LOCK = 0x766F6C74  # "volt"


def url_from_env(url: str | None = None) -> str:
    url = url or os.environ.get("VOLTGATE_DB") or DEFAULT_URL
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def engine(url: str | None = None, **kw) -> Engine:
    url = url_from_env(url)
    if url.startswith("sqlite"):
        eng = create_engine(url, connect_args={"timeout": 30}, **kw)

        @event.listens_for(eng, "connect")
        def _sqlite_pragmas(conn, _record):
            cur = conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return eng
    return create_engine(url, pool_pre_ping=True, **kw)


def sessions(eng: Engine) -> sessionmaker[Session]:
    return sessionmaker(eng, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits at the end of the block, or rolls back."""
    with factory() as s, s.begin():
        yield s


def alembic_config(url: str | None = None):
    """The Alembic configuration of the packaged migrations, for
    alembic.command (upgrade, downgrade, current, history)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # a URL's '%' would be read as configparser interpolation
    cfg.set_main_option("sqlalchemy.url", url_from_env(url).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Run the migrations up to revision (default: the newest). Several
    server processes starting at once against one PostgreSQL take turns
    (an advisory lock), so only the first one migrates."""
    from alembic import command

    cfg = alembic_config(url)
    eng = engine(url)
    try:
        with eng.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATE_LOCK})")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        eng.dispose()
