# Boot and the main loop: one asyncio loop, a task per subsystem, and a
# watchdog (started before the boot) fed only while every task keeps
# checking in. Any exception that reaches the top turns every output off, is
# written to the flash log and the console, and resets the board; Ctrl-C
# turns the outputs off and leaves the REPL to the technician. On a board this file runs at power-up;
# tests call main.run() with simulated hardware.
import asyncio
import sys

import wire

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


WDT_FEED_MS = const(1000)
CLOCK_TICK_MS = const(1000)
PRUNE_EVERY = const(3600)  # clock ticks between permit store prunes
APP_WATCH_MS = const(5000)  # an app that sets no watch_ms must check in this often


class Supervisor:
    """Feeds the hardware watchdog only while every registered task has
    checked in within its own limit: a task that hangs or dies stops the
    feeding, and the watchdog resets the board."""

    def __init__(self, hw):
        self._hw = hw
        self._last = {}
        self._limit = {}

    def register(self, name, limit_ms):
        self._limit[name] = limit_ms
        self._last[name] = self._hw.ticks_ms()

    def beat(self, name):
        self._last[name] = self._hw.ticks_ms()

    def alive(self):
        now = self._hw.ticks_ms()
        for name in self._limit:
            if self._hw.ticks_diff(now, self._last[name]) > self._limit[name]:
                return False
        return True

    async def run(self):
        while True:
            if self.alive():
                self._hw.wdt.feed()
            await self._hw.sleep_ms(WDT_FEED_MS)


async def clock_task(p, sup):
    n = 0
    while True:
        p.clock.tick()
        n += 1
        if n % PRUNE_EVERY == 0:
            p.permits.prune()
        sup.beat("clock")
        await p.hw.sleep_ms(CLOCK_TICK_MS)


def fatal(hw, p, exc):
    """The last handler: safe outputs, the error in the log, then reset."""
    try:
        if hw is not None:
            hw.safe()
    finally:
        sys.print_exception(exc)
        if p is not None:
            try:
                p.log.append(wire.LOG_ERROR, [type(exc).__name__, str(exc)[:80]], p.clock.floor())
            except Exception as e2:  # the log itself may be what failed
                sys.print_exception(e2)
        if hw is not None:
            hw.reset()


async def _main(p, apps, sup):
    loop = asyncio.get_event_loop()

    def on_error(loop, context):
        fatal(p.hw, p, context["exception"])

    loop.set_exception_handler(on_error)
    # every task is watched from before it first runs: one that hangs before
    # it ever checks in must stop the feeding too
    sup.register("clock", 3 * CLOCK_TICK_MS)
    for app in apps:
        # an app has .name, checks in with sup.beat(app.name), and may set
        # .watch_ms (how long it may go without checking in; 0: not watched,
        # for a task that only waits on input)
        limit = getattr(app, "watch_ms", APP_WATCH_MS)
        if limit:
            sup.register(app.name, limit)
    tasks = [asyncio.create_task(sup.run()), asyncio.create_task(clock_task(p, sup))]
    for app in apps:
        tasks.append(asyncio.create_task(app.run(sup)))
    await asyncio.gather(*tasks)


def run(hw, board, apps=(), extra=None):
    """Boot the platform on hw and run forever (or until extra, a coroutine
    the tests pass to drive simulated time, returns)."""
    from system import System

    p = None
    try:
        # the watchdog runs from before the boot: a boot that hangs resets
        hw.wdt.start(board.get("watchdog_ms", 8000))
        p = System(hw, board)
        sup = Supervisor(hw)
        built = [t for t in (make(p) for make in apps) if t is not None]
        if extra is None:
            asyncio.run(_main(p, built, sup))
        else:
            asyncio.run(_until(p, built, sup, extra))
    except KeyboardInterrupt:
        hw.safe()  # Ctrl-C (mpremote): the REPL gets a board with its outputs off
        raise
    except Exception as e:
        fatal(hw, p, e)
    return p


async def _until(p, apps, sup, extra):
    main_task = asyncio.create_task(_main(p, apps, sup))
    await extra(p, sup)
    main_task.cancel()


def boot_hw(path="/board.json", root="/data", hal=None):
    """The hardware and the few board settings that outlive the boot; the
    parsed board file itself is dropped (tens of KB on a big station) before
    the platform's modules are imported. hal overrides the file's choice
    (the benchmarks run an ESP32 board's layout on the simulator)."""
    import gc
    import json

    with open(path) as f:
        board = json.load(f)
    if (hal or board.get("hal")) == "sim":
        from hal import sim

        hw = sim.make(board, root)
    else:
        from hal import esp32

        hw = esp32.make(board)
    keep = {"kind": board["kind"], "name": board.get("name"), "watchdog_ms": board.get("watchdog_ms", 8000), "limits": board.get("limits", {})}
    del board
    gc.collect()
    return hw, keep


def app_for(kind):
    """The application factory for a board kind (firmware/APPS.md)."""
    if kind == "station":
        from station import Station

        return Station
    from outlet import Outlet

    return Outlet


def parts(kind):
    """The factories run() builds at boot, in order: the application, the
    message link (link.py) with the console that carries it on the serial
    line (serlink.py), and the MQTT link when the store's link settings name a broker.
    A factory may return None: nothing to run."""
    made = {}

    def app(p):
        made["app"] = a = app_for(kind)(p)
        return a

    def console(p):
        import link
        import serlink

        made["link"] = lk = link.Link(p, made["app"])
        return serlink.Console(lk)

    def mqtt(p):
        if not p.ident.link.get("host"):
            return None
        import mqtt

        return mqtt.MqttLink(p, made["link"], p.ident.link)

    return (app, console, mqtt)


def main():
    try:
        hw, board = boot_hw()
    except Exception as e:
        # no hw object to make safe: the esp32 layer drives outputs off as
        # its first act, so all that is left is to say why and start over
        sys.print_exception(e)
        import machine

        machine.reset()
    # simulated hardware (hal.sim) keeps no time of its own: on its own
    # (voltgate sim) its world follows the real clock
    run(hw, board, parts(board["kind"]), extra=getattr(hw, "follow_clock", None))


if __name__ == "__main__":
    main()
