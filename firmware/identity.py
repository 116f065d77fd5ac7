# Device identity and keys, read from the persistent store at boot
# (provisioning writes them; DESIGN.md, Permits: one key per device).
#
# Store keys (NVS blobs unless noted; esp32.NVS reads only blobs and i32):
#   dev_id     device id, UTF-8
#   key        the device key, 32 bytes
#   key_ver    (i32) its version, the permits' kid
#   key_old    the previous key during a rotation, 32 bytes
#   key_old_v  (i32) its version
#   key_old_x  (i32, Unix time / 16) when the previous key stops verifying
#   site       site name, UTF-8
#   link       link settings, a CBOR map (broker, port, user, password, ...)
# A board without a valid key refuses every permit with no_key and says why.
import struct

import cbor
from hmac256 import HMAC256
from permit import NoKey

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


KEY_LEN = const(32)


def _kid(version):
    # the kid of a key version: minimal big-endian bytes (SPEC.md, Keys)
    if version < 0x100:
        return bytes((version,))
    return struct.pack(">H", version)


class Identity:
    def __init__(self, store):
        self.problems = []
        raw = store.get("dev_id")
        self.device_id = str(raw, "utf-8") if raw else None
        if not self.device_id:
            self.problems.append("no device id in the store (dev_id)")
        site = store.get("site")
        self.site = str(site, "utf-8") if site else None
        link = store.get("link")
        self.link = {}
        if link:
            try:
                self.link = cbor.loads(link)
            except ValueError:
                self.problems.append("link settings in the store are not CBOR (link)")
        self._keys = {}  # kid -> HMAC256
        self._old_until = None
        key = store.get("key")
        ver = store.get_int("key_ver", 0)
        if key is None:
            self.problems.append("no device key in the store (key): every permit is refused")
        elif len(key) != KEY_LEN or not 0 < ver <= 0xFFFF:
            self.problems.append("device key in the store is invalid (key, key_ver): every permit is refused")
        else:
            self.key_version = ver
            self._keys[_kid(ver)] = HMAC256(key)
        old = store.get("key_old")
        old_v = store.get_int("key_old_v", 0)
        if old is not None and len(old) == KEY_LEN and 0 < old_v <= 0xFFFF and old_v != ver:
            self._keys[_kid(old_v)] = HMAC256(old)
            self._old_kid = _kid(old_v)
            self._old_until = store.get_int("key_old_x", 0) * 16

    def has_key(self):
        return bool(self._keys)

    def current(self):
        """Keys for commands (time sync and the rest): the current key only,
        never the previous one of a rotation."""
        return _Current(self)

    def key(self, kid, now=None):
        """The key for a kid, or None; raises NoKey when the board has none.
        The previous key (rotation) answers only until its overlap ends,
        judged by the time floor now."""
        if not self._keys:
            raise NoKey()
        if self._old_until is not None and kid == self._old_kid and (now is None or now >= self._old_until):
            return None
        return self._keys.get(kid)


class _Current:
    def __init__(self, ident):
        self._i = ident

    def key(self, kid):
        i = self._i
        if not i._keys:
            raise NoKey()
        if i._old_until is not None and kid == i._old_kid:
            return None
        return i._keys.get(kid)
