# Runs on MicroPython: a request/response loop for the host (voltgate.mpy.Worker).
# argv[1] names the module whose functions may be called. Each request is one
# JSON line {"f": name, "a": [args]}; each reply one JSON line, either
# {"r": result} or {"x": exception type, "m": message, "tb": traceback}.
import io
import json
import sys

target = __import__(sys.argv[1])


def reply(obj):
    sys.stdout.write(json.dumps(obj))
    sys.stdout.write("\n")


while True:
    line = sys.stdin.readline()
    if not line:
        break
    req = json.loads(line)
    try:
        res = getattr(target, req["f"])(*req["a"])
        reply({"r": res})
    except Exception as e:
        buf = io.StringIO()
        sys.print_exception(e, buf)
        reply({"x": type(e).__name__, "m": str(e), "tb": buf.getvalue()})
