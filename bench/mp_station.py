# Runs on MicroPython (from the .mpy build, heap-limited): the station application's
# full duty, its own heap and its allocation per control cycle. Used by
# tests/test_station.py (which asserts on it) and bench/run.py (which reports it).
import gc, sys, micropython
from binascii import unhexlify
from vgemit import emit


def live():
    gc.collect()
    return gc.mem_alloc()


import main as boot

hw, config = boot.boot_hw(sys.argv[1], sys.argv[2], "sim")
hw.store.set("dev_id", b"st-8")
hw.store.set("key", unhexlify(sys.argv[3]))
hw.store.set_int("key_ver", 1)
hw.store.commit()
world = hw.world
hw.ext_rtc.set(world.unix())
socs = (0.2, 0.5, 0.995, None, 1.0, 0.3, 0.6, 0.8)  # slot 3 empty, 2 and 4 full soon
for i in range(8):
    if socs[i] is not None:
        world.slots[i].insert(bytes((0x0B, 0, 0, 0, 0, 0, 0xA0, i)), socs[i], 100, 10)
import system

p = system.System(hw, config)
base = live()
import station

code = live() - base
st = station.Station(p)
held = live() - base


def hal_reads():
    # what a cycle asks of the (simulated) hardware, measured alone
    n = 0
    a0 = micropython.mem_total()
    for i in range(8):
        s = hw.slots[i]
        s.door.value()
        s.presence.value()
        if 0 < st._b[i] < 4:
            try:
                s.voltage.read()
                s.current.read()
                s.temperature.read()
            except OSError:
                pass  # a sensor fault: the cycle latches it (an event)
    return micropython.mem_total() - a0


def run(cycles):
    # the app's control cycles, the physics moving outside the measured
    # calls: allocation of plain cycles, of reading rounds, of the cycles
    # that write the registry (every 10 minutes) or where the log starts a
    # new segment (log.py's own allocation), and how many of each
    out = [0, 0, 0, 0, 0]  # plain, readings, writes, reading rounds, writes
    for _ in range(cycles):
        world.advance(station.CYCLE_MS)
        p.clock.tick()
        due = hw.ticks_diff(hw.ticks_ms(), st._next) >= 0
        save = hw.ticks_diff(hw.ticks_ms(), st._save) >= 0
        segs = p.log.stats()["segments"]
        h = hal_reads()
        a0 = micropython.mem_total()
        st.cycle()
        d = micropython.mem_total() - a0 - h
        write = save or p.log.stats()["segments"] != segs
        out[2 if write else 1 if due else 0] += d
        out[3] += due
        out[4] += write
    return out


run(130)  # to steady state: 2 and 4 ready, two reading rounds
# every state: a return door (slot 3), a reservation (2), a latched fault
# (7), a disabled slot (6); their events happen outside the measured runs
r = st.present(unhexlify(sys.argv[4]))
st.command("reserve", {"slot": 2, "user": "u9", "until": world.unix() + 36000})
st.command("disable", {"slot": 6})
world.fault(7, "temperature", "open")
run(2)
quiet = run(20)  # 10 s: the return door unlocked, not opened yet
world.slots[3].open_door()
run(1)
quiet2 = run(80)  # 40 s: the door open; no reading due in these 50 s
world.slots[3].close_door()
run(2)  # the door closes on an empty slot: an event, logged
states = [s[0] for s in st.status()]
full = run(2400)  # 20 minutes: 20 reading rounds of 5 (charging, ready, reserved)
gc.collect()
emit({"code": code, "held": held, "base": base, "present": r[0], "slot": r[1], "states": states,
      "quiet": [quiet[k] + quiet2[k] for k in range(5)], "full": full, "live": gc.mem_alloc(), "heap": gc.mem_alloc() + gc.mem_free()})
