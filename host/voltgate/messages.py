"""The request/response messages of protocol/SPEC.md section 3, host side:
building requests (signed ones through commands.sign), reading replies and
log batches. Transports (voltgate.link) carry the bytes; this module does
no I/O.

    req = messages.request(wire.MSG_HELLO, rid=7)
    cmd = messages.command(wire.MSG_ACK, 120, key=k, key_version=1, device="ou-1",
                           counter=counters.next(), rid=8)
    reply = messages.parse(raw)          # Reply(type, id, body, reason)
    batch = messages.log_batch(reply)    # Batch(next_seq, records)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import cbor2

from . import commands, wire

#: requests that change a board: signed, with a counter and an expiry
SIGNED = frozenset(
    {wire.MSG_ACK, wire.MSG_TIME_SYNC, wire.MSG_REVOKE, wire.MSG_RELAY_OFF, wire.MSG_UNLOCK, wire.MSG_CLEAR_FAULT, wire.MSG_CONFIG}
)
#: how long a signed command stays valid by default (seconds after it is made)
COMMAND_TTL_S = 300

NAMES = {
    wire.MSG_HELLO: "hello",
    wire.MSG_STATUS: "status",
    wire.MSG_GET_LOG: "get_log",
    wire.MSG_ACK: "ack",
    wire.MSG_TIME_SYNC: "time_sync",
    wire.MSG_REVOKE: "revoke",
    wire.MSG_RELAY_OFF: "relay_off",
    wire.MSG_UNLOCK: "unlock",
    wire.MSG_CLEAR_FAULT: "clear_fault",
    wire.MSG_CONFIG: "config",
    wire.MSG_PING: "ping",
    wire.MSG_PRESENT: "present",
}


class MessageError(ValueError):
    """Bytes that are not a message of SPEC.md section 3."""


class BoardError(Exception):
    """A board's error reply: reason is a wire reason code."""

    def __init__(self, reason: int, text: str | None = None):
        self.reason = reason
        self.text = text
        super().__init__(f"{wire.reason_name(reason)}" + (f": {text}" if text else ""))


@dataclass(frozen=True)
class Reply:
    type: int
    id: int | None
    body: Any = None
    reason: int | None = None

    @property
    def is_error(self) -> bool:
        return self.type == wire.MSG_ERROR


@dataclass(frozen=True)
class Record:
    epoch: int
    seq: int
    ts: int
    type: int
    body: Any


@dataclass(frozen=True)
class Batch:
    next_seq: int  # the board's next seq to be written
    records: list[Record]


def request(mtype: int, body: Any = None, *, rid: int | None = None, device: str | None = None) -> bytes:
    """An unsigned request (hello, status, get_log, ping, present)."""
    if mtype in SIGNED:
        raise ValueError(f"{NAMES.get(mtype, mtype)} is a signed command: use command()")
    env: dict = {wire.ENV_TYPE: mtype}
    if rid is not None:
        env[wire.ENV_ID] = rid
    if device is not None:
        env[wire.ENV_DEVICE] = device
    if body is not None:
        env[wire.ENV_BODY] = body
    return cbor2.dumps(env)


def command(
    mtype: int,
    body: Any,
    *,
    key: bytes,
    key_version: int,
    device: str,
    counter: int,
    rid: int | None = None,
    expires: int | None = None,
    alg: int = wire.ALG_HMAC256_256,
) -> bytes:
    """A signed command: the envelope {type, id, body: COSE_Mac0} whose MAC
    covers {type, device, body, counter, exp}. Time sync has its own
    builder (time_sync), since it answers a nonce instead of a counter."""
    if mtype not in SIGNED or mtype == wire.MSG_TIME_SYNC:
        raise ValueError(f"{NAMES.get(mtype, mtype)} is not a counter-signed command")
    if expires is None:
        expires = int(time.time()) + COMMAND_TTL_S
    inner = {wire.ENV_TYPE: mtype, wire.ENV_DEVICE: device, wire.ENV_COUNTER: counter, wire.ENV_EXP: expires}
    if body is not None:
        inner[wire.ENV_BODY] = body
    token = commands.sign(inner, key, key_version, alg)
    return _outer(mtype, token, rid)


def time_sync(now: int, nonce: bytes, *, key: bytes, key_version: int, rid: int | None = None) -> bytes:
    """The answer to the nonce of a board's hello."""
    return _outer(wire.MSG_TIME_SYNC, commands.time_sync(now, nonce, key, key_version), rid)


def _outer(mtype: int, token: bytes, rid: int | None) -> bytes:
    env: dict = {wire.ENV_TYPE: mtype, wire.ENV_BODY: token}
    if rid is not None:
        env[wire.ENV_ID] = rid
    return cbor2.dumps(env)


def parse(raw: bytes) -> Reply:
    """A board's message (reply, error, alarm, state) from its bytes."""
    try:
        env = cbor2.loads(raw)
    except (cbor2.CBORDecodeError, ValueError, TypeError, EOFError) as e:
        raise MessageError(f"not CBOR: {e}") from None
    if not isinstance(env, dict) or not isinstance(env.get(wire.ENV_TYPE), int):
        raise MessageError("not a message envelope")
    return Reply(env[wire.ENV_TYPE], env.get(wire.ENV_ID), env.get(wire.ENV_BODY), env.get(wire.ENV_REASON))


def body_of(reply: Reply, request_type: int) -> Any:
    """The body of a reply to request_type; raises BoardError for an error
    reply and MessageError for a reply of another type."""
    if reply.is_error:
        raise BoardError(reply.reason if isinstance(reply.reason, int) else wire.MALFORMED, reply.body if isinstance(reply.body, str) else None)
    if reply.type != wire.MSG_REPLY + request_type:
        raise MessageError(f"expected a reply to {NAMES.get(request_type, request_type)}, got type {reply.type}")
    return reply.body


def log_batch(reply: Reply) -> Batch:
    """The records of a get_log reply: body [next_seq, run...], run =
    [epoch, record...], record = [seq, ts, type, body]."""
    return log_batch_body(body_of(reply, wire.MSG_GET_LOG))


def log_batch_body(body: Any) -> Batch:
    """log_batch() of a get_log reply's body, already taken from its reply."""
    if not isinstance(body, list) or not body or not isinstance(body[0], int):
        raise MessageError("log batch without next_seq")
    out = []
    for run in body[1:]:
        if not isinstance(run, list) or not run or not isinstance(run[0], int):
            raise MessageError("log batch run without epoch")
        for r in run[1:]:
            if not (isinstance(r, list) and len(r) == 4 and all(isinstance(x, int) for x in r[:3])):
                raise MessageError("log record is not [seq, ts, type, body]")
            out.append(Record(run[0], r[0], r[1], r[2], r[3]))
    return Batch(body[0], out)


class Counter:
    """Command counters for one server: strictly increasing, and above any
    counter another server process may have used before, since each is
    the time in microseconds (or one more than the last). A board accepts
    only a counter above the last it accepted; after a refusal as
    replayed, raise_to(board's hello "ctr") and sign again."""

    def __init__(self):
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns() // 1000)
            return self._last

    def raise_to(self, seen: int) -> None:
        with self._lock:
            self._last = max(self._last, seen)
