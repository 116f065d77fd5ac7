# The battery-swap station application (DESIGN.md, Board kinds: Station;
# seed 003): the slot state machine, charge control, rent and return with
# permits, and the battery registry (batteries.py). Contract: APPS.md.
# The log records, and the numbers of the states and causes below:
# protocol/SPEC.md section 8.
#
# Slot states: empty, charging (or paused: too cold), ready, reserved
# (ready, for one user only), open (unlocked for a rent, a return, a
# service, or to hand back a refused battery: "eject"), fault (latched:
# charger and lock off until a service permit or the server's clear_fault;
# survives reboots), disabled (by the server; survives reboots).
#
# Control cycle, every CYCLE_MS, allocation-free: per slot read presence,
# door, voltage, current, temperature and step the state machine. A fault
# latches (outputs off, an alarm) on: a sensor read that fails (OSError:
# open, short), temperature >= over_temp_dc, voltage >= over_voltage_mv or
# |current| >= over_current_ma (charge or discharge; charging or ready),
# more than charge_timeout_s with the charger on, over _STUCK_MA with the
# charger off or paused (a welded relay), a battery gone with no door
# opened for it, one that appears in a locked empty slot (or, at boot, one
# the registry does not have in that slot), one that gives no id at boot
# (unless the registry has one in that slot: a read that failed once), and
# any other I/O error of the slot (expander, bus): that slot latches, the
# others run on. Below under_temp_dc charging pauses (no latch) until the
# battery is _COLD_HYST_DC warmer. Full: current under _TERM_MA for
# _DONE_MS with the charger on (the charger tapers at CV by itself); then
# ready. Energy in is V x I integrated into the battery's registry entry,
# written to flash at every event of the battery's and every _SAVE_MS while
# it charges (a power cut loses at most that much of its count).
#
# Rent: the ready slot in the permit's scope with the most charge (the
# battery's SoC, then voltage) among batteries with SoH >= _MIN_SOH; a
# reserved slot only for its user, and first for them. The permit is used
# up as the door unlocks. The lock is released once the door is seen open
# (the latch holds it shut again as it closes). BatteryOut is logged when
# the battery leaves the slot (or, after a power cut, at the next boot).
# Door not opened within door_timeout_s: relocked, back to ready, a state
# record with cause door_timeout and the permit id (OCPP 2.1's
# BatteryOutTimeout).
#
# Return: a return permit (or, under the return_known policy, the command
# open_return, for the server or a button) opens the first empty slot in
# its scope. When the door closes on a battery the board reads its id and
# state: accepted, BatteryIn and charging; refused, an alarm with the
# reason and the door opens again to take it back (if it is not: fault
# not_removed). Refused as:
#   unreadable  no id (no answer, a bus error, or not 1..16 bytes)
#   not_named   the permit names a battery (claim CLAIM_BATTERY) and this
#               is another
#   unknown     no return or service permit served the door (a rent door,
#               a permit-less return) and it is neither the battery just
#               taken from this slot nor, under return_known, one in the
#               registry
# A return permit vouches for its user: any battery that gives an id is
# taken (the server that issued the permit reconciles), so a battery
# rented at one station is returned at another.
#
# Service permit: clears the latched faults in its scope (every slot
# without one); when the scope is one slot, opens its door too. The
# server's unlock of a faulted slot does not: it returns to its fault when
# the door closes or times out (clear_fault clears). Clearing reads the
# pack first: still unsafe, it latches again before the charger is on. A
# disabled slot stays disabled through a cleared fault and is never rented.
#
# Boot: a slot whose door stands open is open (purpose unknown, charger
# off) until it closes; a battery that came while the board was down is
# not taken in unchecked (the insertion rules when its door closes, or
# unexpected_battery, then BatteryIn when the fault is cleared).
#
# Permits: present(token, index) from a reader fixed at one slot acts on
# that slot only; rent and return permits are refused from their exp on
# (the checker's leeway is for clock skew).
#
# Readings: every reading_s, LOG_SLOT_READING [slot, mV, mA, 0.1 degC] for
# each slot whose battery is charging, ready or reserved, encoded into a
# buffer made once.
#
# Per-slot values live in one int array and one bytearray (a field is a
# block of _MAX entries, slot i at field + i): few attributes, no objects.
# Functions the control cycle calls keep within 11 words of locals and
# value stack (README.md), so no frame goes on the heap.
from array import array

import wire
from batteries import ENERGY, ID_MAX, POINTS, Registry, put, u32

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


CYCLE_MS = const(500)
NO_SLOT = wire.UNAVAILABLE  # a valid permit no slot can serve now (not used up)
CLAIM_BATTERY = wire.CLAIM_BATTERY  # a return permit may name the battery
_READING_S = const(60)
_WATCH_MS = const(5000)
_TERM_MA = const(250)  # full: below this ...
_DONE_MS = const(10000)  # ... for this long, charger on
_STUCK_MA = const(500)
_COLD_HYST_DC = const(20)
_MIN_SOH = const(70)
_DOOR_ALARM_MS = const(120000)  # open this long: door_left_open, once
_MWMS = const(3600000)  # mW x ms in one mWh
_SAVE_MS = const(600000)  # the registry's energy and temperatures, written this often while they change
_MAX = const(16)

# limits (self._lim), defaults for the fleet's 10S packs
_OT = const(0)
_UT = const(1)
_OV = const(2)
_OC = const(3)
_TMO = const(4)  # ms
_DOOR = const(5)  # ms
_LIMITS = (
    ("over_temp_dc", 550),
    ("under_temp_dc", 0),
    ("over_voltage_mv", 42600),
    ("over_current_ma", 8000),
    ("charge_timeout_s", 14400),
    ("door_timeout_s", 30),
)

# int fields (self._v)
_MV = const(0)
_MA = const(16)
_DC = const(32)
_T = const(48)  # open: door deadline, then the left-open alarm time (ticks)
_CHG = const(64)  # ms charged this session
_HOLD = const(80)  # ms under _TERM_MA
_ACC = const(96)  # mW x ms not yet a whole mWh
_SMWH = const(112)  # mWh this session
_RMV = const(128)  # the last sensor reads (_sense)
_RMA = const(129)
_RDC = const(130)
_NV = const(131)
# byte fields (self._b); state at i
_WHY = const(16)  # open: purpose; fault: cause
_BACK = const(32)  # state before the door opened
_F = const(48)  # flags
_BAT = const(64)  # registry index + 1 of the battery held (0: none)
_GONE = const(80)  # the same, of the battery taken out while open
_SOC0 = const(96)  # SoC % when charging started (255: unknown)
_DIS = const(112)  # disabled
_LAT = const(128)  # open: the fault cause still latched (the server's unlock of a faulted slot)
_NB = const(144)
# flags
_OPENED = const(1)
_LEFT = const(2)
_FORCED = const(4)
_COLD = const(8)

_EMPTY = const(0)
_CHARGING = const(1)
_READY = const(2)
_RESERVED = const(3)
_OPEN = const(4)
_FAULT = const(5)
_DISABLED = const(6)

# causes (SPEC.md section 8)
_C_BOOT = const(1)
_C_FULL = const(2)
_C_RENT = const(3)
_C_RETURN = const(4)
_C_SERVICE = const(5)
_C_EJECT = const(6)
_C_CLOSED = const(7)
_C_DOOR_TIMEOUT = const(8)
_C_INSERTED = const(9)
_C_CLEARED = const(10)
_C_RESERVED = const(11)
_C_RES_END = const(12)
_C_DISABLED = const(13)
_C_ENABLED = const(14)
_C_COLD = const(15)
_C_WARM = const(16)
_C_OVER_TEMP = const(17)  # faults from here
_C_OVER_VOLTAGE = const(18)
_C_OVER_CURRENT = const(19)
_C_TIMEOUT = const(20)
_C_SENSOR_V = const(21)
_C_SENSOR_I = const(22)
_C_SENSOR_T = const(23)
_C_STUCK = const(24)
_C_MISSING = const(25)
_C_UNEXPECTED = const(26)
_C_UNREADABLE = const(27)
_C_NOT_REMOVED = const(28)
_C_UNKNOWN = const(29)  # refusals and alarms
_C_NOT_NAMED = const(30)
_C_REFUSED = const(31)
_C_FORCED = const(32)
_C_LEFT_OPEN = const(33)
_C_REG_LOST = const(34)
_C_IO = const(35)  # a fault: the slot's inputs or outputs failed (OSError)

_LATCH = const(10)  # store "st_slots", per slot: fault u8, disabled u8, reserved until u32, user key u32


class Station:
    name = "station"
    watch_ms = _WATCH_MS

    def __init__(self, system, reading_s=None, return_known=None):
        hw = system.hw
        self._hw = hw
        self._slots = hw.slots
        self.n = len(hw.slots)
        if self.n > _MAX:
            raise ValueError("a station has at most 16 slots")
        self._log = system.log
        self._clock = system.clock
        self._permits = system.permits
        lim = system.config.get("limits") or {}
        # the board file's limits or the defaults; the two *_s limits kept in ms
        self._lim = array("i", [lim.get(k, d) * (1000 if k[-1] == "s" else 1) for k, d in _LIMITS])
        st = hw.store
        # defaults; the server's config command overrides them (persisted)
        self.reading_s = st.get_int("st_read_s", reading_s or _READING_S)
        self.return_known = bool(st.get_int("st_ret_known", 1 if return_known else 0))
        self.reg = Registry(hw.root)
        self._v = array("i", bytes(4 * _NV))
        self._b = bytearray(_NB)
        self._r = array("I", bytes(8 * _MAX))  # reservations: until (Unix s, 0: none) at i, user key at _MAX + i
        self._nres = 0
        self._who = [None] * self.n  # claims of the permit an open door serves
        self._rb = bytearray(18)  # a reading's CBOR body
        self._rv = [None] * 18  # memoryviews of its first k bytes, made once each
        self._now = self._next = hw.ticks_ms()
        self._save = hw.ticks_add(self._now, _SAVE_MS)
        self._dirty = False  # energy counted since the registry was written
        self._dt = 0
        self._w = 0  # which sensor failed (_sense)
        self._boot()

    # ------------------------------------------------------------ the loop

    async def run(self, sup):
        while True:
            self.cycle()
            sup.beat("station")
            await self._hw.sleep_ms(CYCLE_MS)

    def cycle(self):
        """One control cycle over every slot; allocates nothing."""
        hw = self._hw
        now = hw.ticks_ms()
        self._dt = hw.ticks_diff(now, self._now)
        self._now = now
        i = 0
        while i < self.n:
            if not self._step(i) and self._b[_WHY + i] != _C_IO:
                self._fault(i, _C_IO, None)  # once: the latch stops at the first
            i += 1
        if self._nres:
            self._expire()
        if hw.ticks_diff(now, self._next) >= 0:
            self._next = hw.ticks_add(now, self.reading_s * 1000)
            self._readings()
        if hw.ticks_diff(now, self._save) >= 0:
            self._save = hw.ticks_add(now, _SAVE_MS)
            if self._dirty:
                self._dirty = False
                self.reg.save()

    def _step(self, i):
        # one slot's cycle; False on an I/O error (expander, bus), which
        # latches the slot's fault rather than resetting the whole board
        try:
            self._slot(i)
        except OSError:
            return False
        return True

    def _slot(self, i):
        b = self._b
        st = b[i]
        s = self._slots[i]
        if st == _OPEN:
            self._open(i, s)
            return
        if s.door.value():
            if not b[_F + i] & _FORCED:
                b[_F + i] |= _FORCED
                self._rec(wire.LOG_ALARM, _C_FORCED, i, None)
        elif b[_F + i] & _FORCED:
            b[_F + i] &= ~_FORCED
        if st == _EMPTY:
            if s.presence.value():
                self._fault(i, _C_UNEXPECTED, None)
        elif st < _OPEN:
            if not s.presence.value():
                self._vanished(i)
            elif not self._sense(s):
                self._fault(i, self._w, None)
            elif self._safe(i) and st == _CHARGING:
                self._charge(i, s)

    def _sense(self, s):
        # False when a sensor read fails (self._w: which). Two locals only:
        # a try block and a third would put the frame over 11 words, and
        # MicroPython would allocate it on the heap at every call.
        self._w = _C_SENSOR_V
        try:
            self._v[_RMV] = s.voltage.read()
            self._w = _C_SENSOR_I
            self._v[_RMA] = s.current.read()
            self._w = _C_SENSOR_T
            self._v[_RDC] = s.temperature.read()
        except OSError:
            return False
        return True

    def _safe(self, i):
        v = self._v
        x = self._b[_BAT + i]
        if x:
            self.reg.temp(x - 1, v[_RDC])  # extremes first: an over-temperature is one
        x = v[_RDC]
        v[_DC + i] = x
        if x >= self._lim[_OT]:
            return self._fault(i, _C_OVER_TEMP, x)
        x = v[_RMV]
        v[_MV + i] = x
        if x >= self._lim[_OV]:
            return self._fault(i, _C_OVER_VOLTAGE, x)
        x = v[_RMA]
        v[_MA + i] = x
        if x >= self._lim[_OC] or -x >= self._lim[_OC]:  # a discharge too
            return self._fault(i, _C_OVER_CURRENT, x)
        if x > _STUCK_MA and (self._b[i] != _CHARGING or self._b[_F + i] & _COLD):
            return self._fault(i, _C_STUCK, x)  # the charger is off (or paused): a welded relay
        return True

    def _charge(self, i, s):
        if (self._b[_F + i] & _COLD or self._v[_DC + i] < self._lim[_UT]) and self._cold(i, s):
            return
        v = self._v
        dt = self._dt
        t = v[_CHG + i] + dt
        v[_CHG + i] = t
        if t > self._lim[_TMO]:
            t //= 1000
            self._fault(i, _C_TIMEOUT, t)
            return
        t = v[_ACC + i] + v[_MV + i] * v[_MA + i] // 1000 * dt
        if t >= _MWMS:
            self._mwh(i, t // _MWMS)
            t %= _MWMS
        v[_ACC + i] = t
        if v[_MA + i] < _TERM_MA:
            t = v[_HOLD + i] + dt
            v[_HOLD + i] = t
            if t >= _DONE_MS:
                self._full(i, s)
        else:
            v[_HOLD + i] = 0

    def _mwh(self, i, k):
        self._v[_SMWH + i] += k
        if self._b[_BAT + i]:
            self.reg.bump(self._b[_BAT + i] - 1, ENERGY, k)
            self._dirty = True

    def _cold(self, i, s):
        # True while charging is paused below under_temp_dc
        f = self._b[_F + i]
        if f & _COLD:
            if self._v[_DC + i] < self._lim[_UT] + _COLD_HYST_DC:
                return True
            self._b[_F + i] = f & ~_COLD
            s.charger.on()
            self._set(i, _CHARGING, _C_WARM, self._v[_DC + i])
            return False
        s.charger.off()
        self._b[_F + i] = f | _COLD
        self._v[_HOLD + i] = 0
        self._set(i, _CHARGING, _C_COLD, self._v[_DC + i])
        return True

    def _open(self, i, s):
        b = self._b
        f = b[_F + i]
        if not f & _OPENED:
            if s.door.value():
                s.lock.off()  # the latch holds the door shut again as it closes
                b[_F + i] = f | _OPENED
                self._v[_T + i] = self._hw.ticks_add(self._now, _DOOR_ALARM_MS)
            elif self._hw.ticks_diff(self._now, self._v[_T + i]) >= 0:
                self._closed(i, s, _C_DOOR_TIMEOUT)
        elif s.door.value():
            if b[_BAT + i] and not s.presence.value():
                self._out(i)
            if not f & _LEFT and self._hw.ticks_diff(self._now, self._v[_T + i]) >= 0:
                b[_F + i] = f | _LEFT
                self._rec(wire.LOG_ALARM, _C_LEFT_OPEN, i, None)
        else:
            self._closed(i, s, _C_CLOSED)

    def _readings(self):
        ts = self._clock.floor()
        i = 0
        while i < self.n:
            if 0 < self._b[i] < _OPEN:  # charging, ready, reserved
                self._reading(i, ts)
            i += 1

    def _reading(self, i, ts):
        r = self._rb
        r[0] = 0x84  # array of 4
        p = _int(r, 1, i)
        p = _int(r, p, self._v[_MV + i])
        p = _int(r, p, self._v[_MA + i])
        p = _int(r, p, self._v[_DC + i])
        if self._rv[p] is None:
            self._rv[p] = memoryview(r)[0:p]  # once per length
        self._log.append(wire.LOG_SLOT_READING, self._rv[p], ts)

    def _expire(self):
        t = self._clock.floor()
        i = 0
        while i < self.n:
            if self._r[i] and t >= self._r[i]:
                self._reserve(i, None, 0)
            i += 1

    # ------------------------------------------------------------ events (these may allocate)

    def _rec(self, rtype, a, b, c, d=None):
        # LOG_STATE [slot, state, cause(, detail)], LOG_ALARM [cause, slot, value]
        body = [a, b, c]
        if d is not None:
            body.append(d)
        self._log.append(rtype, body, self._clock.floor())

    def _set(self, i, st, cause, detail=None):
        self._b[i] = st
        if st != _OPEN:
            self._who[i] = None
        self._rec(wire.LOG_STATE, i, st, cause, detail)

    def _fault(self, i, cause, value):
        s = self._slots[i]
        s.charger.off()
        s.lock.off()
        self._b[_WHY + i] = cause
        self._rec(wire.LOG_ALARM, cause, i, value)
        self._set(i, _FAULT, cause)
        self._latches()
        if self._b[_BAT + i]:
            self.reg.save()  # its energy and temperatures so far
        return False

    def _start(self, i, cause, detail=None):
        """Charge the (registered) battery slot i holds, a new session."""
        if self._b[_DIS + i]:
            self._slots[i].charger.off()
            self._set(i, _DISABLED, cause, detail)  # never charged while disabled
            return
        v = self._v
        v[_CHG + i] = v[_HOLD + i] = v[_ACC + i] = v[_SMWH + i] = 0
        soc = self.reg.soc(self._b[_BAT + i] - 1)
        self._b[_SOC0 + i] = 255 if soc is None else soc
        self._b[_F + i] = 0
        self._slots[i].charger.on()
        self._set(i, _CHARGING, cause, detail)

    def _full(self, i, s):
        s.charger.off()
        st = _bms(s)
        soc = st.get("soc")
        b = self._b[_BAT + i] - 1
        if soc is not None and self._b[_SOC0 + i] <= 100:
            self.reg.bump(b, POINTS, max(0, soc - self._b[_SOC0 + i]))
        self.reg.seen(b, soc, st.get("soh"), i, self._clock.floor())
        self.reg.save()
        self._set(i, _RESERVED if self._r[i] else _READY, _C_FULL, self._v[_SMWH + i])

    def _vanished(self, i):
        b = self._b[_BAT + i]
        bid = None
        if b:
            bid = self.reg.id(b - 1)
            self._out(i)
        self._fault(i, _C_MISSING, bid)

    def _unlock(self, i, purpose, c):
        b = self._b
        if b[i] != _OPEN:
            b[_BACK + i] = b[i]
            b[_LAT + i] = b[_WHY + i] if b[i] == _FAULT else 0  # a service permit clears it (_service)
        self._who[i] = c
        b[_WHY + i] = purpose
        b[_F + i] = b[_GONE + i] = 0
        self._v[_T + i] = self._hw.ticks_add(self._hw.ticks_ms(), self._lim[_DOOR])
        s = self._slots[i]
        s.charger.off()
        s.lock.on()
        self._set(i, _OPEN, purpose, _cti(c))

    def _closed(self, i, s, cause):
        """Leave open (door closed or never opened), fault or disabled for
        what the slot now holds."""
        s.lock.off()
        b = self._b
        if b[i] == _OPEN and b[_LAT + i]:
            # the server's unlock of a latched slot: latched still (only a
            # service permit or clear_fault clears it)
            if b[_BAT + i] and not s.presence.value():
                self._out(i)  # taken between two cycles
            b[_WHY + i] = b[_LAT + i]
            b[_LAT + i] = 0
            s.charger.off()
            self._set(i, _FAULT, b[_WHY + i])
            self._latches()
            return
        if cause == _C_DOOR_TIMEOUT and b[_WHY + i] == _C_EJECT and s.presence.value():
            self._fault(i, _C_NOT_REMOVED, None)
            return
        detail = _cti(self._who[i])
        if s.presence.value():
            bid = _ident(s)
            # a battery that never left (no BatteryOut) and does not answer
            # now is still the one it was: a read that failed once
            if b[_BAT + i] and bid is not None and self.reg.id(b[_BAT + i] - 1) != bid:
                self._out(i)  # swapped faster than a cycle
            if not b[_BAT + i]:
                self._insert(i, s, bid)
                return
        elif b[_BAT + i]:
            self._out(i)  # taken between two cycles
        if b[_DIS + i]:
            self._set(i, _DISABLED, cause, detail)  # a fault cleared on a disabled slot
        elif not b[_BAT + i]:
            self._set(i, _EMPTY, cause, detail)
        elif b[_BACK + i] == _READY or b[_BACK + i] == _RESERVED:
            self._set(i, _RESERVED if self._r[i] else _READY, cause, detail)
        else:
            self._start(i, cause, detail)

    def _insert(self, i, s, bid):
        # take battery bid into slot i, or refuse it and open the door again
        c = self._who[i]
        why = _C_UNKNOWN
        if bid is None or not 0 < len(bid) <= ID_MAX:
            why = _C_UNREADABLE
        elif c is not None and c.get(CLAIM_BATTERY, bid) != bid:
            why = _C_NOT_NAMED
        elif c is not None and c[wire.CLAIM_ACTION] != wire.ACTION_RENT:
            why = 0  # a return or service permit
        elif c is None and self._b[_WHY + i] == _C_SERVICE:
            why = 0  # the server's unlock or clear: a technician
        else:
            k = self.reg.find(bid) + 1
            if k and (self.return_known or k == self._b[_GONE + i]):
                why = 0
        if why:
            self._log.append(wire.LOG_ALARM, [_C_REFUSED, i, why, bid], self._clock.floor())
            if self._b[_WHY + i] == _C_EJECT:
                self._fault(i, _C_NOT_REMOVED, None)
            else:
                self._unlock(i, _C_EJECT, c)
            return
        st = _bms(s)
        reg = self.reg
        k = reg.add(bid, self._clock.floor())  # never -1: more entries than slots
        reg.seen(k, st.get("soc"), st.get("soh"), i, self._clock.floor())
        self._b[_BAT + i] = k + 1
        body = [i, bid, st.get("soc"), reg.soh(k), _sub(c), _cti(c), st.get("cycles"), st.get("mv"), st.get("dc")]
        self._log.append(wire.LOG_BATTERY_IN, body, self._clock.floor())
        reg.save()
        self._start(i, _C_INSERTED)

    def _out(self, i):
        """The battery left slot i: BatteryOut with what is known of it."""
        k = self._b[_BAT + i] - 1
        self._b[_BAT + i] = 0
        self._b[_GONE + i] = k + 1
        reg = self.reg
        reg.seen(k, None, None, -1, self._clock.floor())
        c = self._who[i]
        r = reg.row(k)
        body = [i, r[0], r[1], r[2], _sub(c), _cti(c), r[3], r[4], r[5], r[6]]
        self._log.append(wire.LOG_BATTERY_OUT, body, self._clock.floor())
        reg.save()
        if self._r[i]:
            self._reserve(i, None, 0)  # taken: the reservation is spent

    # ------------------------------------------------------------ permits

    def present(self, token, index=None):
        """A permit handed over locally: (reason, detail); detail, for the
        console's answer, names the slot(s) acted on: "slot 2", "slots 1 3".
        index: the slot of a reader fixed at one slot (None: the board
        picks within the permit's scope)."""
        reason, c = self._permits.check(token, None, index)
        if reason != wire.OK:
            return reason, None
        act = c[wire.CLAIM_ACTION]
        scope = c.get(wire.CLAIM_SCOPE)
        if index is not None:
            if not 0 <= index < self.n:
                return wire.OUT_OF_SCOPE, None
            scope = [index]  # in the permit's scope (check): that slot only
        if act == wire.ACTION_SERVICE:
            return self._service(c, scope)
        if act != wire.ACTION_RENT and act != wire.ACTION_RETURN:
            return wire.WRONG_ACTION, None
        if self._clock.floor() >= c[wire.CLAIM_EXP]:
            return wire.EXPIRED, None  # the checker's leeway is for clock skew, not for use
        best = -1
        score = -1
        user = _ukey(c.get(wire.CLAIM_SUB))
        for i in range(self.n):
            st = self._b[i]
            if (scope is not None and i not in scope) or self._b[_DIS + i]:
                continue
            if act == wire.ACTION_RETURN:
                if st == _EMPTY:
                    best = i
                    break
            elif (st == _READY or (st == _RESERVED and self._r[_MAX + i] == user)) and self.reg.soh(self._b[_BAT + i] - 1) >= _MIN_SOH:
                v = 10**6 if st == _RESERVED else (self.reg.soc(self._b[_BAT + i] - 1) or 0) * 1000 + self._v[_MV + i] // 100
                if v > score:
                    best = i
                    score = v
        if best < 0:
            return NO_SLOT, None
        self._permits.consume(c)
        if act == wire.ACTION_RENT:
            # the battery's word on its charge now, for BatteryOut
            st = _bms(self._slots[best])
            self.reg.seen(self._b[_BAT + best] - 1, st.get("soc"), st.get("soh"), best, self._clock.floor())
        self._unlock(best, _C_RENT if act == wire.ACTION_RENT else _C_RETURN, c)
        return wire.OK, "slot %d" % best

    def _service(self, c, scope):
        one = scope[0] if scope is not None and len(scope) == 1 and scope[0] < self.n else -1
        if one >= 0 and self._b[one] >= _OPEN and self._b[one] != _FAULT:
            one = -1  # open already, or disabled
        done = [i for i in range(self.n) if self._b[i] == _FAULT and (scope is None or i in scope)]
        if not done and one < 0:
            return NO_SLOT, None
        self._permits.consume(c)
        for i in done:
            if i != one:
                self.clear(i, c)
        if one >= 0:
            self._unlock(one, _C_SERVICE, c)
            self._b[_LAT + one] = 0  # the permit clears the latch
            self._latches()
            if one not in done:
                done.append(one)
        return wire.OK, "slot" + ("s" if len(done) > 1 else "") + "".join([" %d" % i for i in done])

    # ------------------------------------------------------------ server commands

    def clear(self, i, c=None):
        """Clear slot i's latched fault (a service permit c, or the server)."""
        if self._b[i] != _FAULT:
            return NO_SLOT, None
        s = self._slots[i]
        if s.presence.value():
            # read the pack before the charger can switch on: still hot (or
            # a sensor still failing) latches again at once
            if not self._sense(s):
                self._fault(i, self._w, None)
                return wire.OK, i
            if not self._safe(i):
                return wire.OK, i
        self._who[i] = c
        self._b[_LAT + i] = 0
        self._b[_WHY + i] = _C_SERVICE
        self._b[_BACK + i] = _FAULT
        self._b[i] = _OPEN  # not latched while it settles
        self._closed(i, s, _C_CLEARED)
        self._latches()
        return wire.OK, i

    def command(self, name, args=None):
        """Server commands (the link calls these): (reason, detail).
        batteries, status, config {reading_s, return_known}, open_return,
        revoke {cti, exp} or {sub, until} (the permit store's), and with
        {"slot": i} (or i alone): clear_fault, unlock, reserve {user,
        until}, disable, enable."""
        a = args if isinstance(args, dict) else {}
        i = args if isinstance(args, int) else a.get("slot")
        if name == "revoke":
            try:
                return self._permits.revoke(a.get("cti"), a.get("exp"), a.get("sub"), a.get("until")), None
            except ValueError:
                return wire.MALFORMED, None
        if name == "batteries":
            return wire.OK, self.reg.rows()
        if name == "status":
            return wire.OK, self.status()
        if name == "config":
            return self._config(a)
        if name == "open_return":
            i = 0
            while i < self.n and self._b[i] != _EMPTY:
                i += 1
            if not self.return_known:
                return wire.WRONG_ACTION, None
            if i < self.n:
                self._unlock(i, _C_RETURN, None)
                return wire.OK, i
            return NO_SLOT, None
        if not isinstance(i, int) or not 0 <= i < self.n:
            return wire.MALFORMED, None
        st = self._b[i]
        if name == "clear_fault":
            return self.clear(i)
        if name == "unlock":
            if st == _OPEN or st == _DISABLED:
                return NO_SLOT, None
            self._unlock(i, _C_SERVICE, None)
            self._latches()
        elif name == "reserve":
            until = a.get("until") or 0
            user = a.get("user")
            if not isinstance(until, int) or not 0 <= until < 1 << 32 or (until and not isinstance(user, str)):
                return wire.MALFORMED, None
            if until and (not self._b[_BAT + i] or not 0 < st < _OPEN):
                return NO_SLOT, None
            self._reserve(i, user, until)
        elif name == "disable":
            s = self._slots[i]
            s.charger.off()
            s.lock.off()
            self._b[_DIS + i] = 1
            if st == _OPEN and self._b[_LAT + i]:
                self._b[_WHY + i] = self._b[_LAT + i]  # the latch outlives the disable
                self._b[_LAT + i] = 0
            self._set(i, _DISABLED, _C_DISABLED)
            self._latches()
        elif name == "enable" and self._b[_DIS + i]:
            self._b[_DIS + i] = 0
            if self._b[_WHY + i] >= _C_OVER_TEMP:
                self._set(i, _FAULT, self._b[_WHY + i])  # the latch outlives the disable
            else:
                self._b[_BACK + i] = _DISABLED
                self._b[_WHY + i] = _C_SERVICE
                self._closed(i, self._slots[i], _C_ENABLED)
            self._latches()
        elif name != "enable":
            return wire.WRONG_ACTION, None
        return wire.OK, i

    def _reserve(self, i, user, until):
        # until 0: cancel
        r = self._r
        if r[i]:
            self._nres -= 1
        r[i] = until
        r[_MAX + i] = _ukey(user) if until else 0
        st = self._b[i]
        if until:
            self._nres += 1
            if st == _READY:
                self._set(i, _RESERVED, _C_RESERVED, until)
        elif st == _RESERVED:
            self._set(i, _READY, _C_RES_END)
        self._latches()

    def _config(self, a):
        st = self._hw.store
        r = a.get("reading_s")
        if r is not None:
            if not isinstance(r, int) or not 10 <= r <= 86400:
                return wire.MALFORMED, None
            self.reading_s = r
            st.set_int("st_read_s", r)
        k = a.get("return_known")
        if k is not None:
            self.return_known = bool(k)
            st.set_int("st_ret_known", 1 if k else 0)
        st.commit()
        return wire.OK, {"reading_s": self.reading_s, "return_known": self.return_known}

    def status(self):
        """Per slot: [state, purpose or fault cause (open, fault), battery
        id, SoC %, mV, mA, 0.1 degC]."""
        out = []
        for i in range(self.n):
            k = self._b[_BAT + i] - 1
            st = self._b[i]
            why = self._b[_WHY + i] if st == _OPEN or st == _FAULT else None
            bid = soc = None
            if k >= 0:
                bid = self.reg.id(k)
                soc = self.reg.soc(k)
            out.append([st, why, bid, soc, self._v[_MV + i], self._v[_MA + i], self._v[_DC + i]])
        return out

    # ------------------------------------------------------------ boot and latches

    def _boot(self):
        b = self._b
        raw = self._hw.store.get("st_slots")
        if raw is not None and len(raw) == self.n * _LATCH:
            for i in range(self.n):
                b[_WHY + i] = raw[i * _LATCH]
                b[_DIS + i] = raw[i * _LATCH + 1]
                if b[_WHY + i] and not b[_DIS + i]:
                    b[i] = _FAULT  # latched before any latch is written again
                self._r[i] = u32(raw, i * _LATCH + 2)
                self._r[_MAX + i] = u32(raw, i * _LATCH + 6)
                if self._r[i]:
                    self._nres += 1
        reg = self.reg
        if reg.lost:
            self._log.append(wire.LOG_ALARM, [_C_REG_LOST], self._clock.floor())
        ids = [_ident(s) if s.presence.value() else None for s in self._slots]
        for k in range(reg.n):
            i = reg.slot(k)
            if 0 <= i < self.n and ids[i] is None and self._slots[i].presence.value():
                b[_BAT + i] = k + 1  # still there, its id not read this once: unchanged (as _closed)
            elif i >= 0 and (i >= self.n or ids[i] != reg.id(k)):
                # left while the board was down (a power cut during a rent):
                # BatteryOut now, without the permit the lost RAM knew
                if i < self.n:
                    b[_BAT + i] = k + 1
                    self._out(i)
                reg.seen(k, None, None, -1, self._clock.floor())
        learn = reg.new or reg.lost  # a new (or relearning) registry takes what the slots hold
        for i in range(self.n):
            s = self._slots[i]
            bid = ids[i]
            k = -1 if bid is None or not 0 < len(bid) <= ID_MAX else reg.find(bid)
            if k < 0 and bid is not None and learn and 0 < len(bid) <= ID_MAX:
                k = reg.add(bid, self._clock.floor())
            if k >= 0 and (learn or reg.slot(k) == i):  # not one that came while the board was down
                st = _bms(s)
                reg.seen(k, st.get("soc"), st.get("soh"), i, self._clock.floor())
                b[_BAT + i] = k + 1
            if b[_DIS + i]:
                self._set(i, _DISABLED, _C_BOOT)
            elif b[_WHY + i]:
                self._set(i, _FAULT, b[_WHY + i])
            elif s.door.value():
                # open through the reboot: purpose unknown, charger off;
                # _closed decides what the slot holds when it closes
                s.charger.off()
                b[_BACK + i] = _EMPTY
                b[_F + i] = _OPENED  # seen open: the left-open alarm in _DOOR_ALARM_MS
                self._v[_T + i] = self._hw.ticks_add(self._now, _DOOR_ALARM_MS)
                self._set(i, _OPEN, _C_BOOT)
            elif b[_BAT + i]:
                self._start(i, _C_BOOT)
            elif s.presence.value():
                # no id; or one the registry does not have here (a return
                # cut short, a battery pushed in): taken in only when the
                # fault is cleared (BatteryIn then)
                self._fault(i, _C_UNREADABLE if ids[i] is None or not 0 < len(ids[i]) <= ID_MAX else _C_UNEXPECTED, None)
            else:
                self._set(i, _EMPTY, _C_BOOT)
        reg.save()

    def _latches(self):
        # persist fault latches, disables and reservations (on change only)
        b = self._b
        raw = bytearray(self.n * _LATCH)
        for i in range(self.n):
            o = i * _LATCH
            if b[i] == _OPEN:
                raw[o] = b[_LAT + i]  # a latched slot open for the server's unlock stays latched
            elif b[i] == _FAULT or (b[_DIS + i] and b[_WHY + i] >= _C_OVER_TEMP):
                raw[o] = b[_WHY + i]
            raw[o + 1] = b[_DIS + i]
            put(raw, o + 2, self._r[i], 4)
            put(raw, o + 6, self._r[_MAX + i], 4)
        st = self._hw.store
        if st.get("st_slots") != raw:
            st.set("st_slots", raw)
            st.commit()


def _sub(c):
    return None if c is None else c.get(wire.CLAIM_SUB)


def _cti(c):
    return None if c is None else c.get(wire.CLAIM_CTI)


def _ident(s):
    # the battery's id; None when it does not answer, or its bus fails
    try:
        return s.identity.read()
    except OSError:
        return None


def _bms(s):
    # what the battery reports of itself ({} when nothing, or its bus fails)
    try:
        return s.identity.state()
    except OSError:
        return {}


def _ukey(user):
    # a reservation's user: CRC32 of the id (0: none)
    if user is None:
        return 0
    from binascii import crc32

    return crc32(user.encode()) & 0xFFFFFFFF or 1


def _int(b, p, v):
    # a CBOR integer at b[p:], shortest form (SPEC.md section 1); the next p
    m = 0
    if v < 0:
        m = 0x20
        v = -1 - v
    if v < 24:
        b[p] = m | v
        return p + 1
    n = 1 if v < 0x100 else 2 if v < 0x10000 else 4
    b[p] = m | (24 if n == 1 else 25 if n == 2 else 26)
    e = p + n
    while n:
        b[p + n] = v & 0xFF  # big-endian
        v >>= 8
        n -= 1
    return e + 1
