# The station's side of the simulated hardware (hal/sim.py imports it when
# the board file names slots; an outlet board never loads it): the battery
# and slot physics, and the slot's sensors, switches and identity reader.
#
# Battery: open-circuit voltage rises linearly with state of charge; the
# charger runs constant current until the terminal voltage reaches the CV
# limit, then the current tapers in proportion to the remaining charge and
# the charger reports done below the termination current. Temperature rises
# with I^2*R and relaxes to ambient with a time constant.
from hal.sim import Out

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_EIO = const(5)
_MS_PER_H = const(3600000)


class Battery:
    def __init__(self, ident, soc, p, soh=100, cycles=0):
        self.id = ident
        self.soc = soc
        self.soh = soh
        self.cycles = cycles
        self.temp_dc = p["ambient_dc"]
        self.ma = 0
        self._p = p

    def ocv_mv(self):
        p = self._p
        return p["empty_mv"] + int((p["full_mv"] - p["empty_mv"]) * self.soc)

    def terminal_mv(self):
        return self.ocv_mv() + self.ma * self._p["r_int_mohm"] // 1000

    def step(self, charging, dt_ms):
        p = self._p
        if charging and self.soc < 1.0:
            cc = p["charge_ma"]
            # current that would put the terminal voltage exactly at full_mv
            cv = (p["full_mv"] - self.ocv_mv()) * 1000 // p["r_int_mohm"]
            self.ma = max(0, min(cc, cv))
            if self.ma < p["term_ma"]:
                self.ma = 0
        else:
            self.ma = 0
        cap = p["capacity_mah"] * self.soh / 100.0
        self.soc = min(1.0, self.soc + self.ma * dt_ms / _MS_PER_H / cap)
        heat_w = (self.ma / 1000.0) ** 2 * p["r_int_mohm"] / 1000.0
        target = p["ambient_dc"] + heat_w * p["thermal_dc_per_w"]
        k = min(1.0, dt_ms / 1000.0 / p["thermal_tau_s"])
        self.temp_dc += (target - self.temp_dc) * k


class SlotModel:
    """One slot: what a person does to it and what its outputs drive."""

    def __init__(self, p):
        self._p = p
        self.battery = None
        self.door_open = False
        self.lock_energised = False  # energised = unlocked
        self.charger_on = False
        self.faults = {}  # function -> "open" / "short" / "hot" / "stuck" / "noid"

    def insert(self, ident, soc=0.5, soh=100, cycles=0):
        self.battery = Battery(ident, soc, self._p, soh, cycles)

    def remove(self):
        b = self.battery
        self.battery = None
        return b

    def open_door(self):
        """A person pulls the door: it opens only while the lock is energised
        (a lock with a "stuck" fault stays shut)."""
        if not self.lock_energised or self.faults.get("lock") == "stuck":
            return False
        self.door_open = True
        return True

    def close_door(self):
        self.door_open = False

    def charging(self):
        stuck = self.faults.get("charger") == "stuck"
        return self.battery is not None and (self.charger_on or stuck)

    def step(self, dt_ms):
        if self.battery:
            self.battery.step(self.charging(), dt_ms)
            if self.faults.get("battery") == "hot":
                self.battery.temp_dc = 800


class _In:
    def __init__(self, fn):
        self._fn = fn

    def value(self):
        return 1 if self._fn() else 0


class _Analog:
    """A slot sensor: fn() gives the physical value; faults make it fail."""

    def __init__(self, slot, function, fn):
        self._s = slot
        self._f = function
        self._fn = fn

    def read(self):
        fault = self._s.faults.get(self._f)
        if fault == "open" or fault == "short":
            raise OSError(_EIO, "sim %s sensor %s" % (self._f, fault))
        if fault == "hot" and self._f == "temperature":
            return 900
        return self._fn()


class _Ident:
    def __init__(self, slot):
        self._s = slot

    def _bus(self):
        # world.fault(i, "identity", "open"): the battery's bus fails (an
        # SMBus or 1-Wire error), as hal.esp32 raises it
        if self._s.faults.get("identity") == "open":
            raise OSError(_EIO, "sim identity bus error")

    def read(self):
        b = self._s.battery
        self._bus()
        if b is None or self._s.faults.get("identity") == "noid":
            return None
        return b.id

    def state(self):
        b = self._s.battery
        self._bus()
        if b is None or self._s.faults.get("identity") == "noid":
            return {}
        return {"mv": b.terminal_mv(), "ma": b.ma, "dc": int(b.temp_dc), "soc": int(b.soc * 100), "soh": b.soh, "cycles": b.cycles}


class _SlotHw:
    pass


def slot_hw(s):
    h = _SlotHw()
    h.presence = _In(lambda: s.battery is not None)
    h.door = _In(lambda: s.door_open)
    h.lock = Out(s, "lock_energised")
    h.charger = Out(s, "charger_on")
    h.voltage = _Analog(s, "voltage", lambda: s.battery.terminal_mv() if s.battery else 0)
    h.current = _Analog(s, "current", lambda: s.battery.ma if s.battery else 0)
    h.temperature = _Analog(s, "temperature", lambda: int(s.battery.temp_dc) if s.battery else s._p["ambient_dc"])
    h.identity = _Ident(s)
    return h
