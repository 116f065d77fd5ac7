"""Test harness: the same check code on CPython and on the real MicroPython.

Fixtures:
  interp    parametrized over "cpython" and "micropython": interp.call(module,
            fn, *args) calls a function of a module in tests/mp/ (or protocol/,
            firmware/) on that interpreter, with JSON-able args and result.
            MicroPython calls go to one long-lived worker per module
            (voltgate.mpy.Worker); an exception inside MicroPython fails the
            test with MicroPython's own traceback.
  mp        one-shot runs: mp.run(script=..., code=..., heapsize=..., compiled=...)
            returns voltgate.mpy.Result (records emitted with vgemit.emit).
  firmware_build   the .mpy tree (voltgate.build) in a session temp folder.
  broker    a factory: broker(devices=[(site, device, password), ...],
            server_password="...") starts a private Mosquitto for that
            registry (voltgate.broker.Broker, on a free loopback port) and
            returns it; every broker it started is stopped at teardown.
  pg_server the session's PostgreSQL (voltgate.server.pgcluster): the server
            VOLTGATE_TEST_PG names (a URL whose role may CREATE DATABASE), else
            a private cluster started from the server binaries when they are
            installed (initdb, pg_ctl: on PATH, /usr/local/bin or
            /usr/lib/postgresql/*/bin; as root it runs as `postgres` or
            `nobody`), else None. A cluster that is found but does not start
            is an error, not a skip. Stopped (pg_ctl stop -m fast) at the end.
  db_url    parametrized over "sqlite" and "postgresql": the URL of a fresh
            database migrated to head (voltgate.server.db.upgrade); a SQLite
            file in tmp_path, or a new database on pg_server (CREATE DATABASE,
            dropped afterwards). The PostgreSQL case is skipped without a server.
  pg_url    the same, PostgreSQL only.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

from voltgate import build, mpy, tree
from voltgate.broker import Broker, BrokerConfig

ROOT = tree.root()
MP_TESTS = ROOT / "tests" / "mp"
VECTORS = tree.vectors_dir()

# CPython side of `interp`: the board modules become importable here. Their
# names (cbor, wire, permit, framing, hmac256) are not used by the host package.
for p in (tree.firmware_dir(), tree.protocol_dir(), mpy.MPSIDE, MP_TESTS):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


class Interp:
    def __init__(self, name: str, workers: dict):
        self.name = name
        self._workers = workers

    def call(self, module: str, fn: str, *args):
        if self.name == "cpython":
            res = getattr(importlib.import_module(module), fn)(*args)
            # round-trip through JSON so both interpreters return the same types
            return json.loads(json.dumps(res))
        w = self._workers.get(module)
        if w is None or w.proc.poll() is not None:
            w = self._workers[module] = mpy.Worker(module, path=mpy.source_path(MP_TESTS))
        return w.call(fn, *args)

    def __repr__(self):
        return self.name


@pytest.fixture(scope="session")
def _mp_workers():
    workers: dict = {}
    yield workers
    for w in workers.values():
        w.close()


@pytest.fixture(params=["cpython", "micropython"])
def interp(request, _mp_workers):
    return Interp(request.param, _mp_workers)


@pytest.fixture(scope="session")
def mp_worker(_mp_workers):
    """interp for MicroPython only (for property tests that are about the board)."""
    return Interp("micropython", _mp_workers)


class MP:
    def __init__(self, compiled_path: list[str] | None):
        self._compiled = compiled_path

    def run(self, script=None, code=None, *, heapsize=None, args=(), compiled=False, timeout=120, check=True, stdin=None):
        if compiled:
            path = [str(mpy.MPSIDE), str(MP_TESTS), *self._compiled]
        else:
            path = mpy.source_path(MP_TESTS)
        return mpy.run(script, code, path=path, heapsize=heapsize, args=args, timeout=timeout, check=check, stdin=stdin)


@pytest.fixture(scope="session")
def firmware_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fw") / "firmware"
    build.build(out, cache=ROOT / "build" / "cache")
    return out


@pytest.fixture(scope="session")
def mp(firmware_build):
    return MP(build.board_path(firmware_build))


@pytest.fixture(scope="session")
def vectors() -> Path:
    return VECTORS


@pytest.fixture
def broker(tmp_path_factory):
    started: list[Broker] = []

    def start(devices=(), server_password="server-pw", **config) -> Broker:
        b = Broker(BrokerConfig(tuple(devices), server_password, **config), tmp_path_factory.mktemp("broker"))
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.stop()


@pytest.fixture(scope="session")
def pg_server():
    from voltgate.server import pgcluster

    url = os.environ.get("VOLTGATE_TEST_PG")
    if url:
        yield pgcluster.PgServer(url)
        return
    bindir = pgcluster.find_bindir()
    if bindir is None:
        yield None
        return
    with pgcluster.PgCluster(bindir) as pg:
        yield pg


def _fresh_db(request, kind: str, tmp_path: Path) -> str:
    from voltgate.server import db

    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'server.sqlite'}"
    else:
        pg = request.getfixturevalue("pg_server")
        if pg is None:
            pytest.skip("no PostgreSQL: set VOLTGATE_TEST_PG to a server URL, or install the server binaries (initdb, pg_ctl)")
        name = pg.create_database()
        request.addfinalizer(lambda: pg.drop_database(name))
        url = pg.url(name)
    db.upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    return _fresh_db(request, request.param, tmp_path)


@pytest.fixture
def pg_url(request, tmp_path) -> str:
    return _fresh_db(request, "postgresql", tmp_path)
