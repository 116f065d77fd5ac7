# Runs on MicroPython: verify a batch of permits described in a JSON file
# (argv[1]) and emit one verdict per case. File format:
#   {"cases": [{"name": str, "env": {...vgenv form...}, "token": hex,
#               "action": int or null, "index": int or null}, ...]}
# Emits {"name": ..., "reason": int, "claims": {...} or null}; claim maps are
# made JSON-able (int keys as strings, bytes as hex).
import json
import sys
from binascii import hexlify, unhexlify

import permit
from vgemit import emit
from vgenv import DictEnv


def jsonable(v):
    if isinstance(v, dict):
        out = {}
        for k in v:
            out[str(k)] = jsonable(v[k])
        return out
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return hexlify(v).decode()
    return v


def main(path):
    with open(path) as f:
        spec = json.load(f)
    for case in spec["cases"]:
        env = DictEnv(case["env"])
        reason, claims = permit.verify(unhexlify(case["token"]), env, case.get("action"), case.get("index"))
        emit({"name": case["name"], "reason": reason, "claims": jsonable(claims) if claims is not None else None})


main(sys.argv[1])
