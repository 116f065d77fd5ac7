# Runs on MicroPython and CPython: a permit-check env (see protocol/permit.py)
# built from the JSON form the vectors, the demo and the benchmarks share:
#   {"device_id": str, "keys": {kid hex: key hex}, "has_key": bool,
#    "now": int or null, "floor": int (default: now, or 0 if now is null),
#    "leeway": int, "revoked_ctis": [hex],
#    "revoked_users": [str], "used_ctis": [hex], "exi_elapsed": {cti hex: int}}
from binascii import hexlify, unhexlify

from hmac256 import HMAC256
from permit import NoKey


def _hex(b):
    return hexlify(b).decode()


class DictEnv:
    def __init__(self, j):
        self.device_id = j["device_id"]
        self._keys = {}
        for kid, key in j.get("keys", {}).items():
            self._keys[unhexlify(kid)] = HMAC256(unhexlify(key))
        self._has_key = j.get("has_key", True)
        self._now = j.get("now")
        self._floor = j.get("floor")
        if self._floor is None:
            self._floor = self._now or 0
        self.leeway = j.get("leeway", 0)
        self._revoked = set(unhexlify(c) for c in j.get("revoked_ctis", ()))
        self._revoked_users = set(j.get("revoked_users", ()))
        self._used = set(unhexlify(c) for c in j.get("used_ctis", ()))
        self._exi = {}
        for c, s in j.get("exi_elapsed", {}).items():
            self._exi[unhexlify(c)] = s

    def key(self, kid):
        if not self._has_key:
            raise NoKey()
        return self._keys.get(kid)

    def now(self):
        return self._now

    def floor(self):
        return self._floor

    def revoked(self, cti, sub):
        return cti in self._revoked or (sub is not None and sub in self._revoked_users)

    def used(self, cti):
        return cti in self._used

    def exi_elapsed(self, cti):
        return self._exi.get(cti)
