"""Flashing an ESP32 through its ROM bootloader, with esptool as a library
(esptool v5: esptool.cmds.detect_chip, run_stub, write_flash, verify_flash).

    with Chip.connect("/dev/ttyUSB0", expect="esp32") as chip:
        mac = chip.mac()
        changed = chip.write([Region(0x1000, image, "firmware"), Region(0x9000, nvs_bin, "nvs")], progress=cb)

write() writes only the regions whose MD5 in flash differs, then checks
every region it wrote by MD5 (esptool's verify-flash): a re-run on a chip
that holds the same bytes writes nothing. esptool's own output is caught
(kept in Chip.output) and its progress bar goes to progress(name, done, total).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from .errors import EXIT_ENVIRONMENT, EXIT_FAILURE, EXIT_USAGE, VoltgateError

FIRMWARE_OFFSET = {"esp32": 0x1000}  # where MicroPython's merged image goes (bootloader offset)
BUSY_HINT = "close the program that holds the port (mpremote, a terminal, voltgate board, a running `voltgate sim` client)"


@dataclass(frozen=True)
class Region:
    address: int
    data: bytes
    name: str


def chip_key(name: str) -> str:
    """esptool's chip name ("ESP32-S3") as a board file spells it ("esp32s3")."""
    return name.lower().replace("-", "")


def check_image(data: bytes, chip: str, name: str = "firmware image") -> str:
    """Check that data is an ESP32 firmware image for chip (the board file's
    chip); returns a one-line description. Raises VoltgateError otherwise."""
    from esptool.bin_image import LoadFirmwareImage
    from esptool.targets import CHIP_DEFS

    if not data or data[0] != 0xE9:
        raise VoltgateError(
            f"{name} is not an ESP32 firmware image (no image header)",
            "give MicroPython's firmware .bin for the chip (e.g. ESP32_GENERIC-*.bin), not a .uf2, .elf or .hex",
            EXIT_USAGE,
        )
    want = CHIP_DEFS.get(chip)
    if want is None:
        raise VoltgateError(f"unknown chip {chip!r}", "the board file's chip must be one esptool knows, e.g. esp32", EXIT_USAGE)
    try:
        img = LoadFirmwareImage(chip, data)  # the ESP32 family shares the header layout
    except Exception as e:  # esptool raises FatalError, struct.error, RuntimeError ...
        raise VoltgateError(f"{name} cannot be read as an ESP32 firmware image: {e}", "give MicroPython's firmware .bin for the chip", EXIT_USAGE) from None
    if img.chip_id != want.IMAGE_CHIP_ID:
        made_for = next((k for k, c in CHIP_DEFS.items() if getattr(c, "IMAGE_CHIP_ID", None) == img.chip_id and k != "esp8266"), f"chip id {img.chip_id}")
        raise VoltgateError(
            f"{name} is an image for another chip: it was built for {made_for}, the board file says {chip}",
            f"download the MicroPython firmware for {chip} (https://micropython.org/download/), or fix the board file's chip",
            EXIT_USAGE,
        )
    return f"{want.CHIP_NAME} image, {len(data)} bytes"


def _logger_class():
    from esp_pylib.logger import EspLogBase

    class Catch(EspLogBase):
        """esptool's output into a list; its progress bar to a callback."""

        def __init__(self, lines: list[str], progress):
            self.lines = lines
            self._cb = progress

        def print(self, *args, **kwargs):
            self.lines.append(" ".join(str(a) for a in args))

        def err(self, *args, suggestion=None):
            self.print("error:", *args)

        def warn(self, *args, suggestion=None):
            self.print("warning:", *args)

        def note(self, *args):
            self.print("note:", *args)

        def hint(self, *args):
            self.print("hint:", *args)

        def debug(self, *args):
            pass

        def set_verbosity(self, mode):
            pass

        def progress_bar(self, cur_iter, total_iters, prefix="", suffix="", bar_length=30):
            if self._cb is not None:
                self._cb(cur_iter, total_iters)

    return Catch


@contextmanager
def _caught(lines: list[str], progress=None):
    """esptool's logger replaced by one that keeps its lines, for the block."""
    from esp_pylib.logger import EspLog

    old = EspLog.instance
    EspLog.instance = _logger_class()(lines, progress)
    try:
        yield
    finally:
        EspLog.instance = old


def _problem(e: BaseException, port: str) -> VoltgateError:
    """An esptool or serial failure as the user should read it."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    low = text.lower()
    if "busy or doesn't exist" in low:  # esptool cannot tell the two apart
        return VoltgateError(f"cannot open {port}: it is busy or not there", f"check the port name and the cable; {BUSY_HINT}", EXIT_ENVIRONMENT)
    if "busy" in low or "exclusively lock" in low or "resource temporarily unavailable" in low:
        return VoltgateError(f"port {port} is busy: {text}", BUSY_HINT, EXIT_ENVIRONMENT)
    if "could not open" in low or "no such file" in low or "connection refused" in low or "could not connect" in low:
        return VoltgateError(f"cannot open {port}: {text}", "check the cable and the port name (voltgate sim prints its own)", EXIT_ENVIRONMENT)
    if "failed to connect" in low or "timed out waiting for packet" in low or "no serial data" in low:
        return VoltgateError(
            f"no ROM bootloader answers on {port}: {text}",
            "hold BOOT while pressing EN/RESET to enter the bootloader, then retry",
            EXIT_ENVIRONMENT,
        )
    return VoltgateError(f"esptool on {port}: {text}", None, EXIT_FAILURE)


class Chip:
    """An ESP32 in its ROM bootloader (with esptool's stub flasher running)."""

    def __init__(self, esp, port: str):
        self.esp = esp
        self.port = port
        self.output: list[str] = []

    @classmethod
    def connect(cls, port: str, *, expect: str | None = None, reset: str = "default-reset", attempts: int = 3) -> Chip:
        """Connect, detect the chip (it must be `expect` when given) and
        start the stub flasher."""
        from esptool.cmds import detect_chip, run_stub

        lines: list[str] = []
        esp = None
        try:
            with _caught(lines):
                esp = detect_chip(port, connect_mode=reset, connect_attempts=attempts)
                found = chip_key(esp.CHIP_NAME)
                if expect is not None and found != expect:
                    raise VoltgateError(
                        f"wrong chip on {port}: it is an {esp.CHIP_NAME}, the board file says {expect}",
                        "check the port (is this the board you meant?) or the board file's chip",
                        EXIT_USAGE,
                    )
                esp = run_stub(esp)
        except VoltgateError:
            _close(esp)
            raise
        except Exception as e:  # FatalError, SerialException, OSError ...
            _close(esp)
            raise _problem(e, port) from None
        chip = cls(esp, port)
        chip.output = lines
        return chip

    @property
    def name(self) -> str:
        return chip_key(self.esp.CHIP_NAME)

    def description(self) -> str:
        with _caught(self.output):
            return self.esp.get_chip_description()

    def mac(self) -> str:
        """The base MAC address, as 12 lowercase hex digits."""
        try:
            with _caught(self.output):
                mac = self.esp.read_mac()
        except Exception as e:
            raise _problem(e, self.port) from None
        return bytes(mac).hex()

    def holds(self, region: Region) -> bool:
        """Whether the flash holds region's bytes already (by MD5)."""
        data = _pad4(region.data)
        try:
            with _caught(self.output):
                return self.esp.flash_md5sum(region.address, len(data)) == hashlib.md5(data).hexdigest()
        except Exception as e:
            raise _problem(e, self.port) from None

    def write(self, regions: list[Region], progress: Callable[[str, int, int], None] | None = None) -> list[str]:
        """Write the regions that differ, then verify them by MD5; returns the
        names written."""
        from esptool.cmds import verify_flash, write_flash

        written = []
        for r in regions:
            if self.holds(r):
                continue
            cb = (lambda done, total, name=r.name: progress(name, done, total)) if progress else None
            try:
                with _caught(self.output, cb):
                    write_flash(self.esp, [(r.address, r.data)])
                    verify_flash(self.esp, [(r.address, r.data)])
            except Exception as e:
                err = _problem(e, self.port)
                err.problem = f"writing {r.name} at {r.address:#x}: {err.problem}"
                raise err from None
            written.append(r.name)
        return written

    def verify(self, regions: list[Region]) -> None:
        """esptool's verify-flash (by MD5) of every region."""
        from esptool.cmds import verify_flash

        try:
            with _caught(self.output):
                verify_flash(self.esp, [(r.address, r.data) for r in regions])
        except Exception as e:
            err = _problem(e, self.port)
            err.problem = f"verify: {err.problem}"
            raise err from None

    def close(self, reset: bool = True) -> None:
        """Leave the bootloader: a hard reset (RTS) starts the new firmware."""
        if reset:
            try:
                with _caught(self.output):
                    self.esp.hard_reset()
            except Exception:
                pass  # the port may be gone; the board will start on its own power cycle
        _close(self.esp)

    def __enter__(self) -> Chip:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pad4(data: bytes) -> bytes:
    return data + b"\xff" * (-len(data) % 4)


def _close(esp) -> None:
    if esp is not None:
        try:
            esp._port.close()
        except Exception:
            pass
