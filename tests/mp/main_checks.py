# Runs on MicroPython: the main loop on simulated hardware, in simulated time.
import asyncio
import json

import cbor
import main
import wire
from hal import sim
from log import Log


class App:
    """A stand-in application: holds slot 0's charger on and checks in, and
    misbehaves as told ("hang": stops checking in at 5 s, "hang_at_start":
    never checks in, "crash": raises at 3 s, "interrupt": Ctrl-C at 3 s)."""

    name = "app"
    watch_ms = 3000

    def __init__(self, p, mode):
        self.p = p
        self.mode = mode

    async def run(self, sup):
        hw = self.p.hw
        if self.mode == "hang_at_start":
            await asyncio.Event().wait()  # never checks in
        hw.slots[0].charger.on()
        while True:
            t = hw.world.ms
            if self.mode == "crash" and t >= 3000:
                raise RuntimeError("boom at %d ms" % t)
            if self.mode == "interrupt" and t >= 3000:
                raise KeyboardInterrupt()
            if self.mode == "hang" and t >= 5000:
                await asyncio.Event().wait()  # never checks in again
            sup.beat("app")
            await hw.sleep_ms(500)


def run(board_path, root, store, mode, seconds):
    with open(board_path) as f:
        board = json.load(f)
    world = sim.World(board)
    hw = sim.make(board, root, world)
    hw.store.provision(store)
    world.slots[1].charger_on = True  # left on by whatever ran before the boot
    out = {}
    seen = {}

    async def drive(p, sup):
        seen["charger1_at_boot"] = world.slots[1].charger_on
        end = world.ms + seconds * 1000
        while world.ms < end and not world.wdt_fired:
            await sim.drive(world, 100)
            if "charger0_running" not in seen and world.ms >= 1000:
                seen["charger0_running"] = world.slots[0].charger_on

    try:
        p = main.run(hw, board, apps=(lambda p: App(p, mode),), extra=drive)
        out["ended"] = "returned"
        out["epoch"] = p.epoch
    except SystemExit:
        out["ended"] = "reset"
    except KeyboardInterrupt:
        out["ended"] = "KeyboardInterrupt"
    out.update(seen)
    out["wdt_fired"] = world.wdt_fired
    out["ms"] = world.ms
    out["charger0_after"] = world.slots[0].charger_on
    # what survived in flash: read the log back as the next boot would
    lg = Log(root, 999)
    recs = lg.read(1, 100, 100000)
    lg.close()
    out["log"] = [[r[3], wire.json_form(cbor.loads(r[4]))] for r in recs]
    return out
