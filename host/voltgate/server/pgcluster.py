"""A private PostgreSQL for tests and benchmarks: a throwaway cluster in a
temporary folder, or a server someone else runs (a URL).

    with PgCluster() as pg:                 # initdb + pg_ctl start, on 127.0.0.1
        name = pg.create_database()         # a fresh, empty database
        url = pg.url(name)                  # postgresql+psycopg://voltgate@127.0.0.1:PORT/NAME
        ...
        pg.drop_database(name)
                                            # pg_ctl stop -m fast, folder removed

PgCluster needs the server binaries (initdb, pg_ctl, postgres), found on
PATH, in /usr/local/bin or in /usr/lib/postgresql/<version>/bin (Debian);
find_bindir() says where, or None. The cluster listens on 127.0.0.1 only,
on a free port, and on a unix socket in its own folder; authentication is
trust, for the superuser `voltgate`.

PostgreSQL refuses to run as root. Run as root, PgCluster runs initdb, pg_ctl
and the server as an unprivileged account instead (`postgres` when it
exists, else `nobody`), through subprocess's user/group switch (no sudo,
su or runuser needed), and gives that account the cluster's folder, which
it makes directly under the system temp folder (pytest's own temp folders
are 0700 root and would stay closed to that account).

PgServer(url) is the same interface on a server given by URL (the tests'
VOLTGATE_TEST_PG): its role must be allowed to CREATE DATABASE.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SUPERUSER = "voltgate"
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
_PORT_TRIES = 5
_BINARIES = ("initdb", "pg_ctl", "postgres")
_names = itertools.count(1)


def find_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None."""
    candidates = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    candidates.append(Path("/usr/local/bin"))

    def version(p: str) -> tuple:
        m = re.search(r"/postgresql/(\d+)", p)
        return (int(m.group(1)) if m else 0,)

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    for d in candidates:
        if all(os.access(d / b, os.X_OK) for b in _BINARIES):
            return d
    return None


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PgServer:
    """A PostgreSQL server given by URL (its database is the one connected
    to for CREATE / DROP DATABASE)."""

    def __init__(self, url: str):
        from sqlalchemy.engine import make_url

        u = make_url(url)
        if u.drivername in ("postgresql", "postgres"):
            u = u.set(drivername="postgresql+psycopg")
        self._url = u

    def url(self, database: str | None = None) -> str:
        u = self._url if database is None else self._url.set(database=database)
        return u.render_as_string(hide_password=False)

    def _admin(self, sql: str) -> None:
        import psycopg

        u = self._url
        with psycopg.connect(
            host=u.host or "127.0.0.1",
            port=u.port or 5432,
            user=u.username,
            password=u.password,
            dbname=u.database or "postgres",
            autocommit=True,
        ) as c:
            c.execute(sql)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its name (made unique when not given)."""
        name = name or f"vg_{os.getpid()}_{next(_names)}_{int(time.time() * 1000) % 10**8}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: lower-case letters, digits and '_' only")
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop it, closing whatever connections are still open to it."""
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def start(self) -> PgServer:
        return self

    def stop(self) -> None:
        pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PgCluster(PgServer):
    """A cluster of its own in a temporary folder, started and stopped here.

    durable=False (tests) turns fsync, synchronous_commit and full page
    writes off: nothing survives a crash, and every test runs faster."""

    def __init__(self, bindir: str | Path | None = None, *, durable: bool = False):
        self.bindir = Path(bindir) if bindir else find_bindir()
        if self.bindir is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found")
        self.durable = durable
        self.dir: Path | None = None
        self.port: int | None = None
        self._as: dict = {}
        self._running = False

    # who runs the server: ourselves, or an unprivileged account when we are root
    def _account(self) -> dict:
        if os.geteuid() != 0:
            return {}
        for name in ("postgres", "nobody"):
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                continue
            return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        raise RuntimeError("running as root and no unprivileged account (postgres, nobody) to run PostgreSQL as")

    def _run(self, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ, LC_ALL="C", LANG="C")
        env.pop("PGDATA", None)
        p = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.dir,  # a folder the account can enter (root's cwd may be closed to it)
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            **self._as,
        )
        if check and p.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-2000:]}")
        return p

    @property
    def data(self) -> Path:
        assert self.dir is not None
        return self.dir / "data"

    @property
    def log(self) -> Path:
        assert self.dir is not None
        return self.dir / "postgres.log"

    def start(self) -> PgCluster:
        if self._running:
            return self
        self._as = self._account()
        self.dir = Path(tempfile.mkdtemp(prefix="voltgate-pg-"))
        try:
            if self._as:
                os.chown(self.dir, self._as["user"], self._as["group"])
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", timeout=120)
            opts = [
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.dir}",
                "-c max_connections=200",
            ]
            if not self.durable:
                opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
            last = ""
            for _ in range(_PORT_TRIES):
                self.port = _free_port()
                p = self._run(
                    "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(int(_START_TIMEOUT)),
                    "-o", " ".join(opts + [f"-c port={self.port}"]), "start",
                    timeout=_START_TIMEOUT + 10, check=False,
                )  # fmt: skip
                if p.returncode == 0:
                    self._running = True
                    break
                last = self.log.read_text(errors="replace") if self.log.exists() else p.stderr
                if "already in use" not in last:  # only a taken port is worth another try
                    break
            if not self._running:
                raise RuntimeError(f"PostgreSQL did not start: {last.strip()[-2000:]}")
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", connect_timeout=5):
                    return
            except psycopg.OperationalError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL on port {self.port} does not accept connections: {e}") from None
                time.sleep(0.05)  # polling with a deadline, not synchronisation

    def url(self, database: str | None = None) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database or 'postgres'}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True) as c:
            c.execute(sql)

    def stop(self) -> None:
        """pg_ctl stop -m fast (open connections are closed), then the folder goes."""
        if self._running:
            self._running = False
            try:
                stop = ("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", str(int(_STOP_TIMEOUT)), "stop")
                self._run(*stop, timeout=_STOP_TIMEOUT + 10, check=False)
            except subprocess.TimeoutExpired:
                pass
            if self._server_pid() is not None:  # still there: make sure
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=_STOP_TIMEOUT, check=False)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _server_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __repr__(self):
        return f"PgCluster(127.0.0.1:{self.port}, {self.dir}, {'running' if self._running else 'stopped'})"
