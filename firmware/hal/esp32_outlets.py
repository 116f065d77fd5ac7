# The outlet's side of hal/esp32.py, which imports it only for a board file
# that names outlets (a station never loads it: loaded code lives in the
# heap): the relay and the BL0937 energy meter on the pulse counters.
import time

import machine
from machine import Pin
from micropython import const

TYPE_CHECKING = False
if TYPE_CHECKING:  # for the stub check only (tests/test_hal_esp32.py)
    from hal.esp32 import HW

# BL0937 meter
_SEL_CURRENT = const(0)  # SEL low: CF1 frequency follows current RMS
_SEL_VOLTAGE = const(1)  # SEL high: CF1 follows voltage RMS
_WINDOW_MS = const(1000)  # shortest window a frequency is computed over
_PCNT_UNITS = const(8)  # ESP32 pulse counter units (machine.Counter ids)


class PulseCounter:
    """machine.Counter stand-in on a Pin IRQ (hard: no allocation)."""

    def __init__(self, pin):
        self._n = 0
        pin.irq(self._tick, Pin.IRQ_RISING, hard=True)

    def _tick(self, pin):
        self._n += 1

    def value(self, v=None):
        s = machine.disable_irq()
        n = self._n
        if v is not None:
            self._n = v
        machine.enable_irq(s)
        return n


def _counter(gpio, unit):
    pin = Pin(gpio, Pin.IN)
    if unit < _PCNT_UNITS and hasattr(machine, "Counter"):
        return machine.Counter(unit, pin, edge=machine.Counter.RISING)
    return PulseCounter(pin)


class Meter:
    """BL0937: CF pulses count energy and their rate is power; CF1's rate is
    current or voltage as SEL selects. Each value is the average over the
    window since the previous read of the same quantity (at least
    _WINDOW_MS, else the previous value again). Voltage and current share
    CF1: reading the one not selected switches SEL and returns its last
    value (0 before the first window), so read both at a steady pace."""

    def __init__(self, spec, unit):
        self._cf = _counter(spec["cf"], unit)
        self._cf1 = _counter(spec["cf1"], unit + 1)
        self._sel = Pin(spec["sel"], Pin.OUT, value=_SEL_CURRENT)
        self._mode = _SEL_CURRENT
        self._mw_per_hz = spec["mw_per_hz"]
        self._mv_per_hz = spec["mv_per_hz"]
        self._ma_per_hz = spec["ma_per_hz"]
        self.mwh_per_pulse = spec["mwh_per_pulse"]
        self._t = self._t1 = time.ticks_ms()
        self._n = 0
        self._mw = self._mv = self._ma = 0

    def pulses(self):
        return self._cf.value()

    def power_mw(self):
        now = time.ticks_ms()
        dt = time.ticks_diff(now, self._t)
        if dt >= _WINDOW_MS:
            n = self._cf.value()
            self._mw = int((n - self._n) * 1000 * self._mw_per_hz / dt)
            self._n = n
            self._t = now
        return self._mw

    def voltage_mv(self):
        self._cf1_window(_SEL_VOLTAGE)
        return self._mv

    def current_ma(self):
        self._cf1_window(_SEL_CURRENT)
        return self._ma

    def _cf1_window(self, mode):
        now = time.ticks_ms()
        dt = time.ticks_diff(now, self._t1)
        if dt < _WINDOW_MS and mode == self._mode:
            return
        n = self._cf1.value(0)
        if dt >= _WINDOW_MS:
            hz = n * 1000 / dt
            if self._mode == _SEL_VOLTAGE:
                self._mv = int(hz * self._mv_per_hz)
            else:
                self._ma = int(hz * self._ma_per_hz)
        if mode != self._mode:
            self._sel.value(mode)
            self._mode = mode
        self._t1 = now


class Outlet:
    def __init__(self, relay, meter):
        self.relay = relay
        self.meter = meter


def build(hw, board):  # type: (HW, dict) -> list[Outlet]
    """The board file's outlets: each relay on hw's outputs, each meter on
    two pulse counter units."""
    out = []
    unit = 0
    for o in board.get("outlets", ()):
        out.append(Outlet(hw._out(o["relay"]), Meter(o["meter"], unit)))
        unit += 2
    return out
