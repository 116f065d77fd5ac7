# Runs on MicroPython (bench/run.py starts it from the .mpy build, heap-limited).
# argv[1]: JSON {"board": path, "root": dir, "store": {key: hex or int}}
# Boots the platform (system.System: log, identity, clock, permits) on the
# simulated hardware and emits the live heap at each step, so the platform's
# own share is told apart from the interpreter's and the simulator's.
import gc
import json
import sys

import micropython
from vgemit import emit


def live():
    gc.collect()
    return gc.mem_alloc()


def main(path):
    with open(path) as f:
        spec = json.load(f)
    base = live()
    import main as boot

    hw, config = boot.boot_hw(spec["board"], spec["root"], "sim")
    hw.store.provision(spec["store"])
    with_hal = live()
    import system

    p = system.System(hw, config)
    with_platform = live()
    # steady state: the clock task's work, once a second on the board (the
    # simulated physics advances outside the measured calls)
    world = hw.world
    n = 1000
    spent = 0
    for _ in range(n):
        world.advance(1000)
        a0 = micropython.mem_total()
        p.clock.tick()
        spent += micropython.mem_total() - a0
    tick_alloc = spent / n
    emit(
        {
            "base": base,
            "hal": with_hal - base,
            "platform": with_platform - with_hal,
            "live": with_platform,
            "heap": gc.mem_alloc() + gc.mem_free(),
            "tick_alloc": tick_alloc,
        }
    )


main(sys.argv[1])
