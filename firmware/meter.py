# The outlet's energy registers (outlet.py uses them; protocol/SPEC.md section 9).
#
# Meter: one relay's meter read into integers. The energy register counts
# the meter's pulses (hw Meter.pulses(): pulses since boot) in mWh, with
# the part below one mWh kept in nWh, so no pulse is lost to rounding and
# no float is made per cycle. The counter's value at boot is its base: what
# it counted before (on a board: nothing; on the simulator: the world's
# whole past) is already in the register or was lost with the power, and is
# never added again. A counter that goes back (a counter reset) is re-based
# and adds nothing: the register can lose energy, never count it twice.
#
# Registers: the state that survives power loss, one file written whole to
# a temp file and renamed over (atomic on littlefs and POSIX):
#   "VGO1" | channels u8 | table entries u8 | 0 u16 |
#   per channel (140 bytes, outlet.py Channel.pack):
#     mwh u64 | nwh u32 | session u8 (0 none, 1 open, 2 ended, record
#     pending) | latch cause u8 | end reason u8 | cti length u8 |
#     sub length u8 (255: none) | 3 zero bytes | cti 32 bytes | sub 64 bytes |
#     start ts u32 | start run s u32 | register at start u64 |
#     saved ts u32 | saved run s u32 (when saved; the end when ended)
#   energy table (idtable.py, 16-byte entries): many-use permits with an
#     energy cap, a = exp, b = mWh taken in their ended sessions |
#   CRC32 of all before it
# A file that is absent is a new board; one that fails its CRC or shape is
# flash damage (outlet.py latches every outlet until a service clears it).
import os
import struct
from binascii import crc32

from idtable import IdTable

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_NWH = const(1000000)  # nWh in one mWh
_FILE = "/outlet.bin"
_MAGIC = b"VGO1"
_HEAD = "<4sBBH"
_HEAD_LEN = const(8)
_CH_LEN = const(140)
_TABLE = const(16)  # many-use permits with an energy cap, remembered until their exp


class Meter:
    def __init__(self, m):
        self._m = m
        self._pp = int(m.mwh_per_pulse * _NWH + 0.5)  # nWh per pulse
        self._last = -1
        try:
            self._last = m.pulses()  # the base: counted before this boot, or never
        except OSError:
            pass  # the first read that answers sets it (reads fail until then)
        self.mwh = 0  # the register: energy through the relay since the board was new
        self.nwh = 0  # and below one mWh
        self.mw = 0
        self.mv = 0
        self.ma = 0

    def read(self):
        """Read the meter and count its new pulses; False when the meter
        failed. Allocates nothing (the handler is kept small: a bigger one
        would put this frame on the heap)."""
        try:
            self._read()
        except OSError:
            return False
        return True

    def _read(self):
        m = self._m
        p = m.pulses()
        if self._last < 0:
            self._last = p
        d = p - self._last
        self._last = p
        if d > 0:
            d = self.nwh + d * self._pp
            self.mwh += d // _NWH
            self.nwh = d % _NWH
        self.mw = m.power_mw()
        self.mv = m.voltage_mv()
        self.ma = m.current_ma()


class Registers:
    def __init__(self, root, n):
        self._path = root.rstrip("/") + _FILE
        self._tmp = self._path + ".tmp"
        self.n = n
        self.buf = bytearray(_HEAD_LEN + n * _CH_LEN)
        self.table = IdTable(_TABLE)
        self._crc = bytearray(4)

    @staticmethod
    def offset(i):
        return _HEAD_LEN + i * _CH_LEN

    def load(self):
        """True: buf and table hold the file; False: there is none (a new
        board); None: it is damaged."""
        try:
            f = open(self._path, "rb")
        except OSError:
            return False
        try:
            with f:
                t = self.table.buf
                ok = f.readinto(self.buf) == len(self.buf) and f.readinto(t) == len(t)
                ok = ok and f.readinto(self._crc) == 4 and f.read(1) == b""
        except OSError:
            ok = False
        if ok:
            magic, n, t, _ = struct.unpack_from(_HEAD, self.buf, 0)
            crc = crc32(self.table.buf, crc32(self.buf)) & 0xFFFFFFFF
            ok = magic == _MAGIC and n == self.n and t == _TABLE and crc == struct.unpack("<I", self._crc)[0]
        if not ok:
            self.table.clear()
            return None
        return True

    def save(self):
        """Write buf (the channels packed by the caller) and the table."""
        struct.pack_into(_HEAD, self.buf, 0, _MAGIC, self.n, _TABLE, 0)
        struct.pack_into("<I", self._crc, 0, crc32(self.table.buf, crc32(self.buf)) & 0xFFFFFFFF)
        with open(self._tmp, "wb") as f:
            f.write(self.buf)
            f.write(self.table.buf)
            f.write(self._crc)
        os.rename(self._tmp, self._path)
