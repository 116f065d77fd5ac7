# Runs on MicroPython (from the .mpy build, heap-limited): a whole board as
# main.py assembles it (main.parts: the app, the link with the serial
# console, and the MQTT link, here pointed at a closed port so it keeps
# retrying), on the simulated hardware, for 60 s of simulated time; then
# its live heap. argv[1]: JSON {"board", "root", "store", "rom"}; with "rom"
# (a ROMFS image of the board's .mpy files) the modules are imported from
# the image mounted as VfsRom, bytecode used in place, as a board with a
# ROMFS partition runs them from flash: the image is read into the heap here
# (the unix port cannot map a file) and its size reported, so that the heap
# the board itself would need is live - image.
import gc
import json
import sys

import micropython

with open(sys.argv[1]) as f:
    spec = json.load(f)
image = None
if spec.get("rom"):
    import vfs

    with open(spec["rom"], "rb") as f:
        image = f.read()
    vfs.mount(vfs.VfsRom(image), "/rom")
    sys.path[:0] = ["/rom", "/rom/lib"]

import main
from hal import sim
from vgemit import emit

hw, board = main.boot_hw(spec["board"], spec["root"], "sim")
hw.store.provision(spec["store"])


async def drive(p, sup):
    await sim.drive(hw.world, 60000, 50)
    gc.collect()
    micropython.qstr_info()  # the qstr pool's size, in the text the runner reads
    emit({"live": gc.mem_alloc(), "heap": gc.mem_alloc() + gc.mem_free(), "modules": len(sys.modules), "names": sorted(sys.modules), "image": len(image) if image else 0, "from": main.__file__})


main.run(hw, board, main.parts(board["kind"]), extra=drive)
