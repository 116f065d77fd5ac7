# HMAC-SHA256 (RFC 2104) on hashlib.sha256, which is all MicroPython has,
# and a constant-time compare. Runs on MicroPython and CPython.
import hashlib

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_BLOCK = const(64)


class HMAC256:
    """A key prepared once (pads computed in __init__), then used for many MACs."""

    def __init__(self, key):
        self.key_len = len(key)  # callers may insist on a length (permits: 32)
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        ipad = bytearray(_BLOCK)
        opad = bytearray(_BLOCK)
        for i in range(_BLOCK):
            k = key[i] if i < len(key) else 0
            ipad[i] = k ^ 0x36
            opad[i] = k ^ 0x5C
        self._ipad = bytes(ipad)
        self._opad = bytes(opad)

    def inner(self):
        """A running hash to update() with the message; pass it to finish()."""
        return hashlib.sha256(self._ipad)

    def finish(self, inner):
        outer = hashlib.sha256(self._opad)
        outer.update(inner.digest())
        return outer.digest()

    def mac(self, msg):
        h = self.inner()
        h.update(msg)
        return self.finish(h)


def equal(a, b):
    """Compare two MACs in time that depends only on their lengths."""
    return len(a) == len(b) and equal_prefix(a, b)


def equal_prefix(full, tag):
    """Compare tag with the first len(tag) bytes of full (a truncated MAC,
    as alg 4 uses), in time that depends only on len(tag)."""
    n = len(tag)
    if n > len(full):
        return False
    r = 0
    for i in range(n):
        r |= full[i] ^ tag[i]
    return r == 0
