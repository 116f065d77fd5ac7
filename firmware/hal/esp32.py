# Hardware layer on machine/esp32: the objects of hal/__init__.py built from
# a parsed board file (boards/README.md). Thin: it drives hardware and
# converts units, nothing more. tests/test_hal_esp32.py checks it against
# the ESP32 MicroPython stubs (mypy) and imports it on the unix port with
# stand-in machine/esp32/onewire modules.
#
#   hw = hal.esp32.make(json.load(open("board.json")))
import asyncio
import time
from errno import ENOENT

import esp32
import machine
from machine import I2C, Pin
from micropython import const

# The part drivers (onewire, hal.ds3231, hal.mcp23017, hal.sbs) are imported
# where the board file names such a part, not here, and so are each kind's
# parts (hal.esp32_slots: slot inputs, sensors and battery identity;
# hal.esp32_outlets: relays and meters): loaded code lives in the heap, and a
# board without expanders, smart batteries or an RTC chip (an outlet) would
# carry ~9 KB of drivers it never calls, an outlet the station's slot code.
TYPE_CHECKING = False
if TYPE_CHECKING:  # for the stub check only (tests/test_hal_esp32.py)
    import onewire

    from hal import ds3231, mcp23017

# NVS: the port raises ESP-IDF errors as OSError(-esp_err_t, name), so a
# missing key is errno -ESP_ERR_NVS_NOT_FOUND (-4354); ENOENT accepted too
_NVS_NAMESPACE = "voltgate"
_NVS_NOT_FOUND = const(-0x1102)
_MISSING = (_NVS_NOT_FOUND, ENOENT)
_BLOB_MAX = const(512)

# Time: Unix seconds <-> calendar in one place (shared/FIELD-NOTES.md: ESP32
# builds may count from 2000-01-01, the unix port from 1970). time.mktime
# and time.gmtime count from the port's epoch; read it once from gmtime(0).
_EPOCH_2000 = const(946684800)  # 2000-01-01T00:00:00Z in Unix seconds
_PORT_EPOCH = _EPOCH_2000 if time.gmtime(0)[0] == 2000 else 0
_RTC_SET_YEAR = const(2024)  # the chip RTC reads earlier until someone sets it


def _unix(year, month, day, hour, minute, second):
    return time.mktime((year, month, day, hour, minute, second, 0, 0)) + _PORT_EPOCH


def _utc(t):
    """Unix seconds -> (year, month, mday, hour, minute, second, weekday, yearday)."""
    return time.gmtime(t - _PORT_EPOCH)


class Out:
    """Digital output on a chip GPIO or an expander pin; starts off."""

    def __init__(self, pin, active_low):
        self._pin = pin  # type: Pin | mcp23017.Pin
        self._off = 1 if active_low else 0
        self._v = 0
        self.off()

    def on(self):
        self._pin.value(self._off ^ 1)
        self._v = 1

    def off(self):
        self._pin.value(self._off)
        self._v = 0

    def value(self):
        return self._v


class Watchdog:
    """machine.WDT, created by start(): once running it cannot be stopped."""

    def __init__(self):
        self._wdt = None  # type: machine.WDT | None

    def start(self, timeout_ms):
        if self._wdt is None:
            self._wdt = machine.WDT(timeout=timeout_ms)

    def feed(self):
        if self._wdt is not None:
            self._wdt.feed()


class Rtc:
    """The chip RTC (machine.RTC): kept across soft resets and deep sleep,
    lost at power-off; None until set (year before _RTC_SET_YEAR)."""

    def __init__(self):
        self._rtc = machine.RTC()

    def now(self):
        d = self._rtc.datetime()  # (year, month, day, weekday, hour, minute, second, subsecond)
        if d[0] < _RTC_SET_YEAR:
            return None
        return _unix(d[0], d[1], d[2], d[4], d[5], d[6])

    def set(self, t):
        g = _utc(t)
        self._rtc.datetime((g[0], g[1], g[2], g[6], g[3], g[4], g[5], 0))


class ExtRtc:
    """A battery-backed DS3231 as an RTC: None when its oscillator stopped."""

    def __init__(self, chip):
        self._chip = chip  # type: ds3231.DS3231

    def now(self):
        d = self._chip.datetime()
        if d is None:
            return None
        return _unix(d[0], d[1], d[2], d[3], d[4], d[5])

    def set(self, t):
        g = _utc(t)
        self._chip.set_datetime((g[0], g[1], g[2], g[3], g[4], g[5]), g[6])


class Store:
    """esp32.NVS namespace "voltgate", blobs and i32 only. get() reads into
    one _BLOB_MAX-byte buffer allocated here, and set() refuses a larger
    blob, so everything set() wrote reads back (a larger blob written by
    other tools raises OSError on get)."""

    def __init__(self):
        self._nvs = esp32.NVS(_NVS_NAMESPACE)
        self._buf = bytearray(_BLOB_MAX)
        self._mv = memoryview(self._buf)

    def get(self, key):
        try:
            n = self._nvs.get_blob(key, self._buf)
        except OSError as e:
            if e.errno in _MISSING:
                return None
            raise
        return bytes(self._mv[:n])

    def set(self, key, value):
        if len(value) > _BLOB_MAX:
            raise ValueError("NVS blob over %d bytes" % _BLOB_MAX)
        self._nvs.set_blob(key, value)

    def get_int(self, key, default=None):
        try:
            return self._nvs.get_i32(key)
        except OSError as e:
            if e.errno in _MISSING:
                return default
            raise

    def set_int(self, key, n):
        self._nvs.set_i32(key, n)

    def delete(self, key):
        try:
            self._nvs.erase_key(key)
        except OSError as e:
            if e.errno not in _MISSING:
                raise

    def commit(self):
        self._nvs.commit()


def _expanders_safe(board, exps):
    masks = {}  # type: dict[str, list[int]]  # expander name -> [output mask, off levels]
    specs = [board.get("status_led")]
    for sl in board.get("slots", ()):
        specs.append(sl.get("lock"))
        specs.append(sl.get("charger"))
    for o in board.get("outlets", ()):
        specs.append(o.get("relay"))
    for spec in specs:
        if spec and spec.get("expander") in exps:
            m = masks.setdefault(spec["expander"], [0, 0])
            bit = 1 << spec["pin"]
            m[0] |= bit
            if spec.get("active_low"):
                m[1] |= bit
    for name in masks:
        exps[name].set_outputs(masks[name][0], masks[name][1])


class HW:
    def __init__(self, board):
        self.kind = board["kind"]
        # the board's data (log, permit store, registers) in a folder of its
        # own: the modules sit at "/", and a /log folder would hide log.mpy
        self.root = "/data"
        self.ticks_ms = time.ticks_ms
        self.ticks_diff = time.ticks_diff
        self.ticks_add = time.ticks_add
        self.sleep_ms = asyncio.sleep_ms
        self.reset = machine.reset
        self._outs = []  # type: list[Out]
        self._i2c = {}  # type: dict[str, I2C]
        self._ow = {}  # type: dict[str, onewire.OneWire]
        for name, b in board.get("buses", {}).items():
            if b["type"] == "i2c":
                self._i2c[name] = I2C(b["id"], scl=Pin(b["scl"]), sda=Pin(b["sda"]), freq=b.get("freq", 400000))
            else:
                import onewire

                self._ow[name] = onewire.OneWire(Pin(b["pin"]))
        self._exps = {}
        err = None
        for name, e in board.get("expanders", {}).items():
            from hal import mcp23017

            try:
                self._exps[name] = mcp23017.MCP23017(self._i2c[e["bus"]], e["addr"])
            except OSError as x:
                err = x
        # expanders keep their output latch across an ESP32 reset: drive every
        # expander output off now, before any other part can fail the boot
        _expanders_safe(board, self._exps)
        if err is not None:
            raise err
        # each kind's parts in a module of its own, loaded only for that kind
        self.slots = []  # type: list
        self.outlets = []  # type: list
        if board.get("slots"):
            from hal import esp32_slots

            self.slots = esp32_slots.build(self, board)
        if board.get("outlets"):
            from hal import esp32_outlets

            self.outlets = esp32_outlets.build(self, board)
        led = board.get("status_led")
        self.status_led = self._out(led) if led else None
        self.wdt = Watchdog()
        self.rtc = Rtc()
        r = board.get("rtc")
        self.ext_rtc = None
        if r:
            from hal import ds3231

            self.ext_rtc = ExtRtc(ds3231.DS3231(self._i2c[r["bus"]], r["addr"]))
        self.store = Store()

    def safe(self):
        """Every output off; tries them all, then raises the last error."""
        err = None
        for o in self._outs:
            try:
                o.off()
            except OSError as e:
                err = e
        if err is not None:
            raise err

    def _out(self, spec):
        off = 1 if spec.get("active_low") else 0
        if "expander" in spec:
            chip = self._exps[spec["expander"]]
            chip.output(spec["pin"], off)
            from hal import mcp23017

            out = Out(mcp23017.Pin(chip, spec["pin"]), off)
        else:
            out = Out(Pin(spec["pin"], Pin.OUT, value=off), off)
        self._outs.append(out)
        return out


def make(board):
    return HW(board)
