"""The station application (firmware/station.py) on the MicroPython unix port
with the simulated hardware: rent and return (across two stations),
refused batteries, charge control to full and its faults, reservations,
replayed permits, and the app's heap and per-cycle allocation from the .mpy
build. Time moves only when a test steps it (one control cycle at a time,
tests/mp/station_checks.py); permits are made on the host."""

import itertools
import json

import pytest

from voltgate import keys, permits, tree, wire

BOARD = str(tree.boards_dir() / "sim-station-4.json")
BOARD8 = str(tree.boards_dir() / "station-8-devkitc.json")
MASTER = bytes(range(32))
START = 1_800_000_000  # the sim world's Unix time at 0 ms
CLAIM_BATTERY = -65541  # station.CLAIM_BATTERY (proposed claim)
_names = itertools.count()

# batteries at boot: [id hex, soc, soh, cycles]
FULL_A = ["0b000000000000a001", 1.0, 97, 40]
FULL_B = ["0b000000000000a002", 0.995, 100, 3]


def device_key(device):
    return keys.derive_device_key(MASTER, device, 1)


def claims(device, action, user="u1"):
    return dict(device_id=device, user_id=user, action=action, not_before=START - 60, expires=START + 86400, issued_at=START - 60)


class Station:
    """One simulated station in the worker; call(fn, *args) runs a
    station_checks function on it."""

    def __init__(self, worker, tmp_path, device="st-a", **opts):
        self.w = worker
        self.device = device
        self.key = device_key(device)
        self.name = f"{device}-{next(_names)}"
        self.root = tmp_path / self.name
        store = {"dev_id": device.encode().hex(), "key": self.key.hex(), "key_ver": 1}
        self.call("new", BOARD, str(self.root), store, opts)

    def call(self, fn, *args):
        return self.w.call("station_checks", fn, self.name, *args)

    def permit(self, action, user="u1", scope=None, single_use=True, battery=None, expires=None):
        cl = claims(self.device, action, user)
        if expires is not None:
            cl["expires"] = expires
        c = permits.build_claims(**cl, scope=scope, single_use=single_use)
        if battery is not None:
            c[CLAIM_BATTERY] = bytes.fromhex(battery)
        return c, permits.mac_claims(c, self.key, 1).hex()

    def present(self, token, index=None):
        if index is None:
            return self.call("present", token)
        return self.call("present", token, index)

    def step(self, seconds, until=None):
        return self.call("step", seconds, until)

    def slots(self):
        return self.call("status")

    def slot(self, i):
        return self.slots()[i]

    def records(self, rtype=None):
        return [r[3] for r in self.call("records", rtype)]

    def new_records(self):
        """[type, body] logged since the last call."""
        return [[r[1], r[3]] for r in self.call("records", None, True)]


@pytest.fixture
def station(mp_worker, tmp_path):
    def make(device="st-a", **opts):
        return Station(mp_worker, tmp_path, device, **opts)

    return make


def states(st):
    return [s["state"] for s in st.slots()]


def rent(st, user="u1", scope=None):
    c, tok = st.permit("rent", user, scope)
    reason, slot = st.present(tok)
    return reason, slot, c


# ---------------------------------------------------------------- boot, readings, charging


def test_boot_reads_every_slot_and_logs_readings_at_the_configured_interval(station):
    st = station(reading_s=10)
    assert states(st) == ["charging", "charging", "empty", "charging"]
    boot = st.records(wire.LOG_STATE)
    assert boot == [[0, "charging", "boot"], [1, "charging", "boot"], [2, "empty", "boot"], [3, "charging", "boot"]]
    st.new_records()
    st.step(35)
    recs = st.call("records", wire.LOG_SLOT_READING)
    # one round at boot, then every 10 s: t = 0, 10, 20, 30 for slots 0, 1, 3
    assert [r[3][0] for r in recs] == [0, 1, 3] * 4
    assert sorted({r[2] for r in recs}) == [START, START + 10, START + 20, START + 30]
    assert all(15 + r[4] <= 32 for r in recs)  # DESIGN.md budget: a reading record <= 32 bytes
    slot0 = [r[3] for r in recs if r[3][0] == 0][-1]
    assert 35000 < slot0[1] < 37000 and slot0[2] == 4000 and 240 < slot0[3] < 300  # mV, mA, 0.1 degC
    # the interval is a server setting that outlives a reboot
    assert st.call("command", "config", {"reading_s": 20}) == ["ok", {"reading_s": 20, "return_known": False}]
    assert st.call("command", "config", {"reading_s": 1}) == ["malformed", None]
    st.call("reboot", False)
    n = len(st.call("records", wire.LOG_SLOT_READING))
    st.step(45)
    ts = sorted({r[2] for r in st.call("records", wire.LOG_SLOT_READING)[n:]})
    assert [t - ts[0] for t in ts] == [0, 20, 40]
    ids = sorted(r[0] for r in st.call("batteries"))
    assert ids == ["0b00000000a1c3e5", "0b00000000a1c3f1", "0b00000000a1c402"]


def test_charge_runs_to_full_and_the_slot_becomes_ready(station):
    st = station(batteries=[["0b000000000000c001", 0.7, 100, 0], None, None, None])
    t = st.step(4 * 3600, [0, "ready"])
    s = st.slot(0)
    assert s["state"] == "ready" and not s["charger"] and s["world_soc"] > 0.99
    # constant current (4 A) to the CV limit near 87 %, then the taper to under 250 mA for 10 s
    ma = [r[2] for r in st.records(wire.LOG_SLOT_READING)]
    cc = ma.index(next(x for x in ma if x < 4000))
    assert cc > 30 and set(ma[:cc]) == {4000} and ma[cc:] == sorted(ma[cc:], reverse=True)
    assert 6000 < t < 9000
    ready = [b for b in st.records(wire.LOG_STATE) if b[1] == "ready"]
    assert len(ready) == 1 and ready[0][2] == "full"
    mwh = ready[0][3]
    # energy in, integrated from V x I: the charge the sim took (15 Ah pack)
    # at a terminal voltage between 40.0 V (CC at 70 %) and 42.0 V (CV)
    mah = (s["world_soc"] - 0.7) * 15000
    assert mah * 40.0 < mwh < mah * 42.0
    row = st.call("batteries")[0]  # [id, soc, soh, cycles, mWh, lowest, highest, seen, slot]
    assert row[0] == "0b000000000000c001" and row[1] == 99 and row[4] == mwh and row[8] == 0
    assert row[5] == 250 and 300 < row[6] < 350  # I^2 R (6.4 W at 4 A) warmed it
    # a ready battery stays off the charger
    st.step(60)
    assert st.slot(0)["state"] == "ready" and not st.slot(0)["charger"]


def test_charging_pauses_while_the_battery_is_too_cold(station):
    st = station(batteries=[["0b000000000000c001", 0.5, 100, 0], None, None, None])
    st.call("set_sensor", "temperature", 0, -50)  # -5 degC: under under_temp_dc (0)
    st.step(2)
    s = st.slot(0)
    assert s["state"] == "charging" and not s["charger"]
    assert st.records(wire.LOG_STATE)[-1] == [0, "charging", "too_cold", -50]
    st.call("set_sensor", "temperature", 0, 10)  # 1 degC: not yet 2 degC above the limit
    st.step(2)
    assert not st.slot(0)["charger"]
    st.call("set_sensor", "temperature", 0, None)  # the pack's own 25 degC
    st.step(2)
    assert st.slot(0)["charger"] and st.records(wire.LOG_STATE)[-1] == [0, "charging", "warm", 250]
    assert [r[:2] for r in st.records(wire.LOG_ALARM)] == []  # a pause, not a fault


def test_a_charge_that_runs_too_long_is_stopped(station):
    st = station(batteries=[["0b000000000000c001", 0.1, 100, 0], None, None, None])
    t = st.step(5 * 3600, [0, "fault"])
    s = st.slot(0)
    assert s["cause"] == "charge_timeout" and not s["charger"]
    assert 14400 < t <= 14401  # charge_timeout_s of the board file
    assert st.records(wire.LOG_ALARM)[-1][:2] == ["charge_timeout", 0]


def test_a_welded_charger_during_the_cold_pause_latches_charger_stuck(station):
    st = station(batteries=[["0b000000000000c001", 0.5, 100, 0], None, None, None])
    st.call("set_sensor", "temperature", 0, -50)
    st.step(2)
    assert st.slot(0)["state"] == "charging" and not st.slot(0)["charger"]  # paused
    st.call("fault", 0, "charger", "stuck")  # the relay welds: current flows with the charger off
    st.step(2)
    s = st.slot(0)
    assert s["state"] == "fault" and s["cause"] == "charger_stuck" and not s["charger"] and not s["lock"]
    alarm = st.records(wire.LOG_ALARM)[-1]
    assert alarm[:2] == ["charger_stuck", 0] and alarm[2] > 500


def test_a_discharge_over_the_current_limit_latches_over_current(station):
    st = station(batteries=[FULL_A, None, None, None])
    st.step(15, [0, "ready"])
    st.call("set_sensor", "current", 0, -9000)  # a short across the pack: 9 A out of it
    st.step(1)
    s = st.slot(0)
    assert s["state"] == "fault" and s["cause"] == "over_current" and not s["charger"]
    assert st.records(wire.LOG_ALARM)[-1] == ["over_current", 0, -9000]


# ---------------------------------------------------------------- rent and return


def test_rent_at_one_station_and_return_at_another(station):
    a = station("st-a", batteries=[None, FULL_B, None, None])
    b = station("st-b", batteries=[["0b000000000000b001", 0.5, 100, 0], None, None, None])
    a.step(15, [1, "ready"])
    assert a.slot(1)["state"] == "ready"
    a.new_records()

    reason, slot, c = rent(a, "rider-7")
    assert (reason, slot) == ("ok", "slot 1")
    s = a.slot(1)
    assert s["state"] == "open" and s["cause"] == "rent" and s["lock"] and not s["charger"]
    assert a.call("open_door", 1)
    a.step(1)
    assert not a.slot(1)["lock"]  # released once the door is open: the latch holds it when it closes
    bat = a.call("take", 1)
    a.step(1)
    a.call("close_door", 1)
    a.step(1)
    assert a.slot(1)["state"] == "empty" and not a.slot(1)["lock"]
    out = a.records(wire.LOG_BATTERY_OUT)
    assert len(out) == 1
    slot_, bid, soc, soh, user, cti, cycles, mwh, lo, hi = out[0]
    assert (slot_, bid, soc, soh, user, cti) == (1, FULL_B[0], 99, 100, "rider-7", c[wire.CLAIM_CTI].hex())
    assert cycles == 0 and mwh >= 0 and lo is not None and hi is not None
    assert [b_[1:3] for t, b_ in a.new_records() if t == wire.LOG_STATE] == [["open", "rent"], ["empty", "door_closed"]]

    # ridden: station B has never seen this battery; the return permit vouches for the rider
    c2, tok = b.permit("return", "rider-7")
    assert b.present(tok) == ["ok", "slot 1"]
    assert b.slot(1)["lock"] and b.call("open_door", 1)
    b.step(1)
    b.call("insert", 1, bat["id"], 0.41, bat["soh"], 212)
    b.step(1)
    assert b.call("battery", 1)["ma"] == 0  # not charging while the door is open
    b.call("close_door", 1)
    b.step(2)
    s = b.slot(1)
    assert s["state"] == "charging" and s["charger"] and s["battery"] == FULL_B[0]
    ins = b.records(wire.LOG_BATTERY_IN)
    assert len(ins) == 1
    slot_, bid, soc, soh, user, cti, bms_cycles, mv, dc = ins[0]
    assert (slot_, bid, soc, soh, user, cti, bms_cycles) == (1, FULL_B[0], 41, 100, "rider-7", c2[wire.CLAIM_CTI].hex(), 212)
    assert 34000 < mv < 36000 and 200 < dc < 300
    assert [r[0] for r in b.call("batteries")] == ["0b000000000000b001", FULL_B[0]]


def test_a_door_not_opened_in_time_relocks_and_the_timeout_is_logged(station):
    st = station(batteries=[FULL_A, None, None, None])
    st.step(15, [0, "ready"])
    reason, slot, c = rent(st)
    assert (reason, slot) == ("ok", "slot 0") and st.slot(0)["lock"]
    st.step(29)
    assert st.slot(0)["state"] == "open" and st.slot(0)["lock"]  # door_timeout_s is 30
    st.step(2)
    s = st.slot(0)
    assert s["state"] == "ready" and not s["lock"]
    assert st.records(wire.LOG_STATE)[-1] == [0, "ready", "door_timeout", c[wire.CLAIM_CTI].hex()]
    assert not st.call("open_door", 0)  # locked
    assert st.records(wire.LOG_BATTERY_OUT) == []


def test_a_battery_taken_while_the_power_was_out_is_logged_out_at_boot(station):
    st = station(batteries=[FULL_A, FULL_B, None, None])
    st.step(15, [1, "ready"])
    reason, slot, c = rent(st, "u1")
    assert (reason, slot) == ("ok", "slot 0")
    st.call("open_door", 0)
    st.call("take", 0)  # before the board sees it: the power fails
    st.call("reboot", True)
    assert states(st) == ["open", "charging", "empty", "empty"]  # the door still stands open
    assert st.records(wire.LOG_BATTERY_OUT) == [[0, FULL_A[0], 100, 97, None, None, 0, 0, 250, 250]]
    st.call("close_door", 0)
    st.step(1)
    assert states(st) == ["empty", "charging", "empty", "empty"]
    assert [r[8] for r in st.call("batteries")] == [None, 1]  # the registry: not in a slot, in slot 1
    st.call("reboot", False)
    assert len(st.records(wire.LOG_BATTERY_OUT)) == 1  # once


def test_the_battery_registry_survives_reboots_and_a_damaged_one_is_relearned(station):
    st = station()
    st.step(610)
    before = st.call("batteries")
    assert [r[8] for r in before] == [0, 1, 3] and all(r[4] > 0 for r in before)  # in slots 0, 1, 3; mWh in
    st.call("reboot", True)
    kept = st.call("batteries")  # written every 10 minutes while charging: a power cut loses the rest
    assert [[r[0], r[2], r[3]] for r in kept] == [[r[0], r[2], r[3]] for r in before]  # id, SoH, cycles
    assert all(0.97 * b[4] < k[4] <= b[4] and k[6] == b[6] for k, b in zip(kept, before))
    data = bytearray((st.root / "batteries.bin").read_bytes())
    data[40] ^= 1  # a flash bit flips
    (st.root / "batteries.bin").write_bytes(bytes(data))
    st.call("reboot", False)
    assert st.records(wire.LOG_ALARM) == [["battery_registry_lost"]]
    after = st.call("batteries")  # relearned from the slots; the server keeps the history
    assert [r[0] for r in after] == [r[0] for r in before] and all(r[4] == 0 for r in after)
    assert states(st) == ["charging", "charging", "empty", "charging"]


def test_a_rented_door_closed_on_the_battery_puts_it_back_on_sale(station):
    st = station(batteries=[FULL_A, None, None, None])
    st.step(15, [0, "ready"])
    assert rent(st)[:2] == ("ok", "slot 0")
    st.call("open_door", 0)
    st.step(1)
    st.call("fault", 0, "identity", "open")  # and its bus fails as the door closes
    st.call("close_door", 0)
    st.step(1)
    assert st.slot(0)["state"] == "ready" and st.records(wire.LOG_BATTERY_OUT) == []
    assert st.records(wire.LOG_STATE)[-1][1:3] == ["ready", "door_closed"]
    assert st.records(wire.LOG_ALARM) == []


def test_a_replayed_single_use_permit_is_refused(station):
    st = station(batteries=[FULL_A, FULL_B, None, None])
    st.step(15, [1, "ready"])
    c, tok = st.permit("rent")
    assert st.present(tok) == ["ok", "slot 0"]
    assert st.present(tok) == ["replayed", None]
    assert states(st) == ["open", "ready", "empty", "empty"]  # the second slot stays shut
    st.call("reboot", True)  # power cut: the used permit is remembered in flash
    assert st.present(tok) == ["replayed", None]
    assert states(st) == ["charging", "charging", "empty", "empty"]
    verdicts = [b for b in st.records(wire.LOG_PERMIT) if b[1] == c[wire.CLAIM_CTI].hex()]
    assert [wire.reason_name(v[0]) for v in verdicts] == ["ok", "replayed", "replayed"]
    # the server revokes a permit before it is used
    c3, tok3 = st.permit("rent")
    assert st.call("command", "revoke", {"cti": c3[wire.CLAIM_CTI].hex(), "exp": c3[wire.CLAIM_EXP]})[0] == "ok"
    assert st.present(tok3) == ["revoked", None]
    # a many-use permit opens again within its window
    c2, many = st.permit("rent", single_use=False)
    st.step(15, [1, "ready"])
    assert st.present(many)[0] == "ok"
    assert st.present(many)[0] == "ok"


def test_unavailable_leaves_the_permit_unused_and_other_actions_are_refused(station):
    st = station(batteries=[["0b000000000000c001", 0.3, 100, 0], None, None, None])
    c, tok = st.permit("rent")
    assert st.present(tok) == ["unavailable", None]  # nothing ready: the permit keeps
    assert st.present(st.permit("power")[1]) == ["wrong_action", None]
    assert st.present(st.permit("return", scope=[0])[1]) == ["unavailable", None]  # slot 0 is full
    st.call("set_soc", 0, 0.999)
    st.step(30, [0, "ready"])
    assert st.present(tok) == ["ok", "slot 0"]


def test_the_fullest_healthy_battery_in_scope_is_rented(station):
    st = station(batteries=[["0b000000000000d000", 1.0, 60, 900], FULL_B, None, FULL_A])
    st.step(15)
    assert states(st) == ["ready", "ready", "empty", "ready"]
    assert rent(st, "u1", [0, 1])[:2] == ("ok", "slot 1")  # slot 0 holds the most charge, but SoH 60 %
    assert rent(st, "u2")[:2] == ("ok", "slot 3")  # 100 % beats slot 1's 99 %
    assert rent(st, "u3", [0])[:2] == ("unavailable", None)


def test_reservations_are_honoured_and_expire(station):
    st = station(batteries=[FULL_A, FULL_B, None, None])
    st.step(15, [1, "ready"])
    assert st.call("command", "reserve", {"slot": 0, "user": "u2", "until": START + 120}) == ["ok", 0]
    assert st.slot(0)["state"] == "reserved"
    assert rent(st, "u1")[:2] == ("ok", "slot 1")  # slot 0 holds more, but is u2's
    assert rent(st, "u3")[:2] == ("unavailable", None)
    assert rent(st, "u2")[:2] == ("ok", "slot 0")
    assert [0, "reserved", "reserved", START + 120] in st.records(wire.LOG_STATE)
    # a reservation that is not used ends at its time
    st.step(40)  # both doors time out: back to reserved (0) and ready (1)
    assert states(st)[:2] == ["reserved", "ready"]
    st.step(90, [0, "ready"])
    assert st.slot(0)["state"] == "ready"
    assert [0, "ready", "reservation_ended"] in st.records(wire.LOG_STATE)
    assert st.call("command", "reserve", {"slot": 2, "user": "u2", "until": START + 999}) == ["unavailable", None]  # empty


def test_a_reader_fixed_at_one_slot_presents_with_its_index(station):
    st = station(batteries=[FULL_A, FULL_B, None, None])
    st.step(15, [1, "ready"])
    assert st.present(st.permit("rent")[1], 2) == ["unavailable", None]  # slot 2 is empty
    assert st.present(st.permit("rent", scope=[0])[1], 1) == ["out_of_scope", None]
    assert st.present(st.permit("rent")[1], 9) == ["out_of_scope", None]
    assert st.present(st.permit("rent")[1], 1) == ["ok", "slot 1"]  # slot 0 holds more, but the reader is at 1
    assert st.present(st.permit("return")[1], 3) == ["ok", "slot 3"]  # not the first empty slot (2)
    assert states(st) == ["ready", "open", "empty", "open"]


def test_a_permit_past_its_exp_is_refused_within_the_checkers_leeway(station):
    st = station(batteries=[FULL_A, None, None, None])
    st.step(20)
    assert states(st) == ["ready", "empty", "empty", "empty"]
    c, tok = st.permit("rent", expires=START + 10)  # 10 s past exp: within the 60 s clock-skew leeway
    assert st.present(tok) == ["expired", None]
    assert st.present(st.permit("return", expires=START + 19)[1]) == ["expired", None]
    assert states(st) == ["ready", "empty", "empty", "empty"]
    assert st.present(tok) == ["expired", None]  # not used up
    assert st.present(st.permit("rent", expires=START + 60)[1]) == ["ok", "slot 0"]


def test_a_door_open_through_a_reboot_leaves_the_slot_open_with_the_charger_off(station):
    st = station(batteries=[FULL_A, None, None, None])
    st.step(15, [0, "ready"])
    assert rent(st)[:2] == ("ok", "slot 0")
    st.call("open_door", 0)
    st.call("reboot", True)  # the power fails with the door open, the battery still in
    s = st.slot(0)
    assert s["state"] == "open" and not s["charger"] and not s["lock"]
    assert st.records(wire.LOG_STATE)[-4] == [0, "open", "boot"]
    st.step(5)
    assert st.slot(0)["state"] == "open" and not st.slot(0)["charger"]
    st.call("close_door", 0)  # closed on the battery: it charges (whether it is full is not known)
    st.step(1)
    assert st.slot(0)["state"] == "charging" and st.slot(0)["charger"]
    assert st.records(wire.LOG_BATTERY_OUT) == [] and st.records(wire.LOG_BATTERY_IN) == []
    st.call("force_door", 0, True)
    st.call("reboot", True)
    assert st.slot(0)["state"] == "open" and not st.slot(0)["charger"]
    st.call("take", 0)
    st.step(1)
    assert st.records(wire.LOG_BATTERY_OUT)[-1][:2] == [0, FULL_A[0]]
    st.call("close_door", 0)
    st.step(1)
    assert st.slot(0)["state"] == "empty" and st.records(wire.LOG_STATE)[-1] == [0, "empty", "door_closed"]


def test_an_id_read_failing_once_at_boot_is_not_a_battery_out(station):
    st = station(batteries=[FULL_A, None, None, None])
    st.step(15, [0, "ready"])
    st.call("fault", 0, "identity", "noid")  # the pack is there, but does not answer this once
    st.call("reboot", True)
    s = st.slot(0)
    assert s["state"] == "charging" and s["battery"] == FULL_A[0]
    assert st.records(wire.LOG_BATTERY_OUT) == [] and st.records(wire.LOG_ALARM) == []
    assert [r[8] for r in st.call("batteries")] == [0]  # the registry: still in slot 0
    st.call("fault", 0, "identity", None)
    st.step(30, [0, "ready"])
    assert st.slot(0)["state"] == "ready"
    assert st.records(wire.LOG_BATTERY_OUT) == [] and st.records(wire.LOG_BATTERY_IN) == []


def test_a_battery_that_came_while_the_board_was_down_is_not_taken_in_unchecked(station):
    st = station(batteries=[FULL_A, None, None, None])
    st.step(2)
    # pushed into an empty slot (the door forced) while the board was down
    st.call("insert", 2, "0b0000000000005555", 0.5, 100, 0)
    # a return cut short by a power cut: the door still open on the battery
    assert st.present(st.permit("return", scope=[1])[1]) == ["ok", "slot 1"]
    st.call("open_door", 1)
    st.step(1)
    st.call("insert", 1, "0b0000000000006666", 0.4, 100, 0)
    st.call("reboot", True)
    assert states(st) == ["charging", "open", "fault", "empty"]
    assert st.slot(2)["cause"] == "unexpected_battery" and not st.slot(2)["charger"]
    assert st.records(wire.LOG_ALARM)[-1] == ["unexpected_battery", 2, None]
    assert st.records(wire.LOG_BATTERY_IN) == [] and not st.slot(1)["charger"]
    assert [r[0] for r in st.call("batteries")] == [FULL_A[0]]  # not registered unchecked
    # the return door closes: the insertion rules, without the permit the lost RAM knew
    st.call("close_door", 1)
    st.step(1)
    assert st.records(wire.LOG_ALARM)[-1] == ["refused_battery", 1, "unknown", "0b0000000000006666"]
    assert st.slot(1)["cause"] == "eject"
    # the server clears slot 2: the battery is taken in, with a BatteryIn
    assert st.call("command", "clear_fault", {"slot": 2}) == ["ok", 2]
    assert st.slot(2)["state"] == "charging" and st.slot(2)["battery"] == "0b0000000000005555"
    assert st.records(wire.LOG_BATTERY_IN)[-1][:4] == [2, "0b0000000000005555", 50, 100]


# ---------------------------------------------------------------- refused batteries


@pytest.mark.parametrize("kind", ["noid", "open"])
def test_an_unreadable_battery_is_refused_and_handed_back(station, kind):
    st = station(batteries=[FULL_A, None, None, None])
    c, tok = st.permit("return")
    assert st.present(tok) == ["ok", "slot 1"]
    st.call("open_door", 1)
    st.step(1)
    st.call("insert", 1, "0b000000000000e001", 0.2, 100, 0)
    st.call("fault", 1, "identity", kind)  # its BMS does not answer, or its bus fails
    st.call("close_door", 1)
    st.step(1)
    s = st.slot(1)
    assert s["state"] == "open" and s["cause"] == "eject" and s["lock"] and not s["charger"]
    assert st.records(wire.LOG_ALARM)[-1] == ["refused_battery", 1, "unreadable", None]
    assert st.records(wire.LOG_BATTERY_IN) == []
    assert st.call("open_door", 1)
    st.step(1)
    st.call("take", 1)
    st.call("close_door", 1)
    st.step(1)
    assert st.slot(1)["state"] == "empty"
    # refused again and never taken back: the slot holds a battery nobody accepted
    assert st.present(st.permit("return")[1]) == ["ok", "slot 1"]
    st.call("open_door", 1)
    st.step(1)
    st.call("insert", 1, "0b000000000000e001", 0.2, 100, 0)
    st.call("close_door", 1)
    st.step(1)
    assert st.slot(1)["cause"] == "eject"
    st.step(31)
    s = st.slot(1)
    assert s["state"] == "fault" and s["cause"] == "not_removed" and not s["lock"] and not s["charger"]


def test_without_a_permit_only_known_batteries_are_taken_back(station):
    st = station(batteries=[FULL_A, None, None, None], return_known=True)
    st.step(15, [0, "ready"])
    # known: rented from here
    assert rent(st, "u1")[:2] == ("ok", "slot 0")
    st.call("open_door", 0)
    st.step(1)
    known = st.call("take", 0)
    st.call("close_door", 0)
    st.step(1)
    # a permit-less return (a button, or the server) under the return_known policy
    assert st.call("command", "open_return", {}) == ["ok", 0]
    st.call("open_door", 0)
    st.step(1)
    st.call("insert", 0, "0b0000000000009999", 0.5, 100, 0)  # never seen here
    st.call("close_door", 0)
    st.step(1)
    assert st.records(wire.LOG_ALARM)[-1] == ["refused_battery", 0, "unknown", "0b0000000000009999"]
    assert st.slot(0)["cause"] == "eject" and st.call("open_door", 0)
    st.step(1)
    st.call("take", 0)
    st.call("close_door", 0)
    st.step(1)
    assert st.slot(0)["state"] == "empty"
    assert st.call("command", "open_return", {}) == ["ok", 0]
    st.call("open_door", 0)
    st.step(1)
    st.call("insert", 0, known["id"], 0.3, known["soh"], known["cycles"])
    st.call("close_door", 0)
    st.step(1)
    assert st.slot(0)["state"] == "charging"
    assert st.records(wire.LOG_BATTERY_IN)[-1][:6] == [0, FULL_A[0], 30, 97, None, None]
    # the policy is the server's to set
    assert st.call("command", "config", {"return_known": False})[0] == "ok"
    assert st.call("command", "open_return", {}) == ["wrong_action", None]


def test_a_return_permit_naming_a_battery_refuses_another(station):
    st = station()
    c, tok = st.permit("return", battery="0b00000000a1c3e5")
    assert st.present(tok) == ["ok", "slot 2"]
    st.call("open_door", 2)
    st.step(1)
    st.call("insert", 2, "0b0000000000007777", 0.5, 100, 0)
    st.call("close_door", 2)
    st.step(1)
    assert st.records(wire.LOG_ALARM)[-1] == ["refused_battery", 2, "not_named", "0b0000000000007777"]
    assert st.slot(2)["cause"] == "eject"


# ---------------------------------------------------------------- faults


def test_over_temperature_during_charge_latches_until_a_service_permit(station):
    st = station()
    st.step(5)
    st.call("fault", 3, "battery", "hot")  # thermal runaway in slot 3's pack
    st.step(2)
    s = st.slot(3)
    assert s["state"] == "fault" and s["cause"] == "over_temp" and not s["charger"]
    alarm = st.records(wire.LOG_ALARM)[-1]
    assert alarm[:2] == ["over_temp", 3] and alarm[2] >= 550
    assert states(st)[:2] == ["charging", "charging"]  # the other slots charge on
    # latched: through power cuts (one during which a pack that does not
    # answer is pushed into empty slot 2, which latches slot 2 too), and
    # with the pack cooled down
    st.call("insert", 2, "0b00000000a1c999", 0.5, 100, 0)
    st.call("fault", 2, "identity", "noid")
    st.call("reboot", True)
    assert [s["cause"] for s in st.slots()] == [None, None, "unreadable", "over_temp"]
    st.call("reboot", True)
    assert states(st) == ["charging", "charging", "fault", "fault"] and not st.slot(3)["charger"]
    st.call("fault", 3, "battery", None)
    st.call("fault", 2, "identity", None)
    st.step(900)
    assert st.call("battery", 3)["temp_dc"] < 400
    assert states(st) == ["charging", "charging", "fault", "fault"]
    # cleared by a technician's service permit (scope: two slots, so no door opens)
    c, tok = st.permit("service", "tech-1", scope=[2, 3])
    assert st.present(tok) == ["ok", "slots 2 3"]
    s = st.slot(3)
    assert s["state"] == "charging" and s["charger"] and not s["lock"]
    cti = c[wire.CLAIM_CTI].hex()
    assert st.records(wire.LOG_STATE)[-1] == [3, "charging", "cleared", cti]
    # slot 2's pack answers now: taken in on the technician's word
    assert st.records(wire.LOG_BATTERY_IN)[-1][:6] == [2, "0b00000000a1c999", 50, 100, "tech-1", cti]
    st.step(5)
    assert states(st) == ["charging", "charging", "charging", "charging"]


def test_clearing_while_the_battery_is_still_hot_faults_again(station):
    st = station()
    st.call("fault", 0, "battery", "hot")
    st.step(1)
    assert st.call("command", "clear_fault", {"slot": 0}) == ["ok", 0]
    st.step(1)
    assert st.slot(0)["state"] == "fault" and not st.slot(0)["charger"]
    assert st.call("command", "clear_fault", {"slot": 1}) == ["unavailable", None]  # nothing latched
    assert st.call("command", "clear_fault", 9) == ["malformed", None]
    assert st.call("command", "reboot", 0) == ["wrong_action", None]


def test_clearing_reads_the_pack_before_the_charger_switches_on(station):
    st = station()
    st.call("fault", 0, "battery", "hot")
    st.step(1)
    st.call("fault", 0, "battery", None)  # the overheating ends; the pack is still hot
    n = len(st.records(wire.LOG_STATE))
    assert st.call("command", "clear_fault", {"slot": 0}) == ["ok", 0]
    s = st.slot(0)  # no control cycle yet
    assert s["state"] == "fault" and s["cause"] == "over_temp" and not s["charger"]
    assert [r[1:3] for r in st.records(wire.LOG_STATE)[n:]] == [["fault", "over_temp"]]
    assert st.records(wire.LOG_ALARM)[-1][:2] == ["over_temp", 0]


def test_the_servers_unlock_keeps_a_latched_fault(station):
    st = station(batteries=[FULL_A, None, None, None])
    st.call("fault", 0, "battery", "hot")
    st.step(1)
    st.call("fault", 0, "battery", None)
    assert st.slot(0)["cause"] == "over_temp"
    assert st.call("command", "unlock", {"slot": 0}) == ["ok", 0]
    assert st.slot(0)["state"] == "open" and st.slot(0)["cause"] == "service"
    st.call("reboot", False)  # latched through a reboot while open
    assert st.slot(0)["state"] == "fault" and st.slot(0)["cause"] == "over_temp"
    # not opened in time: back to the fault, the charger off
    assert st.call("command", "unlock", {"slot": 0}) == ["ok", 0]
    st.step(31)
    s = st.slot(0)
    assert s["state"] == "fault" and s["cause"] == "over_temp" and not s["charger"] and not s["lock"]
    # opened and closed on the pack: the same
    assert st.call("command", "unlock", {"slot": 0}) == ["ok", 0]
    assert st.call("open_door", 0)
    st.step(1)
    st.call("close_door", 0)
    st.step(5)
    s = st.slot(0)
    assert s["state"] == "fault" and s["cause"] == "over_temp" and not s["charger"]
    assert "charging" not in [r[1] for r in st.records(wire.LOG_STATE) if r[0] == 0][1:]
    st.call("reboot", False)
    assert st.slot(0)["state"] == "fault" and st.slot(0)["cause"] == "over_temp"
    # opened and the pack taken out: BatteryOut, and the slot stays latched
    assert st.call("command", "unlock", {"slot": 0}) == ["ok", 0]
    assert st.call("open_door", 0)
    st.step(1)
    st.call("take", 0)
    st.step(1)
    st.call("close_door", 0)
    st.step(1)
    assert st.records(wire.LOG_BATTERY_OUT)[-1][:2] == [0, FULL_A[0]]
    assert st.slot(0)["state"] == "fault" and st.slot(0)["cause"] == "over_temp"
    # a service permit (or clear_fault) clears it
    assert st.call("command", "clear_fault", {"slot": 0}) == ["ok", 0]
    assert st.slot(0)["state"] == "empty"


@pytest.mark.parametrize("function, kind, cause", [("temperature", "open", "temperature_sensor"), ("voltage", "short", "voltage_sensor")])
def test_a_sensor_fault_during_charge_stops_it(station, function, kind, cause):
    st = station()
    st.step(3)
    st.call("fault", 3, function, kind)
    st.step(1)
    s = st.slot(3)
    assert s["state"] == "fault" and s["cause"] == cause and not s["charger"]
    assert st.records(wire.LOG_ALARM)[-1] == [cause, 3, None]
    st.call("fault", 3, function, None)
    st.step(5)
    assert st.slot(3)["state"] == "fault"  # latched, though the sensor reads again
    assert st.call("command", "clear_fault", {"slot": 3}) == ["ok", 3]
    st.step(1)
    assert st.slot(3)["state"] == "charging" and st.slot(3)["charger"]


def test_a_service_permit_for_one_slot_opens_it_and_the_technician_takes_the_pack(station):
    st = station()
    st.call("fault", 0, "battery", "hot")
    st.step(1)
    c, tok = st.permit("service", "tech-1", scope=[0])
    assert st.present(tok) == ["ok", "slot 0"]
    assert st.slot(0)["state"] == "open" and st.call("open_door", 0)
    st.step(1)
    st.call("take", 0)
    st.step(1)
    st.call("close_door", 0)
    st.step(1)
    assert st.slot(0)["state"] == "empty"
    out = st.records(wire.LOG_BATTERY_OUT)[-1]
    assert out[:2] == [0, "0b00000000a1c3e5"] and out[4:6] == ["tech-1", c[wire.CLAIM_CTI].hex()]
    assert out[9] >= 550  # the registry's highest temperature: the overheating


def test_a_forced_door_and_a_battery_gone_from_behind_it_raise_alarms(station):
    st = station()
    st.call("force_door", 3, True)
    st.step(5)
    assert st.records(wire.LOG_ALARM) == [["door_forced", 3, None]]  # once while it stays open
    st.call("take", 3)
    st.step(1)
    assert st.slot(3)["state"] == "fault" and st.slot(3)["cause"] == "battery_missing"
    assert st.records(wire.LOG_ALARM)[-1] == ["battery_missing", 3, "0b00000000a1c402"]
    assert st.records(wire.LOG_BATTERY_OUT)[-1][:6] == [3, "0b00000000a1c402", 8, 100, None, None]


def test_a_slot_whose_inputs_fail_latches_a_fault_and_the_others_run_on(station):
    st = station()
    st.call("break_input", 1, "door")
    st.step(2)
    s = st.slot(1)
    assert s["state"] == "fault" and s["cause"] == "io_error" and not s["charger"]
    assert st.records(wire.LOG_ALARM) == [["io_error", 1, None]]  # once: latched, no longer read
    assert states(st) == ["charging", "fault", "empty", "charging"]


def test_disabled_slots_are_not_charged_or_rented_and_stay_disabled(station):
    st = station(batteries=[FULL_A, None, None, None])
    assert st.call("command", "disable", {"slot": 0}) == ["ok", 0]
    st.step(15)
    assert st.slot(0)["state"] == "disabled" and not st.slot(0)["charger"]
    assert rent(st)[:2] == ("unavailable", None)
    st.call("reboot", False)
    assert st.slot(0)["state"] == "disabled"
    assert st.call("command", "enable", {"slot": 0}) == ["ok", 0]
    st.step(15, [0, "ready"])
    assert st.slot(0)["state"] == "ready"


def test_a_disabled_slot_with_a_fault_cleared_stays_disabled(station):
    st = station(batteries=[FULL_A, None, None, None])
    assert st.call("command", "disable", {"slot": 0}) == ["ok", 0]
    st.call("break_input", 0, "door")  # an I/O error on the disabled slot
    st.step(1)
    assert st.slot(0)["state"] == "fault" and st.slot(0)["cause"] == "io_error"
    st.call("fix_input", 0, "door")
    assert st.call("command", "clear_fault", {"slot": 0}) == ["ok", 0]
    assert st.slot(0)["state"] == "disabled" and not st.slot(0)["charger"]
    st.step(30)
    assert st.slot(0)["state"] == "disabled" and not st.slot(0)["charger"]
    assert rent(st)[:2] == ("unavailable", None)
    st.call("reboot", False)
    assert st.slot(0)["state"] == "disabled"


# ---------------------------------------------------------------- the app on the platform


def test_permits_come_in_through_the_console(station):
    st = station(batteries=[FULL_A, None, None, None])
    st.step(15, [0, "ready"])
    assert st.call("console", "present " + st.permit("rent")[1]) == "ok slot 0"
    # a valid permit no slot can serve: refused, not used up (no wire name yet)
    assert st.call("console", "present " + st.permit("rent")[1]) == "refused unavailable"
    assert st.call("console", "present " + st.permit("power")[1]) == "refused wrong_action"


def test_the_app_runs_under_the_main_loop_and_keeps_the_watchdog_fed(mp_worker, tmp_path):
    device = "st-m"
    key = device_key(device)
    store = {"dev_id": device.encode().hex(), "key": key.hex(), "key_ver": 1}
    tok = permits.issue(key, 1, **claims(device, "return")).hex()
    out = mp_worker.call("station_checks", "run_main", BOARD, str(tmp_path), store, 20, tok)
    assert out["present"] == ["ok", "slot 2"] and out["opened"] and out["lock_after_open"] is False
    assert not out["wdt_fired"] and out["ms"] >= 20000
    assert out["states"] == ["charging", "charging", "empty", "charging"]  # the return door closed empty


HEAP_SCRIPT = (tree.root() / "bench/mp_station.py").read_text()  # shared with bench/run.py


def test_the_8_slot_app_runs_from_mpy_without_allocating_per_cycle(mp, tmp_path):
    """The 8-slot station's full duty (charging, readings every 60 s, a
    return door waiting and open, a reservation, a fault, a disabled slot)
    from the .mpy build under a heap limit: the app's own heap (code and
    data) and its allocation per control cycle, the simulated hardware's
    share measured apart."""
    key = device_key("st-8")
    tok = permits.issue(key, 1, **claims("st-8", "return")).hex()
    script = tmp_path / "heap.py"
    script.write_text(HEAP_SCRIPT)
    # the platform and the simulated 8-slot hardware alone hold ~97 KB after
    # boot (bench/RESULTS.md: over the 96 KB budget, being reduced); the app
    # runs on top of them in 96 + 32 KB (it needs 124 KB today)
    res = mp.run(str(script), heapsize=128 * 1024, compiled=True, args=[BOARD8, tmp_path / "root", key.hex(), tok]).record
    print(json.dumps(res))
    assert res["present"] == wire.OK and res["slot"] == "slot 3"
    assert res["states"] == [1, 1, 3, 0, 2, 1, 6, 5]
    assert res["quiet"] == [0, 0, 0, 0, 0]  # control cycles: no allocation at all
    plain, readings, writes, rounds, n_writes = res["full"]
    assert rounds == 20 and plain == 0 and readings == 0  # readings encode into a buffer made once
    assert 2 <= n_writes <= 3 and writes <= n_writes * 2048  # the registry file each 10 min; a new log segment
    assert res["held"] - res["code"] < 4 * 1024  # the app's data for 8 slots, registry included
    assert res["held"] < 20 * 1024  # code and data, .mpy on the 64-bit unix port
