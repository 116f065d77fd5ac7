# DS3231 battery-backed RTC over I2C. Calendar time in BCD registers, UTC,
# 24-hour mode when we write it. The oscillator-stop flag (OSF) is set at
# first power-up and whenever the backup battery could not keep the clock
# running: the time is then unknown and datetime() returns None until
# set_datetime() writes a time and clears the flag.
#
#   rtc = DS3231(i2c, 0x68)   # OSError naming the address if absent
#   rtc.datetime()            # (year, month, day, hour, minute, second) or None
#   rtc.set_datetime((2026, 5, 1, 12, 0, 0), weekday)   # weekday 0 = Monday
from errno import ENODEV

from micropython import const

TYPE_CHECKING = False
if TYPE_CHECKING:  # for the stub check only (tests/test_hal_esp32.py)
    from machine import I2C

_ADDR = const(0x68)
_TIME = const(0x00)  # seconds, minutes, hours, weekday, date, month, year
_STATUS = const(0x0F)
_OSF = const(0x80)  # status: oscillator stopped
_CENTURY = const(0x80)  # month register: year is 21xx
_H12 = const(0x40)  # hours register: 12-hour mode
_PM = const(0x20)  # hours register in 12-hour mode: PM


def _bcd(b):
    return (b >> 4) * 10 + (b & 0x0F)


def _tobcd(n):
    return ((n // 10) << 4) | (n % 10)


class DS3231:
    def __init__(self, i2c, addr=_ADDR):
        self._i2c = i2c  # type: I2C
        self.addr = addr
        self._buf = bytearray(7)
        self._status = bytearray(1)
        try:
            i2c.readfrom_mem_into(addr, _STATUS, self._status)
        except OSError:
            raise OSError(ENODEV, "no DS3231 at I2C 0x%02x" % addr) from None

    def datetime(self):
        self._read(_STATUS, self._status)
        if self._status[0] & _OSF:
            return None
        b = self._buf
        self._read(_TIME, b)
        h = b[2]
        if h & _H12:
            hour = _bcd(h & 0x1F) % 12 + (12 if h & _PM else 0)
        else:
            hour = _bcd(h & 0x3F)
        year = 2000 + _bcd(b[6]) + (100 if b[5] & _CENTURY else 0)
        return (year, _bcd(b[5] & 0x1F), _bcd(b[4] & 0x3F), hour, _bcd(b[1] & 0x7F), _bcd(b[0] & 0x7F))

    def set_datetime(self, dt, weekday):
        year, month, day, hour, minute, second = dt
        b = self._buf
        b[0] = _tobcd(second)
        b[1] = _tobcd(minute)
        b[2] = _tobcd(hour)
        b[3] = weekday + 1  # 1..7
        b[4] = _tobcd(day)
        b[5] = _tobcd(month) | (_CENTURY if year >= 2100 else 0)
        b[6] = _tobcd(year % 100)
        self._write(_TIME, b)
        self._read(_STATUS, self._status)
        self._status[0] &= ~_OSF & 0xFF
        self._write(_STATUS, self._status)

    def _read(self, reg, buf):
        try:
            self._i2c.readfrom_mem_into(self.addr, reg, buf)
        except OSError as e:
            raise OSError(e.errno, "DS3231 at I2C 0x%02x" % self.addr) from None

    def _write(self, reg, buf):
        try:
            self._i2c.writeto_mem(self.addr, reg, buf)
        except OSError as e:
            raise OSError(e.errno, "DS3231 at I2C 0x%02x" % self.addr) from None
