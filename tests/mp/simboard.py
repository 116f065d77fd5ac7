# Runs on MicroPython: simulated boards that a test drives call by call
# through the worker (voltgate.mpy.Worker keeps this module alive between
# calls). Each board is the real firmware modules on hal.sim.
import json
from binascii import hexlify, unhexlify

import clock as clockmod
import identity
import permits as permitsmod
import wire
from hal import sim

BOARDS = {}


def _hex(b):
    return None if b is None else hexlify(b).decode()


class ListLog:
    """Stands in for the flash log where a test only reads what was logged."""

    def __init__(self):
        self.records = []

    def append(self, rtype, body, ts):
        self.records.append([rtype, wire.json_form(body), ts])
        return len(self.records)


class SimBoard:
    def __init__(self, board, root, store):
        self.board = board
        self.root = root
        self.world = sim.World(board)
        self.log = ListLog()
        hw = sim.make(board, root, self.world)
        hw.store.provision(store)
        self.boot()

    def boot(self):
        """Start the firmware afresh on the same world, store and files."""
        self.hw = sim.make(self.board, self.root, self.world)
        self.ident = identity.Identity(self.hw.store)
        self.clock = clockmod.Clock(self.hw, self.log)
        self.permits = permitsmod.Permits(self.ident, self.clock, self.log, self.root)


def new(name, board_path, root, store):
    with open(board_path) as f:
        board = json.load(f)
    BOARDS[name] = SimBoard(board, root, store)
    return state(name)


def reboot(name, power_cut):
    b = BOARDS[name]
    if power_cut:
        b.world.power_cut()
    b.boot()
    return state(name)


def advance(name, seconds):
    b = BOARDS[name]
    # the clock task ticks every second on the board; here every 10 s is enough
    while seconds > 0:
        step = min(10, seconds)
        b.world.advance(step * 1000)
        b.clock.tick()
        seconds -= step
    return state(name)


def state(name):
    b = BOARDS[name]
    return {"now": b.clock.now(), "floor": b.clock.floor(), "trusted": b.clock.trusted, "run_s": b.clock.run_s(), "world_unix": b.world.unix()}


def set_rtc(name, which, t):
    b = BOARDS[name]
    (b.hw.rtc if which == "chip" else b.hw.ext_rtc).set(t)


def begin_sync(name):
    return _hex(BOARDS[name].clock.begin_sync())


def sync(name, token_hex):
    return BOARDS[name].clock.sync(unhexlify(token_hex), BOARDS[name].ident.current())


def saw_iat(name, iat):
    return BOARDS[name].clock.saw_iat(iat)


def check(name, token_hex, action, index):
    reason, c = BOARDS[name].permits.check(unhexlify(token_hex), action, index)
    return {"reason": reason, "claims": wire.json_form(c) if c is not None else None}


def use(name, token_hex, action, index):
    """Check, and act on it when ok (as an app does)."""
    b = BOARDS[name]
    reason, c = b.permits.check(unhexlify(token_hex), action, index)
    if reason == wire.OK:
        b.permits.consume(c)
    return reason


def revoke(name, cti_hex, exp, sub, until):
    return BOARDS[name].permits.revoke(unhexlify(cti_hex) if cti_hex else None, exp, sub, until)


def prune(name):
    return BOARDS[name].permits.prune()


def counts(name):
    return list(BOARDS[name].permits.counts())


def records(name, rtype):
    return [r for r in BOARDS[name].log.records if rtype is None or r[0] == rtype]


def ident(name):
    i = BOARDS[name].ident
    return {"device_id": i.device_id, "has_key": i.has_key(), "problems": i.problems, "site": i.site, "link": wire.json_form(i.link)}


def advance_ms(name, ms, tick_ms):
    """Advance in steps of tick_ms, ticking the clock after each, as the
    clock task does when its wake-ups come late or early."""
    b = BOARDS[name]
    while ms > 0:
        step = min(tick_ms, ms)
        b.world.advance(step)
        b.clock.tick()
        ms -= step
    return state(name)


def forget_store_key(name, key):
    b = BOARDS[name]
    b.hw.store.delete(key)
    b.hw.store.commit()


def recover(name):
    BOARDS[name].permits.recover()


def _fill(b, tokens_hex):
    for t in tokens_hex:
        reason, c = b.permits.check(unhexlify(t), wire.ACTION_RENT, 0)
        if reason == wire.OK:
            b.permits.consume(c)
    for i in range(64):
        b.permits.revoke(sub="user-%d" % i, until=2000000000)


def store_heap(name, tokens_hex):
    """Live heap with the used table empty and full, and what one save
    allocates (micropython.mem_total)."""
    import gc

    import micropython

    b = BOARDS[name]
    b.permits.check(unhexlify(tokens_hex[0]), wire.ACTION_RENT, 0)  # one-time: the verifier's decoder
    b.log.records = []
    gc.collect()
    empty = gc.mem_alloc()
    _fill(b, tokens_hex)  # in a function of its own: its locals die with it
    b.log.records = []  # the stand-in log keeps records in RAM; a board's does not
    gc.collect()
    full = gc.mem_alloc()
    a0 = micropython.mem_total()
    b.permits._save()
    return {"empty": empty, "full": full, "save": micropython.mem_total() - a0, "counts": list(b.permits.counts())}
