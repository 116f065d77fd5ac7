"""The serial link end to end: a simulated outlet (mpside/vgsim.py, the real
firmware from .mpy on the MicroPython unix port) whose console is a raw pty,
and the host's voltgate.serlink.SerialTransport on pyserial at the other
end, through a relay that can corrupt the line. Pull sync over it, clean and
noisy; the text console and Ctrl-C on the same line (SPEC.md 4)."""

import itertools
import json
import random
import socket
import threading
from pathlib import Path

import pytest

from voltgate import commands, link, messages, serlink, sync, tree, wire

import test_outlet as to
from techkit import wait_for
import test_sync as ts

framing = tree.board_modules().framing
SPEED = 5  # simulated ms per real ms: the board's 10 s idle time is 2 s here
_names = itertools.count()


class Noise:
    """The line's faults, per byte and both ways, from a fixed seed: a bit
    flipped, the byte dropped, the byte doubled. `on` switches them."""

    def __init__(self, seed, flip, drop, dup):
        self.rng = random.Random(seed)
        self.flip, self.drop, self.dup = flip, drop, dup
        self.on = False
        self.hits = 0

    def __call__(self, direction, data):
        if not self.on:
            return data
        out = bytearray()
        for b in data:
            x = self.rng.random()
            if x < self.flip:
                out.append(b ^ (1 << self.rng.randrange(8)))
            elif x < self.flip + self.drop:
                pass
            elif x < self.flip + self.drop + self.dup:
                out += bytes((b, b))
            else:
                out.append(b)
                continue
            self.hits += 1
        return bytes(out)


def until(cond, timeout, what):
    """Wait for cond() with a deadline (each cond() call itself waits on I/O)."""
    return wait_for(cond, what, timeout, 0)


def filled_flash(mp_worker, tmp_path):
    """A board's flash with a log of events, readings and billing: the
    records as the board holds them, as in test_sync. No session is left
    running, so the simulated board adds only what it logs itself."""
    name = f"ser{next(_names)}"
    root = tmp_path / "flash"

    def oc(fn, *args):
        return mp_worker.call("link_checks", "oc", name, fn, *args)

    mp_worker.call("link_checks", "new", name, to.board_file(tmp_path), str(root), to.STORE, {"reading_s": 5})
    answer = commands.time_sync(to.START, bytes.fromhex(oc("begin_sync")), to.KEY, 1)
    assert oc("sync", answer.hex()) == wire.OK
    assert oc("present", to.permit(expires=to.START + 86400), 0)[0] == wire.OK
    oc("advance", 120_000)
    assert oc("present", to.permit(expires=to.START + 86400, scope=[1]), 1)[0] == wire.OK
    oc("advance", 240_000)  # a reading every 5 s on two outlets
    oc("command", "relay_off", None)
    oc("advance", 2_000)
    want = [(r[0], r[1], r[2], r[3]) for r in oc("records")]
    assert len(want) > 100
    return root, want


@pytest.fixture
def board(firmware_build, tmp_path):
    """start(root, ...): a SimBoard on that flash (with `line` between it and
    the host, the world at `speed`, its store provisioned with `store`, the
    mains at `mains_mv`); every one started is stopped at the end."""
    started = []

    def start(root, line=None, speed=SPEED, store=None, mains_mv=None):
        path = to.board_file(tmp_path)
        if mains_mv is not None:
            data = json.loads(Path(path).read_text())
            data["sim"]["mains_mv"] = mains_mv
            Path(path).write_text(json.dumps(data))
        spec = {"board": path, "root": str(root), "store": store, "speed": speed}
        b = serlink.SimBoard(spec, tmp_path / f"sim{len(started)}", firmware=firmware_build, line=line)
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.stop()


def client(t, **kw):
    kw.setdefault("timeout", 1.0)
    kw.setdefault("clock", lambda: to.START + 3600)  # the server's time: after the board's floor
    return link.Board(t, to.DEVICE, key=to.KEY, key_version=1, **kw)


def test_pull_over_the_serial_line_stores_the_whole_log(mp_worker, board, tmp_path):
    root, want = filled_flash(mp_worker, tmp_path)
    sb = board(root)
    store = sync.RecordStore(tmp_path / "s.sqlite")
    with serlink.SerialTransport(sb.port) as t:
        c = client(t)
        hello = c.hello()
        res = sync.pull(c, store, batch=64)
        got = ts.stored(store)
        # the worker's records, then what the simulated board logged at its boot
        assert got[: len(want)] == want
        assert len(got) == hello["log"][2] - 1 and res.new == len(got) and not res.gaps
        assert {r.epoch for r in store.records(to.DEVICE)[len(want) :]} == {hello["epoch"]}
        assert res.acked == got[-1][0] and res.batches >= 3
        again = sync.pull(c, store)
        assert again.new == 1 and again.gaps == []  # the ack's own LOG_COMMAND record
        assert store.records(to.DEVICE)[-1].type == wire.LOG_COMMAND
        assert t.bad_frames == 0 and c.stats["timeouts"] == 0 and c.stats["sent"] == t.deframer.frames
    assert sb.alive()


def test_a_noisy_line_rejects_corrupt_frames_and_stores_nothing_corrupt(mp_worker, board, tmp_path):
    root, want = filled_flash(mp_worker, tmp_path)
    noise = Noise(seed=5, flip=1 / 1000, drop=1 / 2000, dup=1 / 2000)
    sb = board(root, line=noise)
    clean = sync.RecordStore(tmp_path / "clean.sqlite")
    noisy = sync.RecordStore(tmp_path / "noisy.sqlite")
    with serlink.SerialTransport(sb.port) as t:
        # the board's log read back on a clean line first, without an ack
        sync.pull(client(t), clean, batch=64, ack=False)
        truth = ts.stored(clean)
        assert truth[: len(want)] == want
        noise.on = True
        c = client(t, timeout=0.15, retries=10)  # a pty answers in milliseconds
        res = None
        for _ in range(5):  # a pull may fail after its retries: the next one resumes
            try:
                res = sync.pull(c, noisy, batch=8)
                break
            except link.LinkTimeout:
                continue
        assert res is not None, sb.stderr()
        assert noise.hits > 5 and c.stats["timeouts"] > 0
        assert t.bad_frames > 0  # corrupt frames were seen, and dropped
        got = ts.stored(noisy)
        assert got[: len(truth)] == truth and len({r[0] for r in got}) == len(got)
        assert all(r[2] == wire.LOG_COMMAND for r in got[len(truth) :])  # acks refused or lost on the way
        noise.on = False
        after = sync.pull(client(t), noisy)
        new = ts.stored(noisy)[len(got) :]
        assert after.new == len(new) >= 1 and all(r[2] == wire.LOG_COMMAND for r in new)
    assert sb.alive()


def test_the_text_console_and_ctrl_c_share_the_line_with_the_link(board, tmp_path):
    sb = board(tmp_path / "flash", speed=10, store=to.STORE)  # idle time: 1 s
    # an exi permit works on the untrusted clock of a fresh board
    tok = to.permit(not_before=None, expires=to.START + 30 * 86400, exi=3600)
    with serlink.SerialTransport(sb.port) as t:
        t.write_line("present " + tok)
        assert t.read_line(5) == "ok outlet 0"
        t.serial.write(b"\xff\xfe present\r\n")  # noise on the line, not UTF-8
        assert t.read_line(5) == "error not text"
        c = client(t)
        assert c.status()["app"][0][0] == 1  # the link, right after a line: outlet 0 is on
        t.serial.write(b"\x03")  # inside link mode a 0x03 is a byte like any other
        assert c.ping(b"still here") == b"still here"
        t.write_line("present " + tok)
        assert t.read_line(0.2) is None  # link mode: lines are not read as lines
        # back to text mode once the link has been idle
        answer = until(lambda: t.write_line("x") or t.read_line(0.5), 8, "a console answer")  # lines 0.5 s apart: a frame in flight keeps link mode, a quiet line does not
        assert answer == "error expected: present <hex or base64url token>"
        # the console task owns Ctrl-C: the interpreter's is off (kbd_intr(-1);
        # on the unix port, SIGINT is not caught)
        sigcgt = int(open(f"/proc/{sb.proc.pid}/status").read().split("SigCgt:")[1].split()[0], 16)
        assert not sigcgt & (1 << 1)
        t.serial.write(b"\x03")
        assert sb.wait_exit(5) == 130  # KeyboardInterrupt, through main.run (outputs off)
        lines = [until(lambda: t.read_line(0.1), 5, "the traceback")]
        while lines[-1] is not None:
            lines.append(t.read_line(0.2))
        assert lines[0].startswith("Traceback") and lines[-2].startswith("KeyboardInterrupt")


def test_alarms_go_out_as_frames_while_the_link_is_up(board, tmp_path):
    sb = board(tmp_path / "flash", speed=10, store=to.STORE, mains_mv=270_000)  # above the 253 V limit
    tok = to.permit(not_before=None, expires=to.START + 30 * 86400, exi=3600)
    with serlink.SerialTransport(sb.port) as t:
        c = client(t)
        assert c.present(bytes.fromhex(tok), 0)[0] == wire.OK  # the relay closes on too high a voltage
        # the trip after the 2 s hold (0.2 s here), unasked, while the link is up
        alarm = messages.parse(until(lambda: t.receive(to.DEVICE, 0.1), 5, "an alarm frame"))
        assert alarm.type == wire.MSG_ALARM
        seq, ts_, body = alarm.body
        assert body[:3] == ["trip", 0, "over_voltage"]
        store = sync.RecordStore(tmp_path / "s.sqlite")
        sync.pull(c, store, ack=False)
        [rec] = [r for r in store.records(to.DEVICE) if r.seq == seq]
        assert (rec.type, rec.ts, rec.body) == (wire.LOG_ALARM, ts_, body)


def test_socket_urls_and_text_between_frames(tmp_path):
    """SerialTransport on socket:// (a stand-in board on 127.0.0.1): frames
    split across reads are reassembled, console text between frames is kept
    as lines, garbage is counted and skipped."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    reply = messages.request(wire.MSG_PING, b"pong", rid=7)
    frame = framing.encode(reply)
    got = []
    done = threading.Event()

    def serve():
        conn, _ = srv.accept()
        with conn:
            buf = b""
            while buf.count(b"\x00") < 3:  # the extra zero, then the frame
                buf += conn.recv(4096)
            got.append(buf)
            conn.sendall(b"boot banner\r\n" + frame[:5])
            conn.sendall(frame[5:] + b"Traceback: nothing\r\n\x00\x17\x99junk\x00" + frame)
            done.wait(5)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        with serlink.SerialTransport(f"socket://127.0.0.1:{srv.getsockname()[1]}") as t:
            t.send("any", b"\xa1\x00\x0b")
            assert t.receive("any", 5) == reply
            assert t.receive("any", 5) == reply
            assert t.receive("any", 0.05) is None
            assert list(t.console) == ["boot banner", "Traceback: nothing"]
            assert t.bad_frames == 1 and t.deframer.frames == 2
            assert t.tx_bytes == len(got[0]) and got[0] == b"\x00" + framing.encode(b"\xa1\x00\x0b")
    finally:
        done.set()
        th.join(5)
        srv.close()


# a console on stdin with stand-ins for the link and the hardware; Link.frames
# holds the payloads handed to the link (hex)
CONSOLE_STUBS = r"""
import asyncio, gc, micropython
import serlink
from vgemit import emit

class Hw:
    def ticks_ms(self):
        return 0

    def ticks_diff(self, a, b):
        return a - b

    async def sleep_ms(self, ms):
        await asyncio.sleep_ms(ms)

class Sys:
    hw = Hw()

class Link:
    p = Sys()
    app = None
    outbox = []
    frames = []

    def handle(self, m):
        self.frames.append(m.hex())
        return None
"""

CONSOLE_TURNS = CONSOLE_STUBS + r"""

class Out:
    text = b""

    def write(self, b):
        self.text += b

lk = Link()
out = Out()
asyncio.run(serlink.Console(lk, out=out).run(None))  # until stdin ends
emit({"frames": lk.frames, "text": out.text.decode()})
"""


def test_text_lines_and_frames_take_turns_in_one_buffer(mp):
    """A text line is collected in the Deframer's buffer (serlink.py): a
    line too long, a short one, then a frame, each read whole; the bytes a
    line left there do not reach the frame."""
    frame = framing.encode(b"hi5")  # no byte above 0x7f: stdin is text here
    assert max(frame) < 0x80
    stream = "B" * 1100 + "\n" + "hello\n" + frame.decode()
    r = mp.run(code=CONSOLE_TURNS, compiled=True, heapsize=64 * 1024, stdin=stream).record
    assert r["text"] == "error line too long\r\nerror expected: present <hex or base64url token>\r\n"
    assert r["frames"] == [b"hi5".hex()]


CONSOLE_ALLOC = CONSOLE_STUBS + r"""

c = serlink.Console(Link())
gc.collect()
a0 = micropython.mem_total()
asyncio.run(c.run(None))  # until stdin ends
emit(micropython.mem_total() - a0)
"""


@pytest.mark.parametrize(
    "mode, stream",
    [
        # ten frames that fail their COBS check (each delimiter costs the
        # Deframer's _end call state, test_framing: the same in both runs)
        ("link", lambda n: "\x00" + ("A" * n + "\x00") * 10),
        ("text", lambda n: "A" * n * 10),  # a line too long, with no end
    ],
)
def test_the_console_allocates_nothing_per_byte(mp, mode, stream):
    """The console reads with one await per burst, then byte by byte while
    poll() says more are waiting, with a turn for the other tasks every
    512 bytes (asyncio.sleep_ms(0): 144 B on the unix port). From the .mpy
    build: well under a byte of heap per byte read, where any allocation
    per byte would cost at least 16 (the smallest heap block)."""
    small, big = (mp.run(code=CONSOLE_ALLOC, compiled=True, heapsize=64 * 1024, stdin=stream(n)).record for n in (10, 2000))
    assert (big - small) / (len(stream(2000)) - len(stream(10))) < 1, (small, big)
