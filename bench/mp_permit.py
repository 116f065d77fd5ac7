# Runs on MicroPython (bench/run.py starts it from the .mpy build, heap-limited).
# argv[1]: a JSON file {"token": hex, "env": {...}, "action": int, "index": int, "n": int}
# Emits one record with time and allocation per permit check, and the same
# for the bare HMAC-SHA256 of the token's bytes as the in-run baseline.
import gc
import json
import sys
import time
from binascii import unhexlify

import micropython
import permit
from hmac256 import HMAC256
from vgemit import emit
from vgenv import DictEnv


def per_call(fn, n):
    fn()  # warm up (first call sets up module-level scratch)
    gc.collect()
    a0 = micropython.mem_total()
    t0 = time.ticks_us()
    for _ in range(n):
        fn()
    dt = time.ticks_diff(time.ticks_us(), t0)
    alloc = micropython.mem_total() - a0
    return dt / n, alloc / n


def main(path):
    with open(path) as f:
        spec = json.load(f)
    env = DictEnv(spec["env"])
    tok = unhexlify(spec["token"])
    action = spec["action"]
    index = spec["index"]
    n = spec["n"]
    assert permit.verify(tok, env, action, index)[0] == 0
    key = HMAC256(unhexlify(next(iter(spec["env"]["keys"].values()))))
    rounds = []
    for _ in range(5):
        rounds.append(per_call(lambda: permit.verify(tok, env, action, index), n))
    rounds.sort()
    us, alloc = rounds[len(rounds) // 2]
    base = sorted(per_call(lambda: key.mac(tok), n) for _ in range(5))[2]
    gc.collect()
    emit(
        {
            "verify_us": us,
            "verify_alloc": alloc,
            "hmac_us": base[0],
            "hmac_alloc": base[1],
            # live heap once garbage is collected: interpreter state, modules,
            # env and keys (micropython.mem_peak counts malloc calls, which a
            # GC heap never frees, so it is no measure of peak heap)
            "heap_live": gc.mem_alloc(),
            "heap_total": gc.mem_alloc() + gc.mem_free(),
        }
    )


main(sys.argv[1])
