"""The voltgate command: the demo end to end, and the error contract."""

import json
import os
import subprocess
import sys

from voltgate import cli, demo, wire


def test_demo_runs_every_step_on_micropython(firmware_build, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--firmware", str(firmware_build), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report) == 9
    assert all(r["board"] == r["expected"] == r["host"] for r in report)
    assert {r["expected"] for r in report} >= {"ok", "replayed", "bad_mac", "expired", "time_untrusted", "out_of_scope"}
    key = out / "master.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.read_bytes().hex() not in capsys.readouterr().out


def test_demo_exits_1_when_a_verdict_differs(firmware_build, tmp_path, monkeypatch):
    real = demo.scenario

    def wrong(master, now):
        steps = real(master, now)
        steps[0].expect = "expired"  # the board will say ok
        return steps

    monkeypatch.setattr(demo, "scenario", wrong)
    assert cli.main(["demo", "--firmware", str(firmware_build), "--out", str(tmp_path)]) == 1


def test_errors_are_one_line_with_a_hint_and_an_exit_code(tmp_path):
    env = dict(os.environ, VOLTGATE_TREE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "voltgate.cli", "build", "--out", str(tmp_path / "fw")], env=env, capture_output=True, text=True)
    assert proc.returncode == 3
    assert proc.stderr.startswith("voltgate: build: no voltgate source tree at ")
    assert "(set VOLTGATE_TREE" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_commands_and_exit_codes():
    proc = subprocess.run([sys.executable, "-m", "voltgate.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for word in ("build", "demo", "exit codes:", "examples:"):
        assert word in proc.stdout


def test_reason_names_are_unique_and_stable():
    # the codes are on the wire and in logs: append only (protocol/wire.py)
    assert len(set(wire.REASON_NAMES)) == len(wire.REASON_NAMES)
    assert wire.REASON_CODES["ok"] == 0 and wire.REASON_CODES["bad_mac"] == 6 and wire.REASON_CODES["out_of_scope"] == 14
