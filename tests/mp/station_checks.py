# Runs on MicroPython: simulated stations (system.System + station.Station
# on hal.sim) that tests/test_station.py drives call by call through the
# worker. Time moves only when a test says so: step() advances the world
# one control cycle at a time and runs the cycle, as the app's task does on
# a board. Results are JSON-able (bytes as hex).
import asyncio
import json
from binascii import hexlify, unhexlify

import cbor
import station as stationmod
import system
import wire
from hal import sim

BOARDS = {}

# the codes of protocol/SPEC.md section 8, for readable test results
STATES = ("empty", "charging", "ready", "reserved", "open", "fault", "disabled")
CAUSES = (
    None,
    "boot",
    "full",
    "rent",
    "return",
    "service",
    "eject",
    "door_closed",
    "door_timeout",
    "inserted",
    "cleared",
    "reserved",
    "reservation_ended",
    "disabled",
    "enabled",
    "too_cold",
    "warm",
    "over_temp",
    "over_voltage",
    "over_current",
    "charge_timeout",
    "voltage_sensor",
    "current_sensor",
    "temperature_sensor",
    "charger_stuck",
    "battery_missing",
    "unexpected_battery",
    "unreadable",
    "not_removed",
    "unknown",
    "not_named",
    "refused_battery",
    "door_forced",
    "door_left_open",
    "battery_registry_lost",
    "io_error",
)


def _reason(r):
    return wire.reason_name(r)


def _named(rtype, body):
    # state and cause codes as names (SPEC.md section 8)
    if rtype == wire.LOG_STATE:
        body[1] = STATES[body[1]]
        body[2] = CAUSES[body[2]]
    elif rtype == wire.LOG_ALARM and isinstance(body[0], int):
        body[0] = CAUSES[body[0]]
        if body[0] == "refused_battery":
            body[2] = CAUSES[body[2]]
    return body


def _hex(b):
    return None if b is None else hexlify(b).decode()


class Board:
    def __init__(self, board, root, store, opts):
        self.board = board
        self.root = root
        self.opts = opts
        bats = opts.get("batteries")  # per slot [id hex, soc, soh, cycles] or None
        if bats is not None:
            board.setdefault("sim", {})["batteries"] = [None] * len(board["slots"])
        self.world = sim.World(board)
        for i, bat in enumerate(bats or ()):
            if bat is not None:
                self.world.slots[i].insert(unhexlify(bat[0]), bat[1], bat[2], bat[3])
        hw = sim.make(board, root, self.world)
        hw.store.provision(store)
        if opts.get("trusted", True):
            hw.ext_rtc.set(self.world.unix())  # a battery-backed RTC that kept time
        self.seen = 0  # last log seq handed to the test
        self.boot()

    def boot(self):
        self.hw = sim.make(self.board, self.root, self.world)
        self.p = system.System(self.hw, self.board)
        self.st = stationmod.Station(self.p, self.opts.get("reading_s"), self.opts.get("return_known"))


def new(name, board_path, root, store, opts):
    with open(board_path) as f:
        board = json.load(f)
    BOARDS[name] = Board(board, root, store, opts or {})
    return status(name)


def reboot(name, power_cut):
    b = BOARDS[name]
    b.p.log.close()
    if power_cut:
        b.world.power_cut()
    b.boot()
    return status(name)


def step(name, seconds, until=None):
    """Advance seconds of simulated time, one control cycle at a time; with
    until = [slot, state], stop early once that slot is in that state.
    Returns the simulated seconds actually advanced."""
    b = BOARDS[name]
    ms = int(seconds * 1000)
    done = 0
    while done < ms:
        b.world.advance(stationmod.CYCLE_MS)
        b.p.clock.tick()
        b.st.cycle()
        done += stationmod.CYCLE_MS
        if until is not None and STATES[b.st._b[until[0]]] == until[1]:
            break
    return done / 1000


def present(name, token_hex, index=None):
    st = BOARDS[name].st
    if index is None:
        reason, detail = st.present(unhexlify(token_hex))
    else:
        reason, detail = st.present(unhexlify(token_hex), index)
    return [_reason(reason), wire.json_form(detail)]


def command(name, cmd, args):
    if isinstance(args, dict) and isinstance(args.get("cti"), str):
        args["cti"] = unhexlify(args["cti"])  # bytes do not cross JSON
    reason, detail = BOARDS[name].st.command(cmd, args)
    return [_reason(reason), wire.json_form(detail)]


def status(name):
    b = BOARDS[name]
    out = []
    for i, s in enumerate(b.st.status()):
        m = b.world.slots[i]
        out.append(
            {
                "state": STATES[s[0]],
                "cause": CAUSES[s[1] or 0],
                "battery": _hex(s[2]),
                "soc": s[3],
                "mv": s[4],
                "ma": s[5],
                "dc": s[6],
                "lock": m.lock_energised,
                "charger": m.charger_on,
                "door": m.door_open,
                "world_soc": None if m.battery is None else m.battery.soc,
            }
        )
    return out


def batteries(name):
    return wire.json_form(BOARDS[name].st.command("batteries")[1])


def records(name, rtype=None, new_only=False):
    """The flash log read back, decoded: [seq, type, ts, body]."""
    b = BOARDS[name]
    out = []
    for r in b.p.log.read(b.seen + 1 if new_only else 1, 100000, 10000000):
        if rtype is None or r[3] == rtype:
            out.append([r[0], r[3], r[2], _named(r[3], wire.json_form(cbor.loads(r[4]))), len(r[4])])
        if new_only:
            b.seen = r[0]
    return out


def insert(name, slot, ident_hex, soc, soh, cycles):
    BOARDS[name].world.slots[slot].insert(unhexlify(ident_hex), soc, soh, cycles)


def take(name, slot):
    """A person takes the battery out of the slot: what it was, to insert
    elsewhere (None when the slot was empty)."""
    bat = BOARDS[name].world.slots[slot].remove()
    if bat is None:
        return None
    return {"id": _hex(bat.id), "soc": bat.soc, "soh": bat.soh, "cycles": bat.cycles}


def open_door(name, slot):
    return BOARDS[name].world.slots[slot].open_door()


def close_door(name, slot):
    BOARDS[name].world.slots[slot].close_door()


def fault(name, slot, function, kind):
    BOARDS[name].world.fault(slot, function, kind)


def battery(name, slot):
    m = BOARDS[name].world.slots[slot].battery
    return None if m is None else {"id": _hex(m.id), "soc": m.soc, "temp_dc": m.temp_dc, "ma": m.ma}


def set_soc(name, slot, soc):
    BOARDS[name].world.slots[slot].battery.soc = soc


def store_get(name, key):
    return _hex(BOARDS[name].hw.store.get(key))


def cycle_alloc(name, cycles):
    """Allocation (micropython.mem_total) of the app's control cycles alone,
    the world advancing outside the measured calls."""
    import micropython

    b = BOARDS[name]
    spent = 0
    for _ in range(cycles):
        b.world.advance(stationmod.CYCLE_MS)
        a0 = micropython.mem_total()
        b.st.cycle()
        spent += micropython.mem_total() - a0
    return spent


def run_main(board_path, root, store, seconds, token_hex):
    """The app under main.run: the asyncio loop, the supervisor and the
    watchdog, simulated time driven in 10 ms steps; a permit is presented
    at 2 s (as the console task would), its slot's door opened at 3 s and
    closed at 4 s."""
    import main

    with open(board_path) as f:
        board = json.load(f)
    world = sim.World(board)
    hw = sim.make(board, root, world)
    hw.store.provision(store)
    hw.ext_rtc.set(world.unix())
    seen = {}
    apps = []

    def make(p):
        apps.append(stationmod.Station(p))
        return apps[0]

    async def drive(p, sup):
        await sim.drive(world, 2000)
        reason, slot = apps[0].present(unhexlify(token_hex))
        seen["present"] = [_reason(reason), slot]
        slot = int(slot.split()[1])
        await sim.drive(world, 1000)
        seen["opened"] = world.slots[slot].open_door()
        seen["lock_after_open"] = None
        await sim.drive(world, 1000)
        seen["lock_after_open"] = world.slots[slot].lock_energised
        world.slots[slot].close_door()
        await sim.drive(world, seconds * 1000 - 4000)

    main.run(hw, board, apps=(make,), extra=drive)
    seen["wdt_fired"] = world.wdt_fired
    seen["ms"] = world.ms
    seen["states"] = [STATES[s[0]] for s in apps[0].status()]
    return seen


def console(name, line):
    """A console line through the platform's presenter (present.py)."""
    import present

    return present.Presenter(BOARDS[name].st).line(line)


def force_door(name, slot, is_open):
    """The door moves without the lock's leave (forced, or a bad switch)."""
    BOARDS[name].world.slots[slot].door_open = is_open


class _Broken:
    def value(self):
        raise OSError(5, "expander read failed")


def break_input(name, slot, which):
    """The slot's input (presence, door) fails on every read, as an I2C
    expander that stopped answering does."""
    setattr(BOARDS[name].hw.slots[slot], which, _Broken())


class _Fixed:
    def __init__(self, v):
        self.v = v

    def read(self):
        return self.v


def set_sensor(name, which, slot, value):
    """The slot's sensor ("temperature", "current", "voltage") reads value
    from now on (None: the sim's physics again)."""
    b = BOARDS[name]
    if value is None:
        value_src = getattr(sim.make(b.board, b.root, b.world).slots[slot], which)
    else:
        value_src = _Fixed(value)
    setattr(b.hw.slots[slot], which, value_src)


def fix_input(name, slot, which):
    """The slot's input (presence, door) answers again (break_input undone)."""
    b = BOARDS[name]
    setattr(b.hw.slots[slot], which, getattr(sim.make(b.board, b.root, b.world).slots[slot], which))
