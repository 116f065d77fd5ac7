# Runs on MicroPython and CPython: CBOR values <-> a typed JSON form, so tests
# can pass values between the interpreters and compare them exactly.
#   int, str, true/false/null   as themselves
#   bytes                       ["b", hex]
#   float                       ["f", hex of the IEEE 754 binary64 bits]
#   array                       ["a", [items]]
#   map                         ["m", [[k, v], ...]] sorted by the encoded key
#   tag                         ["t", number, value]
#   simple (incl. undefined)    ["s", number]
import struct
from binascii import hexlify, unhexlify

import cbor


def to_j(v):
    if v is None or v is True or v is False or isinstance(v, (int, str)):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return ["b", hexlify(bytes(v)).decode()]
    if isinstance(v, float):
        return ["f", hexlify(struct.pack(">d", v)).decode()]
    if isinstance(v, (list, tuple)):
        return ["a", [to_j(x) for x in v]]
    if isinstance(v, dict):
        pairs = [(cbor.dumps(k), to_j(k), to_j(v[k])) for k in v]
        pairs.sort(key=lambda p: p[0])
        return ["m", [[p[1], p[2]] for p in pairs]]
    if isinstance(v, cbor.Tag):
        return ["t", v.tag, to_j(v.value)]
    if isinstance(v, cbor.Simple):
        return ["s", v.value]
    raise TypeError("no typed JSON form for %s" % type(v).__name__)


def from_j(j):
    if not isinstance(j, list):
        return j
    kind = j[0]
    if kind == "b":
        return unhexlify(j[1])
    if kind == "f":
        return struct.unpack(">d", unhexlify(j[1]))[0]
    if kind == "a":
        return [from_j(x) for x in j[1]]
    if kind == "m":
        d = {}
        for k, v in j[1]:
            d[from_j(k)] = from_j(v)
        return d
    if kind == "t":
        return cbor.Tag(j[1], from_j(j[2]))
    if kind == "s":
        return cbor.Simple(j[1])
    raise ValueError("unknown typed JSON kind %r" % kind)
