# Stand-in for MicroPython's `onewire` module (the driver frozen into the
# ESP32 port): scan() answers the ROMs a test puts on a GPIO; crc8 is the
# real Dallas/Maxim CRC-8 (the firmware checks ROMs with it).
roms = {}  # gpio -> list of 8-byte ROM ids on that bus


class OneWireError(Exception):
    pass


def crc8(data):
    crc = 0
    for b in data:
        i = 8
        while i:
            mix = (crc ^ b) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            b >>= 1
            i -= 1
    return crc


class OneWire:
    SEARCH_ROM = 0xF0
    MATCH_ROM = 0x55
    SKIP_ROM = 0xCC

    def __init__(self, pin):
        self.pin = pin

    def scan(self):
        return [bytearray(r) for r in roms.get(self.pin.id, ())]

    def crc8(self, data):
        return crc8(data)
