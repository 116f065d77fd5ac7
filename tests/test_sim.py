"""The simulated hardware (firmware/hal/sim.py) on MicroPython: charge curve,
heating, metering, faults. The firmware's tests are only as good as this."""

import json

import pytest

from voltgate import tree

STATION = str(tree.boards_dir() / "station-4-devkitc.json")


@pytest.fixture
def outlet_board(tmp_path):
    board = {"format": 1, "name": "t", "kind": "outlet", "outlets": [{"relay": {"pin": 23}, "meter": {"mwh_per_pulse": 500}}]}
    p = tmp_path / "outlet.json"
    p.write_text(json.dumps(board))
    return str(p)


def test_charge_is_constant_current_then_tapers_then_stops(mp_worker, tmp_path):
    trace = mp_worker.call("sim_checks", "charge_trace", STATION, str(tmp_path), 0.1, 240)
    ma = [t[1] for t in trace]
    mv = [t[0] for t in trace]
    cc = [i for i, a in enumerate(ma) if a == 4000]
    assert cc and cc == list(range(cc[0], cc[-1] + 1)) and len(cc) > 60  # a long constant-current phase
    taper = ma[cc[-1] + 1 :]
    done = taper.index(0)
    assert all(a > b for a, b in zip(taper[:done], taper[1:done]))  # strictly falling current
    assert max(mv) <= 42000 + 5  # the CV limit holds
    assert all(a == 0 for a in taper[done:]) and trace[-1][3] >= 98  # terminated, nearly full
    assert all(b >= a for a, b in zip(mv[: cc[-1]], mv[1 : cc[-1]]))  # voltage rises while charging


def test_temperature_rises_with_current_and_relaxes(mp_worker, tmp_path):
    trace = mp_worker.call("sim_checks", "charge_trace", STATION, str(tmp_path), 0.1, 240)
    dc = [t[2] for t in trace]
    assert max(dc) > dc[0] + 30  # at least 3 degC of heating at 4 A
    assert dc[-1] < max(dc) - 30  # back towards ambient once charging stopped


def test_faults(mp_worker, tmp_path):
    got = mp_worker.call("sim_checks", "faults", STATION, str(tmp_path))
    assert got == {
        "id": "22" * 8,
        "presence": 1,
        "opens_locked": False,
        "opens_unlocked": True,
        "door": 1,
        "open": "OSError",
        "short": "OSError",
        "noid": None,
        "stuck_charging_ma": 4000,
        "after_safe": [0, 0],
    }


def test_meter_counts_energy_only_while_the_relay_conducts(mp_worker, outlet_board, tmp_path):
    got = mp_worker.call("sim_checks", "outlet_energy", outlet_board, str(tmp_path), 1000, 3600)
    assert got["on"] == [2000, 1_000_000, 4347]  # 1 kWh in 0.5 Wh pulses; 1 kW at 230 V
    assert got["off"] == [2000, 0]
    assert got["stuck"] == 4000  # a stuck relay keeps the load on


def test_watchdog_fires_only_when_not_fed(mp_worker, tmp_path):
    assert mp_worker.call("sim_checks", "watchdog", STATION, str(tmp_path)) == [False, True]


def test_a_board_loads_the_simulation_of_its_own_kind_only(mp_worker, outlet_board, tmp_path):
    """Loaded code lives in the heap, and the whole-board heap figures
    (bench/) run on this simulator: a station carries no outlet models and
    an outlet no battery physics."""
    assert mp_worker.call("sim_checks", "kind_modules", STATION, str(tmp_path / "s")) == ["hal.sim_slots"]
    assert mp_worker.call("sim_checks", "kind_modules", outlet_board, str(tmp_path / "o")) == ["hal.sim_outlets"]
