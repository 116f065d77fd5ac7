"""`voltgate sim`: a simulated board whose REPL mpremote and pyserial reach
on a pty or loopback TCP, as on a board on a USB cable (voltgate.simboard).

The real mpremote (its command line) runs against it: exec, fs cp with its
hash check, soft-reset and reset; the flash folder is the board's root;
main.py runs at power-up and Ctrl-C stops it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial

from voltgate import tree
from voltgate.simboard import SOFT_REBOOT, SimulatedBoard

ROOT = tree.root()
OUTLET = ROOT / "boards" / "sim-outlet-2.json"
BIN = Path(sys.executable).parent


def mpremote(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mpremote"), "connect", url, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def started():
    sims: list[SimulatedBoard] = []

    def start(flash, **kw) -> SimulatedBoard:
        s = SimulatedBoard(OUTLET, flash, **kw).start()
        sims.append(s)
        return s

    yield start
    for s in sims:
        s.stop()


@pytest.mark.parametrize("listen", ["pty", "tcp"])
def test_mpremote_works_against_the_sim(started, tmp_path, listen):
    flash = tmp_path / "flash"
    sim = started(flash, tcp_port=0 if listen == "tcp" else None)
    assert sim.url.startswith("socket://127.0.0.1:") if listen == "tcp" else sim.url == sim.pty
    r = mpremote(sim.url, "exec", "import os; print(os.getcwd(), sorted(os.listdir('/')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "/ ['board.json']"  # the flash folder is the root; the board file came with it
    src = tmp_path / "hello.py"
    src.write_text("print('hello from flash')\n")
    r = mpremote(sim.url, "fs", "cp", str(src), ":lib/hello.py")
    assert r.returncode != 0  # no /lib yet: mpremote says so, as on a board
    r = mpremote(sim.url, "fs", "mkdir", ":lib", "+", "fs", "cp", str(src), ":lib/hello.py")
    assert r.returncode == 0, r.stderr
    assert (flash / "lib" / "hello.py").read_text() == src.read_text()
    r = mpremote(sim.url, "fs", "cp", str(src), ":lib/hello.py")
    assert "Up to date: lib/hello.py" in r.stdout  # mpremote's hash check (sha256 on the board)
    r = mpremote(sim.url, "exec", "import hello")  # /lib is on the board's module path
    assert r.stdout.strip() == "hello from flash"
    boots = sim.boots
    assert sim.soft_reboots >= 3  # every mpremote command soft-resets the raw REPL: the interpreter was restarted
    assert SOFT_REBOOT in sim.console()
    r = mpremote(sim.url, "reset")
    assert r.returncode == 0, r.stderr
    assert sim.wait(lambda s: s.boots == boots + 1 and s.resets == 1, 10)  # machine.reset(): a power-on boot
    sim.hard_reset()  # the reset button
    assert sim.wait(lambda s: s.boots == boots + 2 and s.resets == 2, 10)
    assert mpremote(sim.url, "exec", "print('up')").stdout.strip() == "up"


def test_main_py_runs_at_power_up_and_ctrl_c_gives_the_repl(started, tmp_path):
    flash = tmp_path / "flash"
    flash.mkdir()
    # a main.py that serves the console as the firmware does: reads it byte by byte, Ctrl-C stops it
    (flash / "main.py").write_text(
        "import sys\nprint('main running')\nwhile True:\n    b = sys.stdin.buffer.read(1)\n    if b == b'\\x03':\n        raise KeyboardInterrupt\n"
    )
    sim = started(flash, tcp_port=0)
    with serial.serial_for_url(sim.url, timeout=5) as s:
        assert _read_until(s, b"main running")
        assert sim.state == "main"
        s.write(b"\x03")
        assert _read_until(s, b">>> ")  # the REPL takes over the line
        s.write(b"print(6 * 7)\r")
        assert _read_until(s, b"42")
    assert sim.state == "repl"
    r = mpremote(sim.url, "exec", "print(6 * 7)")
    assert r.stdout.strip() == "42"
    # mpremote's soft reset in the raw REPL does not run main.py
    assert b"main running" not in sim.console().split(SOFT_REBOOT)[-1]


def test_one_client_at_a_time_and_a_board_file_that_is_not_simulated(started, tmp_path):
    sim = started(tmp_path / "flash", tcp_port=0)
    with serial.serial_for_url(sim.url, timeout=2):
        r = mpremote(sim.url, "exec", "print(1)", timeout=30)
        assert r.returncode != 0  # the line is taken: mpremote cannot get a REPL
    with pytest.raises(Exception) as e:
        SimulatedBoard(ROOT / "boards" / "outlet-2-devkitc.json", tmp_path / "x")
    assert "is not a simulated board" in str(e.value)


def _read_until(s, marker: bytes, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        buf += s.read(max(1, s.in_waiting))
        if marker in buf:
            return True
    return False


def test_voltgate_sim_command(tmp_path):
    """`voltgate sim --json`: says where it listens, mpremote reaches it, SIGTERM stops it cleanly."""
    flash = tmp_path / "flash"
    proc = subprocess.Popen(
        [str(BIN / "voltgate"), "sim", str(OUTLET), "--flash", str(flash), "--tcp", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        info = json.loads(proc.stdout.readline())
        assert info["kind"] == "outlet" and info["url"].startswith("socket://127.0.0.1:") and info["flash"] == str(flash.resolve())
        r = mpremote(info["url"], "exec", "import sys; print(sys.platform)")
        assert r.returncode == 0 and r.stdout.strip() == "linux", r.stderr
        children = _children(proc.pid)
        assert children  # the interpreter
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not [c for c in children if _alive(c)]  # it stopped what it started


def test_voltgate_sim_errors(tmp_path):
    r = subprocess.run([str(BIN / "voltgate"), "sim", str(ROOT / "boards" / "outlet-2-devkitc.json"), "--flash", str(tmp_path / "f")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("voltgate: sim: ") and "is not a simulated board" in r.stderr and "(give a board file with" in r.stderr
    with SimulatedBoard(OUTLET, tmp_path / "a", tcp_port=0) as sim:
        r = subprocess.run([str(BIN / "voltgate"), "sim", str(OUTLET), "--flash", str(tmp_path / "b"), "--tcp", str(sim.port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "cannot listen on 127.0.0.1:" in r.stderr and "Traceback" not in r.stderr


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ctrl_c_breaks_a_reset_loop(started, tmp_path):
    """A main.py that resets at once: a Ctrl-C on the console during a boot gives the
    REPL (as on an ESP32), where mpremote can remove it."""
    flash = tmp_path / "flash"
    flash.mkdir()
    (flash / "main.py").write_text("import machine\nmachine.reset()\n")
    sim = started(flash, tcp_port=0)
    assert sim.wait(lambda s: s.resets >= 2, 10)  # it loops
    with serial.serial_for_url(sim.url, timeout=5) as s:
        s.write(b"\x03")
        assert _read_until(s, b">>> ")
    r = mpremote(sim.url, "fs", "rm", ":main.py")
    assert r.returncode == 0, r.stderr
    assert not (flash / "main.py").exists()
