"""A board's REPL through mpremote (as a library: mpremote.transport_serial),
for provisioning: what MicroPython the board runs, its identity entries,
uploading files with mpremote's hash check, and a reset.

    with Repl.open("/dev/ttyUSB0") as r:        # or a pty, or socket://127.0.0.1:PORT
        r.micropython()                         # {"version": "1.29.0", "mpy": "6.3", ...}
        r.sync([("/permit.mpy", data), ...])    # writes only what differs (sha256 on the board)
        r.reset()                               # machine.reset(): the firmware starts

Opening stops whatever the board runs (mpremote's Ctrl-C: the firmware
turns its outputs off, protocol/SPEC.md 4) and soft-resets it into the raw
REPL. A board whose console is in link mode (a link frame in the last 10 s)
takes that Ctrl-C as frame data; opening then waits out the idle time and
tries once more.

A file is written under a temporary name and renamed over the old one, so
a cable pulled mid-upload leaves the board with whole files only (old or
new); running the upload again finishes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from typing import Callable

from .errors import EXIT_ENVIRONMENT, EXIT_FAILURE, VoltgateError
from .flashing import BUSY_HINT

CHUNK = 1024  # bytes per raw-REPL exec while writing a file (mpremote: 256; an ESP32 has the heap for more)
OPEN_TIMEOUT = 10.0  # serial read timeout: a board that stops answering is an error, not a hang


class ReplError(VoltgateError):
    pass


def _quiet():
    """mpremote prints what it read when it fails; keep that off our stdout."""
    return contextlib.redirect_stdout(io.StringIO())


class Repl:
    def __init__(self, transport, port: str):
        self.t = transport
        self.port = port

    @classmethod
    def open(cls, port: str, *, attempts: int = 2) -> Repl:
        from mpremote.transport import TransportError
        from mpremote.transport_serial import SerialTransport

        _can_open(port)
        try:
            with _quiet():
                t = SerialTransport(port, baudrate=115200, timeout=OPEN_TIMEOUT)
        except TransportError as e:
            raise _open_problem(port, e) from None
        sock = getattr(t.serial, "_socket", None)  # socket://: raw-paste's many small writes must not wait on Nagle
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        r = cls(t, port)
        last = None
        for _ in range(attempts):
            try:
                with _quiet():
                    t.enter_raw_repl(soft_reset=True)
                return r
            except (TransportError, OSError) as e:  # SerialException is an OSError
                last = e
        r.close()
        raise ReplError(
            f"no MicroPython REPL on {port}: {_first_line(last)}",
            "is MicroPython flashed and the board powered? a board that just used the serial link needs 10 s of quiet first",
            EXIT_ENVIRONMENT,
        )

    def close(self) -> None:
        try:
            with _quiet():
                if self.t.in_raw_repl:
                    self.t.exit_raw_repl()
                self.t.close()
        except Exception:
            pass  # the port may be gone already

    def __enter__(self) -> Repl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running code

    def exec(self, code: str) -> bytes:
        from mpremote.transport import TransportError, TransportExecError

        try:
            with _quiet():
                return self.t.exec(code)
        except TransportExecError as e:
            raise ReplError(f"the board raised: {e.error_output.strip().splitlines()[-1]}", None, EXIT_FAILURE) from None
        except (TransportError, OSError, ValueError) as e:  # ValueError: struct errors on a short read
            raise ReplError(f"lost the REPL on {self.port}: {_first_line(e)}", "check the cable, then run the same command again", EXIT_ENVIRONMENT) from None

    def eval(self, expr: str):
        import ast

        return ast.literal_eval(self.exec(f"print(repr({expr}))").decode().strip())

    def micropython(self) -> dict:
        """The board's MicroPython: version (major.minor.micro), the .mpy
        format it loads ("6.3"), platform ("esp32", "linux") and machine."""
        self.exec("import sys")
        v, mpy, platform, machine = self.eval("(tuple(sys.implementation.version[:3]), sys.implementation._mpy, sys.platform, sys.implementation._machine)")
        return {"version": ".".join(map(str, v)), "mpy": f"{mpy & 0xFF}.{(mpy >> 8) & 3}", "platform": platform, "machine": machine}

    # -- files

    def sync(self, files: list[tuple[str, bytes]], progress: Callable[[str, int, int], None] | None = None) -> tuple[list[str], list[str]]:
        """Make each remote path hold its bytes: a file whose SHA-256 on the
        board matches is left alone (mpremote's hash check), others are
        written (under path + ".part", then renamed). progress(path, done,
        total) after every chunk. Returns (written, unchanged)."""
        written, same = [], []
        dirs = sorted({p.rsplit("/", 1)[0] for p, _ in files if p.rsplit("/", 1)[0]})
        for d in dirs:
            self._mkdirs(d)
        for path, data in files:
            if self._sha256(path) == hashlib.sha256(data).digest():
                same.append(path)
                if progress:
                    progress(path, len(data), len(data))
                continue
            self._write(path, data, progress)
            written.append(path)
        return written, same

    def _sha256(self, path: str) -> bytes | None:
        try:
            with _quiet():
                return self.t.fs_hashfile(path, "sha256")
        except OSError:
            return None  # no such file
        except Exception as e:
            if "ENOENT" in str(e):
                return None
            raise ReplError(f"lost the REPL on {self.port}: {_first_line(e)}", "check the cable, then run the same command again", EXIT_ENVIRONMENT) from None

    def _mkdirs(self, path: str) -> None:
        self.exec(f"import os\np=''\nfor d in {path!r}.strip('/').split('/'):\n p+='/'+d\n try:\n  os.mkdir(p)\n except OSError:\n  pass\n")

    def _write(self, path: str, data: bytes, progress) -> None:
        part = path + ".part"
        self.exec(f"f=open({part!r},'wb')\nw=f.write")
        done = 0
        while done < len(data):
            chunk = data[done : done + CHUNK]
            self.exec("w(" + repr(chunk) + ")")
            done += len(chunk)
            if progress:
                progress(path, done, len(data))
        if not data and progress:
            progress(path, 0, 0)
        # a rename over the old file: whole files only, old or new (LittleFS
        # renames atomically; FAT needs the old one removed first)
        self.exec(f"f.close()\nimport os\ntry:\n os.rename({part!r},{path!r})\nexcept OSError:\n os.remove({path!r})\n os.rename({part!r},{path!r})\n")

    def remove(self, path: str) -> bool:
        try:
            self.exec(f"import os\nos.remove({path!r})")
            return True
        except ReplError as e:
            if e.exit_code == EXIT_FAILURE:  # the board's OSError: no such file
                return False
            raise

    def reset(self) -> None:
        """machine.reset(): the board starts again from power-up (main.py runs)."""
        from mpremote.transport import TransportError

        try:
            with _quiet():
                self.t.exec_raw_no_follow("import machine\nmachine.reset()")
        except (TransportError, OSError) as e:
            raise ReplError(f"could not reset the board on {self.port}: {_first_line(e)}", "press its reset button", EXIT_ENVIRONMENT) from None
        self.t.in_raw_repl = False  # a new boot: nothing to leave
        self.close()


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _can_open(port: str) -> None:
    """Open and close the port as mpremote will (exclusively), for an error
    that says why (mpremote's own says only "failed to access")."""
    import serial

    try:
        s = serial.serial_for_url(port, baudrate=115200, exclusive=True, timeout=0)
    except (serial.SerialException, OSError, ValueError) as e:
        raise _open_problem(port, e) from None
    s.close()


def _open_problem(port: str, e: Exception) -> ReplError:
    text = _first_line(e)
    low = text.lower()
    if "lock" in low or "busy" in low:
        return ReplError(f"port {port} is busy ({text})", BUSY_HINT, EXIT_ENVIRONMENT)
    return ReplError(f"cannot open {port} ({text})", "check the cable and the port name; a simulated board prints its own (voltgate sim)", EXIT_ENVIRONMENT)
