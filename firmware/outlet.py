# The outlet application (DESIGN.md, Board kinds: Outlet; firmware/APPS.md):
# relays closed only under a valid power permit, metered, protected, and
# billed. Records: protocol/SPEC.md section 9.
#
# Control cycle, every CYCLE_MS (250 ms) for each relay, allocating nothing:
# read the meter (meter.py: pulses -> mWh register, power, voltage,
# current); protect; end the session when it is over; then, across relays,
# readings, saves and revocation checks when due.
#
# Protection (as Tasmota's MaxPower / Hold / Window): while a relay is
# closed, current above limits.over_current_ma, power above
# limits.over_power_mw (or the permit's max W, when lower) or mains above
# limits.over_voltage_mv for HOLD_MS (2 s: motors and heaters start with
# inrush) trips it open. It closes again after 5 s, 10 s, 20 s (RETRIES = 3
# automatic retries); the 4th trip latches it (the session ends, "trip").
# A relay that ran RESET_MS (60 s) without a fault starts counting anew.
# Short circuits are the upstream breaker's: the hold is not for them.
# Power above STUCK_MW (5 W) for STUCK_MS (3 s) with the relay commanded
# open is a welded contact: alarm, latched ("relay_stuck"). A meter that
# fails latches its relay too. A latch survives reboots; a service permit
# for the outlet, or the server's clear_fault, clears it.
#
# Sessions. present(token, index) checks the permit with no action asked
# (the permit's own action decides), then: power -> the outlet asked for,
# or the first free one in the permit's scope (any when it has none);
# service -> clear the latched outlets in scope; anything else ->
# wrong_action. A session ends, opening the relay, at exp (the trusted
# clock's time; the floor on an untrusted one), when an exi permit's exi
# has run (run time since its first use), at the permit's energy cap
# (limits max Wh; overshoot at most one cycle's energy), when latched by a
# trip or fault, on the server's relay_off, and when its permit or user is
# revoked (the revoke command ends it at once; other revocations are seen
# within REVOKE_MS). Session energy is the register at the last cycle
# before the end. The relay does not close for a permit past its exp (the
# checker's leeway is for clock skew at the edges of the window, not for
# power after it). A single-use permit presented again is replayed (the
# checker). A many-use permit presented during its own session keeps it
# (ok, nothing changes); after the session ended, within the window, it
# starts a new one, which resumes the permit: its energy cap counts what
# its earlier sessions took (the energy table, below), and an exi permit
# keeps counting from its first use.
#
# Persistence (meter.py Registers: one file, temp + rename): per relay the
# energy register, the latch and the open session; the energy table. Saved
# when a relay has taken PERSIST_MWH (10 Wh) since the last save, every
# PERSIST_MS (60 s) while a session is open or energy is unsaved, and at
# every session start, end, latch and clear. Bound: a power cut loses what
# flowed since the last save: less than 10 Wh + two cycles' energy (the
# cycle that crossed 10 Wh, and the one the cut interrupted), and never
# more than 60.5 s of energy: 10.5 Wh per relay at the 3.68 kW default
# limit. It counts nothing twice: the meter's counter is re-based at boot,
# so the register goes on from its saved value.
# After a reboot the relays stay open: a session found open was cut
# (power cut, reset or watchdog) and is ended with reason "power_cut" and
# the energy up to its last save; a many-use permit presented again starts
# a new session (a load that restarts by itself after a power cut is a
# hazard, and the clock is untrusted then anyway). A session end is saved
# before its record is logged and cleared after: a reboot between the two
# logs the record from the saved end, so it is never lost (at worst the
# same record twice: the server keys a session by device, outlet, cti and
# start time).
#
# Heap (tests/test_outlet.py measures it from the .mpy build): the app
# holds its relays' state, a 29-byte record buffer with a view made once
# per body length (32 B each), and the state file's buffer (8 + 140 bytes
# a relay, 256 bytes of table): 3.3 KB with two relays; its code takes
# 13.5 KB as loaded .mpy. The control cycle allocates nothing, and neither
# do readings and energy totals (encoded into that buffer, appended
# through the view). Saves (~1.1 KB: the file object, the packed
# channels), session records and events (CBOR bodies) allocate, and so
# does the revocation check every REVOKE_MS (~370 B an open session: the
# permit store hashes the ids).
import struct

import wire
from idtable import key
from meter import Meter, Registers

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_CYCLE_MS = const(250)
_HOLD_MS = const(2000)
_RETRIES = const(3)
_RETRY_MS = const(5000)  # the first retry's wait; each next one doubles
_RESET_MS = const(60000)
_STUCK_MW = const(5000)
_STUCK_MS = const(3000)
_READING_S = const(60)  # default; the store's "out_read_s" or the factory's reading_s overrides it
_READ_MIN_S = const(5)  # bounds on the store value: a reading every cycle would flood the log
_READ_MAX_S = const(3600)
_PERSIST_MS = const(60000)
_PERSIST_MWH = const(10000)
_ENERGY_MS = const(3600000)  # energy totals to the log, when they changed
_REVOKE_MS = const(5000)
_MAX_U32 = const(0xFFFFFFFF)

# board limits when the board file has none
_OVER_MA = const(16000)
_OVER_MW = const(3680000)
_OVER_MV = const(253000)

# relay states
_IDLE = const(0)  # open, no session
_ON = const(1)  # closed for a session
_WAIT = const(2)  # open after a trip, the session goes on; closes again at .since
_LATCHED = const(3)  # open until cleared

# causes of trips and latches (persisted by number)
_C_CURRENT = const(1)
_C_POWER = const(2)
_C_VOLTAGE = const(3)
_C_STUCK = const(4)
_C_METER = const(5)
_C_LOST = const(6)
_CAUSES = ("", "over_current", "over_power", "over_voltage", "relay_stuck", "meter_failed", "state_lost")

# why a session ended (persisted by number)
_E_EXP = const(1)
_E_EXI = const(2)
_E_CAP = const(3)
_E_TRIP = const(4)
_E_SERVER = const(5)
_E_REVOKED = const(6)
_E_CUT = const(7)
_E_FAULT = const(8)
_ENDS = ("", "exp", "exi", "energy_cap", "trip", "server", "revoked", "power_cut", "fault")

_CH = "<QIBBBBB3x32s64sIIQII"  # a relay in the state file (meter.py)
_RB = const(29)  # record buffer: the largest reading ([u8, u64, u64, u64]: 29 bytes; 17 below 2**32)


def _uint(b, p, v):
    # CBOR unsigned integer v (clamped to 0..2**64-1) into b at p, shortest
    # form; returns the position after it
    if v < 0:
        v = 0
    if v < 24:
        b[p] = v
        return p + 1
    if v < 0x100:
        b[p] = 0x18
        b[p + 1] = v
        return p + 2
    if v < 0x10000:
        b[p] = 0x19
        n = 2
    elif v <= _MAX_U32:
        b[p] = 0x1A
        n = 4
    else:
        b[p] = 0x1B
        n = 8
    q = p + n
    while q > p:
        b[q] = v & 0xFF
        v >>= 8
        q -= 1
    return p + n + 1


class Channel:
    """One relay: its meter, protection state and session."""

    def __init__(self, i, hw_outlet, max_mw):
        self.i = i
        self.relay = hw_outlet.relay
        self.meter = Meter(hw_outlet.meter)
        self.st = _IDLE
        self.latch = 0  # cause, while latched
        self.trips = 0
        self.over = 0  # cause of the fault seen since .over_at, 0: none
        self.over_at = 0
        self.since = 0  # ticks: closed at (ON), closes again at (WAIT)
        self.saved_mwh = 0
        self.logged_mwh = -1
        self.board_mw = max_mw
        self.cti = None  # the session's permit id; None: no session
        self.sub = None
        self.exp = 0
        self.end_run = 0  # exi: run seconds it ends at; 0: none
        self.cap = -1  # mWh this session may take; -1: no cap
        self.max_mw = max_mw
        self.start_ts = 0
        self.start_run = 0
        self.start_mwh = 0
        self.reason = 0  # set when the session ended and its record is pending
        self.t_end = 0
        self.run_end = 0

    def pack(self, buf, off, t, run):
        cti = self.cti
        sub = None if cti is None or self.sub is None else self.sub.encode()
        if self.reason:
            t = self.t_end
            run = self.run_end
        # session: 0 none, 1 open, 2 ended with its record pending; sub length 255: none
        struct.pack_into(
            _CH,
            buf,
            off,
            self.meter.mwh,
            self.meter.nwh,
            0 if cti is None else (2 if self.reason else 1),
            self.latch,
            self.reason,
            0 if cti is None else len(cti),
            255 if sub is None else len(sub),
            cti or b"",
            sub or b"",
            self.start_ts,
            self.start_run,
            self.start_mwh,
            t,
            run,
        )

    def unpack(self, buf, off):
        v = struct.unpack_from(_CH, buf, off)
        self.meter.mwh = self.saved_mwh = v[0]
        self.meter.nwh = v[1]
        self.latch = v[3]
        if v[2]:
            self.cti = v[7][: v[5]]
            self.sub = None if v[6] == 255 else v[8][: v[6]].decode()
            self.reason = v[4] if v[2] == 2 else _E_CUT
            self.start_ts = v[9]
            self.start_run = v[10]
            self.start_mwh = v[11]
            self.t_end = v[12]
            self.run_end = v[13]


class Outlet:
    name = "outlet"
    watch_ms = 2000

    def __init__(self, system, reading_s=None):
        hw = system.hw
        self._hw = hw
        self._log = system.log
        self._clock = system.clock
        self._permits = system.permits
        lim = system.config.get("limits") or {}
        self._max_ma = lim.get("over_current_ma", _OVER_MA)
        self._max_mv = lim.get("over_voltage_mv", _OVER_MV)
        mw = lim.get("over_power_mw", _OVER_MW)
        self._ch = [Channel(i, hw.outlets[i], mw) for i in range(len(hw.outlets))]
        self._reg = Registers(hw.root, len(self._ch))
        self._rb = bytearray(_RB)
        self._mv = memoryview(self._rb)
        self._views = [None] * (_RB + 1)  # record bodies by length, made on first use
        if reading_s is None:
            reading_s = hw.store.get_int("out_read_s", _READING_S)
            if not _READ_MIN_S <= reading_s <= _READ_MAX_S:
                reading_s = _READING_S  # a bad store value must not flood the log
        self._read_ms = reading_s * 1000
        self._ms = hw.ticks_ms()
        self._t = self._clock.floor()
        self._run = self._clock.run_s()
        self._read_at = self._rev_at = self._energy_at = self._saved_at = self._ms
        self._boot()

    # -- boot

    def _boot(self):
        got = self._reg.load()
        for ch in self._ch:
            if got:
                ch.unpack(self._reg.buf, self._reg.offset(ch.i))
            elif got is None:  # flash damage: nobody knows what was latched
                ch.latch = _C_LOST
            if ch.latch:
                ch.st = _LATCHED
        if got is None:
            self._log.append(wire.LOG_ALARM, ["outlet_state_lost"], self._t)
        for ch in self._ch:
            if ch.cti is not None:  # a session the reboot cut, or one whose end record is pending
                if ch.reason == _E_CUT:
                    self._take(ch)
                self._log_end(ch)
                self._forget(ch)
        self._prune()
        self._save()
        for ch in self._ch:
            if ch.latch:
                self._state(ch, "latched", _CAUSES[ch.latch])
            self._energy(ch)

    # -- the control cycle

    async def run(self, sup):
        sleep = self._hw.sleep_ms
        while True:
            self.step()
            sup.beat(self.name)
            await sleep(_CYCLE_MS)

    def step(self):
        """One control cycle of every relay, then what is due."""
        c = self._clock
        self._ms = self._hw.ticks_ms()
        self._t = c.floor()
        self._run = c.run_s()
        k = 0
        while k < len(self._ch):
            self._cycle(self._ch[k])
            k += 1
        self._duties()

    def _cycle(self, ch):
        if not ch.meter.read():
            if ch.latch != _C_METER:
                self._latch(ch, _C_METER)
            return
        if ch.st == _ON:
            self._protect(ch)
        else:
            if ch.st == _WAIT and self._hw.ticks_diff(self._ms, ch.since) >= 0:
                self._retry(ch)
            self._watch(ch)
        if ch.cti is not None:
            self._ends(ch)

    def _protect(self, ch):
        m = ch.meter
        cause = 0
        if m.ma > self._max_ma:
            cause = _C_CURRENT
        elif m.mw > ch.max_mw:
            cause = _C_POWER
        elif m.mv > self._max_mv:
            cause = _C_VOLTAGE
        if not cause:
            ch.over = 0
            if ch.trips and self._hw.ticks_diff(self._ms, ch.since) >= _RESET_MS:
                ch.trips = 0
        elif not ch.over:
            ch.over = cause
            ch.over_at = self._ms
        elif self._hw.ticks_diff(self._ms, ch.over_at) >= _HOLD_MS:
            self._trip(ch, cause)

    def _watch(self, ch):
        # the relay is commanded open: power through it is a welded contact
        if ch.meter.mw <= _STUCK_MW:
            ch.over = 0
        elif not ch.over:
            ch.over = _C_STUCK
            ch.over_at = self._ms
        elif ch.latch != _C_STUCK and self._hw.ticks_diff(self._ms, ch.over_at) >= _STUCK_MS:
            self._latch(ch, _C_STUCK)

    def _ends(self, ch):
        if self._t >= ch.exp:
            self._end(ch, _E_EXP)
        elif ch.end_run and self._run >= ch.end_run:
            self._end(ch, _E_EXI)
        elif ch.cap >= 0 and ch.meter.mwh - ch.start_mwh >= ch.cap:
            self._end(ch, _E_CAP)

    def _duties(self):
        hw = self._hw
        if hw.ticks_diff(self._ms, self._read_at) >= self._read_ms:
            self._read_at = self._ms
            self._readings()
        if hw.ticks_diff(self._ms, self._rev_at) >= _REVOKE_MS:
            self._rev_at = self._ms
            self._revocations()
        if hw.ticks_diff(self._ms, self._energy_at) >= _ENERGY_MS:
            self._energy_at = self._ms
            for ch in self._ch:
                self._energy(ch)
        if self._due():
            self._save()

    def _due(self):
        late = self._hw.ticks_diff(self._ms, self._saved_at) >= _PERSIST_MS
        for ch in self._ch:
            d = ch.meter.mwh - ch.saved_mwh
            if d >= _PERSIST_MWH or (late and (d or ch.cti is not None)):
                return True
        return False

    # -- protection

    def _trip(self, ch, cause):
        ch.relay.off()
        ch.trips += 1
        ch.over = 0
        self._alarm("trip", ch, cause)
        if ch.trips > _RETRIES:
            self._latch(ch, cause)
            return
        ch.st = _WAIT
        ch.since = self._hw.ticks_add(self._ms, _RETRY_MS << (ch.trips - 1))
        self._state(ch, "open", "trip")

    def _retry(self, ch):
        if self._permits.revoked(ch.cti, ch.sub):
            self._end(ch, _E_REVOKED)  # revoked while the relay waited: no power again
            return
        ch.st = _ON
        ch.since = self._ms
        ch.over = 0
        ch.relay.on()
        self._state(ch, "closed", "retry")

    def _latch(self, ch, cause):
        ch.relay.off()
        ch.st = _LATCHED
        ch.latch = cause
        ch.over = 0
        self._alarm("relay_stuck" if cause == _C_STUCK else "latched", ch, cause)
        if ch.cti is not None:
            self._end(ch, _E_TRIP if cause <= _C_VOLTAGE else _E_FAULT)
        else:
            self._save()
        self._state(ch, "latched", _CAUSES[cause])

    def _clear(self, ch, who):
        ch.st = _IDLE
        ch.latch = 0
        ch.trips = 0
        ch.over = 0
        self._save()
        self._state(ch, "cleared", who)

    # -- sessions

    def status(self):
        """Per outlet: [state, latch cause, mW, mWh register, user, permit
        id] (state: 0 idle, 1 on, 2 waiting to retry, 3 latched)."""
        return [[c.st, _CAUSES[c.latch], c.meter.mw, c.meter.mwh, c.sub, c.cti] for c in self._ch]

    def present(self, token, index=None):
        """A permit handed over a local channel, for the outlet index (None:
        the board picks within its scope). (reason, detail)."""
        reason, c = self._permits.check(token, None, index)
        if reason != wire.OK:
            return reason, None
        act = c[wire.CLAIM_ACTION]
        if act == wire.ACTION_SERVICE:
            return self._service(c, index)
        if act != wire.ACTION_POWER:
            return self._refuse(wire.WRONG_ACTION, c, index, None)
        cti = c[wire.CLAIM_CTI]
        for ch in self._ch:
            if ch.cti == cti:  # many-use, during its own session: it goes on
                return wire.OK, "outlet %d" % ch.i
        ch, why = self._pick(c, index)
        if ch is None:
            # no free outlet (busy, latched or none such in scope)
            return self._refuse(wire.OUT_OF_SCOPE if why == "no such outlet" else wire.UNAVAILABLE, c, index, why)
        if self._clock.floor() >= c[wire.CLAIM_EXP]:
            return self._refuse(wire.EXPIRED, c, index, "past exp")
        now = self._clock.now()
        nbf = c.get(wire.CLAIM_NBF)
        if now is not None and nbf is not None and now < nbf:
            # the checker's leeway is for clock skew; power flows from nbf
            return self._refuse(wire.NOT_YET_VALID, c, index, "before nbf")
        lim = c.get(wire.CLAIM_LIMITS) or {}
        wh = lim.get(wire.LIMIT_WH)
        many = c.get(wire.CLAIM_USES, wire.USES_SINGLE) == wire.USES_MANY
        prior = 0
        if wh is not None and many:
            prior = self._taken(cti)
            if prior < 0:
                return self._refuse(wire.STORE_FULL, c, index, "energy table full")
        if wh is not None and wh * 1000 <= prior:
            return self._refuse(wire.EXPIRED, c, index, "energy cap reached")
        self._permits.consume(c)
        if wh is not None and many and self._reg.table.find(key(cti)) < 0:
            self._reg.table.add(key(cti), 1, c[wire.CLAIM_EXP], 0)  # room: _taken() saw to it
        self._start(ch, c, prior, wh)
        return wire.OK, "outlet %d" % ch.i

    def _pick(self, c, index):
        scope = c.get(wire.CLAIM_SCOPE)
        why = "no such outlet"
        for ch in self._ch:
            if (index is None or ch.i == index) and (scope is None or ch.i in scope):
                if ch.st == _LATCHED:
                    why = "latched"
                elif ch.cti is not None:
                    why = "busy"
                else:
                    return ch, None
        return None, why

    def _start(self, ch, c, prior, wh):
        cti = c[wire.CLAIM_CTI]
        lim = c.get(wire.CLAIM_LIMITS) or {}
        w = lim.get(wire.LIMIT_W)
        run = self._clock.run_s()
        ch.cti = cti
        ch.sub = c.get(wire.CLAIM_SUB)
        ch.exp = c[wire.CLAIM_EXP]
        exi = c.get(wire.CLAIM_EXI)
        ch.end_run = 0 if exi is None else run - self._permits.exi_elapsed(cti) + exi
        ch.cap = -1 if wh is None else wh * 1000 - prior
        ch.max_mw = ch.board_mw if w is None or w * 1000 > ch.board_mw else w * 1000
        ch.start_ts = self._clock.floor()
        ch.start_run = run
        ch.start_mwh = ch.meter.mwh
        ch.st = _ON
        ch.trips = 0
        ch.over = 0
        ch.since = self._hw.ticks_ms()
        self._save()
        self._log.append(wire.LOG_SESSION_START, [ch.i, cti, ch.sub, ch.start_ts, ch.start_mwh, prior], ch.start_ts)
        ch.relay.on()
        self._state(ch, "closed", "session")

    def _end(self, ch, reason):
        """Open the relay and end ch's session: saved as ended, logged, then
        saved as gone (a reboot between the two logs it from the file)."""
        ch.relay.off()
        on = ch.st == _ON
        if ch.st != _LATCHED:
            ch.st = _IDLE
            ch.trips = 0
        ch.over = 0
        ch.reason = reason
        ch.t_end = self._clock.floor()
        ch.run_end = self._clock.run_s()
        self._take(ch)
        self._save()
        self._log_end(ch)
        self._forget(ch)
        self._save()
        if on:
            self._state(ch, "open", _ENDS[reason])

    def _take(self, ch):
        # the ended session's energy counts against its permit's cap
        t = self._reg.table
        i = t.find(key(ch.cti))
        if i >= 0:
            t.set_b(i, min(_MAX_U32, t.b(i) + ch.meter.mwh - ch.start_mwh))

    def _taken(self, cti):
        """mWh a many-use permit's ended sessions took (0 when it has no
        entry yet and there is room for one), or -1 when the table is full."""
        t = self._reg.table
        i = t.find(key(cti))
        if i >= 0:
            return t.b(i)
        if t.count() >= t.n:
            self._prune()
        return 0 if t.count() < t.n else -1

    def _prune(self):
        # against the durable time, as the permit store: a power cut must
        # not bring back a permit whose energy the board forgot
        self._reg.table.drop_until(self._clock.durable() - self._permits.leeway)

    def _forget(self, ch):
        ch.cti = None
        ch.sub = None
        ch.reason = 0
        ch.cap = -1
        ch.end_run = 0
        ch.max_mw = ch.board_mw

    def _log_end(self, ch):
        self._log.append(
            wire.LOG_SESSION_END,
            [
                ch.i,
                ch.cti,
                ch.sub,
                ch.start_ts,
                ch.t_end,
                ch.run_end - ch.start_run,  # duration, s
                ch.meter.mwh - ch.start_mwh,  # energy, mWh
                _ENDS[ch.reason],
                ch.meter.mwh,
            ],
            self._clock.floor(),
        )

    def _service(self, c, index):
        scope = c.get(wire.CLAIM_SCOPE)
        todo = [ch for ch in self._ch if ch.st == _LATCHED and (index is None or ch.i == index) and (scope is None or ch.i in scope)]
        if not todo:
            return self._refuse(wire.UNAVAILABLE, c, index, "nothing to clear")  # not used up
        self._permits.consume(c)
        for ch in todo:
            self._clear(ch, "service")
        return wire.OK, "cleared " + ",".join([str(ch.i) for ch in todo])

    def _refuse(self, reason, c, index, detail):
        # the app's own verdict on a permit the checker passed, logged as its verdicts are
        body = [reason, c.get(wire.CLAIM_CTI), c.get(wire.CLAIM_SUB), c.get(wire.CLAIM_ACTION), index]
        self._log.append(wire.LOG_PERMIT, body, self._clock.floor())
        return reason, detail

    def _revocations(self):
        for ch in self._ch:
            if ch.cti is not None and self._permits.revoked(ch.cti, ch.sub):
                self._end(ch, _E_REVOKED)

    # -- server commands (the link calls these)

    def command(self, name, args=None):
        """relay_off / clear_fault (args: an outlet index, None for all);
        revoke (args: {"cti": bytes, "exp": int} or {"sub": str, "until":
        int}: the permit store's revoke, then its sessions end at once).
        Returns (reason, detail)."""
        if name == "revoke":
            try:
                r = self._permits.revoke(args.get("cti"), args.get("exp"), args.get("sub"), args.get("until"))
            except (ValueError, AttributeError):
                return wire.MALFORMED, "revoke needs cti and exp, or sub and until"
            self._revocations()
            return r, None
        if name != "relay_off" and name != "clear_fault":
            return wire.MALFORMED, "unknown command"
        if args is not None and (not isinstance(args, int) or not 0 <= args < len(self._ch)):
            return wire.OUT_OF_SCOPE, "no such outlet"
        for ch in self._ch:
            if args is None or ch.i == args:
                if name == "clear_fault":
                    if ch.st == _LATCHED:
                        self._clear(ch, "server")
                elif ch.cti is not None:
                    self._end(ch, _E_SERVER)
                else:
                    ch.relay.off()
        return wire.OK, None

    # -- records

    def _save(self):
        reg = self._reg
        t = self._clock.floor()
        run = self._clock.run_s()
        for ch in self._ch:
            ch.pack(reg.buf, reg.offset(ch.i), t, run)
            ch.saved_mwh = ch.meter.mwh
        reg.save()
        self._saved_at = self._hw.ticks_ms()

    def _view(self, n):
        v = self._views[n]
        if v is None:
            v = self._views[n] = self._mv[:n]
        return v

    def _readings(self):
        for ch in self._ch:
            if ch.st == _ON or ch.meter.mw > 0:
                self._reading(ch)

    def _reading(self, ch):
        m = ch.meter
        b = self._rb
        b[0] = 0x84  # [outlet, mW, mV, mA]
        n = _uint(b, 1, ch.i)
        n = _uint(b, n, m.mw)
        n = _uint(b, n, m.mv)
        n = _uint(b, n, m.ma)
        self._log.append(wire.LOG_OUTLET_READING, self._view(n), self._t)

    def _energy(self, ch):
        # the register, when it moved since the last total logged
        if ch.meter.mwh != ch.logged_mwh:
            ch.logged_mwh = ch.meter.mwh
            b = self._rb
            b[0] = 0x82  # [outlet, mWh]
            n = _uint(b, 1, ch.i)
            n = _uint(b, n, ch.meter.mwh)
            self._log.append(wire.LOG_ENERGY, self._view(n), self._clock.floor())

    def _state(self, ch, what, why):
        self._log.append(wire.LOG_STATE, [ch.i, what, why], self._clock.floor())

    def _alarm(self, kind, ch, cause):
        m = ch.meter
        v = lim = 0
        if cause == _C_CURRENT:
            v, lim = m.ma, self._max_ma
        elif cause == _C_POWER:
            v, lim = m.mw, ch.max_mw
        elif cause == _C_VOLTAGE:
            v, lim = m.mv, self._max_mv
        elif cause == _C_STUCK:
            v, lim = m.mw, _STUCK_MW
        self._log.append(wire.LOG_ALARM, [kind, ch.i, _CAUSES[cause], v, lim, ch.trips], self._clock.floor())
