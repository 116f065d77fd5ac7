# Runs on MicroPython: hand a result to the host runner (voltgate.mpy).
# One record per line: the ASCII record separator, then JSON.
import json
import sys


def emit(obj):
    # the line is built before any of it is written: a MemoryError (a run at
    # the edge of its heap) leaves no half record behind
    line = json.dumps(obj)
    sys.stdout.write("\x1e")
    sys.stdout.write(line)
    sys.stdout.write("\n")
