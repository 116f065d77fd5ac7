"""The boards' side of the server: the MQTT gateway (DESIGN.md, Links and
Management server; entrypoint layer).

One Gateway is one MQTT connection (voltgate.mqttlink.MqttTransport, as a
server account of the broker) and one pull scheduler (voltgate.sync.Puller)
over the registry's enabled devices (models.Device: the site names the
topics, key_version picks the device key derived from the master secret).
It

- pulls each board every interval, when it comes online (its retained
  state), when it raises an alarm, and on demand (pull_now), into
  store.ServerRecordStore (records stored and booked once);
- keeps the registry's view of the board: online, last_seen, and from
  every hello its firmware version and boot epoch;
- after a pull, syncs the clock of a board that does not trust its own
  (a signed time sync answering its nonce), then sends the board's queued
  models.PendingCommand rows in order, signed under its key, recording
  done_at and the board's answer (wire.OK or its refusal reason); a command
  the board did not answer stays queued for the next pull;
- reloads the registry every `refresh` seconds (new, removed and disabled
  devices; boards with queued commands are pulled then).

Several server processes may run gateways against one PostgreSQL and one
broker, each under its own broker account (the broker forces client id =
user name). Nothing here is owned by one process: records are stored once
whoever pulls them (ServerRecordStore), a board's oldest queued command is
locked (SELECT ... FOR UPDATE NOWAIT) while one process sends it, and a
process that finds it locked leaves that board's commands to the other, so
each goes once and in order (on PostgreSQL; a single SQLite server sends
each once by itself), and command counters are the
time in microseconds (messages.Counter), so processes need no shared
counter. Every process subscribes to every board's replies and drops those
to requests it did not make (link.Board matches request ids).

    gw = Gateway(db.sessions(db.engine(url)), master, host="127.0.0.1", port=1883,
                 user="voltgate-server", password=pw, interval=300)
    with gw:            # start(): connect, load the registry, schedule pulls
        ...             # stop() on leaving
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .. import keys, link, messages, sync, wire
from ..messages import BoardError, MessageError
from ..mqttlink import MqttTransport
from . import db
from .models import Device, PendingCommand
from .store import ServerRecordStore

log = logging.getLogger(__name__)

REFRESH_S = 30.0
_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL: FOR UPDATE NOWAIT found the row locked


@dataclass(frozen=True)
class _Dev:
    site: str
    key_version: int


def json_to_cbor(value: Any) -> Any:
    """A PendingCommand body in its JSON form back to the CBOR value the
    board wants: {"hex": "..."} is bytes, everything else as it is."""
    if isinstance(value, dict):
        if set(value) == {"hex"} and isinstance(value["hex"], str):
            return bytes.fromhex(value["hex"])
        return {k: json_to_cbor(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_to_cbor(v) for v in value]
    return value


class BoardOffline(Exception):
    """The board's retained state says offline: no pull is tried."""


class _Board(link.Board):
    """link.Board that tells the gateway what every hello said."""

    def __init__(self, on_hello: Callable[[str, dict], None], *a, **kw):
        super().__init__(*a, **kw)
        self._on_hello = on_hello

    def hello(self) -> dict:
        h = super().hello()
        self._on_hello(self.device, h)
        return h


class Gateway:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        master: bytes,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        user: str = "voltgate-server",
        password: str = "",
        interval: float = 300.0,
        refresh: float = REFRESH_S,
        workers: int = 4,
        timeout: float = 2.0,
        retries: int = 3,
        sync_clocks: bool = True,
        tls: dict | None = None,
        store: ServerRecordStore | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self._factory = session_factory
        self._master = master
        self.store = store or ServerRecordStore(session_factory)
        self.refresh_s = refresh
        self.timeout, self.retries = timeout, retries
        self.sync_clocks = sync_clocks
        self._clock = clock
        self._dialect = session_factory.kw["bind"].dialect.name
        self._devices: dict[str, _Dev] = {}
        self._hellos: dict[str, dict] = {}  # device -> its latest hello
        self._keys: dict[tuple[str, int], bytes] = {}
        self._lock = threading.Lock()
        self.transport = MqttTransport(host, port, user, password, site_of=self._site_of, on_state=self._on_state, tls=tls)
        self.puller = sync.Puller(self._board_for, self.store, interval=interval, report=self._report, workers=workers)
        self._states: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        # "new" and "received": of the pulls that ended well (store.stored counts every record stored)
        self.stats = {"pulls": 0, "failed_pulls": 0, "new": 0, "received": 0, "commands": 0, "time_syncs": 0}

    # -- life cycle

    def start(self) -> Gateway:
        """Load the registry, connect to the broker (VoltgateError when it is
        unreachable or refuses the account), then schedule pulls: boards whose
        retained state says online are pulled at once."""
        self.refresh()
        self.transport.connect()  # closes itself when it fails
        self.puller.start()
        for target, name in ((self._state_writer, "voltgate-states"), (self._refresher, "voltgate-registry")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._started = True
        return self

    def stop(self) -> None:
        """Stop scheduling, let the pulls under way end (their timeouts bound
        them), write the last state changes, disconnect."""
        if not self._started:
            return
        self._started = False
        self._stopping.set()
        self.puller.stop()
        self._states.put(None)
        for t in self._threads:
            t.join()
        self.transport.close()

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the registry

    def refresh(self) -> None:
        """Reload the devices: the enabled ones, and disabled ones with queued
        commands (a disabled board is still powered in the field: its
        revocations must reach it); pull those with queued commands."""
        with self._factory() as s:
            waiting = set(s.scalars(select(PendingCommand.device_id).where(PendingCommand.done_at.is_(None)).distinct()))
            rows = s.execute(
                select(Device.id, Device.site_id, Device.key_version).where(Device.enabled.is_(True) | Device.id.in_(waiting))
            ).all()
        devices = {d: _Dev(site, ver) for d, site, ver in rows}
        with self._lock:
            gone = set(self._devices) - set(devices)
            added = set(devices) - set(self._devices)
            self._devices = devices
        for d in gone:
            self.puller.remove(d)
        for d in added:
            # a new board that is online now is pulled at once; the others after an interval
            self.puller.add(d, now=self.transport.online.get(d, False))
        for d in waiting & set(devices):
            self.puller.pull_now(d)

    @property
    def devices(self) -> list[str]:
        with self._lock:
            return sorted(self._devices)

    def _site_of(self, device: str) -> str | None:
        with self._lock:
            d = self._devices.get(device)
        return d.site if d else None

    def key_of(self, device: str) -> tuple[bytes, int]:
        with self._lock:
            d = self._devices.get(device)
        if d is None:
            raise KeyError(f"{device} is not an enabled device of the registry")
        k = self._keys.get((device, d.key_version))
        if k is None:
            k = self._keys[(device, d.key_version)] = keys.derive_device_key(self._master, device, d.key_version)
        return k, d.key_version

    def pull_now(self, device: str) -> None:
        self.puller.pull_now(device)

    # -- the link

    def board(self, device: str) -> _Board:
        key, version = self.key_of(device)
        return _Board(
            self._hello,
            self.transport,
            device,
            key=key,
            key_version=version,
            timeout=self.timeout,
            retries=self.retries,
            on_alarm=lambda reply, d=device: self.puller.pull_now(d),  # the alarm's record comes with the log
            clock=self._clock,
        )

    def _board_for(self, device: str) -> _Board:
        if self.transport.online.get(device) is False:
            raise BoardOffline(f"{device} is offline (its last will)")
        return self.board(device)

    def _on_state(self, device: str, online: bool) -> None:
        # paho's network thread: schedule, never block
        if self._site_of(device) is None:
            return
        self._states.put((device, online, int(self._clock())))
        self.puller.on_state(device, online)

    def hello_of(self, device: str) -> dict | None:
        """The latest hello the device answered to this gateway, or None."""
        return self._hellos.get(device)

    def _hello(self, device: str, h: dict) -> None:
        self._hellos[device] = h
        fw, epoch = h.get("fw"), h.get("epoch")
        values: dict = {"online": True, "last_seen": int(self._clock())}
        if isinstance(fw, str):
            values["fw_version"] = fw[:32]
        if isinstance(epoch, int):
            values["epoch"] = epoch
        with db.transaction(self._factory) as s:
            s.execute(update(Device).where(Device.id == device).values(**values))

    def _state_writer(self) -> None:
        while True:
            item = self._states.get()
            if item is None:
                return
            device, online, t = item
            try:
                with db.transaction(self._factory) as s:
                    values = {"online": online, **({"last_seen": t} if online else {})}
                    s.execute(update(Device).where(Device.id == device).values(**values))
            except Exception:
                log.exception("gateway: could not record that %s is %s", device, "online" if online else "offline")

    def _refresher(self) -> None:
        while not self._stopping.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:
                log.exception("gateway: could not reload the registry")

    # -- after each pull (a Puller worker, while no other pull of this board runs here)

    def _report(self, device: str, result: sync.PullResult | None, error: Exception | None) -> None:
        self.stats["pulls"] += 1
        if error is not None:
            self.stats["failed_pulls"] += 1
            if isinstance(error, BoardOffline):
                log.debug("pull %s: %s", device, error)
            else:
                log.warning("pull %s: %s", device, error)
            return
        self.stats["new"] += result.new
        self.stats["received"] += result.received
        log.info(
            "pulled %s: %d new of %d received, acked %d%s",
            device,
            result.new,
            result.received,
            result.acked,
            f", gaps {result.gaps}" if result.gaps else "",
        )
        try:
            b = self.board(device)
            clock = self._hellos.get(device, {}).get("clock")  # as the pull's hello found it
            if self.sync_clocks and isinstance(clock, list) and clock and not clock[0]:
                b.sync_time()
                self.stats["time_syncs"] += 1
                log.info("synced the clock of %s", device)
            self.send_pending(device, b)
        except KeyError:
            pass  # left the registry meanwhile
        except Exception as e:  # reported, never lost in the pool; the next pull tries again
            log.warning("commands for %s: %s", device, e)

    def send_pending(self, device: str, board: link.Board | None = None) -> int:
        """Send the device's queued commands, oldest first; how many it
        answered. Stops at the first one it does not answer (it is away)."""
        board = board or self.board(device)
        sent = 0
        while not self._stopping.is_set():
            if self._send_one(device, board) is None:
                break
            sent += 1
        return sent

    def _send_one(self, device: str, board: link.Board) -> int | None:
        """Send the oldest queued command: its result, or None when there is
        none (for this process) or the board did not answer."""
        q = select(PendingCommand).where(PendingCommand.device_id == device, PendingCommand.done_at.is_(None))
        q = q.order_by(PendingCommand.id).limit(1)
        if self._dialect == "postgresql":
            # the oldest is locked while it is sent; locked already, another
            # server process is sending this board's commands: leave them to it,
            # in order
            try:
                with db.transaction(self._factory) as s:
                    cmd = s.scalars(q.with_for_update(nowait=True)).first()
                    if cmd is None:
                        return None
                    result = self._deliver(device, board, cmd)
                    if result is not None:
                        cmd.done_at, cmd.result = int(self._clock()), result
            except OperationalError as e:
                if getattr(e.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                    raise
                return None
        else:
            # one SQLite server: no write lock held across the link
            with self._factory() as s:
                cmd = s.scalars(q).first()
            if cmd is None:
                return None
            result = self._deliver(device, board, cmd)
            if result is not None:
                with db.transaction(self._factory) as s:
                    done = update(PendingCommand).where(PendingCommand.id == cmd.id, PendingCommand.done_at.is_(None))
                    s.execute(done.values(done_at=int(self._clock()), result=result))
        if result is not None:
            self.stats["commands"] += 1
            log.info("command %d (%s) for %s: %s", cmd.id, messages.NAMES.get(cmd.type, cmd.type), device, wire.reason_name(result))
        return result

    def _deliver(self, device: str, board: link.Board, cmd: PendingCommand) -> int | None:
        try:
            return self._exchange(board, cmd.type, json_to_cbor(cmd.body))
        except (link.LinkTimeout, MessageError) as e:
            log.info("command %d (%s) for %s not delivered: %s", cmd.id, messages.NAMES.get(cmd.type, cmd.type), device, e)
            return None

    @staticmethod
    def _exchange(board: link.Board, ctype: int, body: Any) -> int:
        """Send one command; wire.OK or the board's refusal reason."""
        try:
            if ctype == wire.MSG_TIME_SYNC:
                board.sync_time(body if isinstance(body, int) else None)
            elif ctype in messages.SIGNED:
                board.command(ctype, body)
            else:
                board.call(ctype, body)
        except BoardError as e:
            return e.reason
        return wire.OK
