# CBOR (RFC 8949) for MicroPython and CPython.
#
# Encoding is deterministic (RFC 8949 section 4.2.1): shortest heads, definite
# lengths, map keys sorted by their encoded bytes; floats go out as float64.
# Decoding is strict and bounded: nesting depth is capped, every length is
# checked against the bytes that remain before anything is allocated,
# indefinite lengths are refused, text must be UTF-8, map keys must be unique
# and hashable, and trailing bytes are an error. Every failure is a CBORError
# (a ValueError) that says what and at which byte offset.
import struct

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


MAX_DEPTH = const(16)

_UINT = const(0)
_NINT = const(1)
_BYTES = const(2)
_TEXT = const(3)
_ARRAY = const(4)
_MAP = const(5)
_TAG = const(6)
_SIMPLE = const(7)

_AI_1 = const(24)
_AI_2 = const(25)
_AI_4 = const(26)
_AI_8 = const(27)
_AI_INDEF = const(31)

_FALSE = const(20)
_TRUE = const(21)
_NULL = const(22)
_UNDEF = const(23)
_MAX_U64 = const(0xFFFFFFFFFFFFFFFF)


class CBORError(ValueError):
    pass


class Tag:
    """A tagged item that this codec does not interpret (e.g. 17, 61)."""

    def __init__(self, tag, value):
        self.tag = tag
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Tag) and self.tag == other.tag and self.value == other.value

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        return "Tag(%d, %r)" % (self.tag, self.value)


class Simple:
    """A simple value other than false/true/null (undefined is Simple(23))."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Simple) and self.value == other.value

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return self.value

    def __repr__(self):
        return "Simple(%d)" % self.value


UNDEFINED = Simple(_UNDEF)
_NOT_KEYS = (list, dict, Tag)  # built once: a tuple literal in a call allocates each time


# ---------------------------------------------------------------- encoding


def encode_head(out, major, n):
    """Append a CBOR head (major type and argument) to a bytearray."""
    mt = major << 5
    if n < 24:
        out.append(mt | n)
    elif n <= 0xFF:
        out.append(mt | _AI_1)
        out.append(n)
    elif n <= 0xFFFF:
        out.append(mt | _AI_2)
        out.extend(struct.pack(">H", n))
    elif n <= 0xFFFFFFFF:
        out.append(mt | _AI_4)
        out.extend(struct.pack(">I", n))
    elif n <= _MAX_U64:
        out.append(mt | _AI_8)
        out.extend(struct.pack(">II", n >> 32, n & 0xFFFFFFFF))
    else:
        raise CBORError("integer does not fit in 64 bits")


def _enc(out, obj, depth):
    if depth <= 0:
        raise CBORError("nesting deeper than %d" % MAX_DEPTH)
    if obj is None:
        out.append(0xF6)
    elif obj is False:
        out.append(0xF4)
    elif obj is True:
        out.append(0xF5)
    elif isinstance(obj, int):
        if obj >= 0:
            encode_head(out, _UINT, obj)
        else:
            encode_head(out, _NINT, -1 - obj)
    elif isinstance(obj, str):
        b = obj.encode("utf-8")
        encode_head(out, _TEXT, len(b))
        out.extend(b)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        encode_head(out, _BYTES, len(obj))
        out.extend(obj)
    elif isinstance(obj, (list, tuple)):
        encode_head(out, _ARRAY, len(obj))
        for x in obj:
            _enc(out, x, depth - 1)
    elif isinstance(obj, dict):
        encode_head(out, _MAP, len(obj))
        pairs = []
        for k in obj:
            kb = bytearray()
            _enc(kb, k, depth - 1)
            pairs.append((bytes(kb), k))
        pairs.sort(key=_first)
        for kb, k in pairs:
            out.extend(kb)
            _enc(out, obj[k], depth - 1)
    elif isinstance(obj, float):
        out.append(0xFB)
        out.extend(struct.pack(">d", obj))
    elif isinstance(obj, Tag):
        if not 0 <= obj.tag <= _MAX_U64:
            raise CBORError("tag number out of range")
        encode_head(out, _TAG, obj.tag)
        _enc(out, obj.value, depth - 1)
    elif isinstance(obj, Simple):
        n = obj.value
        if 0 <= n < 24:
            out.append(0xE0 | n)
        elif 32 <= n <= 255:
            out.append(0xF8)
            out.append(n)
        else:
            raise CBORError("simple value %d is not encodable" % n)
    else:
        raise CBORError("cannot encode %s" % type(obj).__name__)


def _first(pair):
    return pair[0]


def dumps(obj):
    out = bytearray()
    _enc(out, obj, MAX_DEPTH)
    return bytes(out)


# ---------------------------------------------------------------- decoding


def _half(h):
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = m * 5.960464477539063e-08  # 2**-24
    elif e == 31:
        v = float("nan") if m else float("inf")
    else:
        v = (1024 + m) * (2.0 ** (e - 25))
    return -v if h & 0x8000 else v


def _utf8_strict(mv, i, end):
    # MicroPython's str() checks only the byte structure of UTF-8; RFC 3629
    # also forbids overlong forms (lead C0, C1, E0 80..9F, F0 80..8F),
    # surrogates (ED A0..BF) and code points above U+10FFFF (F4 90.., F5..).
    # Each shows in a lead byte and the byte after it. Only non-ASCII text
    # (fewer characters than bytes) gets here.
    while i < end:
        c = mv[i]
        if c >= 0xC0:
            d = mv[i + 1] if i + 1 < end else 0
            if c < 0xC2 or c > 0xF4 or (c == 0xE0 and d < 0xA0) or (c == 0xED and d > 0x9F):
                return False
            if (c == 0xF0 and d < 0x90) or (c == 0xF4 and d > 0x8F):
                return False
        i += 1
    return True


def _fail(msg, *args):
    # Error text is built here, not in the decoding functions: MicroPython
    # heap-allocates the frame of any function whose locals and value stack
    # exceed 11 words, so the hot functions below are kept that small.
    raise CBORError(msg % args)


class Decoder:
    """Reads CBOR items from a buffer, one after the other.

    item() decodes one whole item; _head() and take() let a caller walk a
    structure itself and keep raw byte slices (the COSE verifier needs the
    exact bytes it MACs)."""

    def __init__(self, data, max_depth=MAX_DEPTH):
        self.max_depth = max_depth
        self.major = 0  # major type of the last head
        self.ai = 0  # additional information of the last head (tells float widths)
        self.reset(data, max_depth)

    def reset(self, data, max_depth=MAX_DEPTH):
        """Start over on new data (reusing a decoder saves its allocation)."""
        self.mv = data if isinstance(data, memoryview) else memoryview(data)
        self.pos = 0
        self.end = len(self.mv)
        self.max_depth = max_depth

    def _need(self, n):
        if n > self.end - self.pos:
            _fail("truncated: need %d bytes at offset %d, %d left", n, self.pos, self.end - self.pos)

    def _head(self):
        # one head: returns the argument, leaves the major type in self.major
        # (a (major, argument) tuple would be allocated per item)
        p = self.pos
        if p >= self.end:
            self._need(1)
        ib = self.mv[p]
        self.pos = p + 1
        self.major = ib >> 5
        self.ai = ib & 0x1F
        if self.ai < 24:
            return self.ai
        return self._arg(ib)

    def _arg(self, ib):
        ai = ib & 0x1F
        if ai > _AI_8:
            self._bad_ai(ai)
        return int.from_bytes(self.take(1 << (ai - _AI_1)), "big")

    def _bad_ai(self, ai):
        if ai == _AI_INDEF:
            _fail("indefinite length or break at offset %d is not supported", self.pos - 1)
        _fail("reserved additional information %d at offset %d", ai, self.pos - 1)

    def take(self, n):
        """Return the next n bytes as a memoryview slice (no copy)."""
        self._need(n)
        p = self.pos
        self.pos = p + n
        return self.mv[p : p + n]

    def item(self, depth=None):
        """Decode one item; depth is how many levels may nest (None: max_depth)."""
        if depth is None:
            depth = self.max_depth
        if depth <= 0:
            self._too_deep()
        n = self._head()
        major = self.major
        if major == _UINT:
            return n
        if major == _NINT:
            return -1 - n
        if major == _BYTES:
            return bytes(self.take(n))
        if major == _TEXT:
            return self._text(n)
        if major == _ARRAY:
            return self._array(n, depth - 1)
        if major == _MAP:
            return self._map(n, depth - 1)
        if major == _TAG:
            return Tag(n, self.item(depth - 1))
        return self._simple(n)

    def _too_deep(self):
        _fail("nesting deeper than %d at offset %d", self.max_depth, self.pos)

    # The helpers below stay within 11 words of locals + stack (while loops,
    # not for-range, which holds extra stack slots), so calling them allocates
    # nothing beyond the values they return.

    def _text(self, n):
        s = self._str(n)
        if len(s) != n:  # non-ASCII: str() checked only the byte structure
            self._strict_utf8(n)
        return s

    def _str(self, n):
        try:
            return str(self.take(n), "utf-8")
        except UnicodeError:
            _fail("text ending at offset %d is not valid UTF-8", self.pos)

    def _strict_utf8(self, n):
        if not _utf8_strict(self.mv, self.pos - n, self.pos):
            _fail("text ending at offset %d is not valid UTF-8", self.pos)

    def _array(self, n, depth):
        if n > self.end - self.pos:
            _fail("array of %d items at offset %d exceeds the %d bytes left", n, self.pos, self.end - self.pos)
        out = []  # append: [None] * n would build two lists
        while n:
            n -= 1
            out.append(self.item(depth))
        return out

    def _map(self, n, depth):
        if 2 * n > self.end - self.pos:
            _fail("map of %d pairs at offset %d exceeds the %d bytes left", n, self.pos, self.end - self.pos)
        out = {}
        while n:
            n -= 1
            k = self._key(out, depth)
            out[k] = self.item(depth)
        return out

    def _key(self, out, depth):
        k = self.item(depth)
        if isinstance(k, _NOT_KEYS):
            _fail("map key before offset %d is not hashable (keys must be scalars)", self.pos)
        if k in out:
            _fail("duplicate map key before offset %d", self.pos)
        return k

    def _simple(self, n):
        ai = self.ai
        if ai == _AI_1 and n < 32:
            _fail("two-byte simple value %d before offset %d is not well-formed", n, self.pos)
        if ai == _AI_2:
            return _half(n)
        if ai == _AI_4:
            return struct.unpack(">f", struct.pack(">I", n))[0]
        if ai == _AI_8:
            return struct.unpack(">d", struct.pack(">Q", n))[0]
        if n == _FALSE:
            return False
        if n == _TRUE:
            return True
        if n == _NULL:
            return None
        if n == _UNDEF:
            return UNDEFINED
        return Simple(n)

    def finish(self):
        if self.pos != self.end:
            _fail("%d trailing bytes at offset %d", self.end - self.pos, self.pos)


def loads(data, max_depth=MAX_DEPTH):
    """Decode exactly one CBOR item that fills all of data."""
    d = Decoder(data, max_depth)
    v = d.item()
    d.finish()
    return v
