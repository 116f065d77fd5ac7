# Runs on MicroPython (the unix port or the 32-bit webassembly port): import
# the given firmware modules in order and report the heap they hold
# (code + module-level data), after a collection, as one JSON line.
# Module names: MODULES (set by the caller before this runs) or argv[1]
# as a comma-separated list.
import gc
import json
import sys

# The interpreter's own modules are not the firmware's, and the two ports
# build some of them differently (asyncio, os): loaded before the count.
for name in ("array", "asyncio", "binascii", "errno", "hashlib", "math", "micropython", "os", "random", "select", "struct", "time"):
    __import__(name)

try:
    names = MODULES  # noqa: F821 (the webassembly driver sets it)
except NameError:
    names = sys.argv[1].split(",")
gc.collect()
base = gc.mem_alloc()
for name in names:
    __import__(name)
gc.collect()
print(json.dumps({"held": gc.mem_alloc() - base, "modules": len(names)}))
