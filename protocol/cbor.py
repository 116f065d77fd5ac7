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


def encode_into(out, obj):
    """Append the encoding of obj to a bytearray."""
    _enc(out, obj, MAX_DEPTH)


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


class Decoder:
    """Reads CBOR items from a buffer, one after the other.

    item() decodes one whole item; head() and take() let a caller walk a
    structure itself and keep raw byte slices (the COSE verifier needs the
    exact bytes it MACs)."""

    def __init__(self, data, max_depth=MAX_DEPTH):
        self.mv = memoryview(data)
        self.pos = 0
        self.end = len(self.mv)
        self.max_depth = max_depth

    def remaining(self):
        return self.end - self.pos

    def _need(self, n):
        if n > self.end - self.pos:
            raise CBORError("truncated: need %d bytes at offset %d, %d left" % (n, self.pos, self.end - self.pos))

    def head(self):
        """Read one head; return (major type, argument)."""
        self._need(1)
        ib = self.mv[self.pos]
        self.pos += 1
        major = ib >> 5
        ai = ib & 0x1F
        if ai < 24:
            return major, ai
        if ai == _AI_INDEF:
            raise CBORError("indefinite length or break at offset %d is not supported" % (self.pos - 1))
        if ai > _AI_8:
            raise CBORError("reserved additional information %d at offset %d" % (ai, self.pos - 1))
        n = 1 << (ai - _AI_1)
        self._need(n)
        p = self.pos
        mv = self.mv
        v = 0
        for i in range(n):
            v = (v << 8) | mv[p + i]
        self.pos = p + n
        if major == _SIMPLE and ai == _AI_1 and v < 32:
            raise CBORError("two-byte simple value %d at offset %d is not well-formed" % (v, p - 1))
        return major, v

    def take(self, n):
        """Return the next n bytes as a memoryview slice (no copy)."""
        self._need(n)
        p = self.pos
        self.pos = p + n
        return self.mv[p : p + n]

    def item(self, depth=None):
        if depth is None:
            depth = self.max_depth
        if depth <= 0:
            raise CBORError("nesting deeper than %d at offset %d" % (self.max_depth, self.pos))
        start = self.pos
        major, n = self.head()
        if major == _UINT:
            return n
        if major == _NINT:
            return -1 - n
        if major == _BYTES:
            return bytes(self.take(n))
        if major == _TEXT:
            raw = self.take(n)
            try:
                return str(raw, "utf-8")
            except Exception:
                raise CBORError("text at offset %d is not valid UTF-8" % start)
        if major == _ARRAY:
            if n > self.end - self.pos:
                raise CBORError("array of %d items at offset %d exceeds the %d bytes left" % (n, start, self.end - self.pos))
            out = []
            for _ in range(n):
                out.append(self.item(depth - 1))
            return out
        if major == _MAP:
            if 2 * n > self.end - self.pos:
                raise CBORError("map of %d pairs at offset %d exceeds the %d bytes left" % (n, start, self.end - self.pos))
            out = {}
            for _ in range(n):
                kpos = self.pos
                k = self.item(depth - 1)
                try:
                    dup = k in out
                except TypeError:
                    raise CBORError("map key at offset %d is not hashable" % kpos)
                if dup:
                    raise CBORError("duplicate map key at offset %d" % kpos)
                out[k] = self.item(depth - 1)
            return out
        if major == _TAG:
            return Tag(n, self.item(depth - 1))
        # major 7: simple values and floats
        ai = self.mv[start] & 0x1F
        if ai == _AI_2:
            return _half(n)
        if ai == _AI_4:
            return struct.unpack(">f", self.mv[start + 1 : start + 5])[0]
        if ai == _AI_8:
            return struct.unpack(">d", self.mv[start + 1 : start + 9])[0]
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
            raise CBORError("%d trailing bytes at offset %d" % (self.end - self.pos, self.pos))


def loads(data, max_depth=MAX_DEPTH):
    """Decode exactly one CBOR item that fills all of data."""
    d = Decoder(data, max_depth)
    v = d.item()
    d.finish()
    return v
