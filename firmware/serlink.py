# The console on the serial line (protocol/SPEC.md 4): a technician's text
# lines (present.py) and the host's link frames (link.py, framing.py) on one
# byte stream, with the REPL's Ctrl-C kept for mpremote.
#
# Text mode (the default): bytes make lines (CR or LF ends one) for
# present.py, answered in one line; a 0x03 byte is Ctrl-C (KeyboardInterrupt:
# main.run turns the outputs off and leaves the REPL). A 0x00 byte switches
# to link mode: bytes go to a Deframer, each good frame to link.handle()
# and its reply back as a frame, alarms from link.outbox too; 0x03 is data.
# _IDLE_MS after the last good frame (or the 0x00 that began it) the
# console is back in text mode.
#
# The interpreter's own Ctrl-C is off while this task runs
# (micropython.kbd_intr(-1)): it would fire in the UART's receive interrupt,
# before this task has read the 0x00 that puts a 0x03 inside a frame. The
# task reads the bytes in order and raises KeyboardInterrupt itself.
#
# Reading: one await per burst (StreamReader.readinto into a 1-byte
# buffer), then the bytes already there one by one while poll() says more
# are waiting, with a turn for the other tasks every _BURST bytes.
# sys.stdin.buffer's read(n) would block the loop until n bytes came
# (StreamReader.read(n) too: it polls, then reads n), and the text
# sys.stdin turns CR into LF on the ESP32. Nothing is allocated per byte;
# on the unix port an await of readinto costs ~470 B, a sleep_ms(0) 144 B
# (the scheduler's call state), and a frame its payload, its reply, the
# encoded reply and the Deframer's check (144 B per delimiter).
import asyncio
import select
import sys

import framing
import micropython
from micropython import const

_IDLE_MS = const(10000)
_TICK_MS = const(500)  # alarms go out and the idle time is checked this often
_QUIET_MS = const(200)  # and no byte arrived for this long (a frame in flight)
_BURST = const(512)  # bytes read before the other tasks get a turn
_NUL = const(0)
_CTRL_C = const(3)
_LF = const(10)
_CR = const(13)


class Console:
    """The console task (main.parts builds it after the link it carries)."""

    name = "console"
    watch_ms = 0  # it waits on input: it has no beat to keep

    def __init__(self, link, inp=None, out=None):
        import present

        self._link = link
        self._hw = link.p.hw
        self._pr = present.Presenter(link.app)
        self._in = inp or sys.stdin.buffer
        self._out = out or sys.stdout.buffer
        self._dfr = framing.Deframer()
        # a text line lives in the Deframer's buffer: lines and frames take
        # turns, so they need one buffer between them, not two (1 KB less
        # heap). That is why every switch to link mode (a 0x00) resets the
        # Deframer: a line, or the rest of a frame cut short by the idle
        # time, may be in the buffer. A frame buffer under MAX_LINE + 1 bytes
        # would cut long lines short instead of refusing them (tests/test_serlink.py)
        self._line = memoryview(self._dfr.buf)[: present.MAX_LINE + 1]  # one more: "too long"
        self._n = 0
        self._one = bytearray(1)
        self.linked = False
        self._last = self._rx_at = 0

    async def run(self, sup):
        micropython.kbd_intr(-1)
        tick = asyncio.create_task(self._tick())
        try:
            await self._read()
        finally:
            tick.cancel()
            micropython.kbd_intr(_CTRL_C)

    async def _read(self):
        s = self._in
        one = self._one
        poll = select.poll()
        poll.register(s, select.POLLIN)
        r = asyncio.StreamReader(s)
        while await r.readinto(one):  # 0: the stream closed
            self._rx_at = self._hw.ticks_ms()  # once per burst, not per byte
            self._byte(one)
            n = _BURST
            while _waiting(poll) and s.readinto(one):
                self._byte(one)
                n -= 1
                if not n:  # a flood: the control loops must still run
                    await asyncio.sleep_ms(0)
                    n = _BURST

    def _byte(self, one):
        if self.linked:
            for m in self._dfr.feed(one):
                self._frame(m)
            return
        b = one[0]
        if b == _NUL:
            self.linked = True
            self._last = self._hw.ticks_ms()
            self._dfr.reset()
            self._n = 0
        elif b == _CTRL_C:
            raise KeyboardInterrupt
        elif b == _LF or b == _CR:
            if self._n:
                self._answer()
        elif self._n < len(self._line):
            self._line[self._n] = b
            self._n += 1

    def _answer(self):
        n = self._n
        self._n = 0
        try:
            a = str(self._line[:n], "utf-8")
        except ValueError:  # UnicodeError: noise, not a line
            a = None
        a = "error not text" if a is None else self._pr.line(a)
        if a is not None:
            self._out.write(a)
            self._out.write(b"\r\n")

    def _frame(self, m):
        self._last = self._hw.ticks_ms()
        r = self._link.handle(m)
        if r is not None:
            self._out.write(framing.encode(r))

    async def _tick(self):
        hw = self._hw
        box = self._link.outbox
        while True:
            await hw.sleep_ms(_TICK_MS)
            if not self.linked:
                continue
            while box:
                self._out.write(framing.encode(box.pop(0)))
            now = hw.ticks_ms()
            # idle: no good frame for _IDLE_MS, and not in the middle of one
            # (the rest of a frame read as text could hold a 0x03)
            if hw.ticks_diff(now, self._last) >= _IDLE_MS and (not self._dfr._n or hw.ticks_diff(now, self._rx_at) >= _QUIET_MS):
                self.linked = False
                self._n = 0


def _waiting(poll):
    for _ in poll.ipoll(0):
        return True
    return False
