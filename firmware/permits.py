# The board's permit checker: protocol/permit.py plugged into the trusted
# clock, the identity's keys and two persisted tables (SPEC.md, section 7):
#   used      permits acted on: single-use ones (so a reboot does not reopen
#             them) and exi ones with their first-use run time, until exp
#   revoked   revoked permit ids until their exp, revoked users until a time
# Entries go once the durable time (what a reboot restores at least: the
# last persisted clock) passes their exp, so the check says expired for
# them even after a power cut. The tables (idtable.py) are fixed-size
# bytearrays, so a full store costs the heap an empty one does, and they
# fail closed: when one is full of live entries, a new single-use or exi
# permit is refused with store_full rather than an old entry forgotten;
# when the file is damaged, every permit is refused with store_lost until
# recover() (a server command) says the board may start over. The file also
# keeps a copy of the clock (time and run time), so losing the clock's own
# store entry does not send it back to 1970. Every verdict on a token with a
# valid MAC is logged; tokens without one at most once per NOISE_S, with a
# count of the ones in between.
#
# File (/permits.bin, written whole to a temp file, then renamed over):
#   "VGP2" | durable u32 | run u32 | n_used u16 | n_revoked u16 |
#   n_used x 16-byte entries | n_revoked x 16-byte entries | CRC32 of all before
import os
import struct
from binascii import crc32

import permit
import wire
from idtable import ENTRY, IdTable, key

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


MAX_USED = const(128)
MAX_REVOKED = const(64)
LEEWAY_S = const(60)
NOISE_S = const(10)  # at most one log record per 10 s for tokens without a valid MAC
_FILE = "/permits.bin"
_MAGIC = b"VGP2"
_HEAD = "<4sIIHH"
_HEAD_LEN = const(16)
_SINGLE = const(1)  # used: a single-use permit acted on
_EXI = const(2)  # used: an exi permit's first use, run time in b
_REV_PERMIT = const(1)
_REV_USER = const(2)
_FOREVER = const(1 << 29)


class Permits:
    def __init__(self, ident, clock, log, root, leeway=LEEWAY_S):
        self.device_id = ident.device_id or ""
        self.leeway = leeway
        self._id = ident
        self._clock = clock
        self._log = log
        self._path = root + _FILE
        self._tmp = self._path + ".tmp"
        self._used = IdTable(MAX_USED)  # a = exp, b = first-use run time
        self._rev = IdTable(MAX_REVOKED)  # a = until
        self.lost = False
        self._noise = 0  # unauthenticated rejections not logged since the last one
        self._noise_at = -NOISE_S
        self._load()

    # -- the env protocol/permit.py asks

    def key(self, kid):
        return self._id.key(kid, self._clock.floor())

    def now(self):
        return self._clock.now()

    def floor(self):
        return self._clock.floor()

    def revoked(self, cti, sub):
        if self._rev.find(key(cti), _REV_PERMIT) >= 0:
            return True
        return sub is not None and self._rev.find(key(sub), _REV_USER) >= 0

    def used(self, cti):
        return self._used.find(key(cti), _SINGLE) >= 0

    def exi_elapsed(self, cti):
        i = self._used.find(key(cti), _EXI)
        if i < 0:
            return None
        t = self._clock.run_s() - self._used.b(i)
        return t if t >= 0 else _FOREVER  # run time went back: fail closed

    # -- what the apps call

    def check(self, token, action, index=None):
        """Verdict (reason, claims) for a permit the board is about to act on.
        Logged with its reason. Does not consume the permit."""
        reason, c = permit.verify(token, self, action, index)
        if c is not None:
            self._clock.saw_iat(c.get(wire.CLAIM_IAT))  # MAC-valid: server time
        if reason == wire.OK and self.lost:
            reason = wire.STORE_LOST
        elif reason == wire.OK and not self._room(c):
            reason = wire.STORE_FULL
        self._record(reason, c, action, index)
        return reason, c

    def consume(self, c):
        """The board acts on a checked permit: a single-use one is used up,
        an exi one starts counting. Persisted before returning."""
        k = key(c[wire.CLAIM_CTI])
        flags = _SINGLE if c.get(wire.CLAIM_USES, wire.USES_SINGLE) == wire.USES_SINGLE else 0
        exi = wire.CLAIM_EXI in c
        if exi:
            flags |= _EXI
        if not flags:
            return
        i = self._used.find(k)
        if i < 0:
            i = self._used.add(k, flags, c[wire.CLAIM_EXP], self._clock.run_s())
            if i < 0:
                raise OSError(28, "permit store full")  # check() said store_full first
            if exi:
                self._clock.persist()  # a reboot must not restart the count
        else:
            self._used.set_flags(i, self._used.flags(i) | flags)
        self._save()

    def revoke(self, cti=None, exp=None, sub=None, until=None):
        """Revoke a permit (until its exp) or a user (until a time); returns
        a reason code (store_full when the list is full of live entries)."""
        if (cti is None) == (sub is None) or (cti is not None and not isinstance(exp, int)) or (sub is not None and not isinstance(until, int)):
            raise ValueError("revoke a permit id with its exp, or a user with an end time")
        k = key(cti if cti is not None else sub)
        kind = _REV_PERMIT if cti is not None else _REV_USER
        i = self._rev.find(k, kind)
        if i < 0:
            i = self._rev.add(k, kind, exp if cti is not None else until)
            if i < 0 and self.prune():
                i = self._rev.add(k, kind, exp if cti is not None else until)
            if i < 0:
                return wire.STORE_FULL
        self._save()
        return wire.OK

    def recover(self):
        """After store_lost: start over with empty stores (the server has
        re-sent its revocations and accepts that single-use permits issued
        before the loss may be used once more)."""
        self.lost = False
        self._used.clear()
        self._rev.clear()
        self._save()

    def prune(self):
        """Forget entries whose permits the durable time shows expired."""
        t = self._clock.durable() - self.leeway
        n = self._used.drop_until(t) + self._rev.drop_until(t)
        if n:
            self._save()
        return n

    def counts(self):
        return self._used.count(_SINGLE), self._used.count(_EXI), self._rev.count()

    # -- internals

    def _room(self, c):
        single = c.get(wire.CLAIM_USES, wire.USES_SINGLE) == wire.USES_SINGLE
        if not single and wire.CLAIM_EXI not in c:
            return True
        if self._used.find(key(c[wire.CLAIM_CTI])) >= 0 or self._used.count() < MAX_USED:
            return True
        self.prune()
        return self._used.count() < MAX_USED

    def _record(self, reason, c, action, index):
        if self._log is None:
            return
        if c is None:
            # no valid MAC: anyone can send these, as fast as they like; one
            # record per NOISE_S at most, carrying how many were not logged,
            # so garbage cannot wear the flash or push readings out of the log
            t = self._clock.run_s()
            if t - self._noise_at < NOISE_S:
                self._noise += 1
                return
            body = [reason, None, None, action, index, self._noise]
            self._noise = 0
            self._noise_at = t
        else:
            body = [reason, c.get(wire.CLAIM_CTI), c.get(wire.CLAIM_SUB), action, index]
        self._log.append(wire.LOG_PERMIT, body, self._clock.floor())

    def _load(self):
        try:
            f = open(self._path, "rb")
        except OSError:
            return  # first boot: nothing stored yet
        try:
            with f:
                ok = self._read(f)
        except (OSError, ValueError):
            ok = False
        if not ok:
            # written whole and renamed, so this is flash damage: refuse
            # permits rather than forget used ones and revocations
            self.lost = True
            if self._log is not None:
                self._log.append(wire.LOG_ALARM, ["permit_store_lost"], self._clock.floor())

    def _read(self, f):
        head = f.read(_HEAD_LEN)
        if len(head) != _HEAD_LEN:
            return False
        magic, durable, run, nu, nr = struct.unpack(_HEAD, head)
        if magic != _MAGIC:
            return False
        crc = crc32(head)
        for table, n in ((self._used, nu), (self._rev, nr)):
            if n == table.n:
                if f.readinto(table.buf) != len(table.buf):
                    return False
                crc = crc32(table.buf, crc)
            else:  # another firmware's capacity: entry by entry
                e = bytearray(ENTRY)
                for _ in range(n):
                    if f.readinto(e) != ENTRY:
                        return False
                    crc = crc32(e, crc)
                    if e[7] and table.add((e[0] | e[1] << 8 | e[2] << 16 | e[3] << 24, e[4] | e[5] << 8 | e[6] << 16), e[7], _u32(e, 8), _u32(e, 12)) < 0:
                        return False
        tail = f.read(4)
        if len(tail) != 4 or struct.unpack("<I", tail)[0] != crc & 0xFFFFFFFF:
            return False
        self._clock.restore(durable, run)
        return True

    def _save(self):
        tmp = self._tmp
        head = struct.pack(_HEAD, _MAGIC, self._clock.durable(), self._clock.run_s(), MAX_USED, MAX_REVOKED)
        crc = crc32(self._rev.buf, crc32(self._used.buf, crc32(head)))
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(self._used.buf)
            f.write(self._rev.buf)
            f.write(struct.pack("<I", crc & 0xFFFFFFFF))
        os.rename(tmp, self._path)


def _u32(b, o):
    return b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)
