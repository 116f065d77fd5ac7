# Runs on MicroPython: the simulated hardware's physics and faults.
import json

from hal import sim


def _hw(board_path, root):
    with open(board_path) as f:
        board = json.load(f)
    world = sim.World(board)
    return world, sim.make(board, root, world)


def charge_trace(board_path, root, soc, minutes):
    """Charge slot 0 from soc; one sample a minute of (mv, ma, dc, soc%)."""
    world, hw = _hw(board_path, root)
    world.slots[0].insert(b"\x11" * 8, soc=soc)
    hw.slots[0].charger.on()
    out = []
    for _ in range(minutes):
        world.advance(60000)
        s = hw.slots[0]
        out.append([s.voltage.read(), s.current.read(), s.temperature.read(), int(world.slots[0].battery.soc * 100)])
    return out


def faults(board_path, root):
    world, hw = _hw(board_path, root)
    world.slots[1].insert(b"\x22" * 8, soc=0.5)
    s = hw.slots[1]
    out = {"id": s.identity.read().hex(), "presence": s.presence.value()}
    # a locked door does not open; an energised lock lets it
    out["opens_locked"] = world.slots[1].open_door()
    s.lock.on()
    out["opens_unlocked"] = world.slots[1].open_door()
    out["door"] = s.door.value()
    for kind in ("open", "short"):
        world.fault(1, "temperature", kind)
        try:
            s.temperature.read()
            out[kind] = "read"
        except OSError as e:
            out[kind] = "OSError"
    world.fault(1, "temperature", None)
    world.fault(1, "identity", "noid")
    out["noid"] = s.identity.read()
    world.fault(1, "charger", "stuck")
    s.charger.off()
    world.advance(60000)
    out["stuck_charging_ma"] = s.current.read()
    hw.safe()
    out["after_safe"] = [s.lock.value(), s.charger.value()]
    return out


def outlet_energy(board_path, root, load_w, seconds):
    world, hw = _hw(board_path, root)
    world.outlets[0].load_w = load_w
    o = hw.outlets[0]
    o.relay.on()
    world.advance(seconds * 1000)
    on = [o.meter.pulses(), o.meter.power_mw(), o.meter.current_ma()]
    o.relay.off()
    world.advance(seconds * 1000)
    off = [o.meter.pulses(), o.meter.power_mw()]
    world.fault(0, "relay", "stuck")
    world.advance(seconds * 1000)
    return {"on": on, "off": off, "stuck": o.meter.pulses(), "mwh_per_pulse": o.meter.mwh_per_pulse}


def watchdog(board_path, root):
    world, hw = _hw(board_path, root)
    hw.wdt.start(8000)
    world.advance(7000)
    hw.wdt.feed()
    world.advance(7000)
    fed = world.wdt_fired
    world.advance(1000)
    return [fed, world.wdt_fired]


def kind_modules(board_path, root):
    """The hal.sim submodules building a board's hardware loads. This worker
    may have loaded them for another board: they are taken out of
    sys.modules first and put back after."""
    import sys

    names = ("hal.sim_slots", "hal.sim_outlets")
    old = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    try:
        _hw(board_path, root)
        return sorted(n for n in names if n in sys.modules)
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(old)
