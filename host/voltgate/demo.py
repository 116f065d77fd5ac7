"""`make demo` / `voltgate demo`: the whole mission on one machine, narrated.

What runs (all started here, all stopped at the end, on failure and on Ctrl-C):

- a private Mosquitto (voltgate.broker) on a free loopback port, its
  accounts from the registry: one per board, the server's, and one for
  the demo's own look at the boards;
- `voltgate server` as its own process (gateway, pull scheduler, REST API)
  on a SQLite file in the demo folder;
- four simulated boards on the MicroPython unix port: stations st-a and
  st-b (boards/sim-station-4.json), outlets ou-1 and ou-2
  (boards/sim-outlet-2.json), each provisioned through `voltgate provision`
  against a `voltgate sim` board (mpremote upload of the .mpy tree, NVS
  identity, registry, broker accounts) and then run from its flash folder
  in real time (mpside/vgsim.py), the world around it (doors, batteries,
  loads) driven through vgsim's control channel; ou-2 reaches the broker
  through a cable the demo can pull (simrun.Cable).

The scenario is a list of steps; each states what must happen and checks
it where it shows (the board's console, the simulated world, the server's
REST API and database). A step that does not happen stops the demo with
exit status 1. The folder keeps the database, each board's flash and
console, the server's and the broker's logs and report.json. The master
secret and the broker's files (passwords) live in a private temporary
folder (provisioning refuses both inside the source tree) deleted at the
end: the demo's boards are throw-away.

--quick runs the same steps with a shorter outlet window and a faster pull
interval (the test suite runs it). The boards run at speed 1: the server's
clock is the real one, and a board whose clock ran faster would see the
server's permits expire early.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import broker, keys, link, permits, simrun
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, VoltgateError

SITE = "demo"
ST_A, ST_B, OU_1, OU_2 = "st-a", "st-b", "ou-1", "ou-2"
BOARDS = {ST_A: simrun.STATION_BOARD, ST_B: simrun.STATION_BOARD, OU_1: simrun.OUTLET_BOARD, OU_2: simrun.OUTLET_BOARD}
# the world at power-up: full packs are ready for rent ~10 s after boot
WORLDS = {
    ST_A: {"batteries": [{"id": "0b00000000a1c3e5", "soc": 1.0, "soh": 97, "cycles": 141}, {"id": "0b00000000a1c3f1", "soc": 0.62, "soh": 99, "cycles": 58},
                         None, {"id": "0b00000000a1c402", "soc": 1.0, "soh": 91, "cycles": 388}]},  # fmt: skip
    ST_B: {"batteries": [{"id": "0b00000000b2d401", "soc": 1.0, "soh": 95, "cycles": 203}, None,
                         {"id": "0b00000000b2d417", "soc": 0.3, "soh": 98, "cycles": 77}, None]},  # fmt: skip
    OU_1: {"loads": [2000, 60]},
    OU_2: {"loads": [2000, 60]},
}
USERS = (("alice", "Alice (scooter)", 2000), ("bob", "Bob (camper van)", 1500), ("carol", "Carol (new, nothing paid in)", 0))
TARIFFS = (("day", 35, 6, 22), ("night", 20, 22, 6))
DEMO_USER = "voltgate-demo"  # the demo's own broker account (server ACL: it reads the boards' replies)
MARKER = ".voltgate-demo"
RIDE_SOC = 45  # what alice's battery holds when she brings it back


@dataclass(frozen=True)
class Pace:
    window_s: int  # bob's offline outlet window
    pull_s: float  # the server's pull interval
    wait_s: float  # the longest wait for any one thing to show


FULL = Pace(window_s=30, pull_s=3.0, wait_s=90.0)
QUICK = Pace(window_s=10, pull_s=1.0, wait_s=75.0)


class StepFailed(Exception):
    """A step of the scenario did not happen."""


class _Abort(Exception):
    """A step could not run for want of a tool or for bad input (exit 3 or 2, not 1)."""

    def __init__(self, error: VoltgateError):
        super().__init__(error.problem)
        self.error = error


@dataclass
class Step:
    title: str
    ok: bool | None = None
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)
    problem: str | None = None


def _check(cond, problem: str):
    if not cond:
        raise StepFailed(problem)
    return cond


def _hhmmss(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


class Demo:
    def __init__(self, out: Path, firmware: Path | None, pace: Pace, console: Console):
        self.out = out.resolve()
        self.firmware = firmware
        self.pace = pace
        self.c = console
        self.steps: list[Step] = []
        self.db_url = f"sqlite:///{self.out / 'voltgate.sqlite'}"
        self.boards: dict[str, simrun.SimProcess] = {}
        self.facts: dict = {}  # what the steps found, for later steps and the report
        self.started = time.time()

    # -- running steps

    def step(self, title: str, fn: Callable[[], list[str] | None]) -> None:
        s = Step(title)
        abort = None
        self.steps.append(s)
        n = len(self.steps)
        self.c.print(f"[bold cyan]{n:>2}.[/] [bold]{escape(title)}[/]")
        t0 = time.monotonic()
        try:
            for line in fn() or ():
                s.details.append(line)
                self.c.print(f"    {escape(line)}")
        except StepFailed as e:
            s.ok, s.problem = False, str(e)
        except VoltgateError as e:
            s.ok, s.problem = False, e.render("demo").removeprefix("voltgate: demo: ")
            if e.exit_code != EXIT_FAILURE:
                abort = e
        except Exception as e:  # a failure nobody foresaw: the step did not happen either
            import traceback

            with open(self.out / "logs" / "demo-errors.log", "a") as f:
                traceback.print_exc(file=f)
            s.ok, s.problem = False, f"{type(e).__name__}: {e} (traceback in {self.out / 'logs' / 'demo-errors.log'})"
        s.seconds = time.monotonic() - t0
        if s.ok is False:
            self.c.print(f"    [red bold]✗ did not happen:[/] [red]{escape(s.problem)}[/]")
            if abort is not None:
                raise _Abort(abort)
            raise StepFailed(s.problem)
        s.ok = True
        self.c.print(f"    [green]✓[/] [dim]{s.seconds:.1f} s[/]")

    # -- the whole run

    def run(self) -> int:
        self._prepare_out()
        self.c.rule("[bold]voltgate demo: two swap stations, two outlets, one server")
        self.c.print(f"folder: [cyan]{self.out}[/]   pace: outlet window {self.pace.window_s} s, server pulls every {self.pace.pull_s:g} s")
        failed = False
        abort = None
        with simrun.Closer() as stack:
            self.stack = stack
            try:
                self.step("the registry: a site, three users with their balances, day and night tariffs", self.setup_registry)
                self.step("four simulated boards provisioned through `voltgate provision` (mpremote upload, NVS identity, registry, broker)", self.provision)
                if self.firmware is not None:
                    self.step("the boards hold exactly the .mpy files `make firmware` built", self.same_firmware)
                self.step("a private Mosquitto with the registry's accounts", self.start_broker)
                self.step("`voltgate server`: MQTT gateway, pull scheduler and REST API on the demo's SQLite file", self.start_server)
                self.step("the boards boot from their flash, connect, and the server sets their clocks", self.boot)
                self.step("carol asks for a rent permit at st-a: refused by an approval condition", self.carol_refused)
                self.step("alice asks for a rent permit at st-a (REST API, as her phone would)", self.alice_rent_permit)
                self.step("alice's phone hands it to st-a: the best charged slot unlocks", self.alice_present_rent)
                self.step("alice opens the door, takes the battery, closes the door", self.alice_takes)
                self.step("the server pulls st-a's log: the rental is open, the battery is with alice", self.rental_open)
                self.step(f"alice rides (SoC 100 % -> {RIDE_SOC} %) and returns the battery at st-b with a return permit", self.alice_returns)
                self.step("the server pulls st-b's log: the rental is closed and billed, the battery is at st-b", self.rental_closed)
                self.step("a forged permit at ou-1 (MACed under a key mallory made up): refused by the board", self.forged)
                self.step(f"bob asks for {self.pace.window_s} s of power at ou-2 socket 0", self.bob_permit)
                self.step("ou-2 is cut off from the broker; the server marks it offline", self.cut_ou2)
                self.step("bob's phone hands the permit to ou-2 on its console (the offline path): power flows", self.bob_present)
                self.step("a copy of bob's permit presented again: refused by ou-2 as replayed", self.replayed)
                self.step("power stops at the end of the window; the server knows nothing of it yet", self.window_ends)
                self.step("the link comes back: the server pulls ou-2's log and books the session and its energy", self.link_back)
                self.step("bob's camper feeds 1.5 kWh back (a bidirectional charger's report, REST API): value points", self.points)
                self.step("the operator settles the fees: points pay what they can", self.settle)
                self.step("the ledger's hash chain and every balance verify", self.verify)
            except StepFailed:
                failed = True
            except _Abort as e:
                failed, abort = True, e.error
            except KeyboardInterrupt:
                self.c.print("[yellow]interrupted: stopping everything the demo started[/]")
                self._write_report(interrupted=True)
                raise
            if not failed:
                self.report()
            self.c.print("[dim]stopping the boards, the server and the broker[/]")
        self._write_report()
        self._outro(failed)
        if abort is not None:
            raise abort  # a missing tool (exit 3) or bad input (exit 2), as the error contract says
        return EXIT_FAILURE if failed else EXIT_OK

    def _prepare_out(self) -> None:
        out = self.out
        if out.exists() and any(out.iterdir()):
            if not (out / MARKER).exists():
                raise VoltgateError(f"{out} is not empty and is not a demo folder", "give --out a new or empty folder", EXIT_USAGE)
            shutil.rmtree(out)  # the previous demo's
        for d in (out, out / "logs", out / "boards"):
            d.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("made by voltgate demo; removed and made again by the next run\n")

    # -- setup

    def setup_registry(self) -> list[str]:
        from .server import bootstrap, services

        self.keystore, drop = simrun.private_keystore()
        self.stack.callback(drop)
        # the broker's files hold the server's password: beside the master secret, not in the demo folder
        # (provisioning refuses both inside the source tree); its log is copied into logs/ at the end
        self.broker_dir = self.keystore.parent / "broker"
        self.stack.callback(self._keep_broker_log)
        self.master = keys.load_master(self.keystore)
        eng, self.factory = bootstrap.open_database(self.db_url)
        self.stack.callback(eng.dispose)
        now = int(time.time())

        def work(s):
            services.add_site(s, SITE, "voltgate demo depot")
            for uid, name, cents in USERS:
                services.add_user(s, uid, name=name)
                if cents:
                    services.pay(s, uid, cents, now=now, ref=f"demo:topup:{uid}")
            for name, cents, a, b in TARIFFS:
                services.set_tariff(s, name, cents, a, b)

        services.retrying(self.factory, work)
        lines = [f"database {self.db_url} (migrated)", f"master secret and broker files in a private temporary folder: {self.keystore.parent} (deleted at the end)"]
        lines += [f"{uid}: {cents} c paid in" for uid, _, cents in USERS]
        lines.append("tariffs: " + ", ".join(f"{n} {c} c/kWh ({a:02d}-{b:02d} h)" for n, c, a, b in TARIFFS))
        return lines

    def provision(self) -> list[str]:
        self.broker_port = broker.free_port()
        self.broker_dir.mkdir(parents=True, exist_ok=True)
        self.server_pw = broker.server_password(self.broker_dir)
        # ou-2 reaches the broker through a cable the demo can pull
        self.cable = simrun.Cable(("127.0.0.1", self.broker_port))
        self.stack.callback(self.cable.close)
        lines = []
        for dev, board in BOARDS.items():
            flash = self.out / "boards" / dev / "flash"
            mqtt = self.cable.address if dev == OU_2 else f"127.0.0.1:{self.broker_port}"
            t0 = time.monotonic()
            res = simrun.provision_board(
                simrun.board_file(board), flash, dev, site=SITE, mqtt=mqtt, keystore=self.keystore, db=self.db_url,
                broker_dir=self.broker_dir, broker_listen=f"127.0.0.1:{self.broker_port}",
                console_log=self.out / "logs" / f"{dev}.provision.console",
            )  # fmt: skip
            steps = {s.name: s for s in res.steps}
            _check({"upload", "identity", "registry"} <= set(res.changed), f"{dev}: provisioning changed only {res.changed}")
            lines.append(f"{dev}: {board.removesuffix('.json')}, {steps['upload'].detail.split(':')[0]}; NVS identity, key version {res.key_version}; "
                         f"MQTT via {mqtt}{' (the cable)' if dev == OU_2 else ''} ({time.monotonic() - t0:.1f} s)")  # fmt: skip
        return lines

    def _keep_broker_log(self) -> None:
        log = self.broker_dir / broker.LOG
        if log.exists():
            shutil.copyfile(log, self.out / "logs" / "mosquitto.log")

    def same_firmware(self) -> list[str]:
        want = {p.relative_to(self.firmware).as_posix(): _sha(p) for p in self.firmware.rglob("*.mpy")}
        _check(want, f"no .mpy files in {self.firmware}")
        lines = []
        for dev in BOARDS:
            flash = self.out / "boards" / dev / "flash"
            have = {("main.mpy" if p.name == "vgmain.mpy" and p.parent == flash else p.relative_to(flash).as_posix()): _sha(p) for p in flash.rglob("*.mpy")}
            differ = sorted(k for k in want if have.get(k) != want[k])
            _check(not differ, f"{dev}: {len(differ)} modules differ from {self.firmware}: {', '.join(differ[:4])}")
            lines.append(f"{dev}: {len(have)} modules, identical to {self.firmware}")
        return lines

    def start_broker(self) -> list[str]:
        from .server import services

        rows = services.retrying(self.factory, lambda s: [{"device": d.id, "site": d.site_id, "key_version": d.key_version} for d in services.devices(s)])
        self.demo_pw = simrun.secret()
        config = broker.from_registry(rows, self.master, self.server_pw, port=self.broker_port, server_users=((DEMO_USER, self.demo_pw),))
        self.broker = broker.Broker(config, self.broker_dir).start()
        self.stack.callback(self.broker.stop)
        from .mqttlink import MqttTransport

        self.transport = MqttTransport("127.0.0.1", self.broker_port, DEMO_USER, self.demo_pw, site_of={d: SITE for d in BOARDS}).connect()
        self.stack.callback(self.transport.close)
        return [
            f"mosquitto on 127.0.0.1:{self.broker_port}, its files in {self.broker_dir} (log copied to logs/mosquitto.log at the end)",
            f"accounts: {len(rows)} boards (each may write only vg/{SITE}/<itself>/up|state), voltgate-server, {DEMO_USER}",
        ]

    def start_server(self) -> list[str]:
        self.http = f"127.0.0.1:{broker.free_port()}"
        self.server = simrun.ServerProcess(
            db=self.db_url, broker=f"127.0.0.1:{self.broker_port}", password_file=self.broker_dir / broker.SERVER_PASSWORD, keystore=self.keystore,
            http=self.http, pull_interval=self.pace.pull_s, log=self.out / "logs" / "server.log", cwd=self.out,
        )  # fmt: skip
        self.server.start()
        self.stack.callback(self.server.stop)
        import httpx

        self.api = httpx.Client(base_url=f"http://{self.http}", timeout=10.0)
        self.stack.callback(self.api.close)
        return [
            f"python -m voltgate.cli server --db {self.db_url} --broker 127.0.0.1:{self.broker_port} --http {self.http} --pull-interval {self.pace.pull_s:g}",
            f"REST API http://{self.http} (docs at /docs); log {self.out / 'logs' / 'server.log'}",
        ]

    def boot(self) -> list[str]:
        now = int(time.time())
        for dev in BOARDS:
            p = simrun.SimProcess(dev, self.out / "boards" / dev / "flash", self.out / "boards" / dev, unix=now, world=WORLDS[dev])
            self.boards[dev] = p
            p.start()
            self.stack.callback(p.stop)
        lines = []
        for dev, p in self.boards.items():
            online = simrun.wait_until(lambda d=dev: self._device(d).get("online"), self.pace.wait_s)
            _check(online, f"{dev} did not come online at the server (see {p.console_log} and the server's log)")
            hello = simrun.wait_until(lambda d=dev: self._trusted(d), self.pace.wait_s, 0.5)
            _check(hello, f"the server did not set {dev}'s clock (its hello says untrusted)")
            lines.append(f"{dev}: online, firmware {hello['fw']}, clock trusted ({_hhmmss(hello['clock'][2])}), log records {hello['log'][0]}..{hello['log'][1]}")
        ready = simrun.wait_until(lambda: self._slots(ST_A, state=2), self.pace.wait_s, 0.5)
        _check(ready, "st-a has no ready battery (full packs should be ready ~10 s after boot)")
        lines.append(f"st-a: slots {', '.join(str(i) for i in ready)} ready (full packs), the others charging or empty")
        return lines

    # -- the stations

    def carol_refused(self) -> list[str]:
        r = self.api.post("/api/v1/permits", json={"user_id": "carol", "device_id": ST_A, "action": "rent", "duration_s": 600})
        _check(r.status_code in (402, 403, 409), f"expected a refusal, got HTTP {r.status_code}: {r.text[:200]}")
        body = r.json()
        return [f"HTTP {r.status_code}, code {body['code']}: {body['detail']}"]

    def _permit(self, user: str, device: str, action: str, duration_s: int, **extra) -> dict:
        r = self.api.post("/api/v1/permits", json={"user_id": user, "device_id": device, "action": action, "duration_s": duration_s, **extra})
        _check(r.status_code == 201, f"{user}'s {action} permit for {device} was refused: HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    def _permit_line(self, p: dict) -> str:
        est = p["estimate"]
        n = len(bytes.fromhex(p["token_hex"]))
        line = f"permit {p['cti']} ({n} B, QR as {len(p['token_b64url'])} characters), window {_hhmmss(p['nbf'])}-{_hhmmss(p['exp'])}"
        if est["energy_cents"] or est["fee_cents"]:
            line += f"; estimate {est['energy_cents'] + est['fee_cents']} c ({est['energy_cents']} energy + {est['fee_cents']} fee)"
        return line

    def alice_rent_permit(self) -> list[str]:
        p = self.facts["rent"] = self._permit("alice", ST_A, "rent", 600)
        return [self._permit_line(p)]

    def alice_present_rent(self) -> list[str]:
        ans = self.boards[ST_A].present(bytes.fromhex(self.facts["rent"]["token_hex"]))
        _check(ans.startswith("ok slot "), f"st-a answered {ans!r}")
        slot = self.facts["slot_a"] = int(ans.split()[2])
        w = self.boards[ST_A].state()["slots"][slot]
        _check(w["lock"] and w["battery"], f"slot {slot}'s lock is not released, or it holds no battery: {w}")
        return [f"st-a console: {ans}", f"slot {slot}: lock released, battery {w['battery']['id']} at {round(w['battery']['soc'] * 100)} %"]

    def _door(self, dev: str, slot: int, between: Callable[[], dict | None], seen: Callable[[], object] | None = None) -> dict | None:
        """Open the door of an unlocked slot, do something (then wait until
        the board has seen it, when seen is given), close the door."""
        b = self.boards[dev]
        _check(b.world("open_door", slot=slot)["ok"], f"{dev} slot {slot}: the door did not open (still locked)")
        # the board sees the door open and lets the latch go (it holds the door again as it closes)
        _check(simrun.wait_until(lambda: not b.state()["slots"][slot]["lock"], 10, 0.2), f"{dev} did not see slot {slot}'s door open")
        got = between()
        if seen is not None:
            _check(simrun.wait_until(seen, 10, 0.2), f"{dev} did not see what happened in slot {slot}")
        b.world("close_door", slot=slot)
        return got

    def alice_takes(self) -> list[str]:
        slot = self.facts["slot_a"]
        gone = lambda: (lambda app: app is not None and app[slot][2] is None)(self._status(ST_A))  # noqa: E731 (the board's status: no battery)
        bat = self._door(ST_A, slot, lambda: self.boards[ST_A].world("take", slot=slot)["battery"], gone)
        _check(bat, f"slot {slot} held no battery")
        self.facts["battery"] = bat
        empty = simrun.wait_until(lambda: self._slots(ST_A, state=0, slot=slot), 15, 0.3)
        _check(empty, f"st-a did not report slot {slot} empty after the door closed")
        return [f"battery {bat['id']}: {round(bat['soc'] * 100)} %, SoH {bat['soh']} %, {bat['cycles']} cycles", f"st-a: slot {slot} empty and locked again"]

    def rental_open(self) -> list[str]:
        bid = self.facts["battery"]["id"]

        def found():
            rs = [r for r in self.api.get("/api/v1/users/alice/rentals").json() if r["battery"] == bid]
            return rs[0] if rs else None

        r = simrun.wait_until(found, self.pace.wait_s, 0.5)
        _check(r, f"no rental of battery {bid} for alice at the server")
        _check(r["open"] and r["out_device"] == ST_A and r["out_slot"] == self.facts["slot_a"], f"the rental is not as expected: {r}")
        self.facts["rental"] = r
        b = self.api.get(f"/api/v1/batteries/{bid}").json()
        _check(b["renter"] == "alice", f"the server does not have battery {bid} with alice: {b}")
        return [f"rental {r['id']}: battery {bid} out of st-a slot {r['out_slot']} at {_hhmmss(r['out_ts'])}, SoC {r['out_soc']} %, open",
                f"battery {bid}: with alice, SoH {b['soh']} %"]  # fmt: skip

    def alice_returns(self) -> list[str]:
        p = self._permit("alice", ST_B, "return", 600, battery=self.facts["battery"]["id"])
        ans = self.boards[ST_B].present(bytes.fromhex(p["token_hex"]))
        _check(ans.startswith("ok slot "), f"st-b answered {ans!r}")
        slot = self.facts["slot_b"] = int(ans.split()[2])
        bat = self.facts["battery"]
        self._door(ST_B, slot, lambda: self.boards[ST_B].world("insert", slot=slot, id=bat["id"], soc=RIDE_SOC / 100, soh=bat["soh"], cycles=bat["cycles"]))
        charging = simrun.wait_until(lambda: self._slots(ST_B, state=1, slot=slot), 15, 0.3)
        _check(charging, f"st-b did not take the battery into slot {slot} (not charging)")
        return [self._permit_line(p) + " (names the battery)", f"st-b console: {ans}",
                f"st-b: battery {bat['id']} read in slot {slot} at {RIDE_SOC} %, charging"]  # fmt: skip

    def rental_closed(self) -> list[str]:
        rid, bid = self.facts["rental"]["id"], self.facts["battery"]["id"]

        def closed():
            rs = [r for r in self.api.get("/api/v1/users/alice/rentals").json() if r["id"] == rid and not r["open"]]
            return rs[0] if rs else None

        r = simrun.wait_until(closed, self.pace.wait_s, 0.5)
        _check(r, f"rental {rid} is still open at the server")
        _check(r["in_device"] == ST_B and r["in_slot"] == self.facts["slot_b"] and r["in_soc"] == RIDE_SOC, f"the rental closed otherwise: {r}")
        entries = [e for e in self.api.get("/api/v1/users/alice/ledger").json() if e["ref"] == f"rental:{rid}"]
        _check(entries and entries[0]["kind"] == "energy_taken", f"no energy entry for rental {rid} in alice's ledger")
        e = entries[0]
        b = self.api.get(f"/api/v1/batteries/{bid}").json()
        _check(b["device"] == ST_B and b["slot"] == self.facts["slot_b"] and b["renter"] is None, f"the server does not have the battery at st-b: {b}")
        return [f"rental {rid}: back at st-b slot {r['in_slot']} at {_hhmmss(r['in_ts'])}, SoC {r['out_soc']} % -> {r['in_soc']} %",
                f"ledger #{e['seq']}: alice energy_taken {e['energy_mwh'] / 1000:.0f} Wh, {e['amount']} c (tariff over the rental's hours)",
                f"battery {bid}: at st-b slot {b['slot']}, SoC {b['soc']} %"]  # fmt: skip

    def forged(self) -> list[str]:
        now = int(time.time())
        fake = permits.issue(os.urandom(32), 1, device_id=OU_1, user_id="mallory", action="power", not_before=now, expires=now + 3600, issued_at=now, scope=[0])
        ans = self.boards[OU_1].present(fake)
        _check(ans == "refused bad_mac", f"ou-1 answered {ans!r}")
        relay = self.boards[OU_1].state()["outlets"][0]["relay"]
        _check(not relay, "ou-1's relay closed for a forged permit")
        return [f"ou-1 console: {ans}; relay stays open"]

    # -- the offline outlet

    def bob_permit(self) -> list[str]:
        p = self.facts["power"] = self._permit("bob", OU_2, "power", self.pace.window_s, scope=[0])
        return [self._permit_line(p) + f", energy cap {p['max_wh']} Wh"]

    def cut_ou2(self) -> list[str]:
        self.cable.cut()
        self.facts["cut_at"] = time.time()
        off = simrun.wait_until(lambda: self._device(OU_2).get("online") is False, self.pace.wait_s, 0.2)
        _check(off, "the server still has ou-2 online")
        return ["the cable between ou-2 and the broker is pulled; the broker published ou-2's last will", "server: ou-2 offline"]

    def bob_present(self) -> list[str]:
        p = self.facts["power"]
        ans = self.boards[OU_2].present(bytes.fromhex(p["token_hex"]))
        _check(ans == "ok outlet 0", f"ou-2 answered {ans!r}")
        self.facts["on_at"] = time.time()
        w = simrun.wait_until(lambda: (lambda o: o if o["relay"] and o["mw"] > 0 else None)(self.boards[OU_2].state()["outlets"][0]), 5, 0.2)
        _check(w, "ou-2's relay did not close")
        _check(not self.cable.up, "the cable is back already")
        return [f"ou-2 console: {ans} (checked offline: MAC under ou-2's key, window against its trusted clock)", f"socket 0: relay closed, {w['mw'] / 1000:.0f} W"]

    def replayed(self) -> list[str]:
        ans = self.boards[OU_2].present(bytes.fromhex(self.facts["power"]["token_hex"]))
        _check(ans == "refused replayed", f"ou-2 answered {ans!r}")
        return [f"ou-2 console: {ans} (single use: the board keeps used permit ids until they expire)"]

    def window_ends(self) -> list[str]:
        exp = self.facts["power"]["exp"]
        b = self.boards[OU_2]
        on, off_at, last_on, mwh = [], None, None, None
        # the world sampled 4 times a second from now until the relay has stayed open 2 s (at most 8 s past the end)
        while time.time() < exp + 8 and not (off_at is not None and time.time() > max(off_at, exp) + 2):
            o = b.state()["outlets"][0]
            t = time.time()
            if o["relay"]:
                _check(off_at is None, "the relay closed again after it opened")
                _check(t < exp + 3, f"the relay was still closed {t - exp:.1f} s after the window's end")
                on.append(o["mw"])
                last_on = t
            elif off_at is None and last_on is not None:
                off_at, mwh = t, o["mwh"]
            elif off_at is not None:
                _check(o["mw"] == 0 and o["mwh"] == mwh, "energy flowed after the relay opened")
            time.sleep(0.25)
        _check(off_at is not None, "the relay never opened")
        _check(last_on is not None and last_on >= exp - 2.5, f"power stopped {exp - (last_on or 0):.1f} s before the window's end")
        sessions = self.api.get("/api/v1/users/bob/sessions").json()
        _check(not sessions, f"the server has sessions for bob already: {sessions}")
        _check(self._device(OU_2).get("online") is False, "ou-2 is online again")
        self.facts["meter_mwh"] = mwh
        return [f"relay closed {_hhmmss(self.facts['on_at'])}, opened {_hhmmss(off_at)}; the window ends {_hhmmss(exp)}; {max(on) / 1000:.0f} W while closed",
                f"ou-2's meter: {mwh / 1000:.1f} Wh; the server: no session for bob, ou-2 still offline"]  # fmt: skip

    def link_back(self) -> list[str]:
        self.cable.restore()
        t0 = time.time()
        on = simrun.wait_until(lambda: self._device(OU_2).get("online"), self.pace.wait_s, 0.2)
        _check(on, f"ou-2 did not come back online within {self.pace.wait_s:.0f} s")
        back = time.time() - t0
        cti = self.facts["power"]["cti"]

        def booked():
            ss = [x for x in self.api.get("/api/v1/users/bob/sessions").json() if x["permit"] == cti and x["end_ts"]]
            return ss[0] if ss else None

        x = simrun.wait_until(booked, self.pace.wait_s, 0.5)
        _check(x, "the server booked no ended session for bob's permit")
        _check(x["energy_mwh"] > 0 and x["device"] == OU_2 and x["outlet"] == 0, f"the session is not as expected: {x}")
        expect = 2000 * x["duration_s"] / 3.6  # mWh at 2 kW
        _check(abs(x["energy_mwh"] - expect) <= 0.1 * expect + 1000, f"{x['energy_mwh']} mWh booked for {x['duration_s']} s at 2 kW (about {expect:.0f} expected)")
        entries = [e for e in self.api.get("/api/v1/users/bob/ledger").json() if e["ref"] == f"session:{x['id']}"]
        _check(entries and entries[0]["kind"] == "energy_taken" and entries[0]["energy_mwh"] == x["energy_mwh"], "the session's energy is not in bob's ledger")
        self.facts["session"] = x
        return [f"ou-2 online again after {back:.1f} s (the board's reconnect backoff); the server pulled its log at once",
                f"session {x['id']}: {_hhmmss(x['start_ts'])}-{_hhmmss(x['end_ts'])}, {x['duration_s']} s, {x['energy_mwh'] / 1000:.1f} Wh, ended by {x['reason']}",
                f"ledger #{entries[0]['seq']}: bob energy_taken {x['energy_mwh'] / 1000:.1f} Wh, {entries[0]['amount']} c"
                + (" (under half a cent at the tariff: rounds to 0)" if entries[0]["amount"] == 0 else "")]  # fmt: skip

    def points(self) -> list[str]:
        now = int(time.time())
        r = self.api.post("/api/v1/energy", json={"user_id": "bob", "device_id": OU_1, "direction": "given", "energy_mwh": 1_500_000,
                                                  "start": now - 3600, "end": now, "ref": "demo-v2g-1"})  # fmt: skip
        _check(r.status_code == 201, f"HTTP {r.status_code}: {r.text[:200]}")
        e = r.json()
        _check(e["points"] > 0, f"no points for energy given: {e}")
        u = self.api.get("/api/v1/users/bob").json()
        return [f"ledger #{e['seq']}: bob energy_given 1500 Wh, +{e['points']} points", f"bob: {u['points']} points, worth {u['points_value']} c against fees"]

    def settle(self) -> list[str]:
        from .server import services

        now = int(time.time())
        start = int(self.started) - 60

        def work(s):
            return [(x.user_id, x.sessions, x.rentals, x.fee_cents, x.points_spent, x.points_cents, x.due_cents) for x in services.settle_all(s, start, now + 1, now=now)]

        rows = services.retrying(self.factory, work)
        by = {r[0]: r for r in rows}
        _check("alice" in by and by["alice"][2] == 1 and by["alice"][3] > 0, f"alice's rental fee is missing: {rows}")
        _check("bob" in by and by["bob"][1] == 1 and by["bob"][4] > 0, f"bob's session fee is not paid with points: {rows}")
        self.facts["settled"] = by
        return [f"{u}: {n_s} session(s), {n_r} rental(s): fee {fee} c, {pts} points pay {pc} c, due {due} c" for u, n_s, n_r, fee, pts, pc, due in rows]

    def verify(self) -> list[str]:
        from .server import services

        check = services.retrying(self.factory, lambda s: services.ledger_verify(s))
        c = check.chain
        _check(check.ok, f"the ledger does not verify: {c.problem or check.mismatches}")
        self.facts["ledger"] = {"entries": c.entries, "head": f"{c.head_seq}:{c.head_hash.hex()}"}
        return [f"{c.entries} entries, hash chain intact, balances and points equal the ledger's sums; head {c.head_seq}:{c.head_hash.hex()[:16]}..."]

    # -- looking at things

    def _device(self, dev: str) -> dict:
        try:
            r = self.api.get(f"/api/v1/devices/{dev}")
        except Exception:
            return {}
        return r.json() if r.status_code == 200 else {}

    def _link(self, dev: str) -> link.Board:
        return link.Board(self.transport, dev, timeout=2.0, retries=1)

    def _trusted(self, dev: str) -> dict | None:
        try:
            h = self._link(dev).hello()
        except (link.LinkTimeout, VoltgateError):
            return None
        return h if h.get("clock") and h["clock"][0] else None

    def _status(self, dev: str) -> list | None:
        try:
            return self._link(dev).status().get("app")
        except (link.LinkTimeout, VoltgateError):
            return None

    def _slots(self, dev: str, *, state: int, slot: int | None = None) -> list[int] | None:
        """The slots of a station in a state (firmware/station.py: 0 empty,
        1 charging, 2 ready), as its status says over MQTT; None if none."""
        app = self._status(dev)
        if not app:
            return None
        found = [i for i, row in enumerate(app) if row[0] == state and (slot is None or i == slot)]
        return found or None

    # -- the end

    def report(self) -> None:
        from .server import services

        def users(s):
            out = []
            for u in services.users(s):
                es = services.ledger(s, user_id=u.id)
                taken = sum(e.energy_mwh for e in es if e.kind == "energy_taken")
                given = sum(e.energy_mwh for e in es if e.kind == "energy_given")
                paid = sum(e.amount for e in es if e.kind == "payment")
                energy = -sum(e.amount for e in es if e.kind in ("energy_taken", "rental_correction"))
                fees = -sum(e.amount for e in es if e.kind == "fee")
                earned = sum(e.points for e in es if e.points > 0)
                spent = -sum(e.points for e in es if e.points < 0)
                out.append({"user": u.id, "paid_in": paid, "taken_wh": taken / 1000, "given_wh": given / 1000, "energy_cents": energy,
                            "fee_cents": fees, "points_earned": earned, "points_spent": spent, "points": u.points, "balance": u.balance})  # fmt: skip
            return out

        rows = services.retrying(self.factory, users)
        self.facts["users"] = rows
        t = Table(title="users (from the ledger)", title_justify="left")
        for col in ("user", "paid in", "energy taken", "given back", "energy cost", "fees", "points +/-", "points left", "balance"):
            t.add_column(col, justify="left" if col == "user" else "right")
        for r in rows:
            t.add_row(r["user"], f"{r['paid_in']} c", f"{r['taken_wh']:.1f} Wh", f"{r['given_wh']:.0f} Wh", f"{r['energy_cents']} c", f"{r['fee_cents']} c",
                      f"+{r['points_earned']} / -{r['points_spent']}", str(r["points"]), f"{r['balance']} c")  # fmt: skip
        self.c.print(t)

        stations = {}
        t = Table(title="stations", caption="state: the server's, from the pulled logs; battery, SoC: the board's status", title_justify="left", caption_justify="left")
        for col in ("station", "slot", "state", "battery", "SoC"):
            t.add_column(col)
        for dev in (ST_A, ST_B):
            server = {x["index"]: x for x in self._device(dev).get("slots", [])}
            app = self._status(dev) or []
            stations[dev] = []
            for i, row in enumerate(app):
                bid = row[2].hex() if isinstance(row[2], bytes) else row[2]
                stations[dev].append({"slot": i, "state": server.get(i, {}).get("state"), "battery": bid, "soc": row[3]})
                t.add_row(dev, str(i), str(server.get(i, {}).get("state")), bid or "-", f"{row[3]} %" if row[3] is not None else "-")
        self.facts["stations"] = stations
        self.c.print(t)
        bats = self.api.get("/api/v1/batteries").json()
        for b in bats:
            where = f"at {b['device']} slot {b['slot']}" if b["device"] else f"with {b['renter']}" if b["renter"] else "away"
            self.c.print(f"  battery {b['id']} (the server's registry): {where}, SoC {b['soc']} %, SoH {b['soh']} %")

    def _write_report(self, interrupted: bool = False) -> None:
        doc = {
            "ok": all(s.ok for s in self.steps) and not interrupted,
            "interrupted": interrupted,
            "started": int(self.started),
            "seconds": round(time.time() - self.started, 1),
            "pace": self.pace.__dict__,
            "steps": [{"title": s.title, "ok": s.ok, "seconds": round(s.seconds, 2), "details": s.details, "problem": s.problem} for s in self.steps],
            "facts": {k: v for k, v in self.facts.items() if k in ("users", "stations", "ledger", "session", "rental")},
        }
        (self.out / "report.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")

    def _outro(self, failed: bool) -> None:
        took = time.time() - self.started
        self.c.rule()
        if failed:
            bad = next(s for s in self.steps if s.ok is False)
            self.c.print(f"[red bold]the demo stopped at step {self.steps.index(bad) + 1}: {escape(bad.title)}[/]")
        else:
            self.c.print(f"[green bold]every step happened[/] ({len(self.steps)} steps in {took:.0f} s)")
        self.c.print(f"left in [cyan]{self.out}[/]: voltgate.sqlite, report.json, logs/ (server, broker, provisioning), boards/<id>/ (flash, console.log)", soft_wrap=True)
        self.c.print("inspect with:")
        for cmd in (f"voltgate ledger verify --db {self.db_url}", f"voltgate ledger show --db {self.db_url}", f"voltgate users list --db {self.db_url}",
                    f"python -m json.tool {self.out / 'report.json'}"):  # fmt: skip
            self.c.print(f"  [bold]{escape(cmd)}[/]", soft_wrap=True)  # whole, for copying


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def run(firmware: Path | None, out: Path, quick: bool = False) -> int:
    # under make or CI there is no terminal to measure: a width that fits the tables
    console = Console(width=None if sys.stdout.isatty() else 120, highlight=False)
    if firmware is not None and not (firmware / "permit.mpy").is_file():
        raise VoltgateError(f"{firmware} holds no compiled board tree", "make firmware builds it (build/firmware), or leave --firmware out", EXIT_USAGE)
    return Demo(out, firmware, QUICK if quick else FULL, console).run()
