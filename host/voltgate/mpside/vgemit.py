# Runs on MicroPython: hand a result to the host runner (voltgate.mpy).
# One record per line: the ASCII record separator, then JSON.
import json
import sys


def emit(obj):
    sys.stdout.write("\x1e")
    sys.stdout.write(json.dumps(obj))
    sys.stdout.write("\n")
