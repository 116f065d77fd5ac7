# Runs on MicroPython with this folder first on the path: builds
# firmware/hal/esp32.py's hw from a board dict against the stand-in
# machine/esp32/onewire modules and reports what the hardware saw, for
# tests/test_hal_esp32.py to check.
import time
from binascii import hexlify

import esp32
import machine
import onewire
from fakedev import Behind, Mux, Regs, Words, answer_everywhere

import hal.esp32 as hal_esp32

MCP = 0x20
MUX = 0x70
SBS = 0x0B
DS3231 = 0x68
IODIR = 0x00
GPIOA = 0x12
OLAT = 0x14


class Clock:
    """time for hal.esp32 with a ticks_ms the check moves."""

    def __init__(self):
        self.ms = 0

    def ticks_ms(self):
        return self.ms

    def ticks_diff(self, a, b):
        return time.ticks_diff(a, b)

    def ticks_add(self, a, ms):
        return time.ticks_add(a, ms)

    def gmtime(self, t):
        return time.gmtime(t)

    def mktime(self, t):
        return time.mktime(t)


def _hex(b):
    return None if b is None else hexlify(b).decode()


def _try(fn):
    try:
        return fn()
    except OSError as e:
        return "OSError %s: %s" % (e.errno, e.args[1] if len(e.args) > 1 else "")


def station_devices(batteries):
    """An MCP23017, a TCA9548A with SBS batteries on the given channels, a
    DS3231 whose oscillator stopped. Returns the devices by address."""
    machine.reset_fakes()
    exp = Regs(0x16, {0x00: 0xFF, 0x01: 0xFF})  # IODIR after power-on: inputs
    exp.regs[GPIOA] = exp.regs[GPIOA + 1] = 0xFF  # switches open, pulled up
    mux = Mux()
    rtc = Regs(0x13, {0x0F: 0x80})
    machine.i2c_devices[MCP] = exp
    machine.i2c_devices[MUX] = mux
    machine.i2c_devices[SBS] = Behind(mux, batteries)
    machine.i2c_devices[DS3231] = rtc
    machine.adc_levels[34] = (32768, 1650000)  # 1.65 V: NTC = r_series, 25.0 degC
    machine.adc_levels[35] = (65535, 3150000)  # full scale: open
    machine.adc_levels[36] = (0, 0)  # 0 V: shorted
    machine.adc_levels[39] = (40000, 2000000)
    return exp, mux, rtc


def battery(serial, date, mv, ma, dk, soc, cycles, soh=None):
    w = {0x1C: serial, 0x1B: date, 0x09: mv, 0x0A: ma & 0xFFFF, 0x08: dk, 0x0D: soc, 0x17: cycles}
    if soh is not None:
        w[0x4F] = soh
    return Words(w)


def station(board):
    bat0 = battery(0x1234, 0x5A21, 41000, -1500, 2981, 80, 12, soh=97)
    bat2 = battery(0x0042, 0x5B01, 39000, 2000, 3081, 40, 300)
    exp, mux, rtc = station_devices({0: bat0, 2: bat2})
    hw = hal_esp32.make(board)
    o = {"kind": hw.kind, "root": hw.root, "slots": len(hw.slots), "outlets": len(hw.outlets)}
    o["iodir"] = exp.word(IODIR)
    o["olat_boot"] = exp.word(OLAT)
    o["i2c"] = [[b.id, b.scl.id, b.sda.id, b.freq] for b in machine.i2cs]
    o["adc_atten"] = sorted([g, a.attenuation] for g, a in machine.adcs.items())

    hw.slots[2].lock.on()
    o["olat_lock2"] = exp.word(OLAT)
    o["lock2_value"] = hw.slots[2].lock.value()
    hw.slots[0].charger.on()
    hw.status_led.on()
    o["olat_on"] = exp.word(OLAT)
    o["led_on"] = machine.pins[23].level
    writes = len(exp.writes)
    hw.safe()
    o["olat_safe"] = exp.word(OLAT)
    o["led_safe"] = machine.pins[23].level
    o["outs_safe"] = [[s.lock.value(), s.charger.value()] for s in hw.slots] + [hw.status_led.value()]
    o["safe_wrote_olat"] = all(r == OLAT for r, _ in exp.writes[writes:]) and len(exp.writes) > writes

    exp.regs[GPIOA + 1] = 0xFF & ~(1 << 0)  # pin 8 (slot 2 presence) pulled low
    exp.regs[GPIOA] = 0xFF & ~(1 << 5)  # pin 5 (slot 1 door) low
    o["presence"] = [s.presence.value() for s in hw.slots]
    o["door"] = [s.door.value() for s in hw.slots]

    o["temperature"] = [_try(s.temperature.read) for s in hw.slots]
    o["ident"] = [_try(lambda: _hex(s.identity.read())) for s in hw.slots]
    o["state"] = [s.identity.state() for s in hw.slots]
    o["bms_values"] = [[_try(s.voltage.read), _try(s.current.read)] for s in hw.slots]
    o["mux_control"] = mux.control

    o["rtc_unset"] = hw.rtc.now()
    hw.rtc.set(1767225600)  # 2026-01-01T00:00:00Z, a Thursday
    o["rtc_fields"] = list(machine.state["rtc"])
    o["rtc_now"] = hw.rtc.now()
    o["ext_unset"] = hw.ext_rtc.now()
    hw.ext_rtc.set(1767225600 + 3723)
    o["ext_regs"] = _hex(rtc.read(0, 7))
    o["ext_status"] = rtc.regs[0x0F]
    o["ext_now"] = hw.ext_rtc.now()
    rtc.regs[0x02] = 0x40 | 0x20 | 0x01  # 12-hour mode, 1 PM
    o["ext_12h"] = hw.ext_rtc.now()

    o["wdt_before_start"] = len(machine.wdts)
    hw.wdt.feed()
    hw.wdt.start(8000)
    hw.wdt.start(8000)
    hw.wdt.feed()
    o["wdt"] = [[w.timeout, w.feeds] for w in machine.wdts]

    st = hw.store
    o["store_missing"] = [st.get("nokey"), st.get_int("nokey", 7)]
    st.set("perm", b"\x01\x02\x03")
    st.set_int("boot", -5)
    st.delete("nokey")
    st.commit()
    o["store_back"] = [_hex(st.get("perm")), st.get_int("boot", 0), st.get("boot")]
    st.delete("perm")
    o["store_deleted"] = st.get("perm")
    o["nvs"] = [sorted(esp32.namespaces), esp32.commits]
    try:
        st.set("big", bytes(513))
        o["store_big"] = "accepted"
    except ValueError as e:
        o["store_big"] = str(e)
    esp32.namespaces["voltgate"]["huge"] = bytes(600)  # written by another tool
    o["store_huge"] = _try(lambda: st.get("huge"))

    hw.reset()
    o["resets"] = machine.state["resets"]
    o["ticks"] = hw.ticks_diff(hw.ticks_ms(), hw.ticks_ms()) <= 0
    return o


def missing(board, addr):
    """make() with the device at addr absent: the OSError text."""
    station_devices({})
    del machine.i2c_devices[addr]
    try:
        hal_esp32.make(board)
    except OSError as e:
        return [e.errno, str(e)]
    return None


def latched_on_then_fails(board):
    """The ESP32 reset with every expander output on (the chip keeps its
    latch), and the mux is gone: make() fails, the outputs are off anyway."""
    exp, _, _ = station_devices({})
    exp.regs[0x00] = exp.regs[0x01] = 0x00  # IODIR: all outputs, from before the reset
    exp.regs[0x14] = exp.regs[0x15] = 0xFF  # OLAT: all driven high
    del machine.i2c_devices[MUX]
    try:
        hal_esp32.make(board)
        err = None
    except OSError as e:
        err = str(e)
    olat = exp.regs[0x14] | (exp.regs[0x15] << 8)
    iodir = exp.regs[0x00] | (exp.regs[0x01] << 8)
    return [err, olat, iodir]


def not_mcp(board):
    exp, _, _ = station_devices({})
    exp.regs[0x0A] = 0x04
    exp.regs[0x0B] = 0x00
    try:
        hal_esp32.make(board)
    except OSError as e:
        return [e.errno, str(e)]
    return None


def failing_expander(board):
    """safe() with the expander gone after boot: the LED still goes off,
    then the expander's error comes out."""
    station_devices({})
    hw = hal_esp32.make(board)
    hw.status_led.on()
    del machine.i2c_devices[MCP]
    try:
        hw.safe()
        err = None
    except OSError as e:
        err = str(e)
    return [err, machine.pins[23].level]


def outlets(board):
    machine.reset_fakes()
    clock = Clock()
    from hal import esp32_outlets

    real_time = esp32_outlets.time
    esp32_outlets.time = clock
    try:
        hw = hal_esp32.make(board)
        m = hw.outlets[0].meter
        o = {"counter_ids": sorted(machine.counters), "mwh_per_pulse": m.mwh_per_pulse}
        sel = machine.pins[board["outlets"][0]["meter"]["sel"]]
        o["sel_boot"] = sel.level
        cf, cf1 = machine.counters[0], machine.counters[1]
        clock.ms = 500
        cf.count = 5
        o["power_early"] = m.power_mw()  # window under 1 s: previous value
        clock.ms = 1000
        cf.count = 10
        cf1.count = 50
        o["power"] = m.power_mw()
        o["pulses"] = m.pulses()
        o["current"] = m.current_ma()
        o["voltage_first"] = m.voltage_mv()  # switches SEL, no voltage yet
        o["sel_voltage"] = sel.level
        clock.ms = 2000
        cf1.count = 1240
        o["voltage"] = m.voltage_mv()
        o["current_last"] = m.current_ma()  # switches back, last current
        o["sel_current"] = sel.level
        last = hw.outlets[-1].meter  # beyond the 8 pulse counter units
        cf_pin = machine.pins[board["outlets"][-1]["meter"]["cf"]]
        cf_pin.pulse(7)
        o["irq"] = [cf_pin.hard, cf_pin.trigger, last.pulses()]
        for out in hw.outlets:
            out.relay.on()
        relays = [machine.pins[x["relay"]["pin"]] for x in board["outlets"]]
        o["relays_on"] = [p.level for p in relays]
        hw.safe()
        o["relays_safe"] = [p.level for p in relays]
    finally:
        esp32_outlets.time = real_time
    return o


def one_wire(board):
    machine.reset_fakes()
    rom = bytearray(b"\x2d\x01\x02\x03\x04\x05\x06\x00")
    rom[7] = onewire.crc8(rom[:7])
    bad = bytearray(rom)
    bad[3] ^= 0x10
    other = bytearray(b"\x28\x09\x08\x07\x06\x05\x04\x00")  # a DS18B20
    other[7] = onewire.crc8(other[:7])
    onewire.roms[4] = [other, rom]
    onewire.roms[5] = [bad]
    machine.adc_levels[32] = (30000, 1500000)
    machine.adc_levels[33] = (65535, 3300000)
    hw = hal_esp32.make(board)
    o = {"crc_vector": onewire.crc8(b"\x02\x1c\xb8\x01\x00\x00\x00")}
    o["ident"] = [_try(lambda: _hex(s.identity.read())) for s in hw.slots]
    o["state"] = [s.identity.state() for s in hw.slots]
    onewire.roms[4] = []
    o["ident_empty"] = hw.slots[0].identity.read()
    o["voltage"] = [_try(s.voltage.read) for s in hw.slots]
    machine.adc_levels[32] = (0, 0)
    o["voltage_zero"] = hw.slots[0].voltage.read()
    o["lock_pins"] = [machine.pins[s["lock"]["pin"]].mode for s in board["slots"]]
    o["lock_levels_boot"] = [machine.pins[s["lock"]["pin"]].level for s in board["slots"]]
    return o


def any_board(board):
    """Build any board file with a device answering at every I2C address it
    names and mid-scale on every ADC; turn every output on, then safe()."""
    machine.reset_fakes()
    answer_everywhere(board, machine)
    hw = hal_esp32.make(board)
    outs = [o for s in hw.slots for o in (s.lock, s.charger) if o] + [o.relay for o in hw.outlets]
    if hw.status_led:
        outs.append(hw.status_led)
    for o in outs:
        o.on()
    on = [o.value() for o in outs]
    hw.safe()
    return {"kind": hw.kind, "slots": len(hw.slots), "outlets": len(hw.outlets), "on": on, "safe": [o.value() for o in outs]}


DRIVERS = ("onewire", "hal.ds3231", "hal.mcp23017", "hal.sbs", "hal.esp32_slots", "hal.esp32_outlets")


def drivers(board):
    """The part drivers a board file makes hal.esp32 load (each costs heap)."""
    import sys

    import hal

    had = {}
    for m in DRIVERS:
        if m in sys.modules:
            had[m] = sys.modules.pop(m)
        if m.startswith("hal.") and hasattr(hal, m[4:]):
            delattr(hal, m[4:])  # else "from hal import x" finds it there
    try:
        any_board(board)
        return [m for m in DRIVERS if m in sys.modules]
    finally:  # the other checks hold the first modules (the fakes' state)
        for m, mod in had.items():
            sys.modules[m] = mod
            if m.startswith("hal."):
                setattr(hal, m[4:], mod)


def run(boards):
    return {
        "files": {name: any_board(b) for name, b in boards["files"].items()},
        "drivers": {name: drivers(b) for name, b in boards["files"].items()},
        "station": station(boards["station"]),
        "missing": {hex(a): missing(boards["station"], a) for a in (MCP, MUX, DS3231)},
        "not_mcp": not_mcp(boards["station"]),
        "latched_on_then_fails": latched_on_then_fails(boards["station"]),
        "failing_expander": failing_expander(boards["station"]),
        "outlets": outlets(boards["outlets"]),
        "one_wire": one_wire(boards["one_wire"]),
    }
