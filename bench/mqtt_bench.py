"""MQTT pull throughput (shared/DESIGN.md, Budgets: the server ingests pulled
batches over MQTT at a rate reported as a ratio to the broker's own raw
publish rate, measured in the same run).

measure() starts a private Mosquitto, a simulated outlet in real time
(host/voltgate/mpside/vgsim.py on the .mpy build, speed 1, so the board's
own poll interval applies) whose flash log the firmware's log module has
filled with readings, and pulls it with voltgate.sync.pull over
voltgate.mqttlink; then, through the same broker, paho-mqtt publishes
messages of the same size as the log batches at QoS 1 (pipelined, and in
lock step: one reply awaited per request, as a pull works).

    python bench/mqtt_bench.py [--firmware build/firmware] [--records 5000]

bench/run.py may call measure() and put the figures in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from voltgate import build, keys, link, mpy, sync, tree, wire
from voltgate.broker import SERVER_USER, Broker, BrokerConfig, up
from voltgate.mqttlink import MqttTransport

SITE = "bench"
DEVICE = "ou-bench-1"
KEY = keys.derive_device_key(b"bench master secret, not a secret", DEVICE, 1)
SERVER_PW = "bench-server-pw"
HEAP = 256 * 1024  # the simulated board with a full log (the platform, not the link, needs it)


def _varint_len(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def publish_overhead(topic: str, payload: int) -> int:
    """Bytes an MQTT 3.1.1 QoS 1 PUBLISH adds to its payload: fixed header,
    topic and packet id (each hop; the PUBACK is 4 bytes more)."""
    rem = 2 + len(topic) + 2 + payload
    return 1 + _varint_len(rem) + 2 + len(topic) + 2


class _Counting:
    """A transport that counts the payload bytes of what the board sends."""

    def __init__(self, t: MqttTransport):
        self.t = t
        self.bytes = 0
        self.sizes: list[int] = []

    def send(self, device, payload):
        self.t.send(device, payload)

    def receive(self, device, timeout):
        raw = self.t.receive(device, timeout)
        if raw is not None:
            self.bytes += len(raw)
            self.sizes.append(len(raw))
        return raw


def _raw_rates(b: Broker, size: int, n: int) -> dict:
    """paho publishing n messages of size bytes at QoS 1 from the board's
    account to the server's, pipelined; then request/reply in lock step."""
    got: queue.Queue = queue.Queue()

    def client(user, pw, **cb):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv311)
        c.username_pw_set(user, pw)
        c.max_inflight_messages_set(100)
        c.on_socket_open = lambda cl, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connected = threading.Event()
        c.on_connect = lambda cl, u, f, rc, p: connected.set()
        for k, v in cb.items():
            setattr(c, k, v)
        c.connect(b.host, b.port)
        c.loop_start()
        if not connected.wait(10):
            raise RuntimeError(f"{user} could not connect")
        return c

    subscribed = threading.Event()
    srv = client(SERVER_USER, SERVER_PW, on_message=lambda c, u, m: got.put(m.payload), on_subscribe=lambda *a: subscribed.set())
    srv.subscribe("vg/+/+/up", 1)
    subscribed.wait(10)
    pw = keys.mqtt_password(KEY)
    topic = up(SITE, DEVICE)
    down = f"vg/{SITE}/{DEVICE}/down"
    board = client(DEVICE, pw, on_message=lambda c, u, m: c.publish(topic, payload, 1))
    payload = bytes(size)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            board.publish(topic, payload, 1)
        for _ in range(n):
            got.get(timeout=30)
        pipelined = n / (time.perf_counter() - t0)
        # lock step: the server asks, the paho "board" answers with a batch-sized reply
        sub = threading.Event()
        board.on_subscribe = lambda *a: sub.set()
        board.subscribe(down, 1)
        sub.wait(10)
        m = max(50, n // 10)
        t0 = time.perf_counter()
        for _ in range(m):
            srv.publish(down, b"x" * 12, 1)
            got.get(timeout=30)
        lockstep = m / (time.perf_counter() - t0)
    finally:
        for c in (srv, board):
            c.disconnect()
            c.loop_stop()
    return {"raw_publish_per_s": pipelined, "raw_lockstep_per_s": lockstep}


def measure(firmware: Path | None = None, records: int = 5000, speed: int = 1) -> dict:
    """Pull `records` readings from a simulated board over MQTT; returns the
    figures (rates per second, bytes per record) and the broker's raw rates."""
    with tempfile.TemporaryDirectory(prefix="vg-mqtt-bench-") as tmp:
        tmp = Path(tmp)
        if firmware is None or not (Path(firmware) / "mqtt.mpy").is_file():
            firmware = tmp / "firmware"
            build.build(firmware, cache=tree.root() / "build" / "cache")
        board_file = tmp / "board.json"
        board_file.write_text((tree.boards_dir() / "sim-outlet-2.json").read_text())
        (tmp / "broker").mkdir()
        b = Broker(BrokerConfig(((SITE, DEVICE, keys.mqtt_password(KEY)),), SERVER_PW), tmp / "broker").start()
        proc = None
        try:
            store = {
                "dev_id": DEVICE.encode().hex(),
                "key": KEY.hex(),
                "key_ver": 1,
                "site": SITE.encode().hex(),
                "link": cbor2.dumps({"host": b.host, "port": b.port}).hex(),
            }
            spec = {"board": str(board_file), "root": str(tmp / "flash"), "store": store, "records": records, "rtype": wire.LOG_OUTLET_READING, "speed": speed}
            (tmp / "spec.json").write_text(json.dumps(spec))
            path = [str(mpy.MPSIDE), *build.board_path(firmware)]
            mpy.run(mpy.MPSIDE / "vgfill.py", path=path, heapsize=HEAP, args=[tmp / "spec.json"], timeout=300)
            env = dict(os.environ, MICROPYPATH=os.pathsep.join([".frozen", *path]))
            with open(tmp / "console.txt", "wb") as out:
                proc = subprocess.Popen(
                    [mpy.binary(), "-X", f"heapsize={HEAP}", str(mpy.MPSIDE / "vgsim.py"), str(tmp / "spec.json")],
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            with MqttTransport(b.host, b.port, SERVER_USER, SERVER_PW, site_of={DEVICE: SITE}) as t:
                if not t.wait_state(DEVICE, True, 30):
                    raise RuntimeError("the simulated board did not come online: " + (tmp / "console.txt").read_text()[-2000:])
                counting = _Counting(t)
                board = link.Board(counting, DEVICE, key=KEY, timeout=5.0)
                rs = sync.RecordStore(tmp / "s.sqlite")
                board.hello()
                counting.bytes, counting.sizes = 0, []
                t0 = time.perf_counter()
                res = sync.pull(board, rs, ack=False)
                dt = time.perf_counter() - t0
                got_bytes, sizes = counting.bytes, counting.sizes
            proc.kill()
            proc.wait()
            proc = None
            batch = sum(sizes[1:]) // max(1, len(sizes) - 1)  # the get_log replies (the first is hello)
            topic = up(SITE, DEVICE)
            raw = _raw_rates(b, batch, 800)  # under Mosquitto's max_queued_messages (1000), which drops the rest
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
            b.stop()
    per_batch_overhead = publish_overhead(topic, batch)
    recs_per_batch = res.received / max(1, res.batches)
    out = {
        "records": res.received,
        "batches": res.batches,
        "seconds": dt,
        "records_per_s": res.received / dt,
        "batches_per_s": res.batches / dt,
        "reply_bytes_per_record": (got_bytes - sizes[0]) / res.received,  # payloads of the pull's replies
        "record_bytes_in_log": 15 + 15,  # this reading: 15-byte frame + 15-byte body (log.py)
        "batch_payload_bytes": batch,
        "mqtt_overhead_per_batch": per_batch_overhead,
        "mqtt_overhead_per_record": (per_batch_overhead + 4) / recs_per_batch,  # with its PUBACK
        "requests": board.stats["sent"],
        "timeouts": board.stats["timeouts"],
        "board_speed": speed,
        **raw,
    }
    out["ratio_to_raw_publish"] = out["batches_per_s"] / raw["raw_publish_per_s"]
    out["ratio_to_raw_lockstep"] = out["batches_per_s"] / raw["raw_lockstep_per_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--firmware", default=None, help="compiled board tree (default: build a fresh one)")
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--speed", type=int, default=1, help="simulated ms per real ms (1: the board's own timing)")
    args = ap.parse_args(argv)
    m = measure(Path(args.firmware) if args.firmware else None, args.records, args.speed)
    for k, v in m.items():
        print(f"{k:28} {v:.3f}" if isinstance(v, float) else f"{k:28} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
