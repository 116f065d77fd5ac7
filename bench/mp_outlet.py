# Runs on MicroPython (from the .mpy build, heap-limited): the outlet application's
# full duty, its own heap and its allocation per control cycle. Used by
# tests/test_outlet.py (which asserts on it) and bench/run.py (which reports it).
import gc
import json
import sys
from binascii import unhexlify

import micropython
from vgemit import emit


def live():
    gc.collect()
    return gc.mem_alloc()


with open(sys.argv[1]) as f:  # a file: the unix port fails on an argument over 255 bytes
    spec = json.load(f)
import main as boot

hw, config = boot.boot_hw(spec["board"], spec["root"], "sim")
hw.store.provision(spec["store"])
hw.ext_rtc.set(spec["start"])
import system

p = system.System(hw, config)
world = hw.world
platform = live()
import outlet

code = live()
app = outlet.Outlet(p, 10)
state = live()
for i in range(2):
    assert app.present(unhexlify(spec["tokens"][i]), i)[0] == 0


def cycles(n):
    # n control cycles as the board runs them (the clock task ticks every
    # second; the physics and the tick are outside what is measured)
    total = k = 0
    while k < n:
        world.advance(250)
        if k % 4 == 0:
            p.clock.tick()
        a0 = micropython.mem_total()
        app.step()
        total += micropython.mem_total() - a0
        k += 1
    return total


def one(fn, arg=None):
    world.advance(250)
    a0 = micropython.mem_total()
    if arg is None:
        fn()
    else:
        fn(arg)
    return micropython.mem_total() - a0


cycles(400)  # 100 s: readings, saves and revocation checks have all run
ch = app._ch[0]
got = {"platform": platform, "code": code - platform, "state": state - code}
got["control"] = max([one(app._cycle, ch) for _ in range(20)])  # both relays on, nothing else due
got["readings"] = max([one(app._readings) for _ in range(5)])
one(app._energy, ch)  # the first total of this length makes its view (32 B, once)
got["energy"] = max([one(app._energy, ch) for _ in range(5)])
got["save"] = max([one(app._save) for _ in range(5)])
got["revocations"] = max([one(app._revocations) for _ in range(5)])  # two sessions
total = cycles(4 * 600)  # 10 min at 2 kW and 60 W: 60 readings each, saves, revocation checks
got.update({
    "per_cycle": total / 2400, "peak_live": live(), "heap": gc.mem_alloc() + gc.mem_free(),
    "relays": [o.relay_on for o in world.outlets], "mwh": [c.meter.mwh for c in app._ch],
})
emit(got)
