"""MQTT end to end: simulated boards running the real firmware from the .mpy
build (host/voltgate/mpside/vgsim.py: main.parts with firmware/mqtt.py on
umqtt.simple, in real time), a private Mosquitto with its password file and
ACL (voltgate.broker), and the server's side (voltgate.mqttlink, link.Board,
sync.pull and sync.Puller): a big pull, a broker restart in the middle of
one, impersonation, refused commands, reconnect with backoff and the last
will, TLS against a loopback TLS front; then the link alone on MicroPython:
what a stalled broker costs, and that polling allocates nothing.

Logs of thousands of records are written by the firmware's own log module
(mpside/vgfill.py) before the board starts: the outlet makes at most one reading
per outlet per control cycle, far too few for a test in real time."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from voltgate import build, keys, link, messages, mpy, simrun, sync, wire
from voltgate.broker import SERVER_USER
from voltgate.messages import BoardError
from voltgate.mqttlink import MqttTransport

import test_outlet as to
from techkit import wait_for

SITE = "site-a"
DEV1, KEY1 = to.DEVICE, to.KEY
DEV2 = "ou-0002"
KEY2 = keys.derive_device_key(bytes(range(32)), DEV2, 1)
SERVER_PW = "server-pw"
# vgsim with a 5,000-record log needs ~130 KB live (the platform alone, not
# the link: firmware/mqtt.py and umqtt.simple take ~10 KB of it)
HEAP = 256 * 1024
WAIT = 20.0
READING = [1, 2_000_000, 230_000, 8695]  # body of the filled records, outlet = seq parity

READ = r"""
import sys
from binascii import hexlify
from log import Log
from vgemit import emit
lg = Log(sys.argv[1], 0)
out = []
seq = 1
while True:
    got = lg.read(seq, 64, 1 << 20)
    if not got:
        break
    for r in got:
        out.append([r[0], r[1], r[2], r[3], hexlify(r[4]).decode()])
        seq = r[0] + 1
emit(out)
"""


class SimBoard:
    """One vgsim process: a simulated outlet with its flash in a folder."""

    def __init__(self, mp, fw: Path, tmp: Path, device: str, key: bytes, port: int, *, name=None, speed=10, records=0, link_extra=None):
        self.mp, self.fw, self.speed = mp, fw, speed
        self.dir = tmp / (name or device)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root = self.dir / "flash"
        settings = {"host": "127.0.0.1", "port": port, **(link_extra or {})}
        self.store = {
            "dev_id": device.encode().hex(),
            "key": key.hex(),
            "key_ver": 1,
            "site": SITE.encode().hex(),
            "link": cbor2.dumps(settings).hex(),
        }
        self.spec = self.dir / "spec.json"
        self.spec.write_text(json.dumps({"board": to.board_file(self.dir), "root": str(self.root), "store": self.store, "speed": speed}))
        self.out = self.dir / "console.txt"
        self.proc = None
        if records:
            fill = self.dir / "fill.json"
            fill.write_text(json.dumps({"board": to.board_file(self.dir), "root": str(self.root), "store": self.store, "records": records, "rtype": wire.LOG_OUTLET_READING}))
            mp.run(mpy.MPSIDE / "vgfill.py", compiled=True, heapsize=HEAP, args=[fill])

    def start(self) -> SimBoard:
        env = dict(os.environ, MICROPYPATH=os.pathsep.join([".frozen", *build.board_path(self.fw), str(mpy.MPSIDE)]))
        with open(self.out, "ab") as out:
            # stdin stays open: the serial console waits on it
            self.proc = subprocess.Popen(
                [mpy.binary(), "-X", f"heapsize={HEAP}", str(mpy.MPSIDE / "vgsim.py"), str(self.spec)],
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def kill(self) -> None:
        """SIGKILL: the TCP connection ends without a DISCONNECT (a power cut)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if self.proc is not None and self.proc.stdin:
            self.proc.stdin.close()

    def console(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def lines(self, prefix: str) -> list[str]:
        return [ln for ln in self.console().splitlines() if ln.startswith(prefix)]

    def records(self) -> list[tuple]:
        """The board's flash log, read back with the firmware's Log (from a copy)."""
        assert self.proc is None or self.proc.poll() is not None, "stop the board first"
        copy = self.dir / "readback"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(self.root, copy)
        got = self.mp.run(code=READ, compiled=True, heapsize=16 << 20, args=[copy]).record  # a test tool: all records at once
        return [(s, e, ts, ty, bytes.fromhex(b)) for s, e, ts, ty, b in got]

    def clock(self) -> float:
        """The board's world time as the sim runs it (speed times real time)
        from a Unix time the host syncs it to (self.sync)."""
        return self.synced + (time.monotonic() - self.synced_at) * self.speed

    def sync(self, board: link.Board, t: int = to.START) -> None:
        board.sync_time(t)
        self.synced, self.synced_at = t, time.monotonic()


@pytest.fixture
def net(broker, tmp_path, mp, firmware_build):
    """A broker for two boards, the server's transport on it, and a factory
    for simulated boards; everything it started is stopped."""
    devices = [(SITE, DEV1, keys.mqtt_password(KEY1)), (SITE, DEV2, keys.mqtt_password(KEY2))]
    b = broker(devices, SERVER_PW)
    states: queue.Queue = queue.Queue()
    t = MqttTransport(b.host, b.port, SERVER_USER, SERVER_PW, site_of={DEV1: SITE, DEV2: SITE}, on_state=lambda d, on: states.put((d, on)))
    t.connect()
    boards: list[SimBoard] = []

    class Net:
        pass

    n = Net()
    n.broker, n.t, n.states = b, t, states

    def board(device=DEV1, key=KEY1, **kw) -> SimBoard:
        sb = SimBoard(mp, firmware_build, tmp_path, device, key, b.port, **kw)
        boards.append(sb)
        return sb

    n.board = board
    try:
        yield n
    finally:
        for sb in boards:
            sb.kill()
        t.close()


def client(n, device=DEV1, key=KEY1, **kw) -> link.Board:
    kw.setdefault("timeout", 2.0)
    return link.Board(n.t, device, key=key, key_version=1, **kw)


def fill_records(records):
    """The READING records vgfill.py wrote, as RecordStore gives them back."""
    return [r for r in records if r.type == wire.LOG_OUTLET_READING]


def check_filled(stored, n):
    got = fill_records(stored)
    assert len(got) == n
    assert [r.ts for r in got] == [1_800_000_000 + i for i in range(n)]
    assert [r.body for r in got] == [[i & 1, *READING[1:]] for i in range(n)]
    seqs = [r.seq for r in stored]
    assert seqs == sorted(set(seqs)), "each record once, in order"


# ---------------------------------------------------------------- (a) a big pull


def test_a_5000_record_log_is_pulled_acked_and_a_second_pull_finds_nothing_new(net, tmp_path):
    sb = net.board(records=5000, speed=10).start()
    assert net.t.wait_state(DEV1, True, WAIT)
    store = sync.RecordStore(tmp_path / "s.sqlite")
    b = client(net)
    res = sync.pull(b, store)
    assert res.new == store.count(DEV1) >= 5000 and res.duplicates == 0 and not res.gaps
    check_filled(store.records(DEV1), 5000)
    hello = b.hello()
    assert hello["log"][3] == res.acked == store.last_seq(DEV1)  # the board has the ack
    again = sync.pull(b, store)
    # the ack's own LOG_COMMAND record is all that is new
    assert again.new == 1 and again.batches == 1
    assert store.records(DEV1)[-1].type == wire.LOG_COMMAND
    assert store.records(DEV1)[-1].body[:2] == [wire.MSG_ACK, wire.OK]
    assert b.stats["timeouts"] == 0
    assert sb.lines("mqtt: online") == ["mqtt: online"]  # one connection all along


# ---------------------------------------------------------------- (b) broker restart mid-pull


def test_a_broker_restart_during_a_pull_loses_and_repeats_nothing(net, tmp_path):
    n_rec = 3000
    sb = net.board(records=n_rec, speed=10)
    store = sync.RecordStore(tmp_path / "s.sqlite")
    reports: queue.Queue = queue.Queue()
    restarted = threading.Event()
    over = threading.Event()
    helpers: list[threading.Thread] = []

    def progress(done, nxt):
        # once, a third of the way through: the broker goes away mid-pull
        if done > n_rec // 3 and not restarted.is_set():
            restarted.set()
            net.broker.stop()
            helpers.append(threading.Thread(target=restart))
            helpers[-1].start()

    def restart():
        # back once the board has noticed and tried again at least once
        # (never after the test is over: the fixture could not stop it)
        deadline = time.monotonic() + WAIT
        while not over.is_set() and not sb.lines("mqtt: down") and time.monotonic() < deadline:
            over.wait(0.02)  # polling the console with a deadline
        if not over.is_set():
            net.broker.start()

    made = []

    def board_for(d):
        made.append(client(net, d, timeout=1.0, retries=2))
        return made[-1]

    puller = sync.Puller(board_for, store, interval=3600, report=lambda d, r, e: reports.put((d, r, e)), ack=False, progress=progress)
    net.t.on_state = puller.on_state  # the board coming online starts its pull
    try:
        with puller:
            sb.start()
            outcomes = []
            while True:
                d, r, e = reports.get(timeout=60)
                assert d == DEV1
                outcomes.append(e or r)
                if r is not None and store.last_seq(DEV1) >= n_rec and restarted.is_set():
                    break
                assert len(outcomes) < 10, outcomes
    finally:
        over.set()
        for h in helpers:
            h.join()
    assert restarted.is_set() and net.broker.running
    assert sum(b.stats["timeouts"] for b in made) > 0, outcomes  # the outage was felt, and retried
    assert len(sb.lines("mqtt: online")) >= 2  # and the board came back by itself
    sb.kill()
    board_log = sb.records()
    stored = store.records(DEV1)
    # exactly what the board holds, each record once
    assert [(r.seq, r.epoch, r.ts, r.type, cbor2.dumps(r.body)) for r in stored] == [
        (s, e, ts, ty, cbor2.dumps(cbor2.loads(body))) for s, e, ts, ty, body in board_log
    ]
    assert len(stored) >= n_rec and store.count(DEV1) == len({r.seq for r in stored})
    check_filled(stored, n_rec)


# ---------------------------------------------------------------- (c) impersonation


def test_a_board_cannot_speak_for_another(net, tmp_path):
    a = net.board(DEV1, KEY1).start()
    assert net.t.wait_state(DEV1, True, WAIT)
    # a board with its own account (ou-0002) publishing as ou-0001: acked by
    # the broker (MQTT 3.1.1), delivered to nobody
    forged = messages.request(wire.MSG_PING, "forged")  # any bytes: they never arrive
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=DEV2, protocol=mqtt.MQTTv311)
    c.username_pw_set(DEV2, keys.mqtt_password(KEY2))
    c.connect(net.broker.host, net.broker.port)
    c.loop_start()
    try:
        for leaf, payload in (("up", forged), ("state", b"offline")):
            c.publish(f"vg/{SITE}/{DEV1}/{leaf}", payload, 1, retain=leaf == "state").wait_for_publish(WAIT)
    finally:
        c.disconnect()
        c.loop_stop()
    rid = 4242
    net.t.send(DEV1, messages.request(wire.MSG_PING, "real", rid=rid))
    seen = []
    while True:  # everything that reached the server for ou-0001 until the real answer
        raw = net.t.receive(DEV1, WAIT)
        assert raw is not None
        seen.append(raw)
        if messages.parse(raw).id == rid:
            break
    assert forged not in seen and len(seen) == 1
    assert net.t.online[DEV1] is True  # the forged "offline" went nowhere

    # a clone claiming ou-0001 with another key: its password is wrong, the
    # broker refuses it, and the real ou-0001 keeps its session
    clone = net.board(DEV1, KEY2, name="clone", speed=20)
    clone.start()
    wait_for(lambda: len(clone.lines("mqtt: down")) >= 2, "the clone to be refused twice")
    assert all("MQTTException(5" in ln for ln in clone.lines("mqtt: down"))  # 5: not authorised
    assert not clone.lines("mqtt: online")
    assert "not authorised" in net.broker.log.read_text()
    assert client(net).ping("still me") == "still me"
    assert a.lines("mqtt: online") == ["mqtt: online"] and not a.lines("mqtt: down")
    assert net.t.online[DEV1] is True


# ---------------------------------------------------------------- (d) bad commands


def test_forged_replayed_and_stale_commands_are_refused_and_logged(net, tmp_path):
    sb = net.board(speed=10).start()
    assert net.t.wait_state(DEV1, True, WAIT)
    b = client(net)
    sb.sync(b)  # the board's clock is trusted from here: a stale command is decidable
    b.clock = sb.clock
    # a permit presented over MQTT switches an outlet on (link.py: present)
    tok = bytes.fromhex(to.permit(now=int(sb.clock())))
    assert b.present(tok, 0)[0] == wire.OK
    assert b.status()["app"][0][0] == 1  # on

    def refused(mtype, body, **kw):
        with pytest.raises(BoardError) as e:
            kw.setdefault("key", KEY1)
            kw.setdefault("device", DEV1)
            kw.setdefault("expires", int(sb.clock()) + 300)
            raw = messages.command(mtype, body, key_version=1, rid=7, **kw)
            net.t.send(DEV1, raw)
            messages.body_of(messages.parse(net.t.receive(DEV1, WAIT)), mtype)
        return e.value.reason

    ctr = b.hello()["ctr"]
    assert refused(wire.MSG_RELAY_OFF, 0, key=KEY2, counter=ctr + 10) == wire.BAD_MAC  # forged: another key
    assert refused(wire.MSG_RELAY_OFF, 0, counter=ctr + 20, expires=int(sb.clock()) - 600) == wire.EXPIRED  # stale
    assert refused(wire.MSG_RELAY_OFF, 0, counter=ctr + 30, device=DEV2) == wire.WRONG_AUDIENCE
    assert b.status()["app"][0][0] == 1  # none of them touched the relay
    good = messages.command(wire.MSG_RELAY_OFF, 0, key=KEY1, key_version=1, device=DEV1, counter=ctr + 40, rid=8, expires=int(sb.clock()) + 300)
    net.t.send(DEV1, good)
    assert messages.body_of(messages.parse(net.t.receive(DEV1, WAIT)), wire.MSG_RELAY_OFF) is None
    net.t.send(DEV1, good)  # the same bytes at once: a retry of the last command gets its reply again
    assert messages.body_of(messages.parse(net.t.receive(DEV1, WAIT)), wire.MSG_RELAY_OFF) is None
    later = messages.command(wire.MSG_CLEAR_FAULT, None, key=KEY1, key_version=1, device=DEV1, counter=ctr + 50, rid=9, expires=int(sb.clock()) + 300)
    net.t.send(DEV1, later)
    assert messages.body_of(messages.parse(net.t.receive(DEV1, WAIT)), wire.MSG_CLEAR_FAULT) is None
    net.t.send(DEV1, good)  # the relay_off replayed after another command: refused
    with pytest.raises(BoardError) as e:
        messages.body_of(messages.parse(net.t.receive(DEV1, WAIT)), wire.MSG_RELAY_OFF)
    assert e.value.reason == wire.REPLAYED
    assert refused(wire.MSG_RELAY_OFF, 0, counter=ctr + 35) == wire.REPLAYED  # below the last accepted
    assert b.status()["app"][0][0] != 1  # the good one opened the relay
    # every verdict is in the board's log, pulled over the same link
    store = sync.RecordStore(tmp_path / "s.sqlite")
    sync.pull(b, store, ack=False)
    verdicts = [r.body for r in store.records(DEV1) if r.type == wire.LOG_COMMAND]
    assert not [v for v in verdicts if v[1] == wire.BAD_MAC]  # counted in hello, not written to flash
    assert b.hello()["junk"] >= 1
    assert [wire.MSG_RELAY_OFF, wire.EXPIRED, ctr + 20] in verdicts
    assert [wire.MSG_RELAY_OFF, wire.WRONG_AUDIENCE, ctr + 30] in verdicts
    assert [wire.MSG_RELAY_OFF, wire.OK, ctr + 40] in verdicts
    assert verdicts.count([wire.MSG_RELAY_OFF, wire.OK, ctr + 40]) == 1  # the retry did not run it again
    assert [wire.MSG_RELAY_OFF, wire.REPLAYED, ctr + 40] in verdicts
    assert [wire.MSG_RELAY_OFF, wire.REPLAYED, ctr + 35] in verdicts


# ---------------------------------------------------------------- (e) reconnect and last will


def test_the_board_reconnects_with_backoff_and_its_will_says_offline(net):
    # speed 100: a minute of backoff is 0.6 s here
    sb = net.board(speed=100).start()
    assert net.t.wait_state(DEV1, True, WAIT)
    net.broker.stop()
    wait_for(lambda: len(sb.lines("mqtt: down")) >= 9, "nine failed attempts")
    net.broker.start()
    wait_for(lambda: len(sb.lines("mqtt: online")) >= 2, "the board back online")
    waits = [int(re.search(r"retry in (\d+) ms", ln).group(1)) for ln in sb.lines("mqtt: down")]
    # 1 s doubling to 60 s, each jittered into [w/2, w)
    for i, d in enumerate(waits[:9]):
        w = min(1000 << i, 60000)
        assert w // 2 <= d < w, (i, waits)
    assert len(set(waits[6:9])) > 1 or len(waits) < 9  # jitter: not all the same
    assert client(net).ping(1) == 1
    # the board dies without a DISCONNECT: the broker publishes its will
    while not net.states.empty():
        net.states.get_nowait()
    sb.kill()
    assert net.t.wait_state(DEV1, False, WAIT)
    assert net.states.get(timeout=WAIT) == (DEV1, False)


# ---------------------------------------------------------------- the link on its own (MicroPython)

LINK = r"""
import json, sys, time, micropython
import main, link, mqtt
from system import System
from vgemit import emit
with open(sys.argv[1]) as f:
    spec = json.load(f)
hw, board = main.boot_hw(spec["board"], spec["root"], "sim")
hw.store.provision(spec["store"])
p = System(hw, board)
m = mqtt.MqttLink(p, link.Link(p, main.app_for(board["kind"])(p)), p.ident.link)

def step(fn):
    m._t0 = time.ticks_ms()
    t = time.ticks_ms()
    try:
        r = fn()
        err = None
    except Exception as e:
        r, err = None, repr(e)
    return [time.ticks_diff(time.ticks_ms(), t), err, r]

out = {}
if spec["mode"] == "idle":
    # run() as the board runs it (hw.sleep_ms is asyncio.sleep_ms there),
    # the heap's allocation counter read at every check-in
    import asyncio
    hw.sleep_ms = lambda ms: asyncio.sleep_ms(0)
    marks = [0] * 64
    n = [0]
    class Done(Exception):
        pass
    class Sup:
        def beat(self, name):
            marks[n[0]] = micropython.mem_total()
            n[0] += 1
            if n[0] == len(marks):
                raise Done
    async def bare(sup):  # what asyncio itself allocates per turn of a loop
        while True:
            sup.beat("bare")
            await hw.sleep_ms(20)
    for what, task in (("bare", bare), ("alloc", m.run)):
        n[0] = 0
        try:
            asyncio.run(task(Sup()))
        except Done:
            pass
        out[what] = [marks[i + 1] - marks[i] for i in range(len(marks) - 1)]
    out["phase"] = m._ph
else:
    out["connect"] = step(m.connect)
    if spec["mode"] in ("puback", "keepalive"):
        out["subscribe"] = step(m._step)
        out["online"] = step(m._step)
    if spec["mode"] == "keepalive":
        # simulated time: keepalive/2 without sending, then keepalive without hearing
        hw.world.advance(m.keepalive * 500)
        out["ping"] = step(m._step)
        hw.world.advance(m.keepalive * 500)
        out["dead"] = step(m._step)
emit(out)
"""


def run_link(mp, tmp_path, port, mode, io_ms=300):
    store = {
        "dev_id": DEV1.encode().hex(),
        "key": KEY1.hex(),
        "key_ver": 1,
        "site": SITE.encode().hex(),
        "link": cbor2.dumps({"host": "127.0.0.1", "port": port, "io_ms": io_ms}).hex(),
    }
    spec = tmp_path / "link.json"
    spec.write_text(json.dumps({"board": to.board_file(tmp_path), "root": str(tmp_path / "flash"), "store": store, "mode": mode}))
    return mp.run(code=LINK, compiled=True, heapsize=HEAP, args=[spec], timeout=60).record


def packet(conn) -> bytes:
    """One MQTT packet from a socket: its first byte and what its remaining length covers."""
    f = conn.recv(1)
    n = shift = 0
    while True:
        b = conn.recv(1)[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    rest = b""
    while len(rest) < n:
        rest += conn.recv(n - len(rest))
    return f + rest


class Silent:
    """A TCP listener that accepts and says nothing, or says only what
    answer(conn) sends: a broker that stalls."""

    def __init__(self, answer=None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            if self.answer:
                self.answer(conn, self.stop)
            self.stop.wait(30)

    def close(self):
        self.stop.set()
        self.sock.close()
        self.thread.join(5)


def test_a_stalled_broker_holds_the_board_for_one_timeout(mp, tmp_path):
    s = Silent()
    try:
        out = run_link(mp, tmp_path, s.port, "connect", io_ms=300)
    finally:
        s.close()
    ms, err, _ = out["connect"]
    assert "110" in err  # ETIMEDOUT waiting for the CONNACK
    assert 300 <= ms < 1000


def test_a_broker_that_talks_but_never_acks_is_given_up_at_the_deadline(mp, tmp_path):
    # CONNACK and SUBACK, then PINGRESPs every 50 ms but never the PUBACK of
    # "online": no socket read times out, the step's deadline ends the wait
    def answer(conn, stop):
        packet(conn)  # CONNECT
        conn.sendall(b"\x20\x02\x00\x00")
        sub = packet(conn)
        conn.sendall(b"\x90\x03" + sub[1:3] + b"\x01")
        packet(conn)  # PUBLISH "online"
        while not stop.wait(0.05):
            try:
                conn.sendall(b"\xd0\x00")
            except OSError:
                return

    s = Silent(answer)
    try:
        out = run_link(mp, tmp_path, s.port, "puback", io_ms=300)
    finally:
        s.close()
    assert out["connect"][1] is None and out["subscribe"][1] is None
    ms, err, _ = out["online"]
    assert "110" in err
    assert 300 <= ms < 1000


def test_the_link_pings_when_quiet_and_drops_a_broker_that_stays_silent(mp, tmp_path):
    got = []

    def answer(conn, stop):
        packet(conn)  # CONNECT
        conn.sendall(b"\x20\x02\x00\x00")
        sub = packet(conn)
        conn.sendall(b"\x90\x03" + sub[1:3] + b"\x01")
        pub = packet(conn)  # PUBLISH "online", QoS 1: topic length, topic, packet id
        n = 3 + (pub[1] << 8 | pub[2])
        conn.sendall(b"\x40\x02" + pub[n : n + 2])
        got.append(packet(conn))  # then nothing more, not even a PINGRESP

    s = Silent(answer)
    try:
        out = run_link(mp, tmp_path, s.port, "keepalive")
    finally:
        s.close()
    assert [out[k][1] for k in ("connect", "subscribe", "online", "ping")] == [None] * 4
    assert got == [b"\xc0"]  # PINGREQ
    assert "110" in out["dead"][1]  # ETIMEDOUT: the link gives the connection up


def test_an_idle_link_allocates_nothing(mp, tmp_path, broker):
    b = broker([(SITE, DEV1, keys.mqtt_password(KEY1))], SERVER_PW)
    out = run_link(mp, tmp_path, b.port, "idle")
    assert out["phase"] == 3  # online
    # connect, subscribe and announce allocate; after them nothing but what
    # asyncio's own loop allocates per turn on the unix port (144 B)
    bare = out["bare"][-1]
    assert set(out["bare"][8:]) == {bare}
    assert any(a > bare for a in out["alloc"][:4]) and set(out["alloc"][8:]) == {bare}, out["alloc"]


# ---------------------------------------------------------------- TLS


def make_ca_and_cert(tmp: Path, host="localhost"):
    """A CA (DER, for the board's "ca") and a server certificate for host
    signed by it (PEM files, for the TLS listener)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "voltgate test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca.public_bytes(serialization.Encoding.DER), tmp / "cert.pem", tmp / "key.pem"


class TlsFront:
    """A TLS listener on loopback that hands each connection on to the
    broker's plain port: the broker as a board on TLS would see it."""

    def __init__(self, cert: Path, key: Path, port: int):
        import ssl

        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.to = port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        self.failures = 0
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw):
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except OSError:
            self.failures += 1
            raw.close()
            return
        self.handshakes += 1
        plain = socket.create_connection(("127.0.0.1", self.to))
        self.conns += [tls, plain]
        threading.Thread(target=simrun.pipe, args=(plain, tls), daemon=True).start()
        simrun.pipe(tls, plain)

    def close(self):
        self.sock.close()
        for s in self.conns:
            try:
                s.close()
            except OSError:
                pass


def test_a_board_on_tls_verifies_the_broker_against_its_ca(net, tmp_path):
    ca, cert, key = make_ca_and_cert(tmp_path)
    (tmp_path / "other").mkdir()
    other_ca, _, _ = make_ca_and_cert(tmp_path / "other")
    front = TlsFront(cert, key, net.broker.port)
    try:
        # a CA the broker's certificate does not chain to: no connection
        wrong = net.board(DEV2, KEY2, name="wrong-ca", speed=20, link_extra={"host": "localhost", "port": front.port, "tls": True, "ca": other_ca}).start()
        wait_for(lambda: len(wrong.lines("mqtt: down")) >= 2, "the board to refuse the broker twice")
        assert not wrong.lines("mqtt: online") and front.handshakes == 0 and front.failures >= 2
        wrong.kill()
        sb = net.board(link_extra={"host": "localhost", "port": front.port, "tls": True, "ca": ca}).start()
        assert net.t.wait_state(DEV1, True, WAIT)
        assert front.handshakes == 1
        assert client(net).ping(b"over TLS") == b"over TLS"
    finally:
        front.close()
