# Runs on MicroPython: a request/response loop for the host (voltgate.mpy.Worker).
# argv[1] names the module whose functions may be called. Each request is one
# JSON line {"f": name, "a": [args]}; each reply one line: the ASCII record
# separator, then JSON, either {"r": result} or {"x": exception type,
# "m": message, "tb": traceback}. Other lines are the firmware's console
# output (print, tracebacks), which the host keeps but does not parse.
import io
import json
import sys

target = __import__(sys.argv[1])


def reply(obj):
    text = json.dumps(obj)  # before writing anything: it may raise MemoryError
    sys.stdout.write("\x1e")
    sys.stdout.write(text)
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
