"""A technician's session with one board over its serial line or through
the MQTT broker: the transport, the device key, and a log store that is a
JSON-lines file.

    with Session.open(Target(port="/dev/ttyUSB0", keystore="~/.voltgate/master.key")) as s:
        s.board.hello(); s.board.sync_time()
        sync.pull(s.board, JsonlStore("ou-1.jsonl"), ack=False)

Errors a technician can act on come out as VoltgateError (no answer, a
refusal with its reason, a missing key).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import keys, messages, wire
from .errors import EXIT_ENVIRONMENT, EXIT_FAILURE, EXIT_USAGE, VoltgateError
from .link import Board, LinkTimeout


@dataclass
class Target:
    port: str | None = None  # serial device, pty path or socket://host:port
    mqtt: str | None = None  # HOST:PORT of the broker
    broker_user: str = "voltgate-server"
    broker_password_file: str = "broker/server-password"
    site: str | None = None
    device: str | None = None  # needed on MQTT; on serial the board says who it is
    keystore: str | None = None
    key_version: int | None = None
    db: str | None = None  # the registry, for the key version and the site
    timeout: float = 3.0


class Session:
    def __init__(self, board: Board, transport, target: Target):
        self.board = board
        self.transport = transport
        self.target = target

    @classmethod
    def open(cls, t: Target) -> Session:
        if (t.port is None) == (t.mqtt is None):
            raise VoltgateError("which board?", "give --port PORT (serial) or --mqtt HOST:PORT with --device ID", EXIT_USAGE)
        reg = _registry(t.db, t.device) if t.device and t.db else None
        if t.port is not None:
            from .serlink import SerialTransport

            tr = SerialTransport(t.port)
            device = t.device
            if device is None:
                probe = Board(tr, "?", timeout=t.timeout, retries=1)
                device = _call(probe.hello, t)["dev"]
                reg = _registry(t.db, device) if t.db else None
        else:
            if not t.device:
                raise VoltgateError("on MQTT the device must be named", "give --device ID", EXIT_USAGE)
            from .mqttlink import MqttTransport
            from .server.bootstrap import _password, host_port

            host, port = host_port(t.mqtt, "--mqtt")
            site = t.site or (reg or {}).get("site")
            tr = MqttTransport(host, port, t.broker_user, _password(t.broker_password_file), site_of={t.device: site} if site else None)
            tr.connect()
            if not site and not tr.wait_state(t.device, True, t.timeout):
                tr.close()
                raise VoltgateError(f"{t.device} has not said it is online on the broker", "is it powered and connected? give --site if it is", EXIT_ENVIRONMENT)
            device = t.device
        version = t.key_version or (reg or {}).get("key_version") or 1
        key = None
        if t.keystore:
            key = keys.derive_device_key(keys.load_master(Path(t.keystore).expanduser()), device, version)
        board = Board(tr, device, key=key, key_version=version, timeout=t.timeout)
        return cls(board, tr, t)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def need_key(self, what: str) -> None:
        if self.board.key is None:
            raise VoltgateError(f"{what} is signed with the device key", "give --keystore FILE (or set VOLTGATE_KEYSTORE)", EXIT_USAGE)

    def call(self, fn, *args, **kw):
        """fn(*args, **kw) on the board, with a link failure as a VoltgateError."""
        return _call(lambda: fn(*args, **kw), self.target)


def _call(fn, t: Target):
    try:
        return fn()
    except LinkTimeout as e:
        where = t.port or f"the broker at {t.mqtt}"
        raise VoltgateError(
            f"no answer from the board on {where} ({e})",
            "is its firmware running? a board that mpremote left in the REPL needs a reset (mpremote reset)",
            EXIT_ENVIRONMENT,
        ) from None
    except messages.BoardError as e:
        name = wire.reason_name(e.reason)
        hint = {
            "unknown_key": "the key version differs: give --key-version (or --db for the registry's)",
            "bad_mac": "the keystore is not the one this board was provisioned from",
            "wrong_audience": "the board has another device id: check --device",
            "replayed": "run it again (a fresh counter is signed)",
        }.get(name)
        raise VoltgateError(f"the board refused it: {name}" + (f" ({e.text})" if getattr(e, "text", None) else ""), hint, EXIT_FAILURE) from None


def _registry(url: str | None, device: str | None) -> dict | None:
    if not device:
        return None
    from .provision import _registry_get

    return _registry_get(url, device)


class JsonlStore:
    """sync.pull's store as a JSON-lines file: one line per record
    {"device", "epoch", "seq", "ts", "type", "body"} (body in JSON form:
    byte strings as hex), gaps as {"device", "gap": [first, last],
    "thinned"}. Records already in the file are not written again, and a
    pull goes on from the last record the file holds for the device."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._seen: set[tuple[str, int, int]] = set()
        self._pos: dict[str, tuple[int, int]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line
                if "seq" in r:
                    self._seen.add((r["device"], r["epoch"], r["seq"]))
                    self._pos[r["device"]] = (r["seq"], r["epoch"])

    def _append(self, rows: Iterable[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if text:
            with open(self.path, "a") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

    def add(self, device: str, records, position: tuple[int, int] | None = None) -> int:
        rows = []
        for r in records:
            k = (device, r.epoch, r.seq)
            if k in self._seen:
                continue
            self._seen.add(k)
            rows.append({"device": device, "epoch": r.epoch, "seq": r.seq, "ts": r.ts, "type": r.type, "body": wire.json_form(r.body)})
        self._append(rows)
        if position is not None:
            self._pos[device] = position
        return len(rows)

    def add_gap(self, device: str, first: int, last: int, thinned: int) -> None:
        self._append([{"device": device, "gap": [first, last], "thinned": thinned}])

    def position(self, device: str):
        return self._pos.get(device)

    def count(self, device: str | None = None) -> int:
        return sum(1 for d, _, _ in self._seen if device is None or d == device)
