# The services every board needs (the system), built once at boot in this order: outputs
# safe, boot epoch, flash log, identity, clock, permit checker. Station and
# outlet applications are built on top of it (main.py).
import os

import wire
from clock import Clock
from identity import Identity
from log import Log
from permits import Permits

VERSION = "0.1.0"


class System:
    def __init__(self, hw, board):
        hw.safe()  # relays, locks and chargers off before anything else
        self.hw = hw
        # keep only what runs on: the parsed board file of an 8-slot station
        # holds ~28 KB of heap, which the caller frees once hw is built
        self.config = {"name": board.get("name"), "watchdog_ms": board.get("watchdog_ms", 8000), "limits": board.get("limits", {})}
        st = hw.store
        # the boot epoch: random (31 bits), and never the last one, so
        # (device, epoch, seq) stays unique for the server even after an
        # erase of the whole flash resets the seq counter and the store
        last = st.get_int("epoch", 0)
        self.epoch = last
        while self.epoch == last or self.epoch == 0:
            self.epoch = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
        st.set_int("epoch", self.epoch)
        st.commit()
        self.log = Log(hw.root, self.epoch)
        self.ident = Identity(st)
        self.clock = Clock(hw, self.log)
        self.permits = Permits(self.ident, self.clock, self.log, hw.root)
        self.problems = self.ident.problems
        self.log.append(wire.LOG_BOOT, [self.epoch, VERSION, self.config["name"], self.problems], self.clock.floor())
        for p in self.problems:
            print("voltgate:", p)
