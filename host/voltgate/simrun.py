"""Simulated boards running, and what surrounds them: the pieces `voltgate
demo` and `voltgate sim fleet` (voltgate.fleet) stand on.

- provision_board(): the real provisioning flow (voltgate.provision) against
  a `voltgate sim` board (voltgate.simboard) on a flash folder: mpremote
  uploads the .mpy tree, the identity goes into the board's NVS store, the
  device into the registry and the broker's files. The board is left in its
  REPL (no reset): its first boot is SimProcess's.
- store_entries(): the same NVS entries without the REPL, for fleets too big
  to provision one upload at a time (hal.sim's Store takes them at boot).
- SimProcess: one board running (mpside/vgsim.py) from a flash folder on
  the MicroPython unix port, its world following the real clock (speed
  times as fast). Its console is the process's stdin/stdout (present()
  writes `present <hex>` and returns the board's answer line); its world
  (doors, batteries, loads, faults) is driven through vgsim's control
  channel (world(), state()).
- Cable: a TCP forwarder between a board and the broker that can be cut
  and restored (a link drop: the broker sees the connection end and
  publishes the board's last will).
- SimClock: Unix time that runs `speed` times as fast as the real one.
- ServerProcess: `voltgate server` as its own process.
- Closer: an ExitStack that SIGTERM unwinds too.

Every process started here runs in its own session (Ctrl-C reaches the
runner, which stops them in order) and gets SIGTERM if the runner dies.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import keys, mpy, nvs, tree
from .errors import EXIT_ENVIRONMENT, EXIT_FAILURE, EXIT_USAGE, VoltgateError

# the simulated boards run with a heap well above the ESP32 budgets (the
# budgets are not met yet; bench/RESULTS.md reports the gap)
SIM_HEAP = 256 * 1024
STATION_BOARD = "sim-station-4.json"
OUTLET_BOARD = "sim-outlet-2.json"
ANSWERS = ("ok", "refused", "error")  # the console's answer lines (firmware/present.py)


def board_file(name: str) -> Path:
    return tree.root() / "boards" / name


# -- clocks ------------------------------------------------------------------------------------


class SimClock:
    """Unix seconds that run `speed` times as fast as real time, from `start`."""

    def __init__(self, speed: int = 1, start: float | None = None):
        if speed != int(speed) or speed < 1:
            raise VoltgateError(f"bad speed {speed}", "a whole number of simulated seconds per real second, 1 or more", EXIT_USAGE)
        self.speed = speed
        self.t0 = time.time() if start is None else start
        self.m0 = time.monotonic()

    def __call__(self) -> float:
        return self.t0 + (time.monotonic() - self.m0) * self.speed

    def real(self, sim_s: float) -> float:
        """Real seconds that sim_s simulated seconds take."""
        return sim_s / self.speed


# -- provisioning --------------------------------------------------------------------------------


def provision_board(
    board: Path,
    flash: Path,
    device: str,
    *,
    site: str,
    mqtt: str,
    keystore: Path,
    db: str,
    broker_dir: Path | None,
    broker_listen: str | None = None,
    console_log: Path | None = None,
    ui=None,
):
    """Provision a simulated board through the real flow; returns provision.Result.

    The board is a `voltgate sim` board (console on loopback TCP) on the
    flash folder, stopped again afterwards; provisioning leaves it in the
    REPL (--no-reset), so the firmware first boots in SimProcess."""
    from . import provision
    from .simboard import SimulatedBoard

    with SimulatedBoard(board, flash, tcp_port=0, log=console_log) as sim:
        o = provision.Options(
            board_file=Path(board),
            port=sim.url,
            device_id=device,
            site=site,
            mqtt=mqtt,
            keystore=Path(keystore),
            db=db,
            broker_dir=broker_dir,
            broker_listen=broker_listen,
            reset=False,
        )
        return provision.run(o, ui)


def store_entries(master: bytes, device: str, site: str, link: dict | None, version: int = 1, **extra) -> dict:
    """The NVS entries provisioning writes (nvs.Identity), in the form
    vgsim's spec takes ({key: hex blob or int}); extra: more store keys
    (e.g. st_read_s, out_read_s)."""
    key = keys.derive_device_key(master, device, version)
    entries = nvs.Identity(device, key, version, site, link).entries()
    out = {k: v if isinstance(v, int) else v.hex() for k, v in entries.items()}
    out.update(extra)
    return out


# -- one running board ---------------------------------------------------------------------------


class BoardGone(VoltgateError):
    pass


class SimProcess:
    """One simulated board (mpside/vgsim.py) from a flash folder.

    code: the module folder it runs (default: the flash folder itself, as
    provisioning uploaded it, with firmware/main.py as /vgmain.mpy; a
    `voltgate build` tree runs with main="main"). world: vgsim's "world"
    (the surroundings at power-up); store: entries to write into its NVS
    store before it boots (None: keep what provisioning wrote).
    Files in workdir: spec.json, console.log (what it wrote on its
    console), control / control.out (the world's channel)."""

    def __init__(
        self,
        device: str,
        flash: Path,
        workdir: Path,
        *,
        kind: str | None = None,
        board: Path | None = None,
        code: Path | None = None,
        main: str = "vgmain",
        speed: int = 1,
        unix: int | None = None,
        world: dict | None = None,
        store: dict | None = None,
        heapsize: int = SIM_HEAP,
    ):
        self.device = device
        self.flash = Path(flash)
        self.workdir = Path(workdir)
        self.board = Path(board) if board else self.flash / "board.json"
        self.kind = kind
        self.code = Path(code) if code else self.flash
        self.main = main
        self.speed = speed
        self.unix = unix
        self.world_spec = world
        self.store = store
        self.heapsize = heapsize
        self.proc: subprocess.Popen | None = None
        self.console_log = self.workdir / "console.log"
        self.control = self.workdir / "control"
        self._lines: list[str] = []
        self._cv = threading.Condition()
        self._n = 0
        self._replies: dict[int, dict] = {}
        self._out_pos = 0
        self._reader: threading.Thread | None = None
        self._write_lock = threading.Lock()
        self._present_lock = threading.Lock()
        self._reply_lock = threading.Lock()

    def start(self) -> SimProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.flash / "data").mkdir(parents=True, exist_ok=True)
        for p in (self.control, Path(str(self.control) + ".out")):
            p.unlink(missing_ok=True)
        if self.kind is None:
            self.kind = json.loads(self.board.read_text())["kind"]
        spec = {
            "board": str(self.board.resolve()),
            "root": str((self.flash / "data").resolve()),
            "store": self.store,
            "speed": int(self.speed),  # hal.sim's realtime() counts whole ms
            "unix": self.unix,
            "main": self.main,
            "world": self.world_spec,
            "control": str(self.control.resolve()),
        }
        spec_file = self.workdir / "spec.json"
        spec_file.write_text(json.dumps(spec, indent=1))
        path = [".frozen", str(self.code.resolve()), str((self.code / "lib").resolve())]
        env = dict(os.environ, MICROPYPATH=os.pathsep.join(path))
        argv = [mpy.binary(), "-X", f"heapsize={self.heapsize}", str(mpy.MPSIDE / "vgsim.py"), str(spec_file)]
        # its own session: Ctrl-C in the terminal reaches the runner, which stops the boards in order
        self.proc = subprocess.Popen(argv, env=env, cwd=self.workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        self._reader = threading.Thread(target=self._read, name=f"console-{self.device}", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        with open(self.console_log, "ab") as log:
            for raw in self.proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", "replace").strip()
                with self._cv:
                    self._lines.append(line)
                    self._cv.notify_all()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check(self) -> None:
        if not self.alive:
            raise BoardGone(f"{self.device}: the simulated board is not running", f"see {self.console_log}", EXIT_FAILURE)

    def console_lines(self) -> list[str]:
        with self._cv:
            return list(self._lines)

    # -- the console

    def _write(self, text: str) -> None:
        self._check()
        with self._write_lock:
            self.proc.stdin.write(text.encode() + b"\n")
            self.proc.stdin.flush()

    def present(self, token: bytes, timeout: float = 10.0) -> str:
        """`present <hex>` on the console, as a phone or a reader hands the
        permit over; the board's answer line (ok ... / refused ... / error ...)."""
        with self._present_lock:
            with self._cv:
                start = len(self._lines)
            self._write(f"present {token.hex()}")
            deadline = time.monotonic() + timeout
            with self._cv:
                while True:
                    for line in self._lines[start:]:
                        if line.split(" ", 1)[0] in ANSWERS:
                            return line
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.alive:
                        raise BoardGone(f"{self.device}: no answer on the console within {timeout:.0f} s", f"see {self.console_log}", EXIT_FAILURE)
                    self._cv.wait(min(left, 0.5))

    # -- the world (vgsim's control channel)

    def world(self, op: str, timeout: float = 10.0, **args) -> dict:
        """One command to the simulated world; its answer (VoltgateError
        when the board does not answer or the command was wrong)."""
        self._check()
        with self._reply_lock:
            self._n += 1
            n = self._n
            with open(self.control, "a") as f:
                f.write(json.dumps({"n": n, "op": op, **args}) + "\n")
        deadline = time.monotonic() + timeout
        while True:
            self._poll_replies()
            with self._reply_lock:
                r = self._replies.pop(n, None)
            if r is not None:
                if "error" in r:
                    raise VoltgateError(f"{self.device}: world {op}: {r['error']}", None, EXIT_FAILURE)
                return r
            if time.monotonic() > deadline or not self.alive:
                raise BoardGone(f"{self.device}: the world did not answer {op} within {timeout:.0f} s", f"see {self.console_log}", EXIT_FAILURE)
            time.sleep(0.02)  # polling a file the board appends to, with a deadline

    def _poll_replies(self) -> None:
        out = Path(str(self.control) + ".out")
        with self._reply_lock:
            try:
                with open(out, "rb") as f:
                    f.seek(self._out_pos)
                    data = f.read()
            except FileNotFoundError:
                return
            end = data.rfind(b"\n") + 1
            self._out_pos += end
            for line in data[:end].splitlines():
                if line.strip():
                    r = json.loads(line)
                    self._replies[r.get("n")] = r

    def state(self) -> dict:
        return self.world("state")

    # -- life cycle

    def stop(self, timeout: float = 5.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdin:
            try:
                proc.stdin.close()
            except OSError:
                pass
        if self._reader is not None:
            self._reader.join(5)

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- a cable that can be pulled ------------------------------------------------------------------


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy what a receives to b until a ends or fails; then shut both down
    (the other direction's pipe ends with them)."""
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Cable:
    """127.0.0.1:<port> -> upstream, any number of connections. cut()
    closes every connection and refuses new ones (closed as they come)
    until restore(): to the board it is a broker that is gone, to the
    broker a client whose connection ended (its last will goes out)."""

    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1", port: int = 0):
        self.upstream = upstream
        self.listener = socket.create_server((host, port))
        self.host, self.port = self.listener.getsockname()[:2]
        self._up = threading.Event()
        self._up.set()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self.cuts = 0
        self._thread = threading.Thread(target=self._accept, name=f"cable-{self.port}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                c.close()
                continue
            try:
                u = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                c.close()
                continue
            u.settimeout(None)
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    def cut(self) -> None:
        self._up.clear()
        self.cuts += 1
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below (a close alone does not)
        except OSError:
            pass
        self.listener.close()
        self.cut()
        self._thread.join(5)


# -- helpers for runners -------------------------------------------------------------------------


def wait_until(cond: Callable[[], object], timeout: float, interval: float = 0.1):
    """cond()'s first true value, or None after timeout (polled: the
    things waited for are in other processes)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def private_keystore() -> tuple[Path, Callable[[], None]]:
    """A fresh master secret in a private temporary folder outside the
    source tree (provisioning refuses keystores and broker folders inside
    it); returns its path and a function that deletes the folder. Other
    secrets of the run (the broker's files) may go beside it."""
    d = Path(tempfile.mkdtemp(prefix="voltgate-keys-"))
    path = d / "master.key"
    keys.create_master(path)
    return path, lambda: shutil.rmtree(d, ignore_errors=True)


def secret() -> str:
    return secrets.token_hex(16)


class ServerProcess:
    """`voltgate server` as its own process (python -m voltgate.cli server),
    as an operator runs it; its output goes to log."""

    def __init__(self, *, db: str, broker: str, password_file: Path, keystore: Path, http: str, pull_interval: float, log: Path, cwd: Path):
        self.argv = [
            sys.executable,
            "-m",
            "voltgate.cli",
            "server",
            "--db",
            db,
            "--broker",
            broker,
            "--broker-password-file",
            str(password_file),
            "--keystore",
            str(keystore),
            "--http",
            http,
            "--pull-interval",
            str(pull_interval),
        ]
        self.log = Path(log)
        self.cwd = cwd
        self.http = http
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        import httpx

        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        url = f"http://{self.http}/health"

        def healthy():
            if self.proc.poll() is not None:
                raise VoltgateError(f"voltgate server exited with status {self.proc.returncode} at start", f"see {self.log}", EXIT_ENVIRONMENT)
            try:
                return httpx.get(url, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(healthy, timeout, 0.2):
            self.stop()
            raise VoltgateError(f"voltgate server did not answer on {url} within {timeout:.0f} s", f"see {self.log}", EXIT_ENVIRONMENT)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # the server stops its gateway and API cleanly
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the runner dies, even by
    SIGKILL (Linux prctl PR_SET_PDEATHSIG), so no board outlives it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the runner's own stop() is all there is


@dataclass
class Closer:
    """An ExitStack that also runs on SIGTERM (turned into KeyboardInterrupt)."""

    stack: ExitStack = field(default_factory=ExitStack)

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, _interrupt)
        self.stack.__enter__()
        return self.stack

    def __exit__(self, *exc):
        try:
            return self.stack.__exit__(*exc)
        finally:
            if self._old is not None:
                signal.signal(signal.SIGTERM, self._old)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
