# Runs on MicroPython (from the .mpy build, heap-limited): a whole board as
# main.py assembles it (main.parts: the app, the link with the serial
# console, and the MQTT link, here pointed at a closed port so it keeps
# retrying), on the simulated hardware, for 60 s of simulated time; then
# its live heap. argv[1]: JSON {"board", "root", "store"}.
import gc
import json
import sys

import main
from hal import sim
from vgemit import emit

with open(sys.argv[1]) as f:
    spec = json.load(f)
hw, board = main.boot_hw(spec["board"], spec["root"], "sim")
hw.store.provision(spec["store"])


async def drive(p, sup):
    await sim.drive(hw.world, 60000, 50)
    gc.collect()
    emit({"live": gc.mem_alloc(), "heap": gc.mem_alloc() + gc.mem_free(), "modules": len(sys.modules)})


main.run(hw, board, main.parts(board["kind"]), extra=drive)
