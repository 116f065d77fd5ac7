# I2C devices for the stand-in machine.I2C (put them in machine.i2c_devices
# by address). target() is the device that answers at that address right
# now (None: not acknowledged), so a device behind a mux channel answers
# only while the channel is selected.


class Regs:
    """Register file with auto-increment: MCP23017, DS3231."""

    def __init__(self, size, init=None):
        self.regs = bytearray(size)
        self.writes = []  # (register, bytes) in order
        for reg, v in (init or {}).items():
            self.regs[reg] = v

    def target(self):
        return self

    def read(self, reg, n):
        return bytes(self.regs[reg : reg + n])

    def write(self, reg, data):
        self.regs[reg : reg + len(data)] = data
        self.writes.append((reg, data))

    def word(self, reg):
        return self.regs[reg] | (self.regs[reg + 1] << 8)


class Words:
    """SMBus word commands (an SBS fuel gauge); a command not in the table
    is not acknowledged (OSError EIO, as a data NACK)."""

    def __init__(self, words):
        self.words = dict(words)

    def target(self):
        return self

    def read(self, cmd, n):
        if cmd not in self.words:
            raise OSError(5)
        v = self.words[cmd] & 0xFFFF
        return bytes((v & 0xFF, v >> 8))


class Mux:
    """TCA9548A: one control byte, bit n connects channel n."""

    def __init__(self):
        self.control = 0
        self.selects = 0

    def target(self):
        return self

    def recv(self, n):
        return bytes((self.control,))

    def send(self, data):
        self.control = data[0]
        self.selects += 1


class Behind:
    """The devices at one address behind a mux: channel -> device."""

    def __init__(self, mux, channels):
        self.mux = mux
        self.channels = channels

    def target(self):
        for ch, dev in self.channels.items():
            if self.mux.control & (1 << ch):
                return dev
        return None


def answer_everywhere(board, machine):
    """Put a device at every I2C address the board file names (expanders,
    smart batteries behind their mux, the RTC chip) and mid-scale on every
    ADC input, so that hal.esp32 can build any board file."""
    for e in board.get("expanders", {}).values():
        machine.i2c_devices[e["addr"]] = Regs(0x16)
    for s in board.get("slots", ()):
        for v in s.values():
            if "adc" in v:
                machine.adc_levels[v["adc"]] = (32768, 1650000)
        bms = s.get("identity", {}).get("bms")
        if bms and "mux" in bms:
            mux = machine.i2c_devices.setdefault(bms["mux"]["addr"], Mux())
            machine.i2c_devices.setdefault(bms["addr"], Behind(mux, {}))
    if "rtc" in board:
        machine.i2c_devices[board["rtc"]["addr"]] = Regs(0x13)
