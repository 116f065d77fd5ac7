# The board's permit checker: protocol/permit.py plugged into the trusted
# clock, the identity's keys and three persisted stores (SPEC.md, Permits):
#   used      single-use permit ids, kept until their exp (so a reboot does
#             not reopen them)
#   first     first-use run time of exi permits, kept until their exp
#   revoked   revoked permit ids until their exp, revoked users until a time
# Entries go once the durable time (what a reboot restores at least: the
# last persisted clock) passes their exp, so the check says expired for
# them even after a power cut. The stores are bounded and fail closed: when
# one is full of live entries, a new single-use permit is refused with
# store_full rather than an old entry forgotten; when the file is damaged,
# every permit is refused with store_lost until recover() (a server
# command) says the board may start over. The file also keeps a copy of the
# clock (time and run time), so losing the clock's own store entry does not
# send it back to 1970. Every verdict on a token with a valid MAC is
# logged; tokens without one at most once per NOISE_S, with a count of the
# ones in between.
import os

import cbor
import permit
import wire

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


MAX_USED = const(256)
MAX_REVOKED = const(128)
LEEWAY_S = const(60)
NOISE_S = const(10)  # at most one log record per 10 s for tokens without a valid MAC
_FILE = "/permits.cbor"


class Permits:
    def __init__(self, ident, clock, log, root, leeway=LEEWAY_S):
        self.device_id = ident.device_id or ""
        self.leeway = leeway
        self._id = ident
        self._clock = clock
        self._log = log
        self._path = root + _FILE
        self._used = {}  # cti -> exp
        self._first = {}  # cti -> [run_s at first use, exp]
        self._rev = {}  # cti -> exp
        self._rev_users = {}  # sub -> until
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
        return cti in self._rev or (sub is not None and sub in self._rev_users)

    def used(self, cti):
        return cti in self._used

    def exi_elapsed(self, cti):
        e = self._first.get(cti)
        if e is None:
            return None
        t = self._clock.run_s() - e[0]
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
        cti = c[wire.CLAIM_CTI]
        exp = c[wire.CLAIM_EXP]
        if c.get(wire.CLAIM_USES, wire.USES_SINGLE) == wire.USES_SINGLE:
            self._used[cti] = exp
        if wire.CLAIM_EXI in c and cti not in self._first:
            self._first[cti] = [self._clock.run_s(), exp]
            self._clock.persist()  # a reboot must not restart the count
        self._save()

    def revoke(self, cti=None, exp=None, sub=None, until=None):
        """Revoke a permit (until its exp) or a user (until a time); returns
        a reason code (store_full when the list is full of live entries)."""
        if (cti is None) == (sub is None) or (cti is not None and not isinstance(exp, int)) or (sub is not None and not isinstance(until, int)):
            raise ValueError("revoke a permit id with its exp, or a user with an end time")
        self.prune()
        if len(self._rev) + len(self._rev_users) >= MAX_REVOKED:
            return wire.STORE_FULL
        if cti is not None:
            self._rev[cti] = exp
        if sub is not None:
            self._rev_users[sub] = until
        self._save()
        return wire.OK

    def recover(self):
        """After store_lost: start over with empty stores (the server has
        re-sent its revocations and accepts that single-use permits issued
        before the loss may be used once more)."""
        self.lost = False
        self._save()

    def prune(self):
        """Forget entries whose permits the durable time shows expired."""
        t = self._clock.durable() - self.leeway
        n = _drop(self._used, t, -1) + _drop(self._first, t, 1) + _drop(self._rev, t, -1) + _drop(self._rev_users, t, -1)
        if n:
            self._save()
        return n

    def counts(self):
        return len(self._used), len(self._first), len(self._rev) + len(self._rev_users)

    # -- internals

    def _room(self, c):
        single = c.get(wire.CLAIM_USES, wire.USES_SINGLE) == wire.USES_SINGLE
        exi = wire.CLAIM_EXI in c
        if not single and not exi:
            return True
        if len(self._used) + len(self._first) < MAX_USED:
            return True
        return self.prune() > 0 and len(self._used) + len(self._first) < MAX_USED

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
            with open(self._path, "rb") as f:
                data = f.read()
        except OSError:
            return  # first boot: nothing stored yet
        try:
            d = cbor.loads(data)
            if not _valid(d):
                raise ValueError("permit store has the wrong shape")
        except ValueError:
            # written atomically, so this is flash damage: refuse permits
            # rather than forget used ones and revocations
            self.lost = True
            if self._log is not None:
                self._log.append(wire.LOG_ALARM, ["permit_store_lost"], self._clock.floor())
            return
        self._used = d[1]
        self._first = d[2]
        self._rev = d[3]
        self._rev_users = d[4]
        self._clock.restore(d[5], d[6])

    def _save(self):
        tmp = self._path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(cbor.dumps({1: self._used, 2: self._first, 3: self._rev, 4: self._rev_users, 5: self._clock.durable(), 6: self._clock.run_s()}))
        os.rename(tmp, self._path)


_FOREVER = const(1 << 29)


def _valid(d):
    # the shape _save writes; anything else is damage
    if not isinstance(d, dict) or not isinstance(d.get(5), int) or not isinstance(d.get(6), int):
        return False
    for k, kt in ((1, bytes), (2, bytes), (3, bytes), (4, str)):
        m = d.get(k)
        if not isinstance(m, dict):
            return False
        for key in m:
            v = m[key]
            if not isinstance(key, kt):
                return False
            if k == 2:
                if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], int)):
                    return False
            elif not isinstance(v, int):
                return False
    return True


def _drop(d, t, i):
    # delete entries whose exp (the value, or value[i] for lists) <= t
    old = []
    for k in d:
        v = d[k]
        if (v if i < 0 else v[i]) <= t:
            old.append(k)
    for k in old:
        del d[k]
    return len(old)
