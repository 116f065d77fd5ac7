"""Helpers for the technician tests (test_provision.py, test_cli_tech.py):
the mock ESP32 ROM bootloader as a process, firmware images, a TCP proxy
that can pull the cable, and running `voltgate` in-process."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from voltgate import broker, cli, simrun

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


class Proxy(simrun.Cable):
    """127.0.0.1:<port> -> the simulator's REPL port: simrun.Cable, whose
    cut() here closes the connections and takes new ones again at once
    (a cable pulled and plugged back in)."""

    def __init__(self, upstream_port: int):
        super().__init__(("127.0.0.1", upstream_port))
        self.url = f"socket://127.0.0.1:{self.port}"

    def cut(self) -> None:
        super().cut()
        self.restore()


def wait_for(cond, what: str, timeout: float = 20.0, interval: float = 0.02):
    """cond()'s first true value; the test fails after timeout seconds
    (simrun.wait_until polls it: what is waited for is in another thread or
    process)."""
    got = simrun.wait_until(cond, timeout, interval)
    assert got, f"timed out waiting for {what} ({timeout} s)"
    return got


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`voltgate <argv>` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def vg(capsys, *argv) -> tuple[int, str, str]:
    """run_cli(), asserting that no traceback was printed: a command fails
    with a message."""
    rc, out, err = run_cli(capsys, *argv)
    assert "Traceback" not in out + err
    return rc, out, err
