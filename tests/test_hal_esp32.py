"""firmware/hal/esp32.py, which only runs on an ESP32, checked two ways here:

1. Statically, against the published ESP32 MicroPython API stubs (PyPI
   `micropython-esp32-stubs`, the version of the boards' MicroPython) with
   mypy, stub-only: the stubs' own stdlib (`micropython-stdlib-stubs`) as
   the typeshed, no site-packages. A misspelt method or constant, a wrong
   keyword or a deprecated call fails the build. The drivers' buses are
   typed by `# type: I2C` comments (imported under `if TYPE_CHECKING:`,
   never on the board), so their bus calls are checked too.
2. Dynamically, on the real MicroPython unix port, from source and from the
   .mpy build, with stand-in machine/esp32/onewire modules
   (tests/mp/fake_esp32/) answering as the hardware would.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from voltgate import build, mpy, tree

ROOT = tree.root()
HAL = tree.firmware_dir() / "hal"
HAL_FILES = ["esp32.py", "esp32_slots.py", "esp32_outlets.py", "mcp23017.py", "sbs.py", "ds3231.py"]
FAKES = ROOT / "tests" / "mp" / "fake_esp32"
STUB_DISTS = ("micropython-esp32-stubs", "micropython-stdlib-stubs")


# --- static check against the ESP32 stubs ---------------------------------


@pytest.fixture(scope="session")
def stub_dir(tmp_path_factory) -> Path:
    """The .pyi files of the stub distributions, alone in one folder.

    They install loose into site-packages (machine.pyi, stdlib/, ...), which
    mypy refuses as a search path; a copy holds only them."""
    out = tmp_path_factory.mktemp("esp32-stubs")
    for name in STUB_DISTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is not installed: run 'make setup' (requirements.txt pins it)")
        for f in dist.files or ():
            if f.suffix == ".pyi" or f.name == "VERSIONS":
                dst = out / f
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f.locate(), dst)
    assert (out / "machine.pyi").is_file() and (out / "stdlib" / "VERSIONS").is_file()
    return out


@pytest.fixture(scope="session")
def mypy_config(stub_dir, tmp_path_factory) -> Path:
    cfg = tmp_path_factory.mktemp("mypy") / "mypy.ini"
    cfg.write_text(
        "[mypy]\n"
        f"mypy_path = {stub_dir}\n"
        f"custom_typeshed_dir = {stub_dir}\n"
        "no_site_packages = True\n"
        # device code has no annotations: check the bodies anyway
        "check_untyped_defs = True\n"
        # report our files, not the stubs' own inconsistencies
        "follow_imports = silent\n"
        "follow_imports_for_stubs = True\n"
        "enable_error_code = deprecated\n"
        "warn_unused_ignores = True\n"
        f"cache_dir = {cfg.parent / 'cache'}\n"
    )
    return cfg


def run_mypy(config: Path, files: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), *files],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_stubs_match_the_boards_micropython():
    stubs = importlib.metadata.version("micropython-esp32-stubs")
    for path in sorted(tree.boards_dir().glob("*.json")):
        board = json.loads(path.read_text())
        if board.get("hal") == "esp32":
            want = board.get("micropython", "")
            assert stubs == want or stubs.startswith(want + "."), (
                f"{path.name} runs MicroPython {want}, the stubs are {stubs}: pin micropython-esp32-stubs=={want}.* in requirements"
            )


def test_hal_esp32_passes_the_stub_check(mypy_config):
    res = run_mypy(mypy_config, [f"hal/{f}" for f in HAL_FILES], tree.firmware_dir())
    assert res.returncode == 0, f"mypy against the ESP32 stubs:\n{res.stdout}{res.stderr}"
    assert f"no issues found in {len(HAL_FILES)} source files" in res.stdout


BAD_SNIPPETS = [
    ("import machine\nmachine.Pin(4, machine.Pin.OUTT)\n", '"type[Pin]" has no attribute "OUTT"'),
    ("from machine import ADC, Pin\n\ndef f():\n    adc = ADC(Pin(34), atten=ADC.ATTN_11DB)\n    return adc.read_uvv()\n", '"ADC" has no attribute "read_uvv"'),
    ("import esp32\n\ndef f():\n    return esp32.NVS('voltgate').get_blob('k')\n", 'Too few arguments for "get_blob" of "NVS"'),
    ("import machine\nmachine.I2C(0, scl=machine.Pin(22), sda=machine.Pin(21), baud=100000)\n", 'Unexpected keyword argument "baud"'),
    ("from machine import ADC\n\ndef f():\n    ADC(34).atten(ADC.ATTN_11DB)\n", "machine.ADC.atten is deprecated"),
]


@pytest.mark.parametrize("code,message", BAD_SNIPPETS, ids=["pin-const", "adc-method", "nvs-args", "i2c-kwarg", "deprecated"])
def test_the_check_reports_api_misuse(mypy_config, tmp_path, code, message):
    (tmp_path / "bad.py").write_text(code)
    res = run_mypy(mypy_config, ["bad.py"], tmp_path)
    assert res.returncode == 1 and message in res.stdout, res.stdout + res.stderr


# a typo in each file, where the checked object comes from a constructor, a
# driver's bus (the `# type: I2C` comments) or another driver
MUTATIONS = [
    ("mcp23017.py", "self._i2c.writeto_mem(self.addr, reg, b)", "self._i2c.writeto_memm(self.addr, reg, b)", '"I2C" has no attribute "writeto_memm"'),
    ("sbs.py", "self._i2c.writeto(self.addr, self._buf)", "self._i2c.writeto(self._buf)", 'Too few arguments for "writeto"'),
    ("ds3231.py", "self._i2c.readfrom_mem_into(self.addr, reg, buf)", "self._i2c.readfrom_mem_into(self.addr, reg, buf, 8)", "Too many"),
    ("esp32.py", "self._wdt.feed()", "self._wdt.fed()", '"WDT" has no attribute "fed"'),
    ("esp32.py", "self._nvs.erase_key(key)", "self._nvs.erase(key)", '"NVS" has no attribute "erase"'),
    ("esp32_slots.py", "chip.input(spec[\"pin\"])", "chip.inputt(spec[\"pin\"])", '"MCP23017" has no attribute "inputt"'),
    ("esp32_slots.py", "self._ow.crc8(rom)", "self._ow.crc(rom)", '"OneWire" has no attribute "crc"'),
    ("esp32_outlets.py", "pin.irq(self._tick, Pin.IRQ_RISING, hard=True)", "pin.irq(self._tick, Pin.IRQ_RISE, hard=True)", 'has no attribute "IRQ_RISE"'),
    ("esp32.py", "self._chip.set_datetime(", "self._chip.set_time(", '"DS3231" has no attribute "set_time"'),
    ("esp32.py", "chip.output(spec[\"pin\"], off)", "chip.outpt(spec[\"pin\"], off)", '"MCP23017" has no attribute "outpt"'),
]


@pytest.mark.parametrize("name,old,new,message", MUTATIONS, ids=[f"{m[0]}:{m[3][:24]}" for m in MUTATIONS])
def test_the_check_sees_into_every_hal_file(mypy_config, tmp_path, name, old, new, message):
    shutil.copytree(HAL, tmp_path / "hal", ignore=shutil.ignore_patterns("__pycache__", "sim*.py"))
    src = (tmp_path / "hal" / name).read_text()
    assert src.count(old) == 1, f"{old!r} is no longer in hal/{name}: update this mutation"
    (tmp_path / "hal" / name).write_text(src.replace(old, new))
    res = run_mypy(mypy_config, [f"hal/{f}" for f in HAL_FILES], tmp_path)
    assert res.returncode == 1 and message in res.stdout and f"hal/{name}:" in res.stdout, res.stdout + res.stderr


# --- on the MicroPython unix port with stand-in hardware modules ----------

STATION = json.loads((tree.boards_dir() / "station-4-devkitc.json").read_text())
ESP32_BOARDS = {}
for _path in sorted(tree.boards_dir().glob("*.json")):
    _board = json.loads(_path.read_text())
    if _board.get("hal") == "esp32":
        ESP32_BOARDS[_path.stem] = _board

BL0937 = {"type": "bl0937", "mw_per_hz": 2026.0, "mv_per_hz": 185.98, "ma_per_hz": 12.87, "mwh_per_pulse": 0.5628}
OUTLETS = {
    "format": 1,
    "name": "outlet-5-test",
    "kind": "outlet",
    "chip": "esp32",
    "micropython": "1.29",
    "hal": "esp32",
    "outlets": [
        {"relay": {"pin": [13, 14, 15, 22, 23][i]}, "meter": dict(BL0937, cf=[34, 35, 36, 39, 4][i], cf1=[25, 26, 27, 32, 33][i], sel=[16, 17, 18, 19, 21][i])}
        for i in range(5)
    ],
}
ONE_WIRE = {
    "format": 1,
    "name": "station-2-onewire-test",
    "kind": "station",
    "chip": "esp32",
    "micropython": "1.29",
    "hal": "esp32",
    "buses": {"ow0": {"type": "onewire", "pin": 4}, "ow1": {"type": "onewire", "pin": 5}},
    "slots": [
        {"lock": {"pin": 25, "active_low": True}, "voltage": {"adc": 32, "scale": 11.0, "offset": 100}, "identity": {"bus": "ow0"}},
        {"lock": {"pin": 26}, "voltage": {"adc": 33, "scale": 11.0, "offset": 100}, "identity": {"bus": "ow1"}},
    ],
}

CODE = """\
import json
import hal_esp32_checks
from vgemit import emit
r = hal_esp32_checks.run(json.loads({boards!r}))
r["file"] = hal_esp32_checks.hal_esp32.__file__
emit(r)
"""


@pytest.fixture(scope="session", params=["source", "compiled"])
def seen(request, firmware_build):
    """What the stand-in hardware saw: one MicroPython run per form of the
    firmware, the fakes' folder first on the module path."""
    if request.param == "source":
        path = [str(FAKES), *mpy.source_path()]
    else:
        path = [str(FAKES), str(mpy.MPSIDE), *build.board_path(firmware_build)]
    boards = json.dumps({"station": STATION, "outlets": OUTLETS, "one_wire": ONE_WIRE, "files": ESP32_BOARDS})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TZ", "UTC")  # the unix port's time.mktime is local time; the ESP32's is UTC
        res = mpy.run(code=CODE.format(boards=boards), path=path)
    got = res.record
    assert got["file"].endswith("esp32.py" if request.param == "source" else "esp32.mpy")
    return got


def test_builds_the_station_from_its_board_file(seen):
    s = seen["station"]
    assert (s["kind"], s["root"], s["slots"], s["outlets"]) == ("station", "/data", 4, 0)
    assert s["i2c"] == [[0, 22, 21, 100000]]
    assert s["adc_atten"] == [[34, 3], [35, 3], [36, 3], [39, 3]]  # ADC.ATTN_11DB


@pytest.mark.parametrize("name", sorted(ESP32_BOARDS))
def test_every_esp32_board_file_builds(seen, name):
    board = ESP32_BOARDS[name]
    got = seen["files"][name]
    assert (got["kind"], got["slots"], got["outlets"]) == (board["kind"], len(board.get("slots", ())), len(board.get("outlets", ())))
    assert got["on"] and all(got["on"]) and not any(got["safe"])


def test_only_the_drivers_a_board_file_names_are_loaded(seen):
    """Loaded code lives in the heap: an outlet without expanders, smart
    batteries, 1-Wire or an RTC chip carries none of their drivers, nor the
    station's slot code; a station none of the outlet's meter code."""
    for name, board in ESP32_BOARDS.items():
        want = set()
        if board.get("expanders"):
            want.add("hal.mcp23017")
        if board.get("rtc"):
            want.add("hal.ds3231")
        if any(b["type"] == "onewire" for b in board.get("buses", {}).values()):
            want.add("onewire")
        if any("bms" in s.get("identity", {}) for s in board.get("slots", ())):
            want.add("hal.sbs")
        if board.get("slots"):
            want.add("hal.esp32_slots")
        if board.get("outlets"):
            want.add("hal.esp32_outlets")
        assert set(seen["drivers"][name]) == want, name
    assert seen["drivers"]["outlet-2-devkitc"] == ["hal.esp32_outlets"]


def test_expander_pins_follow_the_board_file(seen):
    s = seen["station"]
    outputs = {2, 3, 6, 7, 10, 11, 14, 15}  # lock and charger of each slot
    assert s["iodir"] == 0xFFFF & ~sum(1 << p for p in outputs)
    assert s["olat_boot"] == 0  # every output off before it became an output
    assert s["olat_lock2"] == 1 << 10 and s["lock2_value"] == 1  # slot 2's lock is MCP23017 pin 10
    assert s["olat_on"] == (1 << 10) | (1 << 3) and s["led_on"] == 1
    assert s["presence"] == [0, 0, 1, 0]  # pin 8 pulled low, active low
    assert s["door"] == [0, 1, 0, 0]


def test_safe_turns_every_output_off(seen):
    s = seen["station"]
    assert s["olat_safe"] == 0 and s["led_safe"] == 0 and s["safe_wrote_olat"]
    assert s["outs_safe"] == [[0, 0]] * 4 + [0]
    o = seen["outlets"]
    assert o["relays_on"] == [1] * 5 and o["relays_safe"] == [0] * 5


def test_safe_tries_every_output_before_raising(seen):
    err, led = seen["failing_expander"]
    assert led == 0 and "MCP23017 at I2C 0x20" in err


@pytest.mark.parametrize("addr,part", [("0x20", "MCP23017"), ("0x70", "TCA9548A"), ("0x68", "DS3231")])
def test_missing_i2c_device_raises_oserror_naming_its_address(seen, addr, part):
    errno, text = seen["missing"][addr]
    assert errno == 19 and f"no {part} at I2C {addr}" in text


def test_a_different_chip_at_the_expander_address_is_refused(seen):
    errno, text = seen["not_mcp"]
    assert errno == 19 and "0x20 is not an MCP23017" in text


def ntc_dc(mv, r25=10000, beta=3950, rs=10000, vcc=3300):
    import math

    r = rs * mv / (vcc - mv)
    return round((1 / (1 / 298.15 + math.log(r / r25) / beta) - 273.15) * 10)


def test_ntc_reads_tenths_of_a_degree_and_eio_at_the_rails(seen):
    t = seen["station"]["temperature"]
    assert t[0] == 250 and t[3] == ntc_dc(2000) == 156
    assert t[1] == "OSError 5: NTC on ADC GPIO 35 open or shorted"
    assert t[2] == "OSError 5: NTC on ADC GPIO 36 open or shorted"


def test_smart_battery_behind_the_mux(seen):
    s = seen["station"]
    assert s["ident"] == ["5a211234", None, "5b010042", None]
    assert s["state"][0] == {"mv": 41000, "ma": -1500, "dc": 250, "soc": 80, "soh": 97, "cycles": 12}
    assert s["state"][2] == {"mv": 39000, "ma": 2000, "dc": 350, "soc": 40, "cycles": 300}  # no StateOfHealth
    assert s["state"][1] == {} and s["state"][3] == {}
    assert s["bms_values"][0] == [41000, -1500] and s["bms_values"][2] == [39000, 2000]
    v, a = s["bms_values"][1]
    assert v == a == "OSError 19: SBS battery at I2C 0x0b (TCA9548A 0x70 channel 1)"
    assert s["mux_control"] == 1 << 3  # the last read went through slot 3's channel


def test_rtc_epoch_conversion(seen):
    s = seen["station"]
    assert s["rtc_unset"] is None
    assert s["rtc_fields"] == [2026, 1, 1, 3, 0, 0, 0, 0]  # (y, m, d, weekday Thu, h, m, s, us)
    assert s["rtc_now"] == 1767225600


def test_ds3231(seen):
    s = seen["station"]
    assert s["ext_unset"] is None  # oscillator-stop flag set
    assert s["ext_regs"] == "03020104010126"  # 01:02:03, Thursday (4), 2026-01-01 in BCD
    assert s["ext_status"] & 0x80 == 0  # flag cleared by set
    assert s["ext_now"] == 1767225600 + 3723
    assert s["ext_12h"] == 1767225600 + 13 * 3600 + 2 * 60 + 3  # 1 PM in 12-hour mode


def test_watchdog_exists_only_once_started(seen):
    s = seen["station"]
    assert s["wdt_before_start"] == 0
    assert s["wdt"] == [[8000, 1]]


def test_store_on_nvs(seen):
    s = seen["station"]
    assert s["store_missing"] == [None, 7]
    assert s["store_back"] == ["010203", -5, None]  # an i32 is not a blob
    assert s["store_deleted"] is None
    assert s["nvs"] == [["voltgate"], ["voltgate"]]
    assert s["store_big"] == "NVS blob over 512 bytes"
    assert s["store_huge"].startswith("OSError -4364")  # ESP_ERR_NVS_INVALID_LENGTH


def test_reset_and_ticks(seen):
    s = seen["station"]
    assert s["resets"] == 1 and s["ticks"]


def test_bl0937_meter(seen):
    o = seen["outlets"]
    assert o["counter_ids"] == list(range(8))  # CF and CF1 of outlets 0-3 on pulse counter units
    assert o["mwh_per_pulse"] == 0.5628
    assert o["sel_boot"] == 0
    assert o["power_early"] == 0 and o["power"] == 10 * 2026 and o["pulses"] == 10
    assert o["current"] == int(50 * 12.87)
    assert o["voltage_first"] == 0 and o["sel_voltage"] == 1
    assert o["voltage"] == int(1240 * 185.98)
    assert o["current_last"] == int(50 * 12.87) and o["sel_current"] == 0
    assert o["irq"] == [True, 1, 7]  # outlet 4: hard rising-edge IRQ counter


def test_one_wire_identity(seen):
    w = seen["one_wire"]
    assert w["crc_vector"] == 0xA2  # the fake's CRC-8 on Maxim's example ROM
    assert re.fullmatch(r"2d010203040506[0-9a-f]{2}", w["ident"][0])  # the DS2431, not the DS18B20
    assert w["ident"][1] == "OSError 5: 1-Wire bus ow1: ROM CRC error"
    assert w["state"] == [{}, {}]
    assert w["ident_empty"] is None


def test_linear_analog_and_chip_gpio_outputs(seen):
    w = seen["one_wire"]
    assert w["voltage"] == [1500 * 11 + 100, "OSError 5: ADC GPIO 33 at full scale"]
    assert w["voltage_zero"] == 100  # 0 V is a reading, not a fault
    assert w["lock_pins"] == [3, 3]  # Pin.OUT
    assert w["lock_levels_boot"] == [1, 0]  # off: high for the active-low lock


def test_expander_outputs_go_off_before_a_failing_boot_gives_up(seen):
    """An MCP23017 keeps its latch across an ESP32 reset: locks and chargers
    wired to it stay on unless the boot drives them off first, even when
    another part (here the battery mux) is missing and make() fails."""
    err, olat, iodir = seen["latched_on_then_fails"]
    assert err is not None and "0x70" in err
    # station-4: per slot pins 2 (lock) and 3 (charger) are outputs; off = low
    outputs = sum((1 << (4 * i + 2)) | (1 << (4 * i + 3)) for i in range(4))
    assert olat & outputs == 0
    assert iodir & outputs == 0
