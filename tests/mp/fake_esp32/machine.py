# Stand-in for the ESP32 port's `machine` module, so firmware/hal/esp32.py
# imports and runs on the MicroPython unix port (tests/test_hal_esp32.py).
# Minimal: each class records what the hardware layer did and answers from
# state a test sets. Signatures follow the ESP32 MicroPython 1.29 API.
# Module state (reset_fakes() clears it):
#   pins[gpio]          the last Pin made for that GPIO
#   adc_levels[gpio]    (read_u16, read_uv) an ADC answers; adcs[gpio] the ADC
#   i2c_devices[addr]   device objects on every I2C bus (see fakedev.py)
#   i2cs                I2C objects made
#   counters[id]        Counter objects; wdts: WDT objects; resets: count

pins = {}
adc_levels = {}
adcs = {}
i2c_devices = {}
i2cs = []
counters = {}
wdts = []
state = {"resets": 0, "rtc": (2000, 1, 1, 5, 0, 0, 0, 0)}


def reset_fakes():
    pins.clear()
    adc_levels.clear()
    adcs.clear()
    i2c_devices.clear()
    del i2cs[:]
    counters.clear()
    del wdts[:]
    state["resets"] = 0
    state["rtc"] = (2000, 1, 1, 5, 0, 0, 0, 0)


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_DOWN = 1
    PULL_UP = 2
    IRQ_RISING = 1
    IRQ_FALLING = 2

    def __init__(self, id, mode=-1, pull=-1, *, value=None, drive=None, alt=None):
        self.id = id
        self.mode = mode
        self.pull = pull
        self.level = 0 if value is None else (1 if value else 0)
        self.handler = None
        self.hard = None
        pins[id] = self

    def init(self, mode=-1, pull=-1, *, value=None, drive=None, alt=None):
        self.mode = mode
        self.pull = pull
        if value is not None:
            self.level = 1 if value else 0

    def value(self, x=None):
        if x is None:
            return self.level
        self.level = 1 if x else 0

    def on(self):
        self.level = 1

    def off(self):
        self.level = 0

    def irq(self, handler=None, trigger=3, *, priority=1, wake=None, hard=False):
        self.handler = handler
        self.trigger = trigger
        self.hard = hard

    def pulse(self, n=1):
        """Test helper: n rising edges into the IRQ handler."""
        while n:
            self.handler(self)
            n -= 1


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3

    def __init__(self, src, *, atten=None, sample_ns=None):
        self.gpio = src.id if isinstance(src, Pin) else src
        self.attenuation = atten
        adcs[self.gpio] = self

    def read_u16(self):
        return adc_levels[self.gpio][0]

    def read_uv(self):
        return adc_levels[self.gpio][1]


class I2C:
    def __init__(self, id, *, scl=None, sda=None, freq=400000, timeout=50000):
        self.id = id
        self.scl = scl
        self.sda = sda
        self.freq = freq
        i2cs.append(self)

    def _dev(self, addr):
        d = i2c_devices.get(addr)
        if d is not None:
            d = d.target()
        if d is None:
            raise OSError(19)  # ENODEV: address not acknowledged, as on the ESP32
        return d

    def scan(self):
        return sorted(a for a, d in i2c_devices.items() if d.target() is not None)

    def readfrom_mem_into(self, addr, memaddr, buf, *, addrsize=8):
        buf[:] = self._dev(addr).read(memaddr, len(buf))

    def readfrom_mem(self, addr, memaddr, nbytes, *, addrsize=8):
        return self._dev(addr).read(memaddr, nbytes)

    def writeto_mem(self, addr, memaddr, buf, *, addrsize=8):
        self._dev(addr).write(memaddr, bytes(buf))

    def readfrom_into(self, addr, buf, stop=True):
        buf[:] = self._dev(addr).recv(len(buf))

    def writeto(self, addr, buf, stop=True):
        self._dev(addr).send(bytes(buf))
        return 1


class Counter:
    RISING = 1
    FALLING = 2
    UP = 1
    DOWN = 2

    def __init__(self, id, src=None, *, edge=RISING, direction=UP, filter_ns=0):
        self.id = id
        self.src = src
        self.edge = edge
        self.count = 0
        counters[id] = self

    def value(self, value=None):
        n = self.count
        if value is not None:
            self.count = value
        return n

    def deinit(self):
        pass


class WDT:
    def __init__(self, *, id=0, timeout=5000):
        self.timeout = timeout
        self.feeds = 0
        wdts.append(self)

    def feed(self):
        self.feeds += 1


class RTC:
    def __init__(self, id=0):
        pass

    def datetime(self, datetimetuple=None):
        if datetimetuple is None:
            return state["rtc"]
        state["rtc"] = tuple(datetimetuple)


def disable_irq():
    return 1


def enable_irq(state):
    pass


def reset():
    state["resets"] += 1
