# A fixed-size table of ids for the permit stores: one bytearray, allocated
# once, 16 bytes an entry, no objects per entry, so a full table costs no
# more heap than an empty one and saving it allocates nothing.
#
#   entry: k1 u32 | k2 u24 | flags u8 | a u32 | b u32      (little-endian)
#
# k1, k2 are two CRC32s of the id (a permit id or a user id), 56 bits in
# all; flags 0 marks a free entry. Two ids that shared a key would share an
# entry: a fresh permit taken for a used one, or a user revoked with another.
# Either refuses; neither accepts (and at 2**-56 a pair, it does not happen).
from binascii import crc32

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


ENTRY = const(16)
_SEED = const(0x5BD1E995)


def key(x):
    """The table key of an id (bytes or str): (k1, k2)."""
    if isinstance(x, str):
        x = x.encode()
    return crc32(x) & 0xFFFFFFFF, crc32(x, _SEED) & 0xFFFFFF


def _u32(b, o):
    return b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)


def _put32(b, o, v):
    b[o] = v & 0xFF
    b[o + 1] = (v >> 8) & 0xFF
    b[o + 2] = (v >> 16) & 0xFF
    b[o + 3] = (v >> 24) & 0xFF


class IdTable:
    def __init__(self, n):
        self.n = n
        self.buf = bytearray(n * ENTRY)

    def find(self, k, mask=0xFF):
        """Index of the entry with key k and a flag in mask, or -1."""
        b = self.buf
        k1 = k[0]
        k2 = k[1]
        o = 0
        end = self.n * ENTRY
        while o < end:
            if b[o + 7] & mask and _u32(b, o) == k1 and (b[o + 4] | (b[o + 5] << 8) | (b[o + 6] << 16)) == k2:
                return o // ENTRY
            o += ENTRY
        return -1

    def add(self, k, flags, a, b=0):
        """Store a new entry; the index, or -1 when the table is full."""
        buf = self.buf
        o = 0
        end = self.n * ENTRY
        while o < end and buf[o + 7]:
            o += ENTRY
        if o >= end:
            return -1
        _put32(buf, o, k[0])
        buf[o + 4] = k[1] & 0xFF
        buf[o + 5] = (k[1] >> 8) & 0xFF
        buf[o + 6] = (k[1] >> 16) & 0xFF
        buf[o + 7] = flags
        _put32(buf, o + 8, a)
        _put32(buf, o + 12, b)
        return o // ENTRY

    def flags(self, i):
        return self.buf[i * ENTRY + 7]

    def set_flags(self, i, flags):
        self.buf[i * ENTRY + 7] = flags

    def a(self, i):
        return _u32(self.buf, i * ENTRY + 8)

    def b(self, i):
        return _u32(self.buf, i * ENTRY + 12)

    def set_b(self, i, v):
        _put32(self.buf, i * ENTRY + 12, v)

    def count(self, mask=0xFF):
        b = self.buf
        n = 0
        o = 7
        while o < len(b):
            if b[o] & mask:
                n += 1
            o += ENTRY
        return n

    def drop_until(self, t):
        """Free every entry whose a (an expiry) is at or before t; how many."""
        b = self.buf
        n = 0
        o = 0
        while o < len(b):
            if b[o + 7] and _u32(b, o + 8) <= t:
                b[o + 7] = 0
                n += 1
            o += ENTRY
        return n

    def clear(self):
        b = self.buf
        for i in range(len(b)):
            b[i] = 0
