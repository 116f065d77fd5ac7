# Runs on MicroPython and CPython: firmware/link.py's check of a signed
# command (Link._signed) against protocol/vectors/messages.json, on a
# stand-in for the platform (identity, clock, store and log).
from binascii import unhexlify

import cbor
import link
from hmac256 import HMAC256


class _Keys:
    def __init__(self, key):
        self._k = HMAC256(key)

    def key(self, kid):
        return self._k if kid == b"\x01" else None


class _Ident:
    def __init__(self, device, key):
        self.device_id = device
        self._keys = _Keys(key)

    def current(self):
        return self._keys


class _Clock:
    def __init__(self, floor):
        self._f = floor

    def floor(self):
        return self._f


class _Store:
    def __init__(self, ctr):
        self.d = {"cmd_ctr": ctr.to_bytes(8, "big")}

    def get(self, k):
        return self.d.get(k)

    def set(self, k, v):
        self.d[k] = v

    def commit(self):
        pass


class _Log:
    def __init__(self):
        self.records = []
        self.on_alarm = None

    def append(self, rtype, body, ts):
        self.records.append((rtype, body))


class _HW:
    pass


class _P:
    pass


def verdict(device, key_hex, ctr, floor, request_hex):
    """[reason, counter stored after, logged verdict] for one command."""
    p = _P()
    p.ident = _Ident(device, unhexlify(key_hex))
    p.clock = _Clock(floor)
    p.hw = _HW()
    p.hw.store = _Store(ctr)
    p.log = _Log()
    lk = link.Link(p, None)
    env = cbor.loads(unhexlify(request_hex))
    r, _ = lk._signed(env[0], env.get(3))
    logged = p.log.records[-1][1] if p.log.records else None
    return [r, int.from_bytes(p.hw.store.get("cmd_ctr"), "big"), logged[:2] if logged else None]
