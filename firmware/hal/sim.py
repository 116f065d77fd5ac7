# Simulated hardware for the unix port: the objects of hal/__init__.py on a
# deterministic world that tests drive. Nothing here reads the real time:
# world.advance(ms) moves the clock and the physics together.
#
#   world = sim.World(board)            # physics from board["sim"], defaults below
#   hw = sim.make(board, root, world)   # the hw object the firmware uses
#   world.advance(1000)                 # one second of charging, heating, metering
#   world.slots[0].insert(b"\x01..", soc=0.2); world.slots[0].open_door()
#   world.fault(0, "temperature", "open")   # or "short", "hot", "stuck", "noid"
#
# Battery: open-circuit voltage rises linearly with state of charge; the
# charger runs constant current until the terminal voltage reaches the CV
# limit, then the current tapers in proportion to the remaining charge and
# the charger reports done below the termination current. Temperature rises
# with I^2*R and relaxes to ambient with a time constant.
import json
import os

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


_EIO = const(5)
_MS_PER_H = const(3600000)

# defaults for board["sim"] keys that are absent
DEFAULTS = {
    "capacity_mah": 10000,
    "empty_mv": 30000,
    "full_mv": 42000,
    "charge_ma": 4000,
    "term_ma": 200,
    "r_int_mohm": 400,  # effective: the CV phase starts near 80 % charge
    "ambient_dc": 250,
    "thermal_dc_per_w": 10,  # steady-state rise: 1 degC per watt of I^2*R
    "thermal_tau_s": 600,
    "mains_mv": 230000,
    "load_w": 0,
    "start_unix": 1800000000,
}


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


class World:
    """The simulated surroundings of one board, advanced only by tests."""

    def __init__(self, board):
        p = dict(DEFAULTS)
        p.update(board.get("sim", {}))
        self.p = p
        self.ms = 0
        self.unix_base = p["start_unix"]
        self.slots = [SlotModel(p) for _ in board.get("slots", ())]
        self.outlets = [OutletModel(p) for _ in board.get("outlets", ())]
        for i, b in enumerate(p.get("batteries", ())):
            if b is not None:
                self.slots[i].insert(_unhex(b["id"]), b.get("soc", 0.5))
        loads = p.get("loads", ())
        for i, w in enumerate(loads):
            self.outlets[i].load_w = w
        self.wdt_deadline = None
        self.wdt_fired = False
        self.speed = 0  # set by realtime(): simulated ms per real ms
        self.rtc = {}  # RTC name -> offset from world seconds to Unix time

    def power_cut(self):
        """Power is lost: the chip RTC forgets; outputs drop; the battery-backed
        RTC, the store and the files remain."""
        self.rtc.pop("chip", None)
        for s in self.slots:
            s.lock_energised = False
            s.charger_on = False
        for o in self.outlets:
            o.relay_on = False
        self.wdt_deadline = None

    def unix(self):
        return self.unix_base + self.ms // 1000

    def advance(self, ms, step_ms=1000):
        """Move time forward in physics steps of at most step_ms."""
        while ms > 0:
            dt = min(ms, step_ms)
            self.ms += dt
            ms -= dt
            for s in self.slots:
                s.step(dt)
            for o in self.outlets:
                o.step(dt)
            if self.wdt_deadline is not None and self.ms >= self.wdt_deadline:
                self.wdt_fired = True

    def fault(self, index, function, kind):
        """Inject a fault: function is a slot/outlet function name."""
        target = self.slots[index] if self.slots else self.outlets[index]
        if kind is None:
            target.faults.pop(function, None)
        else:
            target.faults[function] = kind


def _unhex(s):
    from binascii import unhexlify

    return unhexlify(s)


# ---------------------------------------------------------------- hw objects


class _Out:
    def __init__(self, model, attr):
        self._m = model
        self._a = attr

    def on(self):
        setattr(self._m, self._a, True)

    def off(self):
        setattr(self._m, self._a, False)

    def value(self):
        return 1 if getattr(self._m, self._a) else 0


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


class _Meter:
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


class _Watchdog:
    def __init__(self, world):
        self._w = world
        self._timeout = None

    def start(self, timeout_ms):
        self._timeout = timeout_ms
        self.feed()

    def feed(self):
        if self._timeout is not None:
            self._w.wdt_deadline = self._w.ms + self._timeout


class _RTC:
    """An RTC whose setting lives in the world (it outlives a reboot of the
    firmware); world.power_cut() clears the chip RTC, not a backed one."""

    def __init__(self, world, name):
        self._w = world
        self._n = name

    def now(self):
        off = self._w.rtc.get(self._n)  # unix - world seconds, None = not set
        return None if off is None else self._w.ms // 1000 + off

    def set(self, t):
        self._w.rtc[self._n] = t - self._w.ms // 1000


class Store:
    """NVS on a file: blobs and i32 only, written on commit()."""

    def __init__(self, path):
        self._path = path
        self._d = {}
        try:
            with open(path) as f:
                self._d = json.load(f)
        except OSError:
            pass  # a new board
        except ValueError:
            self._d = {}  # a torn file: NVS would lose the entries the same way

    def get(self, key):
        v = self._d.get(key)
        if v is None or v[0] != "b":
            return None
        return _unhex(v[1])

    def set(self, key, data):
        _key(key)
        from binascii import hexlify

        self._d[key] = ["b", hexlify(bytes(data)).decode()]

    def get_int(self, key, default=None):
        v = self._d.get(key)
        if v is None or v[0] != "i":
            return default
        return v[1]

    def set_int(self, key, n):
        _key(key)
        if not -0x80000000 <= n <= 0x7FFFFFFF:
            raise ValueError("NVS i32 out of range")
        self._d[key] = ["i", n]

    def delete(self, key):
        self._d.pop(key, None)

    def provision(self, items):
        """Write what provisioning would: {key: hex blob or int}, committed."""
        for k in items:
            v = items[k]
            if isinstance(v, int):
                self.set_int(k, v)
            else:
                self.set(k, _unhex(v))
        self.commit()

    def commit(self):
        tmp = self._path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self._d, f)
        os.rename(tmp, self._path)


def _key(key):
    if not 0 < len(key) <= 15:
        raise ValueError("NVS key must be 1..15 characters: %r" % key)


class Hardware:
    def __init__(self, board, root, world):
        self.kind = board["kind"]
        self.world = world
        self.root = root
        self.slots = []
        self.outlets = []
        for s in world.slots:
            self.slots.append(_slot_hw(s))
        meters = board.get("outlets", ())
        for i, o in enumerate(world.outlets):
            mwh = meters[i].get("meter", {}).get("mwh_per_pulse", 1.0) if i < len(meters) else 1.0
            self.outlets.append(_OutletHw(_Out(o, "relay_on"), _Meter(o, world.p, mwh)))
        self.status_led = _Out(_Flag(), "v") if board.get("status_led") else None
        self.wdt = _Watchdog(world)
        self.rtc = _RTC(world, "chip")
        self.ext_rtc = _RTC(world, "ext") if board.get("rtc") else None
        self.store = Store(root + "/nvs.json")

    def ticks_ms(self):
        return self.world.ms

    def ticks_diff(self, a, b):
        return a - b  # the simulated counter does not wrap

    def ticks_add(self, a, ms):
        return a + ms

    async def sleep_ms(self, ms):
        # simulated time: wait (yielding to the other tasks) until whoever
        # drives the world has advanced it by ms; see drive() and realtime()
        import asyncio

        w = self.world
        end = w.ms + ms
        while w.ms < end:
            # driven by realtime(): sleep for real instead of spinning
            await asyncio.sleep_ms((end - w.ms) // w.speed + 1 if w.speed else 0)

    def reset(self):
        self.safe()
        raise SystemExit("sim reset")

    async def follow_clock(self, p, sup):
        """main.run's extra for a board on its own (main.main() on a
        simulated board, voltgate sim): the world follows the real clock."""
        await realtime(self.world)

    def safe(self):
        for s in self.slots:
            s.lock.off()
            s.charger.off()
        for o in self.outlets:
            o.relay.off()
        if self.status_led:
            self.status_led.off()


class _Flag:
    def __init__(self):
        self.v = False


class _SlotHw:
    pass


class _OutletHw:
    def __init__(self, relay, meter):
        self.relay = relay
        self.meter = meter


def _slot_hw(s):
    h = _SlotHw()
    h.presence = _In(lambda: s.battery is not None)
    h.door = _In(lambda: s.door_open)
    h.lock = _Out(s, "lock_energised")
    h.charger = _Out(s, "charger_on")
    h.voltage = _Analog(s, "voltage", lambda: s.battery.terminal_mv() if s.battery else 0)
    h.current = _Analog(s, "current", lambda: s.battery.ma if s.battery else 0)
    h.temperature = _Analog(s, "temperature", lambda: int(s.battery.temp_dc) if s.battery else s._p["ambient_dc"])
    h.identity = _Ident(s)
    return h


async def drive(world, ms, step_ms=10):
    """Advance the world by ms in steps, letting the tasks run between them:
    the simulated counterpart of time passing for asyncio tasks."""
    import asyncio

    end = world.ms + ms
    while world.ms < end:
        world.advance(min(step_ms, end - world.ms), step_ms)
        await asyncio.sleep_ms(0)


async def realtime(world, speed=1, step_ms=5):
    """Advance the world with the real clock, speed times as fast: for a
    simulated board that real clients (broker, serial line) talk to."""
    import asyncio
    import time

    world.speed = speed
    last = time.ticks_ms()
    while True:
        await asyncio.sleep_ms(step_ms)
        now = time.ticks_ms()
        world.advance(time.ticks_diff(now, last) * speed)
        last = now


def make(board, root, world=None):
    """The hw object for a board file (dict) on a simulated world."""
    if world is None:
        world = World(board)
    try:
        os.mkdir(root)
    except OSError:
        pass
    return Hardware(board, root, world)
