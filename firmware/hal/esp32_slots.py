# The station's side of hal/esp32.py, which imports it only for a board file
# that names slots (an outlet never loads it: loaded code lives in the heap):
# the slot's inputs, its sensors on the ADC or a smart battery, and the
# battery's 1-Wire identity.
import math
from errno import EIO

from machine import ADC, Pin
from micropython import const

TYPE_CHECKING = False
if TYPE_CHECKING:  # for the stub check only (tests/test_hal_esp32.py)
    import onewire

    from hal import mcp23017, sbs
    from hal.esp32 import HW

# Analog inputs: ADC1 at 11 dB attenuation (0 .. ~3.1 V)
_RAIL_LO = const(64)  # read_u16() at or below: input at 0 V
_RAIL_HI = const(65535 - 64)  # at or above: input at or beyond full scale
_NTC_VCC_MV = const(3300)  # supply of the NTC divider (r_series to 3V3)
_T25_K = 298.15

_DS2431 = const(0x2D)  # 1-Wire family code


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


def build(hw, board):  # type: (HW, dict) -> list[Slot]
    """The board file's slots, on hw's buses, expanders and outputs."""
    muxes = {}  # type: dict[tuple[str, int], sbs.Mux]
    return [_slot(hw, s, muxes) for s in board.get("slots", ())]


def _slot(hw, s, muxes):  # type: (HW, dict, dict[tuple[str, int], sbs.Mux]) -> Slot
    ident = s.get("identity")
    bms = None
    if ident and "bms" in ident:
        from hal import sbs

        b = ident["bms"]
        mux = None
        if "mux" in b:
            mux = _mux(hw, muxes, b["bus"], b["mux"]["addr"])
        ident = bms = sbs.SBS(hw._i2c[b["bus"]], b["addr"], mux, b.get("mux", {}).get("channel", 0))
    elif ident:
        ident = OneWireIdent(hw._ow[ident["bus"]], ident["bus"])
    return Slot(
        _in(hw, s["presence"]) if "presence" in s else None,
        _in(hw, s["door"]) if "door" in s else None,
        hw._out(s["lock"]),
        hw._out(s["charger"]) if "charger" in s else None,
        _analog(s.get("voltage"), bms.millivolts if bms else None),
        _analog(s.get("current"), bms.milliamps if bms else None),
        _analog(s.get("temperature"), bms.decicelsius if bms else None),
        ident,
    )


def _in(hw, spec):  # type: (HW, dict) -> In
    if "expander" in spec:
        chip = hw._exps[spec["expander"]]
        chip.input(spec["pin"])
        from hal import mcp23017

        return In(mcp23017.Pin(chip, spec["pin"]), spec.get("active_low"))
    return In(Pin(spec["pin"], Pin.IN), spec.get("active_low"))


def _mux(hw, muxes, bus, addr):  # type: (HW, dict[tuple[str, int], sbs.Mux], str, int) -> sbs.Mux
    key = (bus, addr)
    if key not in muxes:
        from hal import sbs

        muxes[key] = sbs.Mux(hw._i2c[bus], addr)
    return muxes[key]


def _analog(spec, bms_read):
    if spec is None:
        return None
    if "bms" in spec:
        return BmsValue(bms_read)
    if "ntc" in spec:
        return Ntc(spec["adc"], spec["ntc"])
    return Linear(spec["adc"], spec.get("scale", 1.0), spec.get("offset", 0))
