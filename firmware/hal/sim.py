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
# The slots' physics and sensors are in hal/sim_slots.py, the outlets' loads
# and meters in hal/sim_outlets.py: each is imported only when the board file
# names slots or outlets, as hal/esp32.py loads only the drivers a board
# file names, so a board holds no code for the other kind.
import json
import os

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


class World:
    """The simulated surroundings of one board, advanced only by tests."""

    def __init__(self, board):
        p = dict(DEFAULTS)
        p.update(board.get("sim", {}))
        self.p = p
        self.ms = 0
        self.unix_base = p["start_unix"]
        self.slots = []
        self.outlets = []
        if board.get("slots"):
            from hal.sim_slots import SlotModel

            self.slots = [SlotModel(p) for _ in board["slots"]]
        if board.get("outlets"):
            from hal.sim_outlets import OutletModel

            self.outlets = [OutletModel(p) for _ in board["outlets"]]
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


class Out:
    def __init__(self, model, attr):
        self._m = model
        self._a = attr

    def on(self):
        setattr(self._m, self._a, True)

    def off(self):
        setattr(self._m, self._a, False)

    def value(self):
        return 1 if getattr(self._m, self._a) else 0


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
        if world.slots:
            from hal.sim_slots import slot_hw

            for s in world.slots:
                self.slots.append(slot_hw(s))
        if world.outlets:
            from hal.sim_outlets import Meter, OutletHw

            meters = board.get("outlets", ())
            for i, o in enumerate(world.outlets):
                mwh = meters[i].get("meter", {}).get("mwh_per_pulse", 1.0) if i < len(meters) else 1.0
                self.outlets.append(OutletHw(Out(o, "relay_on"), Meter(o, world.p, mwh)))
        self.status_led = Out(_Flag(), "v") if board.get("status_led") else None
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
