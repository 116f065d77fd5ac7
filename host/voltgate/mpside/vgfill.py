# Runs on MicroPython: boots the platform on the simulated hardware, as a
# board would, and appends outlet readings to its flash log, for the link
# tests and benchmarks that pull a full log (tests/test_mqtt_e2e.py,
# bench/mqtt_bench.py, bench/serial_bench.py). argv[1]: JSON {"board",
# "root", "store", "records", "rtype"}; rtype is wire.LOG_OUTLET_READING,
# passed in because the build folds wire's constants away. Reading i is
# [i & 1, 2000000, 230000, 8695] (outlet, mW, mV, mA: SPEC.md 9) at Unix
# time 1800000000 + i; its CBOR body is encoded once, not per record.
import json
import sys

import main
from system import System

with open(sys.argv[1]) as f:
    spec = json.load(f)
hw, board = main.boot_hw(spec["board"], spec["root"], "sim")
hw.store.provision(spec["store"])
p = System(hw, board)
b = bytearray(b"\x84\x00\x1a\x00\x1e\x84\x80\x1a\x00\x03\x82\x70\x19\x21\xf7")  # [0, 2000000, 230000, 8695]
rtype = spec["rtype"]
n = spec["records"]
i = 0
while i < n:
    b[1] = i & 1
    p.log.append(rtype, b, 1800000000 + i)
    i += 1
p.log.close()
