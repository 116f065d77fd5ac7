# Hardware layer on machine/esp32: the objects of hal/__init__.py built from
# a parsed board file (boards/README.md). Thin: it drives hardware and
# converts units, nothing more. tests/test_hal_esp32.py checks it against
# the ESP32 MicroPython stubs (mypy) and imports it on the unix port with
# stand-in machine/esp32/onewire modules.
#
#   hw = hal.esp32.make(json.load(open("board.json")))
import asyncio
import math
import time
from errno import EIO, ENOENT

import esp32
import machine
from machine import ADC, I2C, Pin
from micropython import const

# The part drivers (onewire, hal.ds3231, hal.mcp23017, hal.sbs) are imported
# where the board file names such a part, not here: loaded code lives in the
# heap, and a board without expanders, smart batteries or an RTC chip (an
# outlet) would carry ~9 KB of drivers it never calls.
TYPE_CHECKING = False
if TYPE_CHECKING:  # for the stub check only (tests/test_hal_esp32.py)
    import onewire

    from hal import ds3231, mcp23017, sbs

# Analog inputs: ADC1 at 11 dB attenuation (0 .. ~3.1 V)
_RAIL_LO = const(64)  # read_u16() at or below: input at 0 V
_RAIL_HI = const(65535 - 64)  # at or above: input at or beyond full scale
_NTC_VCC_MV = const(3300)  # supply of the NTC divider (r_series to 3V3)
_T25_K = 298.15

# BL0937 meter
_SEL_CURRENT = const(0)  # SEL low: CF1 frequency follows current RMS
_SEL_VOLTAGE = const(1)  # SEL high: CF1 follows voltage RMS
_WINDOW_MS = const(1000)  # shortest window a frequency is computed over
_PCNT_UNITS = const(8)  # ESP32 pulse counter units (machine.Counter ids)

_DS2431 = const(0x2D)  # 1-Wire family code

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


class In:
    def __init__(self, pin, active_low):
        self._pin = pin  # type: Pin | mcp23017.Pin
        self._inv = 1 if active_low else 0

    def value(self):
        return self._pin.value() ^ self._inv


class Linear:
    """ADC1 pin: value = mV at the pin * scale + offset. OSError(EIO) when
    the input is at full scale (the true value is unknown); 0 V is a value."""

    def __init__(self, gpio, scale, offset):
        self._adc = ADC(Pin(gpio), atten=ADC.ATTN_11DB)
        self._gpio = gpio
        self._scale = scale
        self._offset = offset

    def read(self):
        if self._adc.read_u16() >= _RAIL_HI:
            raise OSError(EIO, "ADC GPIO %d at full scale" % self._gpio)
        return int(self._adc.read_uv() // 1000 * self._scale + self._offset)


class Ntc:
    """NTC thermistor from the ADC1 pin to GND, r_series from 3V3 to the pin;
    reads 0.1 degC (beta formula). OSError(EIO) at either rail: open or short."""

    def __init__(self, gpio, ntc):
        self._adc = ADC(Pin(gpio), atten=ADC.ATTN_11DB)
        self._gpio = gpio
        self._r25 = ntc["r25"]
        self._beta = ntc["beta"]
        self._rs = ntc["r_series"]

    def read(self):
        raw = self._adc.read_u16()
        mv = self._adc.read_uv() // 1000
        if raw <= _RAIL_LO or raw >= _RAIL_HI or not 0 < mv < _NTC_VCC_MV:
            raise OSError(EIO, "NTC on ADC GPIO %d open or shorted" % self._gpio)
        r = self._rs * mv / (_NTC_VCC_MV - mv)
        k = 1 / (1 / _T25_K + math.log(r / self._r25) / self._beta)
        return int(round((k - 273.15) * 10))


class BmsValue:
    """Analog read from the slot's smart battery (read = an SBS method)."""

    def __init__(self, read):
        self.read = read


class OneWireIdent:
    """DS2431 on a 1-Wire bus: its 64-bit ROM id is the battery id."""

    def __init__(self, ow, bus):
        self._ow = ow  # type: onewire.OneWire
        self._bus = bus

    def read(self):
        crc_bad = False
        for rom in self._ow.scan():
            if self._ow.crc8(rom) != 0:
                crc_bad = True
            elif rom[0] == _DS2431:
                return bytes(rom)
        if crc_bad:
            raise OSError(EIO, "1-Wire bus %s: ROM CRC error" % self._bus)
        return None

    def state(self):
        return {}


class PulseCounter:
    """machine.Counter stand-in on a Pin IRQ (hard: no allocation)."""

    def __init__(self, pin):
        self._n = 0
        pin.irq(self._tick, Pin.IRQ_RISING, hard=True)

    def _tick(self, pin):
        self._n += 1

    def value(self, v=None):
        s = machine.disable_irq()
        n = self._n
        if v is not None:
            self._n = v
        machine.enable_irq(s)
        return n


def _counter(gpio, unit):
    pin = Pin(gpio, Pin.IN)
    if unit < _PCNT_UNITS and hasattr(machine, "Counter"):
        return machine.Counter(unit, pin, edge=machine.Counter.RISING)
    return PulseCounter(pin)


class Meter:
    """BL0937: CF pulses count energy and their rate is power; CF1's rate is
    current or voltage as SEL selects. Each value is the average over the
    window since the previous read of the same quantity (at least
    _WINDOW_MS, else the previous value again). Voltage and current share
    CF1: reading the one not selected switches SEL and returns its last
    value (0 before the first window), so read both at a steady pace."""

    def __init__(self, spec, unit):
        self._cf = _counter(spec["cf"], unit)
        self._cf1 = _counter(spec["cf1"], unit + 1)
        self._sel = Pin(spec["sel"], Pin.OUT, value=_SEL_CURRENT)
        self._mode = _SEL_CURRENT
        self._mw_per_hz = spec["mw_per_hz"]
        self._mv_per_hz = spec["mv_per_hz"]
        self._ma_per_hz = spec["ma_per_hz"]
        self.mwh_per_pulse = spec["mwh_per_pulse"]
        self._t = self._t1 = time.ticks_ms()
        self._n = 0
        self._mw = self._mv = self._ma = 0

    def pulses(self):
        return self._cf.value()

    def power_mw(self):
        now = time.ticks_ms()
        dt = time.ticks_diff(now, self._t)
        if dt >= _WINDOW_MS:
            n = self._cf.value()
            self._mw = int((n - self._n) * 1000 * self._mw_per_hz / dt)
            self._n = n
            self._t = now
        return self._mw

    def voltage_mv(self):
        self._cf1_window(_SEL_VOLTAGE)
        return self._mv

    def current_ma(self):
        self._cf1_window(_SEL_CURRENT)
        return self._ma

    def _cf1_window(self, mode):
        now = time.ticks_ms()
        dt = time.ticks_diff(now, self._t1)
        if dt < _WINDOW_MS and mode == self._mode:
            return
        n = self._cf1.value(0)
        if dt >= _WINDOW_MS:
            hz = n * 1000 / dt
            if self._mode == _SEL_VOLTAGE:
                self._mv = int(hz * self._mv_per_hz)
            else:
                self._ma = int(hz * self._ma_per_hz)
        if mode != self._mode:
            self._sel.value(mode)
            self._mode = mode
        self._t1 = now


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


class Slot:
    def __init__(self, presence, door, lock, charger, voltage, current, temperature, identity):
        self.presence = presence
        self.door = door
        self.lock = lock
        self.charger = charger
        self.voltage = voltage
        self.current = current
        self.temperature = temperature
        self.identity = identity


class Outlet:
    def __init__(self, relay, meter):
        self.relay = relay
        self.meter = meter


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
        self._muxes = {}  # type: dict[tuple[str, int], sbs.Mux]
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
        self.slots = [self._slot(s) for s in board.get("slots", ())]
        self.outlets = []
        unit = 0  # two pulse counter units per meter
        for o in board.get("outlets", ()):
            self.outlets.append(Outlet(self._out(o["relay"]), Meter(o["meter"], unit)))
            unit += 2
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

    def _in(self, spec):
        if "expander" in spec:
            chip = self._exps[spec["expander"]]
            chip.input(spec["pin"])
            from hal import mcp23017

            return In(mcp23017.Pin(chip, spec["pin"]), spec.get("active_low"))
        return In(Pin(spec["pin"], Pin.IN), spec.get("active_low"))

    def _slot(self, s):
        ident = s.get("identity")
        bms = None
        if ident and "bms" in ident:
            from hal import sbs

            b = ident["bms"]
            mux = None
            if "mux" in b:
                mux = self._mux(b["bus"], b["mux"]["addr"])
            ident = bms = sbs.SBS(self._i2c[b["bus"]], b["addr"], mux, b.get("mux", {}).get("channel", 0))
        elif ident:
            ident = OneWireIdent(self._ow[ident["bus"]], ident["bus"])
        return Slot(
            self._in(s["presence"]) if "presence" in s else None,
            self._in(s["door"]) if "door" in s else None,
            self._out(s["lock"]),
            self._out(s["charger"]) if "charger" in s else None,
            self._analog(s.get("voltage"), bms.millivolts if bms else None),
            self._analog(s.get("current"), bms.milliamps if bms else None),
            self._analog(s.get("temperature"), bms.decicelsius if bms else None),
            ident,
        )

    def _mux(self, bus, addr):
        key = (bus, addr)
        if key not in self._muxes:
            from hal import sbs

            self._muxes[key] = sbs.Mux(self._i2c[bus], addr)
        return self._muxes[key]

    def _analog(self, spec, bms_read):
        if spec is None:
            return None
        if "bms" in spec:
            return BmsValue(bms_read)
        if "ntc" in spec:
            return Ntc(spec["adc"], spec["ntc"])
        return Linear(spec["adc"], spec.get("scale", 1.0), spec.get("offset", 0))


def make(board):
    return HW(board)
