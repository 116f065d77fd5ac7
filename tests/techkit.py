"""Helpers for the technician tests (test_provision.py, test_cli_tech.py):
the mock ESP32 ROM bootloader as a process, firmware images, a TCP proxy
that can pull the cable, and running `voltgate` in-process."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from voltgate import broker, cli

BIN = Path(sys.executable).parent


@contextmanager
def mock_rom(chip: str = "esp32"):
    """esp32-mock-bootloader on a free loopback port; yields its socket:// URL."""
    for _ in range(5):
        port = broker.free_port()
        proc = subprocess.Popen(
            [str(BIN / "esp32-mock-bootloader"), "run", "--chip", chip, "--port", str(port), "--bind", "127.0.0.1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out = b""
        deadline = time.monotonic() + 15
        while b"listening on" not in out and proc.poll() is None and time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 0.2)
            if r:
                out += proc.stdout.read1(4096)
        if b"listening on" in out:
            break
        proc.kill()
        proc.wait()
    else:
        raise RuntimeError(f"the mock bootloader did not start: {out!r}")
    try:
        yield f"socket://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _app(chip: str, size: int) -> bytes:
    from esptool.bin_image import ELFSection, ESP32FirmwareImage, ESP32S3FirmwareImage

    img = {"esp32": ESP32FirmwareImage, "esp32s3": ESP32S3FirmwareImage}[chip]()
    img.entrypoint = 0x40080000
    img.segments = [ELFSection(b".dram0.data", 0x3FFB0000, bytes(i * 7 & 0xFF for i in range(size)), 0)]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        img.save(str(Path(d) / "app.bin"))
        return (Path(d) / "app.bin").read_bytes()


def esp_image(path: Path, chip: str = "esp32") -> Path:
    """A firmware .bin laid out as MicroPython's for the ESP32 (written at
    0x1000): a bootloader image, 0xFF up to the app at 0x10000 (over the
    partition table's place and the NVS partition at 0x9000), then an app
    image; both images made by esptool's own image writer."""
    boot = _app(chip, 16 * 1024)
    app = _app(chip, 32 * 1024)
    data = boot + b"\xff" * (0x10000 - 0x1000 - len(boot)) + app
    path.write_bytes(data)
    return path


class Proxy:
    """127.0.0.1:<port> -> upstream, for one client at a time; cut() closes
    both ends (the cable pulled). TCP_NODELAY on both sides, as the host's
    and the simulator's own sockets have."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"socket://127.0.0.1:{self.port}"
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.upstream))
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [c, u]
            for a, b in ((c, u), (u, c)):
                t = threading.Thread(target=self._pipe, args=(a, b), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
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

    def cut(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()
        for t in self._threads:
            t.join(5)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`voltgate <argv>` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err
