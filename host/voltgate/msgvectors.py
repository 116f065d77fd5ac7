"""Generate protocol/vectors/messages.json: the messages of SPEC.md section 3
as bytes, and the verdict a board gives each signed command.

    python -m voltgate.msgvectors            rewrite the file
    python -m voltgate.msgvectors --check    exit 1 if the file is not what this makes

Requests are built by voltgate.messages (cbor2, python-cwt); the board's
firmware/link.py must read them, and tests/test_msgvectors.py checks both
sides against this file. Everything is deterministic: fixed keys (the public
test master of voltgate.vectors), ids, counters and times.
"""

from __future__ import annotations

import sys

import cbor2

from . import messages, wire
from .vectors import DEVICE, NOW, OTHER, _key, generate

CTR = 1_000  # the counter the board accepted last, in the command cases


def _cmd(mtype, body, *, counter=CTR + 1, expires=NOW + 300, key=None, device=DEVICE, rid=7):
    return messages.command(mtype, body, key=key or _key(), key_version=1, device=device, counter=counter, rid=rid, expires=expires)


def build() -> dict:
    requests = [
        ("hello", messages.request(wire.MSG_HELLO, rid=1)),
        ("status", messages.request(wire.MSG_STATUS, rid=2)),
        ("get_log from 1", messages.request(wire.MSG_GET_LOG, [1], rid=3)),
        ("get_log from 120, at most 16", messages.request(wire.MSG_GET_LOG, [120, 16], rid=4)),
        ("ping", messages.request(wire.MSG_PING, b"\x01\x02", rid=5)),
        ("hello naming the device (serial link)", messages.request(wire.MSG_HELLO, rid=6, device=DEVICE)),
    ]
    cases = [
        ("ack", _cmd(wire.MSG_ACK, 120), wire.MSG_ACK, wire.OK),
        ("relay_off outlet 0", _cmd(wire.MSG_RELAY_OFF, 0), wire.MSG_RELAY_OFF, wire.OK),
        ("relay_off every outlet", _cmd(wire.MSG_RELAY_OFF, None), wire.MSG_RELAY_OFF, wire.OK),
        ("clear_fault", _cmd(wire.MSG_CLEAR_FAULT, 1), wire.MSG_CLEAR_FAULT, wire.OK),
        ("unlock slot 3", _cmd(wire.MSG_UNLOCK, 3), wire.MSG_UNLOCK, wire.OK),
        ("revoke a permit", _cmd(wire.MSG_REVOKE, {"cti": bytes(8), "exp": NOW + 3600}), wire.MSG_REVOKE, wire.OK),
        ("revoke a user", _cmd(wire.MSG_REVOKE, {"sub": "user-0042", "until": NOW + 86400}), wire.MSG_REVOKE, wire.OK),
        ("config", _cmd(wire.MSG_CONFIG, {"read_s": 60}), wire.MSG_CONFIG, wire.OK),
        ("alg 4 (64-bit tag)", messages.command(wire.MSG_ACK, 1, key=_key(), key_version=1, device=DEVICE, counter=CTR + 1, rid=7, expires=NOW + 300, alg=wire.ALG_HMAC256_64), wire.MSG_ACK, wire.OK),
        ("the counter accepted last: a replay", _cmd(wire.MSG_ACK, 120, counter=CTR), wire.MSG_ACK, wire.REPLAYED),
        ("an older counter", _cmd(wire.MSG_ACK, 120, counter=CTR - 500), wire.MSG_ACK, wire.REPLAYED),
        ("expired before the board's time floor", _cmd(wire.MSG_ACK, 120, expires=NOW - 1), wire.MSG_ACK, wire.EXPIRED),
        ("for another device", _cmd(wire.MSG_ACK, 120, device=OTHER), wire.MSG_ACK, wire.WRONG_AUDIENCE),
        ("under another device's key", _cmd(wire.MSG_ACK, 120, key=_key(OTHER)), wire.MSG_ACK, wire.BAD_MAC),
        ("inner type is not the outer type", _cmd(wire.MSG_RELAY_OFF, 0), wire.MSG_ACK, wire.MALFORMED),
    ]
    unsigned = cbor2.dumps({wire.ENV_TYPE: wire.MSG_ACK, wire.ENV_ID: 7, wire.ENV_BODY: 120})
    cases.append(("not signed", unsigned, wire.MSG_ACK, wire.BAD_MAC))
    out_cases = []
    for name, raw, outer, reason in cases:
        env = cbor2.loads(raw)
        env[wire.ENV_TYPE] = outer  # the mismatch case re-labels the outer envelope
        raw = cbor2.dumps(env)
        out_cases.append({"name": name, "request": raw.hex(), "reason": reason, "reason_name": wire.reason_name(reason)})
    return {
        "comment": "SPEC.md section 3. Command cases: a board whose device id is `device`, whose current key is "
        "`key` (kid 01), whose last accepted counter is `counter` and whose time floor is `floor` answers `reason`.",
        "device": DEVICE,
        "key": _key().hex(),
        "counter": CTR,
        "floor": NOW,
        "requests": [{"name": n, "request": r.hex(), "decoded": wire.json_form(cbor2.loads(r))} for n, r in requests],
        "commands": out_cases,
    }


def main(argv=None) -> int:
    return generate(argv, "voltgate.msgvectors", "messages.json", build, __doc__)


if __name__ == "__main__":
    sys.exit(main())
