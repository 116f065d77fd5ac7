# MCP23017: 16 GPIOs over I2C (datasheet register map with IOCON.BANK = 0,
# the power-on state: port A and B registers interleaved, A at even
# addresses, so one 2-byte access covers pins 0..15).
#
#   chip = MCP23017(i2c, 0x20)     # OSError naming the address if absent
#   chip.output(2, 0)              # latch first, then direction: no glitch
#   lock = Pin(chip, 2); lock.value(1)
#
# The output latch and the direction are cached: a pin write is one
# register write, no read-modify-write on the bus.
from errno import ENODEV

from micropython import const

TYPE_CHECKING = False
if TYPE_CHECKING:  # for the stub check only (tests/test_hal_esp32.py)
    from machine import I2C

_ADDR = const(0x20)
_IODIR = const(0x00)  # IODIRA/B: 1 = input (power-on: all inputs)
_IOCON = const(0x0A)  # IOCON, also readable at 0x0B while BANK = 0
_GPIO = const(0x12)  # GPIOA/B: pin levels
_OLAT = const(0x14)  # OLATA/B: output latch


class MCP23017:
    def __init__(self, i2c, addr=_ADDR):
        self._i2c = i2c  # type: I2C
        self.addr = addr
        self._buf = bytearray(2)
        # IOCON sits at 0x0A and 0x0B: two equal bytes, or not this chip
        b = self._buf
        try:
            i2c.readfrom_mem_into(addr, _IOCON, b)
        except OSError:
            raise OSError(ENODEV, "no MCP23017 at I2C 0x%02x" % addr) from None
        if b[0] != b[1]:
            raise OSError(ENODEV, "I2C 0x%02x is not an MCP23017 (IOCON)" % addr)
        self._dir = self._read(_IODIR)
        self._lat = self._read(_OLAT)

    def set_outputs(self, mask, levels):
        """Make the pins in mask outputs driving the bits of levels: latch
        first, then direction, two bus writes for all 16 pins. The chip keeps
        its latch across an ESP32 reset, so the board drives its outputs off
        with this before anything else."""
        self._lat = (self._lat & ~mask) | (levels & mask)
        self._write(_OLAT, self._lat)
        self._dir &= ~mask
        self._write(_IODIR, self._dir)

    def output(self, n, v):
        """Make pin n an output driving v."""
        self.write(n, v)
        self._dir &= ~(1 << n)
        self._write(_IODIR, self._dir)

    def input(self, n):
        self._dir |= 1 << n
        self._write(_IODIR, self._dir)

    def write(self, n, v):
        if v:
            self._lat |= 1 << n
        else:
            self._lat &= ~(1 << n)
        self._write(_OLAT, self._lat)

    def read(self, n):
        return (self._read(_GPIO) >> n) & 1

    def _read(self, reg):
        b = self._buf
        try:
            self._i2c.readfrom_mem_into(self.addr, reg, b)
        except OSError as e:
            raise OSError(e.errno, "MCP23017 at I2C 0x%02x" % self.addr) from None
        return b[0] | (b[1] << 8)

    def _write(self, reg, v):
        b = self._buf
        b[0] = v & 0xFF
        b[1] = (v >> 8) & 0xFF
        try:
            self._i2c.writeto_mem(self.addr, reg, b)
        except OSError as e:
            raise OSError(e.errno, "MCP23017 at I2C 0x%02x" % self.addr) from None


class Pin:
    """One expander pin with machine.Pin's value([x])."""

    def __init__(self, chip, n):
        self._chip = chip  # type: MCP23017
        self._n = n

    def value(self, v=None):
        if v is None:
            return self._chip.read(self._n)
        self._chip.write(self._n, v)
