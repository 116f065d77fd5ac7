"""The outlet application on MicroPython with the simulated hardware, in
simulated time: permit-gated sessions and how they end (exp, exi, energy
cap, trip, server, revocation, power cut), protection with hold, retries
and latch, a welded relay, readings and billing records as the flash log
holds them, and the app's heap from the .mpy build."""

import itertools
import json

import pytest

from voltgate import commands, keys, permits, tree, wire

BOARD = tree.boards_dir() / "sim-outlet-2.json"
DEVICE = "ou-0001"
KEY = keys.derive_device_key(bytes(range(32)), DEVICE, 1)
STORE = {"dev_id": DEVICE.encode().hex(), "key": KEY.hex(), "key_ver": 1}
START = 1_800_000_000  # the sim world's Unix time at 0 ms
CYCLE_MS = 250
MWH_PER_PULSE = 0.5628
# mWh a 2 kW load takes in one control cycle (and one pulse of rounding):
# how far past a cap a session may go
ONE_CYCLE = -(-2000 * CYCLE_MS // 3600) + 1
_names = itertools.count()


def board_file(tmp_path, ext_rtc=False):
    data = json.loads(BOARD.read_text())
    if ext_rtc:
        data["rtc"] = {"type": "ds3231", "bus": "i2c0", "addr": 104}
    path = tmp_path / "board.json"
    path.write_text(json.dumps(data))
    return str(path)


class Outlet:
    """A simulated outlet in the MicroPython worker (tests/mp/outlet_checks.py)."""

    def __init__(self, mp_worker, tmp_path, **opts):
        self._w = mp_worker
        self.name = f"o{next(_names)}"
        self.root = tmp_path / "flash"
        mp_worker.call("outlet_checks", "new", self.name, board_file(tmp_path), str(self.root), STORE, opts)

    def __call__(self, fn, *args):
        return self._w.call("outlet_checks", fn, self.name, *args)

    def sync(self, t=START):
        nonce = bytes.fromhex(self("begin_sync"))
        assert self("sync", commands.time_sync(t, nonce, KEY, 1).hex()) == wire.OK

    def records(self, *types):
        return self("records", list(types) or None)

    def bodies(self, rtype):
        return [r[3] for r in self("records", [rtype])]


@pytest.fixture
def outlet(mp_worker, tmp_path):
    return Outlet(mp_worker, tmp_path)


def permit(now=START, **over):
    args = dict(device_id=DEVICE, user_id="u1", action="power", not_before=now - 60, expires=now + 3600, issued_at=now - 60, scope=[0])
    args.update(over)
    return permits.issue(KEY, 1, **args).hex()


def cti_of(token_hex):
    return permits.claims_of(bytes.fromhex(token_hex))[wire.CLAIM_CTI].hex()


def mwh(watts, seconds):
    """What the simulated meter counts for a load: whole pulses, in mWh."""
    pulses = watts * 1000 * seconds * 1000 // round(MWH_PER_PULSE * 3_600_000)
    return pulses * round(MWH_PER_PULSE * 1_000_000) // 1_000_000


# -------------------------------------------------------------- ends of a session


def test_a_session_ends_at_exp_on_a_trusted_clock(outlet):
    outlet.sync()  # at world ms 0: the board's second boundaries are the world's
    tok = permit(expires=START + 300)
    assert outlet("present", tok, None) == [wire.OK, "outlet 0"]
    assert outlet("state")["outlets"][0]["relay"] is True
    opened = outlet("advance_until_open", 0, 400_000)
    assert 300_000 <= opened < 301_000  # within 1 s of exp, never before it
    assert outlet("changes") == [[0, START, 0, True], [opened, START + opened // 1000, 0, False]]
    [start] = outlet.bodies(wire.LOG_SESSION_START)
    assert start == [0, cti_of(tok), "u1", START, 0, 0]
    [end] = outlet.bodies(wire.LOG_SESSION_END)
    # outlet, cti, user, start, end, duration s, energy mWh, reason, register
    assert end == [0, cti_of(tok), "u1", START, START + 300, 300, mwh(2000, 300), "exp", mwh(2000, 300)]
    assert [0, "open", "exp"] in outlet.bodies(wire.LOG_STATE)
    outlet("advance", 10_000)
    assert outlet("state")["outlets"][0]["mwh"] == mwh(2000, 300)  # nothing after the relay opened


def test_an_exi_permit_runs_on_an_untrusted_clock_for_its_exi(outlet):
    assert outlet("state")["trusted"] is False
    assert outlet("present", permit(), None)[0] == wire.TIME_UNTRUSTED
    tok = permit(not_before=None, expires=START + 30 * 86400, exi=120)
    assert outlet("present", tok, None) == [wire.OK, "outlet 0"]
    opened = outlet("advance_until_open", 0, 200_000)
    assert 120_000 <= opened < 121_000
    [end] = outlet.bodies(wire.LOG_SESSION_END)
    assert end[5] == 120 and end[7] == "exi" and end[6] == mwh(2000, 120)


def test_the_energy_cap_opens_the_relay(outlet):
    outlet.sync()
    tok = permit(max_wh=50)
    assert outlet("present", tok, None)[0] == wire.OK
    opened = outlet("advance_until_open", 0, 200_000)
    assert 90_000 <= opened < 91_000  # 50 Wh at 2 kW: 90 s
    [end] = outlet.bodies(wire.LOG_SESSION_END)
    assert end[7] == "energy_cap"
    assert 50_000 <= end[6] <= 50_000 + ONE_CYCLE


def test_the_server_turns_a_relay_off(outlet):
    outlet.sync()
    assert outlet("present", permit(), None)[0] == wire.OK
    outlet("advance", 10_000)
    assert outlet("command", "relay_off", 0) == [wire.OK, None]
    assert outlet("state")["outlets"][0]["relay"] is False
    [end] = outlet.bodies(wire.LOG_SESSION_END)
    assert end[7] == "server" and end[6] == mwh(2000, 10)
    assert outlet("command", "relay_off", 7)[0] == wire.OUT_OF_SCOPE
    assert outlet("command", "reboot", None)[0] == wire.MALFORMED


def test_revocation_ends_the_session(outlet):
    outlet.sync()
    a = permit(single_use=False)
    assert outlet("present", a, None)[0] == wire.OK
    outlet("advance", 2_000)
    # the server's revoke command: the session ends at once
    assert outlet("command", "revoke", {"cti": cti_of(a), "exp": START + 3600}) == [wire.OK, None]
    assert outlet("state")["outlets"][0]["relay"] is False
    assert outlet.bodies(wire.LOG_SESSION_END)[0][7] == "revoked"
    assert outlet("present", a, None)[0] == wire.REVOKED
    # a user revoked behind the app's back (straight in the permit store): seen within 5 s
    b = permit(user_id="u2", scope=[1])
    assert outlet("present", b, None) == [wire.OK, "outlet 1"]
    assert outlet("revoke_direct", None, 0, "u2", START + 86400) == wire.OK
    opened = outlet("advance_until_open", 1, 10_000)
    assert opened is not None and opened - outlet("changes")[-2][0] <= 5_000 + CYCLE_MS
    assert outlet.bodies(wire.LOG_SESSION_END)[1][:3] == [1, cti_of(b), "u2"]
    assert outlet.bodies(wire.LOG_SESSION_END)[1][7] == "revoked"


# -------------------------------------------------------------- permits


def test_a_replayed_single_use_permit_is_refused(outlet):
    outlet.sync()
    tok = permit()
    assert outlet("present", tok, None)[0] == wire.OK
    assert outlet("present", tok, None)[0] == wire.REPLAYED  # during its session
    outlet("advance", 5_000)
    outlet("command", "relay_off", None)
    assert outlet("present", tok, None)[0] == wire.REPLAYED  # after it
    outlet("reboot", True)
    outlet.sync(START + 10)
    assert outlet("present", tok, None)[0] == wire.REPLAYED  # after a power cut
    assert len(outlet.bodies(wire.LOG_SESSION_START)) == 1
    assert outlet("state")["outlets"][0]["relay"] is False


def test_a_many_use_permit_keeps_its_session_and_resumes_after_it_ended(outlet):
    outlet.sync()
    tok = permit(single_use=False, max_wh=20)
    assert outlet("present", tok, None) == [wire.OK, "outlet 0"]
    outlet("advance", 10_000)
    assert outlet("present", tok, None) == [wire.OK, "outlet 0"]  # its session goes on
    assert len(outlet.bodies(wire.LOG_SESSION_START)) == 1
    outlet("command", "relay_off", 0)
    first = outlet.bodies(wire.LOG_SESSION_END)[0][6]
    assert first == mwh(2000, 10)
    assert outlet("present", tok, None) == [wire.OK, "outlet 0"]  # resumed: a new session
    starts = outlet.bodies(wire.LOG_SESSION_START)
    assert len(starts) == 2 and starts[1][5] == first  # the energy its earlier sessions took
    outlet("advance_until_open", 0, 60_000)
    ends = outlet.bodies(wire.LOG_SESSION_END)
    assert ends[1][7] == "energy_cap" and 20_000 <= first + ends[1][6] <= 20_000 + ONE_CYCLE
    # the cap counts across sessions: used up, so refused
    assert outlet("present", tok, None) == [wire.EXPIRED, "energy cap reached"]


def test_the_energy_table_fails_closed_when_full(outlet):
    outlet.sync()
    for k in range(16):  # meter.py: 16 many-use permits with a cap, remembered until their exp
        assert outlet("present", permit(single_use=False, max_wh=5, expires=START + 100, cti=bytes([k]) * 8), None)[0] == wire.OK
        outlet("command", "relay_off", 0)
    full = permit(single_use=False, max_wh=5, expires=START + 1000, cti=b"\xff" * 8)
    assert outlet("present", full, None) == [wire.STORE_FULL, "energy table full"]
    assert outlet("present", permit(max_wh=5), None)[0] == wire.OK  # a single-use one needs no entry
    outlet("command", "relay_off", 0)
    outlet("advance", 700_000)  # past their exp, also for the time a reboot restores (saved every 600 s)
    assert outlet("present", full, None)[0] == wire.OK


def test_scope_picks_the_outlet_and_refuses_others(outlet):
    outlet.sync()
    assert outlet("present", permit(scope=[1]), 0)[0] == wire.OUT_OF_SCOPE  # at outlet 0, for outlet 1
    assert outlet("present", permit(scope=[5]), None) == [wire.OUT_OF_SCOPE, "no such outlet"]
    assert outlet("present", permit(scope=[1]), None) == [wire.OK, "outlet 1"]
    assert outlet("present", permit(scope=[1]), None) == [wire.UNAVAILABLE, "busy"]
    assert outlet("present", permit(scope=[0, 1]), None) == [wire.OK, "outlet 0"]
    assert outlet("present", permit(action="rent", scope=None), None)[0] == wire.WRONG_ACTION
    outlet("advance", 60_000)
    outlet("command", "relay_off", None)
    # the checker's leeway (60 s) passes a permit 30 s past its exp, the outlet does not
    late = permit(scope=None, expires=START + 30, not_before=START - 300, issued_at=START - 300)
    assert outlet("present", late, None) == [wire.EXPIRED, "past exp"]
    assert outlet("state")["outlets"][0]["relay"] is False  # ... the relay does not close for it
    verdicts = [b[0] for b in outlet.bodies(wire.LOG_PERMIT)]
    assert verdicts.count(wire.OUT_OF_SCOPE) == 2 and verdicts.count(wire.UNAVAILABLE) == 1
    assert wire.WRONG_ACTION in verdicts and wire.EXPIRED in verdicts


# -------------------------------------------------------------- protection


def test_an_overload_trips_after_the_hold_retries_then_latches(outlet):
    outlet.sync()
    outlet("set_load", 0, 4000)  # 4 kW: 17.4 A over the board's 16 A
    assert outlet("present", permit(), None)[0] == wire.OK
    outlet("advance", 60_000)
    on_off = [[ms, on] for ms, _, i, on in outlet("changes") if i == 0]
    # over from the first reading (250 ms), trip 2 s later; retries after 5, 10, 20 s; the 4th trip latches
    assert on_off == [[0, True], [2250, False], [7250, True], [9500, False], [19500, True], [21750, False], [41750, True], [44000, False]]
    alarms = outlet.bodies(wire.LOG_ALARM)
    trips = [["trip", 0, "over_current", 17391, 16000, n] for n in (1, 2, 3, 4)]
    assert alarms == trips + [["latched", 0, "over_current", 17391, 16000, 4]]
    [end] = outlet.bodies(wire.LOG_SESSION_END)
    assert end[7] == "trip"
    assert outlet("state")["outlets"][0]["st"] == "latched"
    # latched across a reboot; refused until a service permit clears it
    outlet("reboot", False)
    outlet.sync(START + 60)
    assert outlet("state")["outlets"][0]["st"] == "latched"
    assert outlet("present", permit(START + 60), None) == [wire.UNAVAILABLE, "latched"]
    assert outlet("present", permit(START + 60, action="service", scope=[1]), None) == [wire.UNAVAILABLE, "nothing to clear"]
    assert outlet("present", permit(START + 60, action="service"), None) == [wire.OK, "cleared 0"]
    outlet("set_load", 0, 2000)
    assert outlet("present", permit(START + 60), None) == [wire.OK, "outlet 0"]
    outlet("advance", 5_000)
    assert outlet("state")["outlets"][0]["relay"] is True


def test_an_overload_shorter_than_the_hold_does_not_trip(outlet):
    outlet.sync()
    assert outlet("present", permit(), None)[0] == wire.OK
    outlet("set_load", 0, 4000)
    outlet("advance", 1_750)  # seen over at 7 readings: 1.75 s < 2 s
    outlet("set_load", 0, 2000)
    outlet("advance", 5_000)
    assert outlet("state")["outlets"][0]["relay"] is True and outlet.bodies(wire.LOG_ALARM) == []


@pytest.mark.parametrize(
    "setup,cause,value,limit",
    [
        ({"max_w": 1000}, "over_power", 2_000_000, 1_000_000),  # the permit's max W
        ({"mains_mv": 260_000}, "over_voltage", 260_000, 253_000),
    ],
)
def test_other_trip_sources(outlet, setup, cause, value, limit):
    outlet.sync()
    if "mains_mv" in setup:
        outlet("set_mains", setup["mains_mv"])
    assert outlet("present", permit(max_w=setup.get("max_w")), None)[0] == wire.OK
    outlet("advance", 3_000)
    assert outlet.bodies(wire.LOG_ALARM)[0] == ["trip", 0, cause, value, limit, 1]
    assert outlet("state")["outlets"][0]["st"] == "wait"


def test_a_welded_relay_is_an_alarm_and_latches(outlet):
    outlet("fault", 0, "relay", "stuck")  # power flows with the relay commanded open
    outlet("advance", 4_000)
    st = outlet("state")["outlets"][0]
    assert st["relay"] is False and st["closed"] is True and st["st"] == "latched"
    assert outlet.bodies(wire.LOG_ALARM) == [["relay_stuck", 0, "relay_stuck", 2_000_000, 5000, 0]]
    outlet.sync()
    assert outlet("present", permit(), None) == [wire.UNAVAILABLE, "latched"]
    assert outlet("command", "clear_fault", 0)[0] == wire.OK  # still welded: seen again
    outlet("advance", 4_000)
    assert len(outlet.bodies(wire.LOG_ALARM)) == 2 and outlet("state")["outlets"][0]["st"] == "latched"
    # a session on the healthy outlet is unaffected
    assert outlet("present", permit(scope=[1]), None) == [wire.OK, "outlet 1"]


def test_a_failed_meter_opens_the_relay_and_latches(outlet):
    outlet.sync()
    assert outlet("present", permit(), None)[0] == wire.OK
    outlet("advance", 5_000)
    outlet("fault", 0, "meter", "open")
    outlet("advance", CYCLE_MS)
    assert outlet("state")["outlets"][0]["relay"] is False and outlet("state")["outlets"][0]["st"] == "latched"
    assert outlet.bodies(wire.LOG_SESSION_END)[0][7] == "fault"
    assert outlet.bodies(wire.LOG_ALARM) == [["latched", 0, "meter_failed", 0, 0, 0]]
    outlet("command", "clear_fault", None)  # still failing: latched again at the next cycle
    outlet("advance", CYCLE_MS)
    assert outlet("state")["outlets"][0]["st"] == "latched" and len(outlet.bodies(wire.LOG_ALARM)) == 2
    before = outlet("state")["outlets"][0]["mwh"]
    outlet("reboot", True)  # a meter that fails at boot does not stop the boot
    assert outlet("state")["outlets"][0]["st"] == "latched"
    outlet("fault", 0, "meter", None)
    outlet("advance", 1_000)
    outlet.sync(START + 10)
    assert outlet("command", "clear_fault", 0) == [wire.OK, None]
    assert outlet("present", permit(START + 10), None) == [wire.OK, "outlet 0"]
    outlet("advance", 10_000)  # the register goes on from its saved value: the meter's past is not counted
    assert 0 <= outlet("state")["outlets"][0]["mwh"] - (before + mwh(2000, 10)) <= 1  # (pulse phase)


# -------------------------------------------------------------- power cuts


def test_a_power_cut_in_a_session_counts_its_energy_once(outlet):
    outlet.sync()
    tok = permit(single_use=False, max_wh=100)
    assert outlet("present", tok, None)[0] == wire.OK
    before = outlet("advance", 100_000)["outlets"][0]
    true = before["true_mwh"]
    assert before["mwh"] <= true and true - before["saved_mwh"] <= 10_000 + ONE_CYCLE
    after = outlet("reboot", True)
    o = after["outlets"][0]
    assert o["relay"] is False and o["session"] is None and o["mwh"] == before["saved_mwh"]
    [end] = outlet.bodies(wire.LOG_SESSION_END)
    # ended at its last save, with the energy up to it
    assert end[:3] == [0, cti_of(tok), "u1"] and end[7] == "power_cut"
    assert end[6] == before["saved_mwh"] and end[8] == before["saved_mwh"]
    assert START + 80 <= end[4] <= START + 100 and end[5] == end[4] - START
    assert outlet.bodies(wire.LOG_ENERGY)[-2:] == [[0, before["saved_mwh"]], [1, 0]]  # the registers at boot
    outlet("advance", 30_000)  # the relay stays open: nothing more is counted
    assert outlet("state")["outlets"][0]["mwh"] == before["saved_mwh"]
    # presented again (once the clock is trusted again): a new session, its cap counting the first
    outlet.sync(START + 200)
    assert outlet("present", tok, None)[0] == wire.OK
    assert outlet.bodies(wire.LOG_SESSION_START)[-1][5] == end[6]
    outlet("advance_until_open", 0, 200_000)
    ends = outlet.bodies(wire.LOG_SESSION_END)
    assert ends[-1][7] == "energy_cap" and 100_000 <= end[6] + ends[-1][6] <= 100_000 + ONE_CYCLE
    o = outlet("state")["outlets"][0]
    assert o["mwh"] <= o["true_mwh"]  # never more than flowed


def test_a_reset_between_the_end_and_its_record_still_logs_it_once(outlet):
    outlet.sync()
    tok = permit(expires=START + 30)
    assert outlet("present", tok, None)[0] == wire.OK
    outlet("crash_on", wire.LOG_SESSION_END)
    assert "power cut" in outlet("advance_crash", 40_000)
    assert outlet.bodies(wire.LOG_SESSION_END) == []
    outlet("reboot", True)
    [end] = outlet.bodies(wire.LOG_SESSION_END)
    assert end[7] == "exp" and end[4] == START + 30 and end[6] == mwh(2000, 30)  # from the saved end, not a power cut
    outlet("reboot", False)
    assert len(outlet.bodies(wire.LOG_SESSION_END)) == 1


def test_a_damaged_state_file_latches_every_outlet(outlet):
    outlet.sync()
    assert outlet("present", permit(), None)[0] == wire.OK
    outlet("advance", 5_000)
    outlet("damage_state_file")
    st = outlet("reboot", True)
    assert [o["st"] for o in st["outlets"]] == ["latched", "latched"]
    assert ["outlet_state_lost"] in outlet.bodies(wire.LOG_ALARM)
    outlet.sync(START + 10)
    assert outlet("present", permit(START + 10, action="service", scope=None), None) == [wire.OK, "cleared 0,1"]
    assert outlet("present", permit(START + 10), None)[0] == wire.OK


# -------------------------------------------------------------- records


def test_readings_at_their_interval_fit_32_bytes(mp_worker, tmp_path):
    outlet = Outlet(mp_worker, tmp_path, reading_s=10)
    outlet.sync()
    assert outlet("present", permit(), None)[0] == wire.OK
    outlet("advance", 65_000)
    readings = outlet.records(wire.LOG_OUTLET_READING)
    assert [r[1] for r in readings] == [START + 10 * k for k in range(1, 7)]  # outlet 1 is idle: none
    assert all(r[3] == [0, 2_000_000, 230_000, 8695] for r in readings)
    assert max(r[4] for r in readings) <= 32  # 30 bytes as stored
    # billing and state records of the session so far
    types = [r[2] for r in outlet.records()]
    assert types.count(wire.LOG_ENERGY) == 2 and types.count(wire.LOG_SESSION_START) == 1


def test_the_app_runs_in_the_main_loop(mp_worker, tmp_path):
    tok = permit(expires=START + 20)
    got = mp_worker.call("outlet_checks", "run_main", board_file(tmp_path, ext_rtc=True), str(tmp_path / "flash"), STORE, START, tok, 30)
    assert got["present"] == [wire.OK, "outlet 0"] and not got["wdt_fired"]
    [[on_ms, _, on], [off_ms, off_unix, off]] = got["changes"]
    assert on and not off and off_unix == START + 20 and off_ms - 20_000 < 1000
    types = [t for t, _ in got["log"]]
    assert wire.LOG_SESSION_START in types and wire.LOG_SESSION_END in types


# -------------------------------------------------------------- heap, from the .mpy build

HEAP_SCRIPT = (tree.root() / "bench/mp_outlet.py").read_text()  # shared with bench/run.py


HEAP = 120 * 1024  # it runs in 112 KB (platform and sim HAL ~87 KB, the app ~17 KB)


def test_the_app_runs_from_mpy_without_allocating_per_cycle(mp, tmp_path):
    tokens = [permit(single_use=False, expires=START + 86400, scope=[i]) for i in (0, 1)]
    spec = {"board": board_file(tmp_path, ext_rtc=True), "root": str(tmp_path / "flash"), "store": STORE, "start": START, "tokens": tokens}
    # the platform and the simulated hardware alone hold ~87 KB at boot
    # (bench/RESULTS.md): the whole board runs in HEAP, the app's share is measured
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    res = mp.run(code=HEAP_SCRIPT, args=[tmp_path / "spec.json"], compiled=True, heapsize=HEAP).record
    assert res["relays"] == [True, True] and res["mwh"][0] > 300_000, res
    # nothing per control cycle, nor for a reading or an energy total
    assert res["control"] == res["readings"] == res["energy"] == 0, res
    # the rest: a save (~1.1 KB: a file, a packed CBOR-free record per relay) at most
    # every 18 s at 2 kW; a revocation check (~370 B a session: the store hashes ids) every 5 s
    assert res["save"] < 1536 and res["revocations"] < 2 * 512, res
    assert res["per_cycle"] < 64, res
    # the app's own heap: its state, and its bytecode as loaded from .mpy
    assert res["state"] < 4096 and res["code"] < 14 * 1024, res


def test_power_flows_from_nbf_not_from_the_checkers_leeway(outlet):
    outlet.sync()
    early = permit(not_before=START + 30, issued_at=START - 60)  # inside the checker's 60 s leeway
    assert outlet("present", early, None) == [wire.NOT_YET_VALID, "before nbf"]
    assert outlet("state")["outlets"][0]["relay"] is False
    outlet("advance", 30_000)
    assert outlet("present", early, None) == [wire.OK, "outlet 0"]  # refused before: not used up
