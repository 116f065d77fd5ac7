"""`voltgate sim fleet`: simulated boards with users, faults and link drops
(voltgate.fleet), briefly: a station and an outlet at 20x time for 15 s,
with the broker and the server's gateway it starts itself."""

from __future__ import annotations

import json

from voltgate import cli

from test_cli_demo import _running


def test_a_tiny_fleet_runs_and_the_server_keeps_up(firmware_build, tmp_path, capsys):
    out = tmp_path / "fleet"
    argv = ["sim", "fleet", "--stations", "1", "--outlets", "1", "--speed", "20", "--seconds", "15", "--arrival", "60",
            "--seed", "3", "--firmware", str(firmware_build), "--out", str(out), "--json"]  # fmt: skip
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["boards"] == 2 and summary["speed"] == 20
    fleet, server = summary["fleet"], summary["server"]
    # users came (about five a board in 300 simulated seconds) and the boards took them
    assert fleet["rented"] + fleet["sessions"] >= 1, fleet
    # what happened on the boards reached the server: records pulled, rentals and sessions booked
    assert summary["records_stored"] > 0 and summary["gateway"]["time_syncs"] >= 2
    assert server["rentals"] == fleet["rented"] and server["ledger_ok"]
    assert "every board is online" in captured.err
    # it stops everything it started; the boards' consoles and the gateway's log stay
    assert _running(out) == []
    assert (out / "logs" / "gateway.log").stat().st_size > 0
    assert (out / "boards" / "st-01" / "console.log").exists()


def test_a_fleet_needs_a_board(tmp_path, capsys):
    assert cli.main(["sim", "fleet", "--stations", "0", "--outlets", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("voltgate: sim fleet: a fleet needs at least one board")
