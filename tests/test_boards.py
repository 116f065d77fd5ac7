"""Board files and their validator (boards/README.md is the contract).

Each rule is shown by breaking one committed, valid board (a deep copy) and
asserting the whole list of messages, so a rule that also fires elsewhere,
or names the wrong key, fails the test.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from voltgate import boards, cli, tree
from voltgate.errors import EXIT_ENVIRONMENT, EXIT_USAGE

ROOT = tree.root()
BOARDS = tree.boards_dir()
COMMITTED = sorted(p.name for p in BOARDS.glob("*.json"))
EXPECTED_WARNINGS: dict[str, list[str]] = {}  # file name -> warnings; every committed board is clean today


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # messages name files relative to the working directory


def board(stem):
    return copy.deepcopy(boards.load(BOARDS / f"{stem}.json"))


def problems(doc, stem):
    """(errors, warnings) of a mutated board, messages without the file prefix."""
    report = boards.validate(doc, name=f"boards/{stem}.json")
    prefix = f"boards/{stem}.json: "
    assert all(m.startswith(prefix) for m in report.errors + report.warnings)
    return [m[len(prefix) :] for m in report.errors], [m[len(prefix) :] for m in report.warnings]


def errors(doc, stem):
    errs, warns = problems(doc, stem)
    assert warns == []
    return errs


# --- the committed boards -------------------------------------------------------------


def test_the_issue_asks_for_these_boards():
    wanted = {"station-4-devkitc", "station-8-devkitc", "outlet-2-devkitc", "sim-station-4", "sim-outlet-2"}
    assert {f"{stem}.json" for stem in wanted} <= set(COMMITTED)


@pytest.mark.parametrize("name", COMMITTED)
def test_every_committed_board_validates(name):
    report = boards.validate(Path("boards") / name)
    assert report.file == f"boards/{name}"
    assert report.errors == []
    assert report.warnings == EXPECTED_WARNINGS.get(name, [])
    assert boards.check(BOARDS / name) == report.warnings


@pytest.mark.parametrize(("real", "sim"), [("station-4-devkitc", "sim-station-4"), ("outlet-2-devkitc", "sim-outlet-2")])
def test_simulated_boards_mirror_the_real_design(real, sim):
    r, s = board(real), board(sim)
    assert s["hal"] == "sim" and s["chip"] == "esp32" == r["chip"]
    for key in ("kind", "buses", "expanders", "slots", "outlets", "rtc", "status_led", "link", "limits"):
        assert s.get(key) == r.get(key), key


def test_station_8_is_two_expanders_and_smart_batteries_behind_one_mux():
    b = board("station-8-devkitc")
    assert len(b["slots"]) == 8 and sorted(b["expanders"]) == ["io0", "io1"]
    assert {s["identity"]["bms"]["mux"]["channel"] for s in b["slots"]} == set(range(8))
    assert all(s[k] == {"bms": "bms"} for s in b["slots"] for k in ("voltage", "current", "temperature"))


def test_the_simulated_hardware_reads_what_the_sim_schema_allows():
    from hal import sim  # firmware/hal/sim.py, on CPython (conftest puts firmware/ on the path)

    physics = {k for k in {**boards.STATION_SIM.fields, **boards.OUTLET_SIM.fields} if k not in ("batteries", "loads")}
    assert physics <= set(sim.DEFAULTS)
    station = sim.World(board("sim-station-4"))
    assert station.p["capacity_mah"] == 15000 and station.p["full_mv"] == 42000
    assert [s.battery.id.hex() if s.battery else None for s in station.slots] == [
        b and b["id"] for b in board("sim-station-4")["sim"]["batteries"]
    ]
    assert station.slots[0].battery.soc == 0.35
    outlet = sim.World(board("sim-outlet-2"))
    assert [o.load_w for o in outlet.outlets] == [2000, 60] and outlet.p["mains_mv"] == 230000


def test_bl0937_constants_follow_the_datasheet_transfer_functions():
    vref, shunt, divider = 1.218, 0.001, 2351  # as written in the board's notes
    meter = board("outlet-2-devkitc")["outlets"][0]["meter"]
    assert meter["mw_per_hz"] == pytest.approx(1000 * vref**2 * divider / shunt / 1721506, rel=1e-3)
    assert meter["ma_per_hz"] == pytest.approx(1000 * vref / shunt / 94638, rel=1e-3)
    assert meter["mv_per_hz"] == pytest.approx(1000 * vref * divider / 15397, rel=1e-3)


# --- the README's rules, one mutation each ----------------------------------------------


def test_the_readme_example_output_on_an_input_only_pin():
    b = board("station-4-devkitc")
    b["slots"][0]["temperature"]["adc"] = 37  # frees GPIO 34
    b["slots"][2]["lock"] = {"pin": 34}
    report = boards.validate(b, name="boards/station-4-devkitc.json")
    assert report.errors == ["boards/station-4-devkitc.json: slots[2].lock.pin: GPIO 34 is input-only"]


@pytest.mark.parametrize(
    ("stem", "key"),
    [
        ("outlet-2-devkitc", "outlets[1].relay.pin"),
        ("outlet-2-devkitc", "status_led.pin"),
        ("outlet-2-devkitc", "outlets[0].meter.sel"),
        ("station-4-devkitc", "buses.i2c0.scl"),  # open drain: the pin drives the line low
        ("station-8-devkitc", "link.serial.tx"),
    ],
)
def test_every_output_on_an_input_only_pin_is_an_error(stem, key):
    b = board(stem)
    *parents, last = key.replace("[", ".").replace("]", "").split(".")
    target = b
    for p in parents:
        target = target[int(p) if p.isdigit() else p]
    target[last] = 38
    assert errors(b, stem) == [f"{key}: GPIO 38 is input-only"]


def test_unknown_key_at_the_top():
    b = board("station-4-devkitc")
    b["colour"] = "red"
    assert errors(b, "station-4-devkitc") == ["colour: unknown key"]


def test_unknown_key_deep_inside_names_its_path_and_a_near_miss():
    b = board("station-4-devkitc")
    b["slots"][3]["identity"]["bms"]["mux"]["chanel"] = 4
    assert errors(b, "station-4-devkitc") == ['slots[3].identity.bms.mux.chanel: unknown key (did you mean "channel"?)']


def test_missing_function():
    b = board("station-4-devkitc")
    del b["slots"][1]["lock"]
    assert errors(b, "station-4-devkitc") == ["slots[1].lock: required key is missing"]
    o = board("outlet-2-devkitc")
    del o["outlets"][0]["meter"]
    assert errors(o, "outlet-2-devkitc") == ["outlets[0].meter: required key is missing"]


def test_missing_required_top_level_key():
    b = board("station-8-devkitc")
    del b["micropython"]
    del b["slots"]
    assert problems(b, "station-8-devkitc") == (
        ["micropython: required key is missing", "slots: required key is missing"],
        ["expanders.io0: not used by anything on the board", "expanders.io1: not used by anything on the board"],
    )


def test_slot_and_outlet_counts():
    b = board("station-4-devkitc")
    b["slots"] = b["slots"][:1]
    assert errors(b, "station-4-devkitc") == ["slots: 1 entry, expected 2..16"]
    o = board("outlet-2-devkitc")
    o["outlets"] = []
    assert errors(o, "outlet-2-devkitc") == ["outlets: 0 entries, expected 1..8"]
    o = board("outlet-2-devkitc")
    o["outlets"] = [copy.deepcopy(o["outlets"][0]) for _ in range(9)]
    errs = errors(o, "outlet-2-devkitc")
    assert errs[0] == "outlets: 9 entries, expected 1..8"
    assert "outlets[8].relay.pin: GPIO 26 is already used by outlets[0].relay.pin" in errs


def test_gpio_used_twice_names_both_keys():
    o = board("outlet-2-devkitc")
    o["outlets"][1]["relay"]["pin"] = 26
    assert errors(o, "outlet-2-devkitc") == ["outlets[1].relay.pin: GPIO 26 is already used by outlets[0].relay.pin"]


def test_a_function_on_a_bus_pin():
    b = board("station-4-devkitc")
    b["status_led"]["pin"] = 21
    assert errors(b, "station-4-devkitc") == ["status_led.pin: GPIO 21 is already used by buses.i2c0.sda"]


def test_a_onewire_bus_pin_on_a_meter_pin():
    o = board("outlet-2-devkitc")
    o["buses"] = {"ow0": {"type": "onewire", "pin": 32}}
    errs, warns = problems(o, "outlet-2-devkitc")
    assert errs == ["buses.ow0.pin: GPIO 32 is already used by outlets[0].meter.sel"]  # in document order
    assert warns == ["buses.ow0: not used by anything on the board"]


def test_the_uart_pins_count_as_used_even_when_left_to_their_defaults():
    b = board("station-4-devkitc")
    b["status_led"]["pin"] = 1
    assert errors(b, "station-4-devkitc") == ["link.serial.uart: GPIO 1 is already used by status_led.pin"]
    b = board("station-4-devkitc")
    b["link"]["serial"]["uart"] = 1
    assert errors(b, "station-4-devkitc") == ['link.serial.uart: UART1\'s default pins are flash pins (GPIO 10, 9): set "tx" and "rx"']
    b["link"]["serial"].update(tx=17, rx=16)
    assert errors(b, "station-4-devkitc") == []


@pytest.mark.parametrize("gpio", [6, 7, 8, 9, 10, 11])
def test_flash_pins(gpio):
    b = board("station-4-devkitc")
    b["status_led"]["pin"] = gpio
    assert errors(b, "station-4-devkitc") == [f"status_led.pin: GPIO {gpio} is wired to the SPI flash (GPIO 6-11)"]


@pytest.mark.parametrize("gpio", [20, 24, 28, 31, 40, 99])
def test_gpios_the_esp32_does_not_have(gpio):
    b = board("station-4-devkitc")
    b["status_led"]["pin"] = gpio
    assert errors(b, "station-4-devkitc") == [f"status_led.pin: GPIO {gpio} does not exist on the ESP32"]


def test_adc_outside_adc1():
    b = board("station-4-devkitc")
    b["slots"][1]["temperature"]["adc"] = 25
    assert errors(b, "station-4-devkitc") == [
        "slots[1].temperature.adc: GPIO 25 is not an ADC1 pin (32-39; ADC2 does not work while Wi-Fi is on)"
    ]


@pytest.mark.parametrize("gpio", [0, 2, 5, 12, 15])
def test_strapping_pins_are_warnings(gpio):
    b = board("outlet-2-devkitc")
    b["outlets"][0]["relay"]["pin"] = gpio
    report = boards.validate(b, name="boards/outlet-2-devkitc.json")
    assert report.errors == []
    assert report.warnings == [
        f"boards/outlet-2-devkitc.json: outlets[0].relay.pin: GPIO {gpio} is a strapping pin ({boards.STRAPPING[gpio]})"
    ]


def test_strapping_warning_does_not_block_provisioning(tmp_path):
    b = board("outlet-2-devkitc")
    b["status_led"]["pin"] = 2
    path = tmp_path / "outlet-2-devkitc.json"
    path.write_text(json.dumps(b))
    assert boards.check(path) == [f"{path}: status_led.pin: GPIO 2 is a strapping pin ({boards.STRAPPING[2]})"]


def test_reference_to_an_unknown_bus_or_expander():
    b = board("station-4-devkitc")
    b["rtc"]["bus"] = "i2c1"
    b["slots"][0]["lock"]["expander"] = "io9"
    assert errors(b, "station-4-devkitc") == [
        'slots[0].lock.expander: no expander named "io9" (expanders: io0)',
        'rtc.bus: no bus named "i2c1" (buses: i2c0)',
    ]
    o = board("outlet-2-devkitc")
    o["rtc"] = {"type": "ds3231", "bus": "i2c0", "addr": 104}
    assert errors(o, "outlet-2-devkitc") == ['rtc.bus: no bus named "i2c0" (the board has no buses)']


def test_reference_to_a_bus_of_the_wrong_type():
    b = board("station-4-devkitc")
    b["buses"]["ow0"] = {"type": "onewire", "pin": 4}
    b["rtc"]["bus"] = "ow0"
    assert errors(b, "station-4-devkitc") == ['rtc.bus: "ow0" is a onewire bus, expected i2c']


def test_expander_pins_in_range_and_used_once():
    b = board("station-4-devkitc")
    b["slots"][0]["lock"]["pin"] = 16
    b["slots"][1]["lock"]["pin"] = 3
    assert errors(b, "station-4-devkitc") == [
        "slots[0].lock.pin: 16 is out of range (0..15)",
        "slots[1].lock.pin: io0 pin 3 is already used by slots[0].charger.pin",
    ]


def test_i2c_addresses_in_their_parts_range():
    b = board("station-4-devkitc")
    b["expanders"]["io0"]["addr"] = 40
    b["rtc"]["addr"] = 0x57
    b["slots"][0]["identity"]["bms"]["addr"] = 120
    b["slots"][1]["identity"]["bms"]["mux"]["addr"] = 111
    b["slots"][2]["identity"]["bms"]["mux"]["channel"] = 8
    assert errors(b, "station-4-devkitc") == [
        "expanders.io0.addr: 40 is out of range (32..39)",
        "slots[0].identity.bms.addr: 120 is out of range (8..119)",
        "slots[1].identity.bms.mux.addr: 111 is out of range (112..119)",
        "slots[2].identity.bms.mux.channel: 8 is out of range (0..7)",
        "rtc.addr: expected 104, got 87",
    ]


def test_i2c_address_collision_on_one_bus():
    b = board("station-4-devkitc")
    b["expanders"]["io1"] = {"type": "mcp23017", "bus": "i2c0", "addr": 32}
    assert problems(b, "station-4-devkitc") == (
        ["expanders.io1.addr: I2C address 32 (0x20) on i2c0 is already used by expanders.io0"],
        ["expanders.io1: not used by anything on the board"],
    )


def test_mux_channels_separate_the_batteries_but_one_channel_does_not():
    b = board("station-4-devkitc")
    b["slots"][1]["identity"]["bms"]["mux"]["channel"] = 0
    assert errors(b, "station-4-devkitc") == [
        "slots[1].identity.bms.addr: I2C address 11 (0x0b) on i2c0 mux 112 channel 0 is already used by slots[0].identity.bms"
    ]


def test_a_device_on_the_bus_itself_collides_with_every_channel():
    b = board("station-4-devkitc")
    b["slots"] = b["slots"][:2]
    del b["slots"][0]["identity"]["bms"]["mux"]
    assert errors(b, "station-4-devkitc") == [
        "slots[1].identity.bms.addr: I2C address 11 (0x0b) on i2c0 mux 112 channel 1 is already used by slots[0].identity.bms"
    ]


def test_a_device_at_the_mux_address():
    b = board("station-4-devkitc")
    b["slots"][0]["identity"]["bms"] = {"bus": "i2c0", "addr": 112}
    assert errors(b, "station-4-devkitc") == [
        f"slots[{i}].identity.bms.mux.addr: I2C address 112 (0x70) on i2c0 is already used by slots[0].identity.bms" for i in (1, 2, 3)
    ]


def test_smbus_speed_warning():
    b = board("station-8-devkitc")
    b["buses"]["i2c0"]["freq"] = 400000
    warning = "buses.i2c0.freq: 400000 Hz is above SMBus's 100 kHz: the smart batteries on i2c0 may not answer"
    assert problems(b, "station-8-devkitc") == ([], [warning])
    del b["buses"]["i2c0"]["freq"]  # hal/esp32.py's default is 400 kHz
    assert problems(b, "station-8-devkitc") == ([], [warning])


def test_two_buses_on_one_controller():
    b = board("station-4-devkitc")
    b["buses"]["i2c1"] = {"type": "i2c", "id": 0, "sda": 18, "scl": 19}
    b["rtc"]["bus"] = "i2c1"
    assert errors(b, "station-4-devkitc") == ["buses.i2c1.id: I2C controller 0 is already buses.i2c0"]


def test_name_is_the_file_stem():
    b = board("station-4-devkitc")
    b["name"] = "station-4"
    assert errors(b, "station-4-devkitc") == ['name: "station-4" does not match the file name "station-4-devkitc"']
    assert boards.validate(b).errors == []  # a dict without a file name: nothing to compare


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("format", 2, "format: expected 1, got 2"),
        ("chip", "esp32s3", 'chip: expected one of "esp32", "sim", got "esp32s3"'),
        ("hal", "linux", 'hal: expected one of "esp32", "sim", got "linux"'),
        ("micropython", "v1.29", 'micropython: "v1.29" is not a MicroPython version like 1.29'),
        ("watchdog_ms", "8000", 'watchdog_ms: expected an integer, got "8000"'),
        ("watchdog_ms", 100, "watchdog_ms: 100 is out of range (1000..60000)"),
        ("notes", 3, "notes: expected a string, got 3"),
    ],
)
def test_top_level_values(key, value, message):
    b = board("station-4-devkitc")
    b[key] = value
    assert errors(b, "station-4-devkitc") == [message]


def test_an_unknown_kind_is_one_error_not_a_cascade():
    b = board("station-4-devkitc")
    b["kind"] = "kiosk"
    assert problems(b, "station-4-devkitc") == (['kind: expected one of "station", "outlet", got "kiosk"'], [])


def test_kind_decides_slots_or_outlets():
    o = board("outlet-2-devkitc")
    o["slots"] = board("station-4-devkitc")["slots"]
    assert errors(o, "outlet-2-devkitc") == ["slots: only a station board has slots"]


def test_hal_and_chip_and_sim_go_together():
    o = board("outlet-2-devkitc")
    o["chip"] = "sim"
    assert errors(o, "outlet-2-devkitc") == ['hal: the esp32 hardware layer needs chip "esp32"']
    o = board("outlet-2-devkitc")
    o["hal"] = "sim"
    assert errors(o, "outlet-2-devkitc") == ["sim: required key is missing"]
    o = board("outlet-2-devkitc")
    o["sim"] = board("sim-outlet-2")["sim"]
    assert errors(o, "outlet-2-devkitc") == ['sim: only a board with hal "sim" has physics parameters']


def test_chip_sim_skips_the_esp32_pin_rules_but_not_duplicates():
    s = board("sim-outlet-2")
    s["chip"] = "sim"
    s["outlets"][0]["relay"]["pin"] = 7
    s["outlets"][1]["relay"]["pin"] = 7
    assert errors(s, "sim-outlet-2") == ["outlets[1].relay.pin: GPIO 7 is already used by outlets[0].relay.pin"]


def test_bms_sensors_need_a_smart_battery():
    b = board("station-4-devkitc")
    b["buses"]["ow0"] = {"type": "onewire", "pin": 4}
    b["slots"][0]["identity"] = {"bus": "ow0"}
    assert errors(b, "station-4-devkitc") == [
        "slots[0].voltage.bms: the slot's identity is not a smart battery (identity.bms)",
        "slots[0].current.bms: the slot's identity is not a smart battery (identity.bms)",
    ]


def test_one_onewire_bus_per_slot():
    b = board("station-4-devkitc")
    b["buses"]["ow0"] = {"type": "onewire", "pin": 4}
    b["slots"][0].update(identity={"bus": "ow0"}, voltage={"adc": 32, "scale": 11.0}, current={"adc": 33, "scale": 2.5, "offset": -10})
    b["slots"][1].update(identity={"bus": "ow0"}, voltage={"adc": 37, "scale": 11.0}, current={"adc": 38, "scale": 2.5, "offset": -10})
    assert errors(b, "station-4-devkitc") == [
        "slots[1].identity.bus: ow0 already identifies the battery in slots[0] (one 1-Wire bus per slot)"
    ]


def test_analog_sensor_variants():
    b = board("station-4-devkitc")
    b["slots"][0]["voltage"] = {"adc": 32, "bms": "bms"}
    b["slots"][1]["voltage"] = {"scale": 2.0}
    b["slots"][2]["voltage"] = {"bms": "battery"}
    b["slots"][3]["temperature"]["scale"] = 0.1
    assert errors(b, "station-4-devkitc") == [
        'slots[0].voltage: use "adc" or "bms", not both',
        'slots[1].voltage: needs "adc" or "bms"',
        'slots[2].voltage.bms: expected "bms", got "battery"',
        "slots[3].temperature.scale: an NTC sensor is calibrated by its ntc curve, not scale/offset",
    ]


def test_meter_calibration_must_agree_with_itself():
    o = board("outlet-2-devkitc")
    o["outlets"][0]["meter"]["mwh_per_pulse"] = 0.5
    o["outlets"][1]["meter"]["ma_per_hz"] = 0
    assert errors(o, "outlet-2-devkitc") == [
        "outlets[0].meter.mwh_per_pulse: 0.5 does not match mw_per_hz / 3600 = 0.5628",
        "outlets[1].meter.ma_per_hz: 0 is out of range (1e-06..1000000.0)",
    ]


def test_meter_type():
    o = board("outlet-2-devkitc")
    o["outlets"][0]["meter"]["type"] = "hlw8012"
    del o["outlets"][1]["meter"]["type"]
    assert errors(o, "outlet-2-devkitc") == [
        'outlets[0].meter.type: expected "bl0937", got "hlw8012"',
        "outlets[1].meter.type: required key is missing",
    ]


def test_limits_per_kind():
    b = board("station-4-devkitc")
    b["limits"]["over_power_mw"] = 3680000
    b["limits"]["under_temp_dc"] = 600
    assert errors(b, "station-4-devkitc") == [
        'limits.over_power_mw: unknown key (did you mean "over_voltage_mv"?)',
        "limits.under_temp_dc: must be below over_temp_dc (550)",
    ]


def test_station_sim_schema():
    s = board("sim-station-4")
    s["sim"]["full_mv"] = 30000
    s["sim"]["term_ma"] = 5000
    s["sim"]["batteries"][1]["id"] = "xyz"
    s["sim"]["batteries"][3]["id"] = s["sim"]["batteries"][0]["id"].upper()
    s["sim"]["batteries"][0]["soc"] = 35  # a fraction, not percent
    s["sim"]["batteries"][0]["soh"] = 96
    s["sim"]["thermal_tau"] = 5
    s["sim"]["r_int_mohm"] = 0
    assert errors(s, "sim-station-4") == [
        "sim.r_int_mohm: 0 is out of range (1..10000)",
        "sim.batteries[0].soc: 35 is out of range (0..1)",
        'sim.batteries[0].soh: unknown key (did you mean "soc"?)',
        'sim.batteries[1].id: "xyz" is not a battery id (1 to 16 bytes in hex)',
        'sim.thermal_tau: unknown key (did you mean "thermal_tau_s"?)',
        "sim.empty_mv: must be below full_mv (30000)",
        "sim.term_ma: must be below charge_ma (4000)",
        "sim.batteries[3].id: battery 0B00000000A1C3E5 is already in sim.batteries[0]",
    ]


def test_sim_keys_follow_the_kind():
    s = board("sim-station-4")
    s["sim"]["mains_mv"] = 230000
    o = board("sim-outlet-2")
    o["sim"]["capacity_mah"] = 15000
    assert errors(s, "sim-station-4") == ["sim.mains_mv: unknown key"]
    assert errors(o, "sim-outlet-2") == ["sim.capacity_mah: unknown key"]
    o["sim"] = {}
    assert errors(o, "sim-outlet-2") == []  # every key has a default in hal/sim.py


def test_sim_lists_mirror_slots_and_outlets():
    s = board("sim-station-4")
    s["sim"]["batteries"].pop()
    assert errors(s, "sim-station-4") == ["sim.batteries: 3 entries, expected 4 (one per slot, null for an empty one)"]
    o = board("sim-outlet-2")
    o["sim"]["loads"].append(5)
    o["sim"]["mains_mv"] = 23000
    assert errors(o, "sim-outlet-2") == [
        "sim.mains_mv: 23000 is out of range (90000..264000)",
        "sim.loads: 3 entries, expected 2 (one per outlet)",
    ]


def test_types_are_checked_where_they_are():
    b = board("station-4-devkitc")
    b["slots"][0]["presence"]["active_low"] = "yes"
    b["slots"][1] = []
    b["buses"]["i2c0"]["sda"] = "21"
    b["expanders"]["io0"]["addr"] = True
    b["link"]["mqtt"] = None
    errs = errors(b, "station-4-devkitc")
    assert errs[:5] == [
        'buses.i2c0.sda: expected a GPIO number, got "21"',
        "expanders.io0.addr: expected an integer, got true",
        'slots[0].presence.active_low: expected true or false, got "yes"',
        "slots[1]: expected an object, got a list",
        "link.mqtt: expected an object, got null",
    ]


def test_bad_names_and_tags():
    b = board("station-4-devkitc")
    b["buses"]["I2C-1"] = {"type": "spi"}
    errs, warns = problems(b, "station-4-devkitc")
    assert errs == [
        "buses.I2C-1: not a valid name (a lowercase letter, then lowercase letters, digits or _)",
        'buses.I2C-1.type: expected one of "i2c", "onewire", got "spi"',
    ]
    assert warns == ["buses.I2C-1: not used by anything on the board"]


# --- files: JSON syntax, duplicates, provisioning's check ---------------------------------------


def test_json_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "format": 1,\n  "name": "broken"\n  "kind": "station"\n}\n')
    report = boards.validate(path)
    assert report.errors == [f"{path}: line 4, column 3: invalid JSON: Expecting ',' delimiter"]
    assert report.board is None and not report.ok
    with pytest.raises(boards.BoardError) as e:
        boards.load(path)
    assert e.value.exit_code == EXIT_USAGE


def test_a_key_twice_in_one_object(tmp_path):
    lock = '"lock": {"expander": "io0", "pin": 6},'
    text = (BOARDS / "station-4-devkitc.json").read_text().replace(lock, lock + " " + lock)
    path = tmp_path / "station-4-devkitc.json"
    path.write_text(text)
    assert boards.validate(path).errors == [f"{path}: slots[1].lock: key appears more than once (JSON keeps only the last)"]


def test_file_not_json_object(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    assert boards.validate(path).errors == [f"{path}: expected a JSON object, got a list"]


def test_missing_file_is_an_environment_error(tmp_path):
    with pytest.raises(boards.BoardError) as e:
        boards.validate(tmp_path / "nope.json")
    assert e.value.exit_code == EXIT_ENVIRONMENT


def test_check_raises_with_every_message(tmp_path):
    b = board("station-4-devkitc")
    b["status_led"]["pin"] = 7
    b["colour"] = "red"
    path = tmp_path / "station-4-devkitc.json"
    path.write_text(json.dumps(b))
    with pytest.raises(boards.BoardError) as e:
        boards.check(path)
    assert e.value.messages == [f"{path}: colour: unknown key", f"{path}: status_led.pin: GPIO 7 is wired to the SPI flash (GPIO 6-11)"]
    assert e.value.exit_code == EXIT_USAGE
    rendered = e.value.render("provision")
    assert rendered.startswith(f"voltgate: provision: {path} has 2 errors:\n")
    assert all(m in rendered for m in e.value.messages)


# --- the CLI ------------------------------------------------------------------------------------


def _write(tmp_path, stem, doc):
    path = tmp_path / f"{stem}.json"
    path.write_text(json.dumps(doc))
    return path


def test_cli_validate_every_board(capsys):
    assert cli.main(["boards", "validate"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [f"boards/{name}: valid" for name in COMMITTED]


def test_cli_validate_prints_messages_and_exits_2(tmp_path, capsys):
    bad = board("outlet-2-devkitc")
    bad["outlets"][0]["relay"]["pin"] = 34
    warned = board("sim-outlet-2")
    warned["status_led"]["pin"] = 2
    files = [_write(tmp_path, "outlet-2-devkitc", bad), _write(tmp_path, "sim-outlet-2", warned)]
    assert cli.main(["boards", "validate", *map(str, files)]) == 2
    cap = capsys.readouterr()
    assert cap.out.splitlines() == [
        f"{files[0]}: 2 errors",
        f"  error: {files[0]}: outlets[0].relay.pin: GPIO 34 is input-only",
        f"  error: {files[0]}: outlets[0].meter.cf: GPIO 34 is already used by outlets[0].relay.pin",
        f"{files[1]}: 1 warning",
        f"  warning: {files[1]}: status_led.pin: GPIO 2 is a strapping pin ({boards.STRAPPING[2]})",
    ]
    assert cap.err == "voltgate: boards validate: 1 of 2 board files has errors\n"


def test_cli_validate_warnings_alone_exit_0(tmp_path, capsys):
    warned = board("sim-outlet-2")
    warned["status_led"]["pin"] = 2
    assert cli.main(["boards", "validate", str(_write(tmp_path, "sim-outlet-2", warned))]) == 0
    assert "warning:" in capsys.readouterr().out


def test_cli_validate_json(tmp_path, capsys):
    bad = board("station-4-devkitc")
    bad["slots"][0]["door"]["pin"] = 0
    path = _write(tmp_path, "station-4-devkitc", bad)
    assert cli.main(["boards", "validate", "--json", "boards/station-8-devkitc.json", str(path)]) == 2
    assert json.loads(capsys.readouterr().out) == {
        "valid": False,
        "files": [
            {"file": "boards/station-8-devkitc.json", "valid": True, "errors": [], "warnings": []},
            {
                "file": str(path),
                "valid": False,
                "errors": [f"{path}: slots[0].door.pin: io0 pin 0 is already used by slots[0].presence.pin"],
                "warnings": [],
            },
        ],
    }


def test_cli_validate_missing_file_exits_3(capsys):
    assert cli.main(["boards", "validate", "boards/nope.json"]) == 3
    err = capsys.readouterr().err
    assert err == "voltgate: boards validate: no board file boards/nope.json (voltgate boards list shows the board files)\n"


def test_cli_list(capsys):
    assert cli.main(["boards", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "CHIP", "HAL", "SIZE", "CHECK"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["station-8-devkitc"] == ["station", "esp32", "esp32", "8", "slots", "valid"]
    assert rows["sim-outlet-2"] == ["outlet", "esp32", "sim", "2", "outlets", "valid"]
    assert len(rows) == len(COMMITTED)


def test_cli_list_json_and_a_broken_file(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert cli.main(["boards", "list", "--json", "boards/outlet-2-devkitc.json", str(broken)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [
        {
            "file": "boards/outlet-2-devkitc.json",
            "name": "outlet-2-devkitc",
            "kind": "outlet",
            "chip": "esp32",
            "hal": "esp32",
            "slots": None,
            "outlets": 2,
            "errors": 0,
            "warnings": 0,
        },
        dict.fromkeys(("name", "kind", "chip", "hal", "slots", "outlets")) | {"file": str(broken), "errors": 1, "warnings": 0},
    ]


def test_cli_boards_without_a_subcommand_prints_help(capsys):
    assert cli.main(["boards"]) == 2
    err = capsys.readouterr().err
    assert "validate" in err and "list" in err and "examples:" in err


def test_console_script_lists_boards_as_json():
    exe = Path(sys.executable).with_name("voltgate")
    exe = str(exe) if exe.exists() else shutil.which("voltgate")
    assert exe, "the voltgate console script is not installed"
    proc = subprocess.run([exe, "boards", "list", "--json"], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert {r["name"] for r in json.loads(proc.stdout)} == {Path(n).stem for n in COMMITTED}
    proc = subprocess.run([exe, "boards", "validate", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "examples:" in proc.stdout and "--json" in proc.stdout
