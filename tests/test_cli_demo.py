"""The voltgate command: the demo end to end (in its --quick form: broker,
server, four provisioned simulated boards, the whole scenario), a demo that
stops at a step that did not happen, and the error contract."""

import json
import os
import subprocess
import sys
from pathlib import Path

from voltgate import cli, demo, wire


def _running(under: Path) -> list[str]:
    """Processes whose command line names a path under `under` (boards, server, broker)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(under) in cmd:
            found.append(f"{p.name}: {cmd}")
    return found


def test_demo_quick_plays_the_whole_scenario(firmware_build, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--firmware", str(firmware_build), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and all(s["ok"] for s in report["steps"]) and len(report["steps"]) == 23
    steps = {s["title"].split(":")[0]: s for s in report["steps"]}
    details = "\n".join(d for s in report["steps"] for d in s["details"])
    # the boards said it on their consoles
    for answer in ("st-a console: ok slot", "st-b console: ok slot", "ou-1 console: refused bad_mac", "ou-2 console: ok outlet 0", "ou-2 console: refused replayed"):
        assert answer in details, answer
    assert "code insufficient_funds" in steps["carol asks for a rent permit at st-a"]["details"][0]
    # and the server booked it: the rental across stations, the offline session, fees and points
    facts = report["facts"]
    assert facts["session"]["device"] == "ou-2" and facts["session"]["energy_mwh"] > 0 and facts["session"]["reason"] == "exp"
    users = {u["user"]: u for u in facts["users"]}
    assert users["alice"]["taken_wh"] == 275 and users["alice"]["fee_cents"] == 100
    assert users["bob"]["points_earned"] == 150 and users["bob"]["points_spent"] == 50 and users["bob"]["fee_cents"] == 50
    st_b = {x["slot"]: x for x in facts["stations"]["st-b"]}
    assert any(x["battery"] == "0b00000000a1c3e5" for x in st_b.values())  # rented at st-a, now at st-b
    assert facts["ledger"]["entries"] == 8
    # what it leaves: the database (the ledger verifies from the command line), logs, no master secret
    assert cli.main(["ledger", "verify", "--db", f"sqlite:///{out / 'voltgate.sqlite'}"]) == 0
    assert (out / "logs" / "server.log").stat().st_size > 0 and (out / "boards" / "ou-2" / "console.log").exists()
    assert not list(out.rglob("master.key"))
    assert f"voltgate ledger verify --db sqlite:///{out / 'voltgate.sqlite'}" in text
    # and nothing it started still runs
    assert _running(out) == []


def test_demo_exits_1_when_a_step_does_not_happen(firmware_build, tmp_path, monkeypatch, capsys):
    # carol has paid in: her request is granted, so the refusal the scenario expects does not happen
    monkeypatch.setattr(demo, "USERS", tuple((u, n, 5000) for u, n, _ in demo.USERS))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert not report["ok"]
    last = report["steps"][-1]
    assert last["title"].startswith("carol asks for a rent permit") and last["ok"] is False
    assert "expected a refusal, got HTTP 201" in last["problem"]
    assert "the demo stopped at step" in text and "did not happen" in text
    assert _running(out) == []


def test_a_missing_tool_is_exit_3_not_a_failed_step(tmp_path, monkeypatch, capsys):
    from voltgate.errors import VoltgateError

    def no_broker(self):
        raise VoltgateError("the mosquitto broker is not installed", "make setup installs it", 3)

    monkeypatch.setattr(demo.Demo, "setup_registry", no_broker)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 3
    assert "voltgate: demo: the mosquitto broker is not installed (make setup installs it)" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["steps"][0]["ok"] is False


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["demo", "--out", str(tmp_path)]) == 2
    assert "is not empty and is not a demo folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


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
