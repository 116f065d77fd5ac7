# Runs on MicroPython: one simulated board in real time, assembled as
# main.py assembles a board (main.parts), on hal.sim driven by the real
# clock (sim.realtime), so that real clients (a broker, a serial line, a
# test) talk to it as to an ESP32. argv[1]: a JSON file
#   {"board": path, "root": flash folder, "store": {...} or null (keep the
#    store as it is), "speed": simulated ms per real ms (default 1),
#    "unix": Unix time of the world's start (default from the board file)}
import json
import sys

import main
from hal import sim

with open(sys.argv[1]) as f:
    spec = json.load(f)
hw, board = main.boot_hw(spec["board"], spec["root"], "sim")
if spec.get("store"):
    hw.store.provision(spec["store"])
if spec.get("unix"):
    hw.world.unix_base = spec["unix"]


async def drive(p, sup):
    await sim.realtime(hw.world, spec.get("speed", 1))


main.run(hw, board, main.parts(board["kind"]), extra=drive)
