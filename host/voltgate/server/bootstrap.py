"""Wiring of `voltgate server`, in one place: the database (migrated to
head), the master secret, the MQTT gateway with its pull scheduler, and the
REST API (voltgate.server.api.create_app, when that module is there) under
uvicorn, all in one process until a stop is asked for (SIGINT, SIGTERM).

    serve(ServerOptions(db="postgresql://vg@db/vg", broker="10.0.0.5:1883"))

Defaults are the embedded ones: a SQLite file voltgate.sqlite in the
working directory (or VOLTGATE_DB), the broker on 127.0.0.1:1883 as
voltgate-server with the password `voltgate broker config` wrote to
broker/server-password, the master secret in master.key (or
VOLTGATE_KEYSTORE), the API on 127.0.0.1:8080.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import keys
from ..broker import SERVER_USER
from ..errors import EXIT_ENVIRONMENT, EXIT_OK, EXIT_USAGE, VoltgateError

log = logging.getLogger("voltgate.server")

DEFAULT_BROKER = "127.0.0.1:1883"
DEFAULT_HTTP = "127.0.0.1:8080"
DEFAULT_PASSWORD_FILE = "broker/server-password"
DEFAULT_KEYSTORE = "master.key"
_HTTP_START_TIMEOUT = 15.0


@dataclass
class ServerOptions:
    db: str | None = None  # URL; None: VOLTGATE_DB, else the SQLite file
    broker: str = DEFAULT_BROKER
    broker_user: str = SERVER_USER
    broker_password_file: str = DEFAULT_PASSWORD_FILE
    keystore: str = field(default_factory=lambda: os.environ.get("VOLTGATE_KEYSTORE", DEFAULT_KEYSTORE))
    http: str | None = DEFAULT_HTTP  # HOST:PORT, or None / "off": no REST API
    pull_interval: float = 300.0
    refresh: float = 30.0


def host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise VoltgateError(f"bad {what} address {text!r}", "HOST:PORT, e.g. 127.0.0.1:1883", EXIT_USAGE)
    return host, int(port)


def _password(path: str) -> str:
    try:
        pw = Path(path).read_text().strip()
    except FileNotFoundError:
        raise VoltgateError(
            f"no broker password file at {path}",
            "voltgate broker config writes <out>/server-password; or give --broker-password-file",
            EXIT_USAGE,
        ) from None
    except OSError as e:
        raise VoltgateError(f"cannot read {path}: {e.strerror}", None, EXIT_USAGE) from None
    if not pw:
        raise VoltgateError(f"{path} is empty", "it holds the server account's broker password", EXIT_USAGE)
    return pw


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_database(url: str | None):
    """Migrate the database to head and return (engine, session factory)."""
    from sqlalchemy.exc import SQLAlchemyError

    from . import db

    url = db.url_from_env(url)
    try:
        db.upgrade(url)
    except SQLAlchemyError as e:
        why = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        hint = "check --db or VOLTGATE_DB; is the server running?"
        raise VoltgateError(f"cannot open the database {_safe(url)}: {why}", hint, EXIT_ENVIRONMENT) from None
    eng = db.engine(url)
    return eng, db.sessions(eng)


class _Http:
    """uvicorn on a socket bound here (a taken port is a plain error), in a thread."""

    def __init__(self, app, sock: socket.socket):
        import uvicorn

        self.sock = sock
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="auto"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="voltgate-http", daemon=True)

    def start(self) -> None:
        self.thread.start()
        # uvicorn sets started once it serves; a failed start ends its thread
        while not self.server.started:
            self.thread.join(0.05)
            if not self.thread.is_alive() and not self.server.started:
                raise VoltgateError("the REST API did not start", "see the messages above", EXIT_ENVIRONMENT)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def _listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        hint = "is another server running? use --http HOST:PORT or --http off"
        raise VoltgateError(f"cannot listen on {host}:{port} for the REST API: {e.strerror}", hint, EXIT_ENVIRONMENT) from None


def serve(opts: ServerOptions, *, stop: threading.Event | None = None, ready: Callable[[dict], None] | None = None) -> int:
    """Run the server until stop is set, or SIGINT / SIGTERM (when called on
    the main thread). ready(info) is called once everything runs."""
    from .gateway import Gateway

    broker_host, broker_port = host_port(opts.broker, "broker")
    http = None if opts.http in (None, "", "off", "none") else host_port(opts.http, "--http")
    if opts.pull_interval <= 0:
        raise VoltgateError(f"bad pull interval {opts.pull_interval}", "seconds, more than 0", EXIT_USAGE)
    master = keys.load_master(opts.keystore)
    password = _password(opts.broker_password_file)
    eng, factory = open_database(opts.db)
    stop = stop or threading.Event()
    restore = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            restore[sig] = signal.signal(sig, lambda n, f: stop.set())
    gw = web = sock = None
    try:
        app = None
        if http:
            from . import api  # FastAPI and uvicorn only when the API is served

            app = api.create_app(factory, master)
            sock = _listen(*http)
        g = Gateway(factory, master, host=broker_host, port=broker_port, user=opts.broker_user, password=password,
                    interval=opts.pull_interval, refresh=opts.refresh)  # fmt: skip
        gw = g.start()
        if sock is not None:
            web = _Http(app, sock)
            web.start()
        info = {
            "db": _safe(str(eng.url)),
            "broker": f"{broker_host}:{broker_port}",
            "broker_user": opts.broker_user,
            "devices": len(gw.devices),
            "http": f"http://{http[0]}:{sock.getsockname()[1]}" if sock is not None else None,
        }
        api_url = info["http"] or "off"
        log.info(
            "running: database %s, broker %s as %s, %d devices, REST API %s",
            info["db"],
            info["broker"],
            info["broker_user"],
            info["devices"],
            api_url,
        )
        if ready is not None:
            ready(info)
        stop.wait()
        log.info("stopping")
    finally:
        if web is not None:
            web.stop()
        elif sock is not None:
            sock.close()
        if gw is not None:
            gw.stop()
            s = gw.stats
            log.info(
                "stopped: %d pulls (%d failed), %d records stored, %d commands",
                s["pulls"],
                s["failed_pulls"],
                gw.store.stored,
                s["commands"],
            )
        eng.dispose()
        for sig, h in restore.items():
            signal.signal(sig, h)
    return EXIT_OK


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """One line per event on stderr: time, level, logger, what."""
    root = logging.getLogger("voltgate")
    for h in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(h)
    h = _Stderr()
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(level)
