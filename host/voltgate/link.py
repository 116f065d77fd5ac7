"""Talking to one board over any transport: request/response with ids,
timeouts and retries, and the operations written once above it.

A transport (voltgate.mqttlink.MqttTransport, voltgate.serlink.SerialTransport,
or anything with the same two methods) moves bytes:

    transport.send(device, payload)            # one request, as bytes
    transport.receive(device, timeout) -> bytes | None
                                               # the board's next message, None on timeout

Board (below) matches replies to requests by id, drops stale replies and
unsolicited messages it does not want (alarms go to on_alarm), resends
unsigned requests on timeout, and signs each attempt of a command afresh
(a new counter, or a new hello nonce for a time sync), so a command whose
reply was lost is never refused as a replay of itself.

    b = Board(transport, "ou-0001", key=k, key_version=1)
    b.hello(); b.get_log(1); b.ack(120); b.sync_time(); b.command(wire.MSG_RELAY_OFF, 0)
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from typing import Any, Callable, Protocol

from . import messages, wire
from .messages import BoardError, MessageError


class Transport(Protocol):
    def send(self, device: str, payload: bytes) -> None: ...

    def receive(self, device: str, timeout: float) -> bytes | None: ...


class LinkTimeout(Exception):
    """The board did not answer within the timeout, after every retry."""


# request ids: from a random start, so that two server processes do not
# take each other's replies for their own
_rids = itertools.count(random.SystemRandom().getrandbits(31))
_locks: dict = {}
_locks_guard = threading.Lock()


def _device_lock(transport, device) -> threading.RLock:
    """One exchange at a time per (transport, device) in this process: two
    Board objects for one board (a puller and a one-off command) would
    otherwise take each other's replies off the same queue."""
    with _locks_guard:
        return _locks.setdefault((id(transport), device), threading.RLock())


class Board:
    def __init__(
        self,
        transport: Transport,
        device: str,
        *,
        key: bytes | None = None,
        key_version: int = 1,
        timeout: float = 2.0,
        retries: int = 3,
        counter: messages.Counter | None = None,
        on_alarm: Callable[[messages.Reply], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.t = transport
        self.device = device
        self.key = key
        self.key_version = key_version
        self.timeout = timeout
        self.retries = retries
        self.counter = counter or messages.Counter()
        self.on_alarm = on_alarm
        self.clock = clock  # the server's time: command expiries and time syncs
        self.stats = {"sent": 0, "timeouts": 0, "stale": 0, "bad": 0}

    # -- the request/response core

    def _exchange(self, make: Callable[[int], bytes], mtype: int, once: bool = False) -> Any:
        """Send make(rid) and wait for its reply, resending on timeout.
        once: make the request once and resend the same bytes (a signed
        command: a retry must not be a second command)."""
        with _device_lock(self.t, self.device):
            return self._exchange_locked(make, mtype, once)

    def _exchange_locked(self, make, mtype, once):
        last: Exception | None = None
        payload = None
        rid = 0
        for _ in range(self.retries + 1):
            if payload is None or not once:
                rid = next(_rids) & 0xFFFFFFFF
                payload = make(rid)
            self.t.send(self.device, payload)
            self.stats["sent"] += 1
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stats["timeouts"] += 1
                    last = LinkTimeout(f"{self.device}: no answer to {messages.NAMES.get(mtype, mtype)} within {self.timeout} s")
                    break
                raw = self.t.receive(self.device, left)
                if raw is None:
                    continue
                try:
                    reply = messages.parse(raw)
                except MessageError:
                    self.stats["bad"] += 1
                    continue
                if reply.type == wire.MSG_ALARM:
                    if self.on_alarm is not None:
                        self.on_alarm(reply)
                    continue
                if reply.id != rid:
                    self.stats["stale"] += 1  # the answer to an earlier attempt
                    continue
                return messages.body_of(reply, mtype)
        assert last is not None
        raise last

    def call(self, mtype: int, body: Any = None) -> Any:
        """An unsigned request; its reply body."""
        return self._exchange(lambda rid: messages.request(mtype, body, rid=rid), mtype)

    def command(self, mtype: int, body: Any = None) -> Any:
        """A signed command (ack, revoke, relay_off, unlock, clear_fault,
        config); its reply body. Every retry resends the same token, which
        the board answers with the reply it gave (it never runs twice). A
        refusal as replayed means this server's counter is behind the
        board's (another server, a lost database): it moves above the
        board's and signs once more."""
        if self.key is None:
            raise ValueError(f"{self.device}: a signed command needs the device key")

        def make(rid):
            return messages.command(
                mtype,
                body,
                key=self.key,
                key_version=self.key_version,
                device=self.device,
                counter=self.counter.next(),
                rid=rid,
                expires=int(self.clock()) + messages.COMMAND_TTL_S,
            )

        try:
            return self._exchange(make, mtype, once=True)
        except BoardError as e:
            if e.reason != wire.REPLAYED:
                raise
            self.counter.raise_to(self.hello()["ctr"])
            return self._exchange(make, mtype, once=True)

    # -- the operations

    def hello(self) -> dict:
        return self.call(wire.MSG_HELLO)

    def status(self) -> dict:
        return self.call(wire.MSG_STATUS)

    def ping(self, data: Any = None) -> Any:
        return self.call(wire.MSG_PING, data)

    def get_log(self, from_seq: int, max_records: int = 64) -> messages.Batch:
        return messages.log_batch_body(self.call(wire.MSG_GET_LOG, [from_seq, max_records]))

    def ack(self, upto_seq: int) -> int:
        return self.command(wire.MSG_ACK, upto_seq)

    def present(self, token: bytes, index: int | None = None) -> list:
        return self.call(wire.MSG_PRESENT, token if index is None else [token, index])

    def sync_time(self, now: int | None = None) -> int:
        """Set the board's clock: a hello for its nonce, then the signed
        answer (each attempt with a fresh nonce)."""
        if self.key is None:
            raise ValueError(f"{self.device}: a time sync needs the device key")

        def make(rid):
            nonce = self.hello()["nonce"]
            t = int(self.clock()) if now is None else now
            return messages.time_sync(t, nonce, key=self.key, key_version=self.key_version, rid=rid)

        try:
            return self._exchange(make, wire.MSG_TIME_SYNC)
        except BoardError as e:
            if e.reason != wire.REPLAYED:
                raise
            return self._exchange(make, wire.MSG_TIME_SYNC)  # its nonce went stale (two more hellos): once more
