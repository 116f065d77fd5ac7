"""A board's identity in NVS: the entries provisioning writes, the NVS
partition image made from them, and reading/writing them on a board
through its REPL.

The entries are what firmware/identity.py reads (namespace "voltgate"):

    dev_id     blob   device id, UTF-8
    key        blob   the device key, 32 bytes
    key_ver    i32    its version (the permits' kid)
    key_old    blob   during a key rotation: the previous key ...
    key_old_v  i32    ... its version ...
    key_old_x  i32    ... and until when it verifies (Unix time / 16)
    site       blob   site id, UTF-8
    link       blob   MQTT link settings, a CBOR map (host, port, ...); absent: serial only

Only blobs and i32: MicroPython's esp32.NVS cannot read NVS strings.

On an ESP32 the entries reach the chip as an NVS partition image
(esp-idf-nvs-partition-gen) flashed with esptool, or, on a board that runs
already, through esp32.NVS over the REPL. A simulated board (hal "sim")
keeps its NVS in the store file /data/nvs.json of its flash folder
(firmware/hal/sim.py, Store); provisioning writes the same entries there
through the REPL with that Store class, so the simulated firmware reads
exactly what an ESP32 would read from its partition.

Values never come back from a board: reading compares SHA-256 digests the
board computes.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import cbor2

from .errors import EXIT_USAGE, VoltgateError

NAMESPACE = "voltgate"  # firmware/hal/esp32.py, _NVS_NAMESPACE
INTS = ("key_ver", "key_old_v", "key_old_x")
KEYS = ("dev_id", "key", "key_ver", "key_old", "key_old_v", "key_old_x", "site", "link")
SIM_STORE = "/data/nvs.json"  # firmware/main.py boot_hw root + hal/sim.py Store
NVS_OFFSET = 0x9000  # MicroPython's ESP32 partition tables: nvs at 0x9000 ...
NVS_SIZE = 0x6000  # ... 24 KB
_PAGE = 4096


@dataclass(frozen=True)
class Identity:
    device_id: str
    key: bytes
    key_version: int
    site: str
    link: dict | None = None  # {"host": ..., "port": ...}
    old_key: bytes | None = None  # a rotation's previous key ...
    old_version: int | None = None
    old_until: int | None = None  # ... verifying until this Unix time

    def entries(self) -> dict[str, bytes | int]:
        e: dict[str, bytes | int] = {"dev_id": self.device_id.encode(), "key": self.key, "key_ver": self.key_version, "site": self.site.encode()}
        if self.link:
            e["link"] = cbor2.dumps(self.link)
        if self.old_key is not None:
            e["key_old"] = self.old_key
            e["key_old_v"] = self.old_version
            e["key_old_x"] = self.old_until // 16
        return e


def digests(entries: dict[str, bytes | int]) -> dict[str, str | int]:
    """What a board reports for its entries: ints as they are, blobs as SHA-256 hex."""
    return {k: v if isinstance(v, int) else hashlib.sha256(v).hexdigest() for k, v in entries.items()}


def partition(entries: dict[str, bytes | int], size: int = NVS_SIZE) -> bytes:
    """The NVS partition image (format version 2) holding the entries in
    the namespace "voltgate". The same entries give the same bytes."""
    from esp_idf_nvs_partition_gen import nvs_partition_gen as gen

    if size % _PAGE or size < 3 * _PAGE:
        raise VoltgateError(f"NVS partition size {size:#x} is not a multiple of 4 KB of at least 12 KB", "see the board's partition table", EXIT_USAGE)
    out = io.BytesIO()
    # one page is kept free (the generator's "reserved" page), as the CLI does
    with gen.nvs_open(out, size - _PAGE, gen.Page.VERSION2) as n:
        gen.write_entry(n, NAMESPACE, "namespace", "", "")
        for k in KEYS:
            if k not in entries:
                continue
            v = entries[k]
            if k in INTS:
                gen.write_entry(n, k, "data", "i32", str(int(v)))
            else:
                gen.write_entry(n, k, "data", "hex2bin", bytes(v).hex())
    data = out.getvalue()
    assert len(data) == size, (len(data), size)
    return data


# -- on a board, through the REPL (code run by mpremote's raw REPL) --------------

_READ_ESP32 = """
import esp32, hashlib, binascii
def _vg(keys, ints):
    n = esp32.NVS(%r)
    b = bytearray(2048)
    out = {}
    for k in keys:
        try:
            if k in ints:
                out[k] = n.get_i32(k)
            else:
                l = n.get_blob(k, b)
                out[k] = binascii.hexlify(hashlib.sha256(b[:l]).digest()).decode()
        except OSError:
            pass
    return out
print(repr(_vg(%r, %r)))
del _vg
"""

_READ_SIM = """
import json, hashlib, binascii
def _vg(path, keys):
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return {}
    out = {}
    for k in keys:
        v = d.get(k)
        if v is None:
            continue
        out[k] = v[1] if v[0] == "i" else binascii.hexlify(hashlib.sha256(binascii.unhexlify(v[1])).digest()).decode()
    return out
print(repr(_vg(%r, %r)))
del _vg
"""

_WRITE_ESP32 = """
import esp32
def _vg(items, gone):
    n = esp32.NVS(%r)
    for k in items:
        v = items[k]
        if isinstance(v, int):
            n.set_i32(k, v)
        else:
            n.set_blob(k, v)
    for k in gone:
        try:
            n.erase_key(k)
        except OSError:
            pass
    n.commit()
_vg(%r, %r)
del _vg
"""

# the simulated firmware's own NVS (hal/sim.py Store), uploaded before this runs
_WRITE_SIM = """
from hal import sim
def _vg(items, gone):
    s = sim.Store(%r)
    for k in items:
        v = items[k]
        if isinstance(v, int):
            s.set_int(k, v)
        else:
            s.set(k, v)
    for k in gone:
        s.delete(k)
    s.commit()
_vg(%r, %r)
del _vg
"""


def read_code(hal: str) -> str:
    if hal == "sim":
        return _READ_SIM % (SIM_STORE, list(KEYS))
    return _READ_ESP32 % (NAMESPACE, list(KEYS), list(INTS))


def write_code(hal: str, items: dict[str, bytes | int], gone: list[str]) -> str:
    if hal == "sim":
        return "import os\ntry:\n os.mkdir('/data')\nexcept OSError:\n pass\n" + _WRITE_SIM % (SIM_STORE, items, gone)
    return _WRITE_ESP32 % (NAMESPACE, items, gone)


def diff(want: dict[str, bytes | int], have: dict[str, str | int]) -> tuple[dict[str, bytes | int], list[str]]:
    """(entries to write, entries to erase) to turn a board's entries (as
    digests) into want."""
    wd = digests(want)
    write = {k: v for k, v in want.items() if have.get(k) != wd[k]}
    gone = [k for k in KEYS if k in have and k not in want]
    return write, gone


def sim_store_text(entries: dict[str, bytes | int]) -> str:
    """A simulated board's store file holding the entries (hal/sim.py's format)."""
    return json.dumps({k: ["i", v] if isinstance(v, int) else ["b", bytes(v).hex()] for k, v in entries.items()})
