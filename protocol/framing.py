# Serial framing for MicroPython and CPython.
#
# A frame on the wire is    0x00  COBS(payload || CRC32-LE(payload))  0x00
# COBS (Cheshire & Baker, 1999) removes every zero byte, so 0x00 only ever
# delimits. The leading zero ends whatever garbage came before; the reader
# drops frames with a bad CRC or bad COBS and frames longer than its buffer,
# and picks up at the next zero. CRC32 is the IEEE polynomial
# (binascii.crc32, the same one the flash log uses).
from binascii import crc32

import wire

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_CRC_LEN = const(4)
_DELIM = const(0)


def max_encoded(n):
    """Bytes on the wire for an n-byte payload, delimiters included."""
    body = n + _CRC_LEN
    return body + body // 254 + 1 + 2


def encode(payload, max_payload=wire.MAX_FRAME):
    if len(payload) > max_payload:
        raise ValueError("frame payload of %d bytes exceeds %d" % (len(payload), max_payload))
    body = bytearray(payload)
    c = crc32(payload) & 0xFFFFFFFF
    body.append(c & 0xFF)
    body.append((c >> 8) & 0xFF)
    body.append((c >> 16) & 0xFF)
    body.append(c >> 24)
    out = bytearray(max_encoded(len(body) - _CRC_LEN))
    out[0] = _DELIM
    code_at = 1
    w = 2
    code = 1
    for b in body:
        if b == 0:
            out[code_at] = code
            code_at = w
            w += 1
            code = 1
        else:
            out[w] = b
            w += 1
            code += 1
            if code == 0xFF:
                out[code_at] = code
                code_at = w
                w += 1
                code = 1
    out[code_at] = code
    out[w] = _DELIM
    return bytes(memoryview(out)[: w + 1])


def _unstuff(buf, n):
    """COBS-decode buf[:n] in place; return the decoded length or -1."""
    r = 0
    w = 0
    while r < n:
        code = buf[r]
        if code == 0:
            return -1
        r += 1
        end = r + code - 1
        if end > n:
            return -1
        while r < end:
            buf[w] = buf[r]
            w += 1
            r += 1
        if code < 0xFF and r < n:
            buf[w] = 0
            w += 1
    return w


class Deframer:
    """Turns a byte stream into payloads. Allocates its buffer once.

    feed() returns the payloads completed by the bytes given (usually none
    or one): a list, or the empty tuple () when none completed, so feeding
    bytes that complete no frame allocates nothing. Counters say what was
    thrown away."""

    def __init__(self, max_payload=wire.MAX_FRAME):
        self.max_payload = max_payload
        self._cap = max_encoded(max_payload) - 2
        # buf: the frame collected so far. A caller that reads something else
        # in turn with frames (serlink.py's text lines) may write into it
        # while it feeds nothing, provided it calls reset() before it feeds
        # again: what was collected before is then thrown away.
        self.buf = self._buf = bytearray(self._cap)
        self._n = 0
        self._skip = False
        self.frames = 0
        self.bad_crc = 0
        self.bad_cobs = 0
        self.overflows = 0

    def reset(self):
        self._n = 0
        self._skip = False

    def _end(self, out):
        # A delimiter: check the frame collected so far. Returns out, with the
        # payload appended if the frame is good (a new list if out was ()).
        n = self._n
        self._n = 0
        if self._skip:
            self._skip = False
            return out
        if n == 0:
            return out  # back-to-back delimiters
        buf = self._buf
        m = _unstuff(buf, n)
        if m < _CRC_LEN:
            self.bad_cobs += 1
            return out
        m -= _CRC_LEN
        mv = memoryview(buf)
        got = buf[m] | (buf[m + 1] << 8) | (buf[m + 2] << 16) | (buf[m + 3] << 24)
        if crc32(mv[:m]) & 0xFFFFFFFF != got:
            self.bad_crc += 1
            return out
        if m > self.max_payload:
            self.overflows += 1
            return out
        self.frames += 1
        if out:
            out.append(bytes(mv[:m]))
            return out
        return [bytes(mv[:m])]

    def feed(self, data):
        # Touches the heap only when a frame completes: no list until then
        # (() is a constant), and few enough locals that MicroPython keeps
        # this call's state on the C stack (a function needing more than 11
        # slots of locals + stack gets it heap-allocated on every call).
        out = ()
        for b in data:
            if b == _DELIM:
                out = self._end(out)
            elif self._skip:
                pass
            elif self._n < self._cap:
                self._buf[self._n] = b
                self._n += 1
            else:
                self.overflows += 1
                self._skip = True
        return out
