# Runs on MicroPython (bench/run.py starts it from the .mpy build): the heap
# a board's hardware layer holds once built from its board file, code and
# objects. argv[1]: the board file; argv[2]: "esp32" (hal/esp32.py on the
# stand-in machine, esp32 and onewire modules of tests/mp/fake_esp32, which
# are loaded before the count, with a device answering at every I2C address
# the file names and mid-scale on every ADC input) or "sim" (hal/sim.py and
# its world; argv[3]: its root folder). The board file is parsed before the
# count and dropped after, as main.boot_hw does.
import gc
import json
import sys

from vgemit import emit

with open(sys.argv[1]) as f:
    board = json.load(f)
kind = sys.argv[2]
if kind == "esp32":
    import esp32  # noqa: F401 (the stand-ins, loaded before the count)
    import machine
    import onewire  # noqa: F401
    from fakedev import answer_everywhere

    answer_everywhere(board, machine)
import asyncio  # noqa: F401 (the interpreter's, loaded by every board)

gc.collect()
before = gc.mem_alloc()
if kind == "esp32":
    from hal import esp32

    hw = esp32.make(board)
else:
    from hal import sim

    hw = sim.make(board, sys.argv[3])
del board
gc.collect()
emit({"held": gc.mem_alloc() - before, "modules": sorted(m for m in sys.modules if m.startswith("hal"))})
