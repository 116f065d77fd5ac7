# Runs on MicroPython (bench/run.py starts it from the .mpy build, heap-limited).
# argv[1]: a JSON file {"root": dir, "records": int, "rounds": int, "seg_bytes": int,
#                      "ram_root": dir on a RAM file system, or absent}
# Emits one record: append time and allocation (averaged over segment rolls,
# and between them), the same bytes written and flushed to a plain file (the
# in-run baseline), bytes per reading in the
# log, boot (open + scan) time of the full log against reading its files, heap
# in use once it is open, and append time once the log is full and thins.
import gc
import json
import os
import sys
import time

import cbor
import log
import micropython
from vgemit import emit

TS0 = 1800000000


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def appends(lg, body, n):
    """Microseconds per append of n readings; bytes allocated per append."""
    gc.collect()
    a0 = micropython.mem_total()
    t0 = time.ticks_us()
    i = 0
    while i < n:
        lg.append(1, body, TS0 + i)
        i += 1
    dt = time.ticks_diff(time.ticks_us(), t0)
    a1 = micropython.mem_total()
    return dt / n, (a1 - a0) / n


def raw_writes(path, frame, n):
    """Microseconds per write + flush of the same bytes to a plain file."""
    with open(path, "wb") as f:
        t0 = time.ticks_us()
        i = 0
        while i < n:
            f.write(frame)
            f.flush()
            i += 1
        dt = time.ticks_diff(time.ticks_us(), t0)
    os.remove(path)
    return dt / n


def read_files(d, buf):
    """Microseconds to read every segment file's bytes, and how many."""
    t0 = time.ticks_us()
    n = 0
    for name in os.listdir(d):
        if name.endswith(".seg"):
            with open(d + "/" + name, "rb") as f:
                while True:
                    k = f.readinto(buf)
                    if not k:
                        break
                    n += k
    return time.ticks_diff(time.ticks_us(), t0), n


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    root = spec["root"]
    n = spec["records"]
    rounds = spec["rounds"]
    seg = spec["seg_bytes"]
    body = cbor.dumps([3, 3700, 1500, 250])  # slot, mV, mA, 0.1 degC
    rbuf = bytearray(seg)  # the baseline's read buffer, allocated before the heap fragments
    frame = bytes(15 + len(body))
    big = 2 * n * len(frame) + 16 * seg  # room for every record: no thinning

    # append rate against a raw write + flush of the same bytes, alternating
    lg = log.Log(root + "/a", 1, seg, big)
    per = n // rounds
    app = []
    alloc = []
    raw = []
    r = 0
    while r < rounds:
        us, al = appends(lg, body, per)
        app.append(us)
        alloc.append(al)
        raw.append(raw_writes(root + "/raw.bin", frame, per))
        r += 1
    st = lg.stats()
    lg.close()
    lg = None

    # the same on a RAM file system, where a flush costs nothing: what the
    # log's own code costs over the raw write
    mem = spec.get("ram_root")
    ram = [0, 0]
    if mem:
        lg = log.Log(mem + "/a", 1, seg, big)
        app2 = []
        raw2 = []
        r = 0
        while r < rounds:
            app2.append(appends(lg, body, per)[0])
            raw2.append(raw_writes(mem + "/raw.bin", frame, per))
            r += 1
        lg.close()
        lg = None
        ram = [median(app2), median(raw2)]

    # allocation between segment rolls: 100 readings into a fresh segment,
    # after one (the first append on a new log allocates ~200 B once)
    lg = log.Log(root + "/b", 1, seg, big)
    lg.append(1, body, TS0)
    in_segment = appends(lg, body, 100)[1]
    lg.close()
    lg = None

    # boot with the log of n records, against reading its bytes
    gc.collect()
    heap0 = gc.mem_alloc()
    boots = []
    reads = []
    r = 0
    while r < rounds:
        gc.collect()
        t0 = time.ticks_us()
        lg = log.Log(root + "/a", 2 + r, seg, big)
        boots.append(time.ticks_diff(time.ticks_us(), t0))
        if r < rounds - 1:
            lg.close()
            lg = None
        us, nbytes = read_files(root + "/a/log", rbuf)
        reads.append(us)
        r += 1
    gc.collect()
    heap_log = gc.mem_alloc() - heap0
    heap_live = gc.mem_alloc()
    heap_total = gc.mem_alloc() + gc.mem_free()
    booted = lg.stats()
    lg.close()
    lg = None

    # append once full: every new segment first thins an old one
    gc.collect()
    small = 16 * seg
    lg = log.Log(root + "/f", 1, seg, small)
    appends(lg, body, 2 * small // len(frame))  # fill well past the limit
    full = []
    r = 0
    while r < rounds:
        full.append(appends(lg, body, per)[0])
        r += 1
    thinned = lg.stats()["dropped_readings"]
    lg.close()

    emit(
        {
            "records": st["last"],
            "append_us": median(app),
            "append_alloc": median(alloc),
            "append_alloc_in_segment": in_segment,
            "raw_us": median(raw),
            "ram_append_us": ram[0],
            "ram_raw_us": ram[1],
            "frame": len(frame),
            "bytes_per_reading": st["bytes"] / st["last"],
            "largest_reading": 15 + len(cbor.dumps([65535, 65535, 65535, 65535])),
            "segments": booted["segments"],
            "log_bytes": nbytes,
            "boot_us": median(boots),
            "read_us": median(reads),
            "booted_records": booted["last"] - booted["first"] + 1,
            "heap_log": heap_log,
            "heap_live": heap_live,
            "heap_total": heap_total,
            "full_append_us": median(full),
            "thinned": thinned,
        }
    )


main(sys.argv[1])
