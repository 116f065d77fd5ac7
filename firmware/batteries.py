# The station's battery registry: what this station knows about each battery
# id it has held (seed 000: acquire battery information, store it, hand it
# over when the server asks). One bytearray of fixed 36-byte entries,
# allocated once, so a full registry costs the heap what an empty one does
# and the control cycle updates it (temperature extremes, energy) without
# allocating.
#
#   entry  0  id length u8 (0: a free entry)
#          1  id, 16 bytes, zero padded
#         17  SoH % as the battery last reported it (255: never reported)
#         18  SoC % last known (255: unknown)
#         19  slot u8: index + 1 of the slot here that holds it (0: none)
#         20  SoC points charged here u32 (equivalent full cycles = // 100)
#         24  energy charged in here, mWh u32
#         28  lowest temperature seen here, 0.1 degC i16 (0x7FFF: none yet)
#         30  highest temperature seen here, 0.1 degC i16 (-0x8000: none yet)
#         32  last seen, Unix seconds u32 (insertion, charge end, removal)
#
# SoH: the battery's own figure when it reports one (a smart battery);
# otherwise 100 % less 1 % per 25 equivalent full cycles charged here.
# When the table is full, a new battery takes the entry of the battery seen
# longest ago that is not in a slot. The file (/batteries.bin) is written
# whole to a temp file and renamed over: "VGB1" | n u16 | 0 u16 | n entries |
# CRC32 of all before. A damaged file starts an empty registry (lost is set:
# the station re-learns batteries as they come; the server keeps history).
import os
import struct
from binascii import crc32

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


MAX_BATTERIES = const(32)
ID_MAX = const(16)
POINTS = const(20)  # bump() fields
ENERGY = const(24)
_ENTRY = const(36)
_PTS_PER_SOH = const(2500)
_FILE = "/batteries.bin"
_MAGIC = b"VGB1"
_HEAD = const(8)
_SOH = const(17)
_SOC = const(18)
_SLOT = const(19)
_TMIN = const(28)
_TMAX = const(30)
_SEEN = const(32)
_UNKNOWN = const(255)


def u32(b, o):
    return b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)


def put(b, o, v, n):
    # n little-endian bytes of v at o
    while n:
        b[o] = v & 0xFF
        v >>= 8
        o += 1
        n -= 1


def _i16(b, o):
    v = b[o] | (b[o + 1] << 8)
    return v - 0x10000 if v & 0x8000 else v


class Registry:
    def __init__(self, root, n=MAX_BATTERIES):
        self.n = n
        self.buf = bytearray(n * _ENTRY)
        self._path = root + _FILE
        self.lost = False
        self.new = False
        try:
            f = open(self._path, "rb")
        except OSError:
            self.new = True
            return  # a new station
        try:
            with f:
                d = f.read()
            k = d[4] | (d[5] << 8)
            end = len(d) - 4
            ok = d[0:4] == _MAGIC and end == _HEAD + k * _ENTRY and crc32(memoryview(d)[0:end]) & 0xFFFFFFFF == u32(d, end)
        except (OSError, IndexError):
            ok = False
        if not ok:
            self.lost = True
            return
        k = min(k, n) * _ENTRY  # another firmware's capacity: the first entries
        self.buf[0:k] = memoryview(d)[_HEAD : _HEAD + k]

    def find(self, bid):
        """Index of battery id bid's entry, or -1."""
        i = 0
        while i < self.n:
            if self.buf[i * _ENTRY] == len(bid) and self.id(i) == bid:
                return i
            i += 1
        return -1

    def add(self, bid, now):
        """bid's entry, made when new (a free entry, or the one seen longest
        ago that is not in a slot); -1 when every entry holds a battery in a slot."""
        i = self.find(bid)
        if i >= 0:
            return i
        b = self.buf
        o = 0
        while o < self.n * _ENTRY:
            if not b[o]:
                i = o
                break
            if not b[o + _SLOT] and (i < 0 or u32(b, o + _SEEN) < u32(b, i + _SEEN)):
                i = o
            o += _ENTRY
        if i < 0:
            return -1
        b[i : i + _ENTRY] = bytes(_ENTRY)
        b[i] = len(bid)
        b[i + 1 : i + 1 + len(bid)] = bid
        b[i + _SOH] = b[i + _SOC] = _UNKNOWN
        put(b, i + _TMIN, 0x7FFF, 2)
        put(b, i + _TMAX, 0x8000, 2)
        put(b, i + _SEEN, now, 4)
        return i // _ENTRY

    def id(self, i):
        o = i * _ENTRY
        return bytes(self.buf[o + 1 : o + 1 + self.buf[o]])

    def soc(self, i):
        v = self.buf[i * _ENTRY + _SOC]
        return None if v == _UNKNOWN else v

    def soh(self, i):
        v = self.buf[i * _ENTRY + _SOH]
        if v == _UNKNOWN:
            v = 100 - u32(self.buf, i * _ENTRY + POINTS) // _PTS_PER_SOH
        return v if v > 0 else 0

    def slot(self, i):
        """The slot here that holds battery i, or -1."""
        return self.buf[i * _ENTRY + _SLOT] - 1

    def seen(self, i, soc, soh, slot, now):
        """What the battery said (soc, soh: % or None) and the slot here
        that now holds it (-1: none)."""
        b = self.buf
        o = i * _ENTRY
        if soc is not None:
            b[o + _SOC] = soc if 0 <= soc <= 100 else _UNKNOWN
        if soh is not None:
            b[o + _SOH] = soh if 0 <= soh <= 100 else _UNKNOWN
        b[o + _SLOT] = slot + 1
        put(b, o + _SEEN, now, 4)

    def bump(self, i, field, v):
        """Add v to a u32 field (POINTS, ENERGY); no allocation."""
        o = i * _ENTRY + field
        put(self.buf, o, u32(self.buf, o) + v, 4)

    def temp(self, i, dc):
        """Fold a temperature into the extremes; no allocation."""
        b = self.buf
        o = i * _ENTRY
        if dc < _i16(b, o + _TMIN):
            put(b, o + _TMIN, dc, 2)
        if dc > _i16(b, o + _TMAX):
            put(b, o + _TMAX, dc, 2)

    def row(self, i):
        """[id, soc, soh, cycles, mWh in, lowest, highest 0.1 degC or None,
        last seen, slot here or None]"""
        b = self.buf
        o = i * _ENTRY
        lo = _i16(b, o + _TMIN)
        hi = _i16(b, o + _TMAX)
        if lo > hi:
            lo = hi = None
        slot = self.slot(i)
        cycles = u32(b, o + POINTS) // 100
        return [self.id(i), self.soc(i), self.soh(i), cycles, u32(b, o + ENERGY), lo, hi, u32(b, o + _SEEN), slot if slot >= 0 else None]

    def rows(self):
        return [self.row(i) for i in range(self.n) if self.buf[i * _ENTRY]]

    def save(self):
        tmp = self._path + ".tmp"
        head = struct.pack("<4sHH", _MAGIC, self.n, 0)
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(self.buf)
            f.write(struct.pack("<I", crc32(self.buf, crc32(head)) & 0xFFFFFFFF))
        os.rename(tmp, self._path)
