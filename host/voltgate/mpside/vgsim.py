# Runs on MicroPython: one simulated board in real time, assembled as
# main.py assembles a board (main.parts), on hal.sim driven by the real
# clock (sim.realtime), so that real clients (a broker, a serial line, a
# test) talk to it as to an ESP32. argv[1]: a JSON file
#   {"board": path, "root": flash folder, "store": {...} or null (keep the
#    store as it is), "speed": simulated ms per real ms (default 1),
#    "unix": Unix time of the world's start (default from the board file),
#    "main": the module that is firmware/main.py (default "main"; a
#        provisioned flash holds it as "vgmain"),
#    "world": the simulated surroundings at power-up, before the firmware
#        looks at them (default: the board file's "sim" section):
#        {"batteries": [null or {"id": hex, "soc": 0..1, "soh": %,
#         "cycles": n}, one per slot], "loads": [W, one per outlet],
#         "rtc": Unix time the battery-backed RTC holds (a board file
#         with an "rtc" then boots with a trusted clock)},
#    "control": a file path, or absent: the world's control channel}
#
# Control channel (voltgate.fleet.SimProcess is the host's side): the host
# appends one JSON command per line to the control file; this board polls
# it every CONTROL_MS of real time, applies each complete line to the world
# and appends the answer, one JSON line, to the same path + ".out":
#   {"n": id, "op": "state"}                  -> {"n": id, "ms", "slots": [...], "outlets": [...]}
#   {"n": id, "op": "open_door", "slot": i}   -> {"n": id, "ok": bool} (only an unlocked door opens)
#   {"n": id, "op": "close_door", "slot": i}
#   {"n": id, "op": "take", "slot": i}        -> {"n": id, "battery": {id, soc, soh, cycles} or null}
#   {"n": id, "op": "insert", "slot": i, "id": hex, "soc": 0..1, "soh": %, "cycles": n}
#   {"n": id, "op": "load", "outlet": i, "w": watts}
#   {"n": id, "op": "fault", "index": i, "function": name, "kind": kind or null}
# An answer with "error" names what was wrong with the command. Only the
# world changes: what the board makes of it is the firmware's business.
import json
import os
import sys

from hal import sim

CONTROL_MS = 50

with open(sys.argv[1]) as f:
    spec = json.load(f)
main = __import__(spec.get("main") or "main")
hw, board = main.boot_hw(spec["board"], spec["root"], "sim")
if spec.get("store"):
    hw.store.provision(spec["store"])
if spec.get("unix"):
    hw.world.unix_base = spec["unix"]


def _setup(world, w):
    bats = w.get("batteries")
    if bats is not None:
        for i, s in enumerate(world.slots):
            b = bats[i] if i < len(bats) else None
            s.battery = None
            if b:
                s.insert(sim._unhex(b["id"]), b.get("soc", 0.5), b.get("soh", 100), b.get("cycles", 0))
    for i, load in enumerate(w.get("loads") or ()):
        if i < len(world.outlets):
            world.outlets[i].load_w = load
    if w.get("rtc"):
        world.rtc["ext"] = w["rtc"] - world.ms // 1000


if spec.get("world"):
    _setup(hw.world, spec["world"])


def _battery(b):
    if b is None:
        return None
    from binascii import hexlify

    return {"id": hexlify(b.id).decode(), "soc": b.soc, "soh": b.soh, "cycles": b.cycles, "ma": b.ma, "dc": int(b.temp_dc)}


def _state(world):
    slots = []
    for s in world.slots:
        slots.append({"battery": _battery(s.battery), "door": s.door_open, "lock": s.lock_energised, "charger": s.charger_on, "faults": s.faults})
    outlets = []
    for o in world.outlets:
        outlets.append({"relay": o.closed(), "w": o.load_w, "mw": o.power_mw(), "mwh": o.energy_uj // 3600000, "faults": o.faults})
    return {"ms": world.ms, "slots": slots, "outlets": outlets}


def _apply(world, c):
    op = c.get("op")
    if op == "state":
        return _state(world)
    if op == "open_door":
        return {"ok": world.slots[c["slot"]].open_door()}
    if op == "close_door":
        world.slots[c["slot"]].close_door()
        return {"ok": True}
    if op == "take":
        return {"battery": _battery(world.slots[c["slot"]].remove())}
    if op == "insert":
        s = world.slots[c["slot"]]
        if s.battery is not None:
            return {"error": "slot %d holds a battery" % c["slot"]}
        s.insert(sim._unhex(c["id"]), c.get("soc", 0.5), c.get("soh", 100), c.get("cycles", 0))
        return {"ok": True}
    if op == "load":
        world.outlets[c["outlet"]].load_w = c["w"]
        return {"ok": True}
    if op == "fault":
        world.fault(c["index"], c["function"], c.get("kind"))
        return {"ok": True}
    return {"error": "unknown op %s" % op}


async def control(world, path):
    import asyncio

    pos = 0
    part = b""
    while True:
        await asyncio.sleep_ms(CONTROL_MS)
        try:
            size = os.stat(path)[6]
        except OSError:
            continue  # nothing sent yet
        if size <= pos:
            continue
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read(size - pos)
        pos += len(data)
        lines = (part + data).split(b"\n")
        part = lines.pop()  # an incomplete last line waits for its end
        for line in lines:
            if not line.strip():
                continue
            c = {}
            try:
                c = json.loads(line)
                r = _apply(world, c)
            except Exception as e:  # a bad command must not stop the board
                r = {"error": "%s: %s" % (type(e).__name__, e)}
            r["n"] = c.get("n") if isinstance(c, dict) else None
            with open(path + ".out", "a") as out:
                out.write(json.dumps(r))
                out.write("\n")


async def drive(p, sup):
    if spec.get("control"):
        import asyncio

        asyncio.create_task(control(hw.world, spec["control"]))
    await sim.realtime(hw.world, spec.get("speed", 1))


main.run(hw, board, main.parts(board["kind"]), extra=drive)
