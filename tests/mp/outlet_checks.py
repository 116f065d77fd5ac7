# Runs on MicroPython: a simulated outlet board (system.System + outlet.Outlet
# on hal.sim, the real flash log and state files in a folder) that a test
# drives cycle by cycle through the worker, in simulated time.
import json
from binascii import hexlify, unhexlify

import cbor
import outlet
import system
import wire
from hal import sim

BOARDS = {}
CYCLE_MS = 250  # outlet._CYCLE_MS (a const: not importable)
STATES = ("idle", "on", "wait", "latched")


class Board:
    def __init__(self, board, root, store, opts):
        self.board = board
        self.root = root
        self.opts = opts
        self.world = sim.World(board)
        hw = sim.make(board, root, self.world)
        hw.store.provision(store)
        if opts.get("ext_rtc") is not None:
            hw.ext_rtc.set(opts["ext_rtc"])
        self.changes = []  # [world ms, world unix, outlet, relay on] as the relays moved
        self.sys = None
        self.boot()

    def boot(self):
        """The firmware starts afresh on the same world, store and files."""
        if self.sys is not None:
            self.sys.log.close()
        self.hw = sim.make(self.board, self.root, self.world)
        self.sys = system.System(self.hw, self.board)
        self.app = outlet.Outlet(self.sys, self.opts.get("reading_s"))
        self.on = [o.relay_on for o in self.world.outlets]
        self.cycles = 0

    def note(self):
        w = self.world
        for i in range(len(w.outlets)):
            if w.outlets[i].relay_on != self.on[i]:
                self.on[i] = w.outlets[i].relay_on
                self.changes.append([w.ms, w.unix(), i, self.on[i]])

    def cycle(self):
        """What the board does in one control cycle: time passes, the clock
        task ticks (every second), the app steps."""
        self.world.advance(CYCLE_MS)
        self.cycles += 1
        if self.cycles % 4 == 0:
            self.sys.clock.tick()
        self.app.step()
        self.note()


def new(name, board_path, root, store, opts):
    with open(board_path) as f:
        board = json.load(f)
    BOARDS[name] = Board(board, root, store, opts)
    return state(name)


def state(name):
    b = BOARDS[name]
    c = b.sys.clock
    outs = []
    for ch in b.app._ch:
        o = b.world.outlets[ch.i]
        outs.append(
            {
                "relay": o.relay_on,
                "closed": o.closed(),
                "st": STATES[ch.st],
                "latch": ch.latch,
                "trips": ch.trips,
                "mwh": ch.meter.mwh,
                "saved_mwh": ch.saved_mwh,
                "session": None if ch.cti is None else hexlify(ch.cti).decode(),
                # what really flowed (mW x ms), for the no-double-count checks
                "true_mwh": o.energy_uj // 3600000,
            }
        )
    return {"ms": b.world.ms, "unix": b.world.unix(), "now": c.now(), "floor": c.floor(), "trusted": c.trusted, "outlets": outs}


def advance(name, ms):
    b = BOARDS[name]
    end = b.world.ms + ms
    while b.world.ms < end:
        b.cycle()
    return state(name)


def advance_until_open(name, i, max_ms):
    """Cycle until relay i opens (or max_ms): the world ms it opened at."""
    b = BOARDS[name]
    end = b.world.ms + max_ms
    while b.world.ms < end:
        b.cycle()
        if not b.world.outlets[i].relay_on:
            return b.world.ms
    return None


def changes(name):
    return BOARDS[name].changes


def begin_sync(name):
    return hexlify(BOARDS[name].sys.clock.begin_sync()).decode()


def sync(name, token_hex):
    b = BOARDS[name]
    return b.sys.clock.sync(unhexlify(token_hex), b.sys.ident.current())


def present(name, token_hex, index=None):
    b = BOARDS[name]
    reason, detail = b.app.present(unhexlify(token_hex), index)
    b.note()
    return [reason, detail]


def command(name, cmd, args):
    b = BOARDS[name]
    if isinstance(args, dict) and "cti" in args:
        args = dict(args)
        args["cti"] = unhexlify(args["cti"])
    reason, detail = b.app.command(cmd, args)
    b.note()
    return [reason, detail]


def revoke_direct(name, cti_hex, exp, sub, until):
    """A revocation that reaches the permit store without the app (as a
    link calling permits.revoke itself would)."""
    p = BOARDS[name].sys.permits
    return p.revoke(unhexlify(cti_hex) if cti_hex else None, exp, sub, until)


def reboot(name, power_cut):
    b = BOARDS[name]
    if power_cut:
        b.world.power_cut()
    b.boot()
    b.note()
    return state(name)


def set_load(name, i, watts):
    BOARDS[name].world.outlets[i].load_w = watts


def set_mains(name, mv):
    BOARDS[name].world.p["mains_mv"] = mv


def fault(name, i, function, kind):
    BOARDS[name].world.fault(i, function, kind)


def crash_on(name, rtype):
    """The next append of a record of rtype fails as a power cut would stop
    it: the exception leaves the app mid-step (a board resets there)."""
    b = BOARDS[name]
    log = b.sys.log
    real = log.append

    def append(t, body, ts):
        if t == rtype:
            log.append = real
            raise OSError(5, "power cut")
        return real(t, body, ts)

    log.append = append


def advance_crash(name, ms):
    try:
        advance(name, ms)
    except OSError as e:
        return str(e)
    return None


def records(name, types=None):
    """Every record in the flash log, read back: [seq, ts, type, body, bytes
    as stored (15 + body)]."""
    lg = BOARDS[name].sys.log
    out = []
    seq = 1
    while True:
        got = lg.read(seq, 64, 1 << 20)
        if not got:
            return out
        for r in got:
            if types is None or r[3] in types:
                out.append([r[0], r[2], r[3], wire.json_form(cbor.loads(r[4])), 15 + len(r[4])])
            seq = r[0] + 1


def app_state_file(name):
    import os

    b = BOARDS[name]
    return os.stat(b.root + "/outlet.bin")[6]


def damage_state_file(name):
    b = BOARDS[name]
    path = b.root + "/outlet.bin"
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[20] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- the asyncio loop


def run_main(board_path, root, store, ext_rtc, token_hex, seconds):
    """main.run with the outlet app on simulated time: the permit is
    presented once the loop runs; returns the relay changes and the log."""
    import main

    with open(board_path) as f:
        board = json.load(f)
    world = sim.World(board)
    hw = sim.make(board, root, world)
    hw.store.provision(store)
    hw.ext_rtc.set(ext_rtc)
    apps = []
    seen = {"changes": []}

    def make(p):
        app = outlet.Outlet(p)
        apps.append(app)
        return app

    async def drive(p, sup):
        await sim.drive(world, 500)
        seen["present"] = list(apps[0].present(unhexlify(token_hex)))
        on = False
        end = world.ms + seconds * 1000
        while world.ms < end and not world.wdt_fired:
            await sim.drive(world, 50)
            if world.outlets[0].relay_on != on:
                on = world.outlets[0].relay_on
                seen["changes"].append([world.ms, world.unix(), on])

    p = main.run(hw, board, apps=(make,), extra=drive)
    seen["wdt_fired"] = world.wdt_fired
    seen["ms"] = world.ms
    lg = p.log
    recs = lg.read(1, 200, 1 << 20)
    seen["log"] = [[r[3], wire.json_form(cbor.loads(r[4]))] for r in recs]
    lg.close()
    return seen
