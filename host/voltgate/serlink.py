"""The serial link, host side (protocol/SPEC.md section 4): link messages in
frames (protocol/framing.py: COBS + CRC32, zero-delimited) on a board's
console line, which the board's text console and mpremote share.

    with SerialTransport("/dev/ttyUSB0") as t:      # or a pty path, or socket://host:port
        board = link.Board(t, "ou-0001", key=k)
        sync.pull(board, store)

SerialTransport is a voltgate.link transport: send() writes one frame,
receive() returns the next good payload. What is not a good frame is
skipped: console text between frames (kept in `console`), and frames the
Deframer rejects (`deframer` counts them: bad CRC, bad COBS, too long).
link.Board resends on timeout.

SimBoard runs a simulated board (mpside/vgsim.py on the MicroPython unix
port) whose console is a pty, for tests and benchmarks.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import subprocess
import threading
import time
import tty
from pathlib import Path
from typing import Callable

import serial

from . import build, mpy, tree, wire
from .errors import EXIT_ENVIRONMENT, VoltgateError

framing = tree.board_modules().framing

BAUDRATE = 115200
#: bytes that make a stretch between zeros console text, not a frame. A
#: frame of a message never passes for text: its second byte is the first
#: byte of a CBOR map (0xa0-0xbf).
_TEXT = bytes(range(0x20, 0x7F)) + b"\t\r\n"


def _is_text(b) -> bool:
    return not bytes(b).translate(None, _TEXT)


class SerialTransport:
    """Frames on a serial line (pyserial: a device, a pty path, or any URL
    serial_for_url takes, e.g. socket://127.0.0.1:4000). One board per line:
    the device argument of send/receive is not needed to address it."""

    def __init__(self, port_or_url: str, baudrate: int = BAUDRATE, *, console_lines: int = 200):
        try:
            self.serial = serial.serial_for_url(port_or_url, baudrate=baudrate, timeout=0, write_timeout=10)
        except (serial.SerialException, ValueError, OSError) as e:
            raise VoltgateError(
                f"cannot open serial port {port_or_url}: {e}",
                "check the port name, and that no terminal or mpremote holds it",
                EXIT_ENVIRONMENT,
            ) from None
        self.port = port_or_url
        self.deframer = framing.Deframer()
        self._cap = framing.max_encoded(wire.MAX_FRAME)
        self._seg = bytearray()  # bytes since the last zero
        self._skip = False  # the segment grew past any frame: drop it up to the next zero
        self._got: collections.deque[bytes] = collections.deque()
        self.console: collections.deque[str] = collections.deque(maxlen=console_lines)
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.text_bytes = 0

    @property
    def bad_frames(self) -> int:
        d = self.deframer
        return d.bad_crc + d.bad_cobs + d.overflows

    # -- the transport

    def send(self, device: str, payload: bytes) -> None:
        # one zero more than the frame's own: a board in text mode switches
        # to link mode on the first, even if noise took the other
        data = b"\x00" + framing.encode(payload)
        try:
            self.serial.write(data)
        except serial.SerialException as e:
            raise VoltgateError(f"cannot write to {self.port}: {e}", "is the board still connected?") from None
        self.tx_bytes += len(data)

    def receive(self, device: str, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while not self._got:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._take(self._read(left))
        return self._got.popleft()

    def _read(self, timeout: float) -> bytes:
        s = self.serial
        try:
            s.timeout = timeout
            data = s.read(1)
            if data and s.in_waiting:
                s.timeout = 0
                data += s.read(s.in_waiting)
        except serial.SerialException as e:
            raise VoltgateError(f"cannot read from {self.port}: {e}", "is the board still connected?") from None
        return data

    # -- splitting the line into frames and text

    def _take(self, data: bytes) -> None:
        self.rx_bytes += len(data)
        for k, part in enumerate(data.split(b"\x00")):
            if k:
                self._end()
            if part and not self._skip:
                self._add(part)

    def _add(self, part: bytes) -> None:
        seg = self._seg
        seg += part
        if b"\n" in part and len(seg) > 1 and _is_text(seg):
            # console text with no zero after it (yet): hand on its lines now
            cut = seg.rfind(b"\n") + 1
            self._text(seg[:cut])
            del seg[:cut]
        if len(seg) > self._cap:
            self.deframer.overflows += 1
            seg.clear()
            self._skip = True

    def _end(self) -> None:
        seg = bytes(self._seg)
        self._seg.clear()
        if self._skip:
            self._skip = False
        elif seg and _is_text(seg):
            self._text(seg)
        elif seg:
            # the Deframer sits at a frame boundary: give it one whole frame
            self._got.extend(self.deframer.feed(seg + b"\x00"))

    def _text(self, b) -> None:
        self.text_bytes += len(b)
        self.console.extend(line for line in bytes(b).decode("ascii").splitlines() if line)

    # -- the console in text mode (after the link has been idle, SPEC.md 4)

    def write_line(self, text: str) -> None:
        """Write a console line (e.g. `present <token>`)."""
        data = text.encode() + b"\r\n"
        self.serial.write(data)
        self.tx_bytes += len(data)

    def read_line(self, timeout: float) -> str | None:
        """The board's next console line, or None after the timeout (frames
        arriving meanwhile wait for receive())."""
        deadline = time.monotonic() + timeout
        while not self.console:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._take(self._read(left))
        return self.console.popleft()

    # -- lifetime

    def close(self) -> None:
        self.serial.close()

    def __enter__(self) -> SerialTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SimBoard:
    """A simulated board in real time (mpside/vgsim.py) with its console on
    a pty, as a board's console is on a UART: the board holds the slave side
    of one pty in raw mode; a relay thread copies between that pty's master
    and the master of a second pty, whose slave path (`port`) is the host's
    end of the line (SerialTransport(board.port)). `line(direction, data)`,
    when given, sees every chunk on its way ("down": host to board, "up":
    board to host) and returns what arrives instead (noise for tests).

    spec: vgsim's spec ({"board", "root", "store", "speed", "unix"}).
    firmware: a build folder (voltgate build) to run from .mpy; None runs
    the sources."""

    def __init__(
        self,
        spec: dict,
        workdir: str | Path,
        *,
        firmware: str | Path | None = None,
        heapsize: int | None = None,
        line: Callable[[str, bytes], bytes] | None = None,
    ):
        self.spec = spec
        self.workdir = Path(workdir)
        self.firmware = firmware
        self.heapsize = heapsize
        self.line = line
        self.bytes_down = 0  # as the host sent them, before `line`
        self.bytes_up = 0
        self.proc: subprocess.Popen | None = None
        self.port = ""
        self._fds: list[int] = []
        self._thread: threading.Thread | None = None

    def start(self) -> SimBoard:
        self.workdir.mkdir(parents=True, exist_ok=True)
        spec_file = self.workdir / "vgsim.json"
        spec_file.write_text(json.dumps(self.spec))
        path = [str(mpy.MPSIDE), *build.board_path(Path(self.firmware))] if self.firmware else mpy.source_path()
        bm, bs = os.openpty()
        hm, hs = os.openpty()
        self._fds = [bm, bs, hm, hs]
        for fd in (bs, hs):
            tty.setraw(fd)  # a UART: no echo, no line editing, no CR/LF changes, 0x03 is a byte
        self._board_fd, self._host_fd = bm, hm
        self.port = os.ttyname(hs)  # hs stays open here: the master never sees a hang-up
        self.stderr_path = self.workdir / "vgsim.stderr"
        argv = [mpy.binary(), *(["-X", f"heapsize={self.heapsize}"] if self.heapsize else []), str(mpy.MPSIDE / "vgsim.py"), str(spec_file)]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=bs, stdout=bs, stderr=err, env=mpy._env(path), close_fds=True)
        os.close(bs)
        self._fds.remove(bs)
        self._wake_r, self._wake_w = os.pipe()
        for fd in (bm, hm):
            os.set_blocking(fd, False)
        self._thread = threading.Thread(target=self._relay, name="simboard-relay", daemon=True)
        self._thread.start()
        return self

    def _relay(self) -> None:
        import select

        bm, hm = self._board_fd, self._host_fd
        pending = {bm: bytearray(), hm: bytearray()}  # what waits to be written to each master
        peer = {bm: hm, hm: bm}
        board_open = True
        while True:
            rd = [self._wake_r, hm] + ([bm] if board_open else [])
            wr = [fd for fd, buf in pending.items() if buf]
            r, w, _ = select.select(rd, wr, [])
            if self._wake_r in r:
                return
            for fd in w:
                try:
                    n = os.write(fd, pending[fd])
                except BlockingIOError:
                    continue
                except OSError:
                    pending[fd].clear()  # the board is gone
                    continue
                del pending[fd][:n]
            for fd in r:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    data = b""
                if not data:
                    board_open = board_open and fd != bm  # EIO: the board exited
                    continue
                up = fd == bm
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                if self.line is not None:
                    data = self.line("up" if up else "down", data)
                pending[peer[fd]] += data

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int | None:
        """The board process's exit status, or None if it still runs after timeout."""
        assert self.proc is not None, "not started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", "replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(5)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._thread = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> SimBoard:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
