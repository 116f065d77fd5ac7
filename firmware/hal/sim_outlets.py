# The outlet's side of the simulated hardware (hal/sim.py imports it when
# the board file names outlets; a station never loads it): the load behind
# each relay and its energy meter.
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_EIO = const(5)
_MS_PER_H = const(3600000)


class OutletModel:
    def __init__(self, p):
        self._p = p
        self.relay_on = False
        self.load_w = p["load_w"]
        self.faults = {}
        self.energy_uj = 0  # mW x ms: integers, so the meter is exact

    def closed(self):
        return self.relay_on or self.faults.get("relay") == "stuck"

    def power_mw(self):
        return int(self.load_w * 1000) if self.closed() else 0

    def step(self, dt_ms):
        self.energy_uj += self.power_mw() * dt_ms


class Meter:
    def __init__(self, outlet, p, mwh_per_pulse):
        self._o = outlet
        self._p = p
        self.mwh_per_pulse = mwh_per_pulse
        self._uj = int(mwh_per_pulse * _MS_PER_H)  # mW x ms a pulse: made once, so pulses() allocates no float

    def pulses(self):
        if self._o.faults.get("meter") == "open":  # world.fault(i, "meter", "open"): the meter stops answering
            raise OSError(_EIO, "sim meter open")
        return self._o.energy_uj // self._uj

    def power_mw(self):
        return self._o.power_mw()

    def voltage_mv(self):
        return self._p["mains_mv"]

    def current_ma(self):
        return self._o.power_mw() * 1000 // self._p["mains_mv"]


class OutletHw:
    def __init__(self, relay, meter):
        self.relay = relay
        self.meter = meter
