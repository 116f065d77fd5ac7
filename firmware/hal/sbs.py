# Smart battery (SBS 1.1 fuel gauge) over SMBus, optionally behind one
# channel of a TCA9548A I2C mux (every slot's battery answers at 0x0B, so
# each slot gets its own mux channel).
#
#   mux = Mux(i2c, 0x70)                 # OSError naming the address if absent
#   bat = SBS(i2c, 0x0B, mux, channel=2)
#   bat.read()     # battery id (bytes) or None when no battery answers
#   bat.state()    # {"mv", "ma", "dc", "soc", "soh", "cycles"} or {}
#
# SMBus read-word: command byte, then two bytes little-endian. No PEC.
from errno import ENODEV

from micropython import const

TYPE_CHECKING = False
if TYPE_CHECKING:  # for the stub check only (tests/test_hal_esp32.py)
    from machine import I2C

_SBS_ADDR = const(0x0B)
_MUX_ADDR = const(0x70)

_TEMPERATURE = const(0x08)  # 0.1 K
_VOLTAGE = const(0x09)  # mV
_CURRENT = const(0x0A)  # mA, signed, + = charging
_RELATIVE_SOC = const(0x0D)  # %
_CYCLE_COUNT = const(0x17)
_MANUFACTURE_DATE = const(0x1B)
_SERIAL_NUMBER = const(0x1C)
_STATE_OF_HEALTH = const(0x4F)  # %, not in SBS 1.1; many gauges (TI bq) have it
_DK_AT_0C = const(2731)  # 273.1 K in 0.1 K


class Mux:
    """TCA9548A: one control byte, bit n connects channel n."""

    def __init__(self, i2c, addr=_MUX_ADDR):
        self._i2c = i2c  # type: I2C
        self.addr = addr
        self._buf = bytearray(1)
        try:
            i2c.readfrom_into(addr, self._buf)
        except OSError:
            raise OSError(ENODEV, "no TCA9548A at I2C 0x%02x" % addr) from None

    def select(self, channel):
        self._buf[0] = 1 << channel
        try:
            self._i2c.writeto(self.addr, self._buf)
        except OSError as e:
            raise OSError(e.errno, "TCA9548A at I2C 0x%02x" % self.addr) from None


class SBS:
    def __init__(self, i2c, addr=_SBS_ADDR, mux=None, channel=0):
        self._i2c = i2c  # type: I2C
        self.addr = addr
        self._mux = mux  # type: Mux | None
        self._channel = channel
        self._buf = bytearray(2)

    def read(self):
        """Battery id: ManufactureDate and SerialNumber (4 bytes, big-endian
        words), or None when nothing answers at the address."""
        self._select()
        try:
            d = self._word(_MANUFACTURE_DATE)
            s = self._word(_SERIAL_NUMBER)
        except OSError as e:
            if e.errno == ENODEV:  # address not acknowledged: no battery
                return None
            raise
        return bytes((d >> 8, d & 0xFF, s >> 8, s & 0xFF))

    def state(self):
        self._select()
        try:
            st = {
                "mv": self._word(_VOLTAGE),
                "ma": _signed(self._word(_CURRENT)),
                "dc": self._word(_TEMPERATURE) - _DK_AT_0C,
                "soc": self._word(_RELATIVE_SOC),
                "cycles": self._word(_CYCLE_COUNT),
            }
        except OSError as e:
            if e.errno == ENODEV:
                return {}
            raise
        try:
            st["soh"] = self._word(_STATE_OF_HEALTH)
        except OSError:
            pass  # gauge without StateOfHealth
        return st

    def millivolts(self):
        self._select()
        return self._word(_VOLTAGE)

    def milliamps(self):
        self._select()
        return _signed(self._word(_CURRENT))

    def decicelsius(self):
        self._select()
        return self._word(_TEMPERATURE) - _DK_AT_0C

    def _select(self):
        if self._mux is not None:
            self._mux.select(self._channel)

    def _word(self, cmd):
        b = self._buf
        try:
            self._i2c.readfrom_mem_into(self.addr, cmd, b)
        except OSError as e:
            raise self._error(e.errno) from None
        return b[0] | (b[1] << 8)

    def _error(self, errno):
        where = "SBS battery at I2C 0x%02x" % self.addr
        if self._mux is not None:
            where += " (TCA9548A 0x%02x channel %d)" % (self._mux.addr, self._channel)
        return OSError(errno, where)


def _signed(w):
    return w - 0x10000 if w & 0x8000 else w
