"""`voltgate sim`: a simulated board that the ESP32 tools talk to as to a real one.

The board is the MicroPython unix port on a folder that stands for its
flash. Its console (the REPL, and while the firmware runs, the firmware's
console with the serial link: firmware/serlink.py) is reachable on a pty
or on a loopback TCP port, so that mpremote (`mpremote connect <pty>` or
`socket://127.0.0.1:<port>`), pyserial, voltgate.serlink.SerialTransport
and `voltgate provision` work against it as against a board on a USB cable.

    with SimulatedBoard("boards/sim-outlet-2.json", "flash/", tcp_port=0) as sim:
        print(sim.url)      # socket://127.0.0.1:40123 (or the pty's path)

How it behaves like a board (mpside/vgboot.py runs inside the interpreter):

- The flash folder is the filesystem root ("/", a VfsPosix mount), with
  the board's module path ("", ".frozen", "/lib"). At power-up, when the
  flash has a /main.py, it runs, as on an ESP32: provisioning leaves one
  that starts the firmware (firmware/main.py with the simulated hardware
  of /board.json, its world following the real clock). /board.json is the
  given board file when the flash has none yet.
- When main.py ends (Ctrl-C on the console: the firmware turns its
  outputs off and stops) the REPL takes over, on the same line.
- The unix port's REPL ends its process on a soft reset (Ctrl-D). The
  simulator then prints the soft-reboot banner ("MPY: soft reboot") and
  starts the interpreter again: in the raw REPL when the soft reset came
  from there (what mpremote does before its commands; main.py does not
  run, as on a board), else at power-up state (main.py runs).
- machine.reset() (and the firmware's own reset) boots the board again
  from power-up: the interpreter exits with vgmachine.RESET and is started
  anew; a Ctrl-C on the console during that boot gives the REPL instead
  (as on an ESP32: a firmware that resets at once stays within reach). The
  simulated RTC does not survive any of these; the store (/data/nvs.json)
  and the files do.

What differs from an ESP32: the unix port has no UART interrupt, so
Ctrl-C interrupts only code that reads the console (the firmware does);
a program started from the REPL that loops forever needs the simulator
restarted. Only one client at a time: on TCP, a second connection is
closed at once (a serial port has one user).
"""

from __future__ import annotations

import collections
import errno
import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import tty
from pathlib import Path

from . import mpy
from .errors import EXIT_ENVIRONMENT, EXIT_USAGE, VoltgateError

RESET = 77  # vgmachine.RESET: the interpreter asked for a power-on boot
SOFT_REBOOT = b"MPY: soft reboot\r\n"
_RAW = b"raw REPL; CTRL-B to exit\r\n"
_FRIENDLY = b'Type "help()" for more information.'
_TAIL = max(len(_RAW), len(_FRIENDLY))
_HOLD_S = 5.0  # longest wait for the raw REPL banner after a soft reset
_QUICK_RESET_S = 0.5  # a boot that resets sooner than this ...
_RESET_PAUSE_S = 1.0  # ... waits this long before the next (a reset loop would spin)
_CONSOLE_KEEP = 64 * 1024
_CLIENT_MAX = 1024 * 1024  # output waiting for a client that does not read: beyond this the oldest goes


class SimulatedBoard:
    """A simulated board serving its console on a pty (tcp_port None) or on
    127.0.0.1:tcp_port (0: a free port). url is what clients open."""

    def __init__(
        self,
        board_file: str | Path,
        flash: str | Path,
        *,
        tcp_port: int | None = None,
        host: str = "127.0.0.1",
        heapsize: int | None = None,
        log: str | Path | None = None,
    ):
        self.board_file = Path(board_file)
        self.flash = Path(flash)
        self.tcp_port = tcp_port
        self.host = host
        self.heapsize = heapsize
        self.log_path = Path(log) if log else None
        self.board = _load_sim_board(self.board_file)
        self.url = ""
        self.pty = None  # the pty's path in pty mode
        self.boots = 0  # interpreter starts at power-up state (main.py ran, if any)
        self.soft_reboots = 0
        self.resets = 0  # power-on boots asked for by the board (machine.reset)
        self.state = "stopped"  # "main" (main.py runs), "repl", "stopped"
        self._console = collections.deque(maxlen=_CONSOLE_KEEP)  # bytes the board wrote, last ones
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._raw = False  # the REPL is in raw mode (from the banners it printed)
        self._tail = b""
        self._hold: bytearray | None = None  # output held back until the raw REPL banner
        self._hold_until = 0.0
        self._to_board = bytearray()
        self._to_client = bytearray()
        self._conn: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._proc_lock = threading.Lock()  # a process is started only while the board is not being stopped
        self._pending_reset = False
        self._ctrl_c = threading.Event()  # the client sent 0x03 during this boot
        self._threads: list[threading.Thread] = []
        self._fds: list[int] = []
        self._logf = None
        self.dropped = 0  # board output lost because no client was reading

    # -- life cycle

    def start(self) -> SimulatedBoard:
        mpy.binary()  # a missing interpreter is an error now, not in a thread
        try:
            self.flash.mkdir(parents=True, exist_ok=True)
            if not (self.flash / "board.json").exists():
                shutil.copyfile(self.board_file, self.flash / "board.json")
        except OSError as e:
            raise VoltgateError(f"cannot use {self.flash} as the flash folder: {e.strerror}", "give a folder (it is made if missing)", EXIT_USAGE) from None
        if self.log_path:
            self._logf = open(self.log_path, "ab")
        im, is_ = os.openpty()  # the interpreter's console (a UART)
        tty.setraw(is_)  # no echo, no line editing, no CR/LF changes, 0x03 is a byte
        self._im, self._is = im, is_
        self._fds = [im, is_]
        if self.tcp_port is None:
            hm, hs = os.openpty()  # the host's end of the cable
            tty.setraw(hs)
            self._hm = hm
            self._fds += [hm, hs]  # hs stays open here: the master never sees a hang-up
            self.pty = os.ttyname(hs)
            self.url = self.pty
        else:
            self._hm = None
            try:
                self._listener = socket.create_server((self.host, self.tcp_port))
            except OSError as e:
                self._close_fds()
                raise VoltgateError(
                    f"cannot listen on {self.host}:{self.tcp_port}: {e.strerror}",
                    "the port is taken: choose another, or 0 for a free one",
                    EXIT_ENVIRONMENT,
                ) from None
            self.url = f"socket://{self.host}:{self._listener.getsockname()[1]}"
        self._wake_r, self._wake_w = os.pipe()
        for fd in [im] + ([self._hm] if self._hm is not None else []):
            os.set_blocking(fd, False)
        self._threads = [
            threading.Thread(target=self._relay, name="sim-relay", daemon=True),
            threading.Thread(target=self._supervise, name="sim-supervisor", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop the interpreter and the relay; the flash stays as it is."""
        self._stop.set()
        self._ctrl_c.set()  # wakes a supervisor pausing between resets
        with self._proc_lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._threads:
            os.write(self._wake_w, b"x")
            for t in self._threads:
                t.join(10)
            self._threads = []
            os.close(self._wake_r)
            os.close(self._wake_w)
        for s in (self._conn, self._listener):
            if s is not None:
                s.close()
        self._conn = self._listener = None
        self._close_fds()
        if self._logf:
            self._logf.close()
            self._logf = None
        with self._changed:
            self.state = "stopped"
            self._changed.notify_all()

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> SimulatedBoard:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int | None:
        """The TCP port (TCP mode)."""
        return self._listener.getsockname()[1] if self._listener else None

    def console(self) -> bytes:
        """The last 64 KB the board wrote to its console."""
        with self._lock:
            return bytes(self._console)

    def wait(self, predicate, timeout: float) -> bool:
        """Wait until predicate(self) holds (checked at every boot and state
        change); False after timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def hard_reset(self) -> None:
        """Power-cycle the board: the interpreter is stopped and boots again
        (main.py runs). What a reset button does."""
        proc = self._proc
        self._pending_reset = True
        if proc is not None and proc.poll() is None:
            proc.kill()

    # -- the interpreter, one boot after another

    def _argv(self, mode: str) -> list[str]:
        argv = [mpy.binary()]
        if self.heapsize:
            argv += ["-X", f"heapsize={self.heapsize}"]
        if mode != "main":
            argv.append("-i")
        return argv + [str(mpy.MPSIDE / "vgboot.py"), "main" if mode == "main" else "repl"]

    def _supervise(self) -> None:
        env = dict(os.environ)
        env["MICROPYPATH"] = str(mpy.MPSIDE)  # vgboot's own helpers; it sets the board's path itself
        env["VGSIM_FLASH"] = str(self.flash.resolve())
        mode = "main"
        while not self._stop.is_set():
            with self._changed:
                if mode == "main":
                    self.boots += 1
                    self._ctrl_c.clear()
                self.state = "main" if mode == "main" else "repl"
                self._raw = False
                if mode == "raw":
                    # the unix port starts in the friendly REPL: enter the raw
                    # one for it, and show the client only what a board shows
                    # after "soft reboot": the raw REPL banner
                    self._hold = bytearray()
                    self._hold_until = time.monotonic() + _HOLD_S
                    self._to_board[:0] = b"\x01"
                self._changed.notify_all()
            started = time.monotonic()
            with self._proc_lock:
                if self._stop.is_set():
                    break
                self._proc = subprocess.Popen(
                    self._argv(mode), stdin=self._is, stdout=self._is, stderr=self._is, env=env, cwd=self.flash, close_fds=True
                )
            self._kick()
            rc = self._proc.wait()
            if self._stop.is_set():
                break
            if rc == RESET or self._pending_reset:
                self._pending_reset = False
                with self._lock:
                    self.resets += 1
                if time.monotonic() - started < _QUICK_RESET_S:
                    self._ctrl_c.wait(_RESET_PAUSE_S)  # a reset loop would spin; a Ctrl-C ends the pause
                    if self._stop.is_set():
                        break
                # Ctrl-C while main.py was booting: the REPL, as an ESP32 gives it
                # (a firmware that resets at once is otherwise out of reach)
                mode = "repl" if mode == "main" and self._ctrl_c.is_set() else "main"
            elif mode == "main":
                mode = "repl"  # main.py ended (or there was none): the REPL
            else:
                # the REPL ended: a soft reset (Ctrl-D, sys.exit)
                with self._lock:
                    raw = self._raw
                    self.soft_reboots += 1
                self._emit(SOFT_REBOOT)
                mode = "raw" if raw else "main"

    # -- the relay between the interpreter's console and the client

    def _kick(self) -> None:
        os.write(self._wake_w, b"k")

    def _emit(self, data: bytes) -> None:
        """Bytes to the client as if the board had written them."""
        with self._lock:
            self._record(data)
            self._to_client += data
        self._kick()

    def _record(self, data: bytes) -> None:
        self._console.extend(data)
        if self._logf:
            self._logf.write(data)
            self._logf.flush()

    def _from_board(self, data: bytes) -> None:
        with self._lock:
            self._record(data)
            seen = self._tail + data
            r, f = seen.rfind(_RAW), seen.rfind(_FRIENDLY)
            if r >= 0 or f >= 0:
                self._raw = r > f
            self._tail = seen[-_TAIL:]
            if self._hold is not None:
                self._hold += data
                i = self._hold.find(_RAW)
                if i < 0 and time.monotonic() < self._hold_until:
                    return
                data = bytes(self._hold[max(i, 0) :])
                self._hold = None
            self._to_client += data
            over = len(self._to_client) - _CLIENT_MAX
            if over > 0:
                self.dropped += over
                del self._to_client[:over]

    def _relay(self) -> None:
        im, hm = self._im, self._hm
        while not self._stop.is_set():
            rd = [self._wake_r, im]
            if hm is not None:
                rd.append(hm)
            if self._listener is not None:
                rd.append(self._listener)
            if self._conn is not None:
                rd.append(self._conn)
            wr = []
            with self._lock:
                if self._to_board:
                    wr.append(im)
                if self._to_client and hm is not None:
                    wr.append(hm)
                elif self._to_client and self._conn is not None:
                    wr.append(self._conn)
                elif self._to_client:
                    self.dropped += len(self._to_client)  # nobody on the line
                    self._to_client.clear()
            timeout = 0.2 if self._hold is not None else None  # let a held banner time out
            r, w, _ = select.select(rd, wr, [], timeout)
            if self._wake_r in r:
                os.read(self._wake_r, 4096)
            if im in r:
                data = _read(im)
                if data:
                    self._from_board(data)
            if self._hold is not None:
                self._from_board(b"")
            if hm is not None and hm in r:
                data = _read(hm)
                if data:
                    self._client_sent(data)
            if self._listener is not None and self._listener in r:
                self._accept()
            if self._conn is not None and self._conn in r:
                try:
                    data = self._conn.recv(65536)
                except OSError:
                    data = b""
                if data:
                    self._client_sent(data)
                else:
                    self._drop_client()
            for fd in w:
                self._write(fd)

    def _client_sent(self, data: bytes) -> None:
        if b"\x03" in data:
            self._ctrl_c.set()
        with self._lock:
            self._to_board += data

    def _accept(self) -> None:
        conn, _ = self._listener.accept()
        if self._conn is not None:
            conn.close()  # one user at a time, as on a serial port
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(False)
        self._conn = conn
        with self._lock:
            self._to_client.clear()  # a new client does not get what nobody read

    def _drop_client(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _write(self, target) -> None:
        with self._lock:
            buf = self._to_board if target == self._im else self._to_client
            data = bytes(buf)
        try:
            if isinstance(target, socket.socket):
                n = target.send(data)
            else:
                n = os.write(target, data)
        except BlockingIOError:
            n = 0
            if target == self._hm:
                # nobody reads the pty and its buffer is full: the bytes are lost,
                # as on a UART with no one listening
                with self._lock:
                    self.dropped += len(buf)
                    buf.clear()
                return
        except OSError:
            if isinstance(target, socket.socket):
                self._drop_client()
                return
            n = len(data)  # the interpreter's side is gone (between two boots)
        with self._lock:
            del buf[:n]


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""
    except OSError as e:
        if e.errno == errno.EIO:  # no process on the pty (between two boots)
            return b""
        raise


def _load_sim_board(path: Path) -> dict:
    try:
        board = json.loads(path.read_text())
    except FileNotFoundError:
        raise VoltgateError(f"no board file at {path}", "give one of boards/sim-*.json", EXIT_USAGE) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VoltgateError(f"{path} is not JSON: {e}", "check it with `voltgate boards validate`", EXIT_USAGE) from None
    if not isinstance(board, dict) or board.get("hal") != "sim":
        raise VoltgateError(
            f"{path} is not a simulated board (its hal is {board.get('hal') if isinstance(board, dict) else None!r}, not 'sim')",
            "give a board file with \"hal\": \"sim\", e.g. boards/sim-outlet-2.json",
            EXIT_USAGE,
        )
    return board
