# Runs on MicroPython: verify a batch of permits described in a JSON-lines
# file (argv[1]), one case per line, read one at a time so the heap holds one
# case, as a board holds one permit:
#   {"name": str, "env": {...vgenv form...}, "token": hex,
#    "action": int or null, "index": int or null}
# Emits {"name": ..., "reason": int, "claims": {...} or null}; claim maps are
# in wire.json_form (int keys as strings, bytes as hex).
import json
import sys
from binascii import unhexlify

import permit
import wire
from vgemit import emit
from vgenv import DictEnv


def main(path):
    with open(path) as f:
        while True:
            line = f.readline()
            if not line:
                break
            check(json.loads(line))


def check(case):
    env = DictEnv(case["env"])
    reason, claims = permit.verify(unhexlify(case["token"]), env, case.get("action"), case.get("index"))
    emit({"name": case["name"], "reason": reason, "claims": wire.json_form(claims) if claims is not None else None})


main(sys.argv[1])
