"""Engines and sessions. The database URL comes from the argument, else
VOLTGATE_DB, else a SQLite file `voltgate.sqlite` in the working directory
(nothing to install). PostgreSQL URLs use psycopg 3
(`postgresql+psycopg://user:pw@host/db`; a plain `postgresql://` is mapped to
it)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

DEFAULT_URL = "sqlite:///voltgate.sqlite"


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
