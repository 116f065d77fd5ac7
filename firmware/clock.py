# Trusted time (DESIGN.md, Trusted time; SPEC.md section 7).
#
# Three lower bounds on the real time, none of which runs backwards except
# through an authenticated sync: confirmed() (the persisted time, the chip
# RTC, a battery-backed RTC, then the tick counter), floor() (confirmed,
# raised by the iat of permits seen while untrusted; what checks and log
# timestamps use) and durable() (the last persisted time, which a reboot
# restores at least; what the permit stores forget by). Only an
# authenticated time sync (a signed command carrying the nonce this boot
# handed out, answered within SYNC_WINDOW_S, under the current key) may set
# the time anywhere, back included; the sync, or a valid external RTC, makes
# the clock trusted. Until then now() returns None and time-bound permits
# are refused with time_untrusted.
#
# iat bound: on a trusted clock an iat moves the time forward by at most
# IAT_AHEAD_S (drift correction); an iat further ahead is ignored. On an
# untrusted clock iat raises only floor(), the bound permit checks use to
# refuse expired permits: it is kept in RAM, never persisted, never used to
# forget anything (pruning uses durable()), it cannot make the clock
# trusted, and the next sync or reboot drops it.
#
# Persistence: time and run-time seconds go to the store every PERSIST_S
# (and at boot, at a sync, and when an exi permit starts counting), 144 NVS
# writes a day in steady state: about 9 KB/day of NVS entries, so a
# 24 KB wear-levelled NVS partition erases each page every ~2.7 days and
# 100,000 erase cycles last centuries. After a power cut the floor is at most
# PERSIST_S behind the last time the board knew.
import os
import struct

import command
import wire
from hmac256 import equal

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


PERSIST_S = const(600)
IAT_AHEAD_S = const(300)
SYNC_WINDOW_S = const(60)
NONCE_LEN = const(8)
_KEY = "clock"  # store blob: <QI last-known Unix time, run-time seconds


class Clock:
    def __init__(self, hw, log=None):
        self._hw = hw
        self._log = log
        raw = hw.store.get(_KEY)
        floor, run = struct.unpack("<QI", raw) if raw and len(raw) == 12 else (0, 0)
        self.trusted = False
        t = floor
        rtc = hw.rtc.now()
        if rtc is not None and rtc > t:
            t = rtc
        if hw.ext_rtc is not None:
            ext = hw.ext_rtc.now()
            # a battery-backed chip that kept time is trusted, unless it is
            # behind what the board already knew (then it lost time)
            if ext is not None and ext >= t:
                t = ext
                self.trusted = True
        self._t0 = t  # confirmed Unix time at tick _k0
        # run time since the last persist is lost with the power: assume a
        # whole interval ran, so exi permits can only run out early, never
        # late (cycling the power must not stretch them)
        self._run0 = run + PERSIST_S  # run-time seconds at tick _k0
        self._k0 = hw.ticks_ms()
        self._iat = 0  # iat seen on an untrusted clock: RAM only (see floor())
        self._nonce = self._nonce_old = None
        self._nonce_at = self._nonce_old_at = 0
        self.junk = 0  # syncs refused for their MAC
        self.persist()  # so that the next boot adds to this one's bump

    # -- reading

    def _elapsed(self):
        return self._hw.ticks_diff(self._hw.ticks_ms(), self._k0) // 1000

    def now(self):
        """Trusted Unix time, or None while the clock is not trusted."""
        return self._t0 + self._elapsed() if self.trusted else None

    def confirmed(self):
        """A lower bound on the real time from the board's own sources (the
        persisted time, RTCs, ticks) and syncs; never decreases except by a sync."""
        return self._t0 + self._elapsed()

    def floor(self):
        """What permit checks and log timestamps use: confirmed(), raised by
        the iat of permits seen while untrusted (server time, under the key)."""
        t = self._t0 + self._elapsed()
        return t if t >= self._iat else self._iat

    def durable(self):
        """The time a reboot restores at least: the last persisted one. What
        is forgotten (pruned) must be forgotten against this, or a power cut
        would bring back permits the stores no longer remember."""
        return self._saved

    def run_s(self):
        """Seconds this board has run, across reboots, never under the truth:
        each boot adds PERSIST_S for the unrecorded tail before it (exi
        permits count this)."""
        return self._run0 + self._elapsed()

    # -- moving

    def _advance(self):
        # fold whole elapsed seconds into the base, keeping the remainder in
        # _k0 (so ticking at any rate neither loses nor invents time)
        e = self._elapsed()
        if e:
            self._t0 += e
            self._run0 += e
            self._k0 = self._hw.ticks_add(self._k0, e * 1000)

    def _set(self, t):
        self._advance()
        self._t0 = t

    def restore(self, t, run):
        """Another durable record of time and run time (the permit store):
        the clock takes whichever is later, so losing its own store entry
        does not send it back to 1970."""
        self._advance()
        if t > self._t0:
            self._t0 = t
        if run > self._run0:
            self._run0 = run

    def tick(self):
        """Call about once a second (any rate works): keeps tick differences
        short (ticks wrap on the board) and persists every PERSIST_S."""
        self._advance()
        if self._t0 - self._saved >= PERSIST_S:
            self.persist()

    def persist(self):
        self._advance()
        t = self._t0
        self._hw.store.set(_KEY, struct.pack("<QI", t, self._run0))
        self._hw.store.commit()
        self._saved = t

    def saw_iat(self, iat):
        """A verified permit's issue time (see the iat bound above)."""
        if iat is None:
            return False
        if not self.trusted:
            if iat > self._iat:
                self._iat = iat  # raises floor(), not confirmed() nor durable()
            return False
        t = self.confirmed()
        if iat <= t:
            return False
        if iat > t + IAT_AHEAD_S:
            self._event("iat_ahead", t, iat)
            return False
        self._set(iat)
        return True

    # -- authenticated sync

    def begin_sync(self):
        """A fresh nonce for the server to answer; valid for SYNC_WINDOW_S,
        for one sync, and only in this boot (it is never persisted). The
        nonce before it stays valid too, so that one more hello (a pull,
        another server) does not spoil a sync on its way."""
        self._nonce_old = self._nonce
        self._nonce_old_at = self._nonce_at
        self._nonce = os.urandom(NONCE_LEN)
        self._nonce_at = self.run_s()
        return self._nonce

    def sync(self, token, keys):
        """Apply a signed time sync; returns a wire reason code."""
        reason, env = command.verify(token, keys)
        if reason != wire.OK:
            self.junk += 1  # no valid MAC: counted, not logged (junk must not write the flash)
            return reason
        t = env.get(wire.ENV_BODY)
        nonce = env.get(wire.ENV_NONCE)
        at = None
        if isinstance(nonce, bytes):
            if self._nonce is not None and equal(nonce, self._nonce):
                at = self._nonce_at
            elif self._nonce_old is not None and equal(nonce, self._nonce_old):
                at = self._nonce_old_at
        if env[wire.ENV_TYPE] != wire.MSG_TIME_SYNC or not isinstance(t, int) or t < 0 or not isinstance(nonce, bytes):
            reason = wire.MALFORMED
        elif at is None:
            reason = wire.REPLAYED  # not the answer to a nonce outstanding now
        elif self.run_s() - at > SYNC_WINDOW_S:
            reason = wire.EXPIRED
        if reason != wire.OK:
            self._event("sync_" + wire.reason_name(reason), self.floor(), t)
            return reason
        self._nonce = self._nonce_old = None
        old = self.floor()
        self._set(t)
        self._iat = 0
        self.trusted = True
        self._hw.rtc.set(t)
        if self._hw.ext_rtc is not None:
            self._hw.ext_rtc.set(t)
        self.persist()
        self._event("sync", old, t)
        return wire.OK

    def _event(self, what, old, new):
        if self._log is not None:
            self._log.append(wire.LOG_CLOCK, [what, old, new], self.floor())
