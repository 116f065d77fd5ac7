# Runs on MicroPython and CPython: permit verification entry points for tests.
import json
from binascii import unhexlify

import permit
import wire
from vgenv import DictEnv


def verify(token_hex, env, action=None, index=None):
    reason, claims = permit.verify(unhexlify(token_hex), DictEnv(env), action, index)
    return {"reason": reason, "claims": wire.json_form(claims) if claims is not None else None}


def verify_many(tokens_hex, env, action=None, index=None):
    """One env, many tokens: for batched fuzzing. Only verdict codes come back."""
    e = DictEnv(env)
    out = []
    for t in tokens_hex:
        out.append(permit.verify(unhexlify(t), e, action, index)[0])
    return out


def run_vectors(path):
    with open(path) as f:
        cases = json.load(f)["cases"]
    out = []
    for c in cases:
        r = verify(c["token"], c["env"], c["action"], c["index"])
        r["name"] = c["name"]
        out.append(r)
    return out
