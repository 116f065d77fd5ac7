"""Pull sync over the serial link (SPEC.md 4) on a pty: records per second,
bytes on the line per record, and the share of an ideal 115200-baud line
the pull would fill (a pty has no baud rate: above 100 % the real line,
not the board or the host, sets the pace).

A simulated outlet (mpside/vgsim.py from the .mpy build, real time) boots
on a flash log filled with N outlet readings; the host pulls all of it
with voltgate.sync.pull through voltgate.serlink.SerialTransport and acks.
CPython drives it; the board half runs on MicroPython (bench/mp_*.py are
such halves; the log is filled by mpside/vgfill.py).

    python bench/serial_bench.py [--firmware build/firmware] [--records 2000] [--batch 64]

measure() returns the figures as a dict (for bench/run.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from voltgate import build, keys, link, mpy, serlink, sync, tree, wire

BAUD = 115200
BITS_PER_BYTE = 10  # start + 8 data + stop
DEVICE = "ou-bench"
BOARD = tree.boards_dir() / "sim-outlet-2.json"


def measure(firmware: Path, records: int = 2000, batch: int = 64) -> dict:
    key = keys.derive_device_key(bytes(32), DEVICE, 1)
    store_cfg = {"dev_id": DEVICE.encode().hex(), "key": key.hex(), "key_ver": 1}
    path = [str(mpy.MPSIDE), *build.board_path(firmware)]
    with tempfile.TemporaryDirectory(prefix="vgserial_") as tmp:
        tmp = Path(tmp)
        root = tmp / "flash"
        spec = tmp / "fill.json"
        fill = {"board": str(BOARD), "root": str(root), "store": store_cfg, "records": records, "rtype": wire.LOG_OUTLET_READING}
        spec.write_text(json.dumps(fill))
        mpy.run(mpy.MPSIDE / "vgfill.py", path=path, args=[spec], timeout=600)
        sim = {"board": str(BOARD), "root": str(root), "store": None, "speed": 1}
        with serlink.SimBoard(sim, tmp / "sim", firmware=firmware, heapsize=256 * 1024) as sb:
            with serlink.SerialTransport(sb.port) as t:
                # the board's time is its floor (untrusted clock): sign commands just after it
                floor = None
                board = link.Board(t, DEVICE, key=key, key_version=1, timeout=5, clock=lambda: floor)
                floor = board.hello()["clock"][1] + 60
                store = sync.RecordStore(tmp / "s.sqlite")
                tx0, rx0 = t.tx_bytes, t.rx_bytes
                t0 = time.perf_counter()
                res = sync.pull(board, store, batch=batch)
                elapsed = time.perf_counter() - t0
                wire_bytes = t.tx_bytes - tx0 + t.rx_bytes - rx0
                down = t.tx_bytes - tx0
                bad = t.bad_frames
        store.close()
    line_s = wire_bytes * BITS_PER_BYTE / BAUD
    return {
        "records": res.received,
        "batches": res.batches,
        "batch": batch,
        "seconds": elapsed,
        "records_per_s": res.received / elapsed,
        "wire_bytes": wire_bytes,
        "host_to_board_bytes": down,
        "bytes_per_record": wire_bytes / res.received,
        "line_share": line_s / elapsed,
        "records_per_s_at_115200": res.received / line_s,
        "bad_frames": bad,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--firmware", type=Path, default=tree.root() / "build" / "firmware")
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    m = measure(args.firmware, args.records, args.batch)
    print(json.dumps(m, indent=2))
    print(
        f"{m['records']} records in {m['seconds']:.3f} s over the pty: {m['records_per_s']:.0f} records/s, "
        f"{m['bytes_per_record']:.1f} B/record on the line; that is {m['line_share'] * 100:.0f} % of a 115200-baud line, "
        f"which would carry {m['records_per_s_at_115200']:.0f} records/s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
