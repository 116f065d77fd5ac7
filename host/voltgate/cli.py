"""The `voltgate` command: parses arguments and calls the library.

Errors users can act on are printed as `voltgate: <command>: <problem> (<hint>)`
with no traceback; exit codes are listed in EPILOG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import EXIT_ENVIRONMENT, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, VoltgateError

EPILOG = """\
exit codes:
  0  success
  1  the operation ran and failed (e.g. a demo step did not happen)
  2  bad command line or bad input
  3  a tool, file or device the command needs is missing

examples:
  voltgate build --out build/firmware     compile the board image tree (.mpy)
  voltgate demo                           broker, server, simulated fleet, narrated scenario
  voltgate boards validate                check every board file in boards/
  voltgate boards list --json             the board files, for scripts
"""


def cmd_build(args) -> int:
    from rich.console import Console

    from . import build

    console = Console(stderr=True)
    with console.status("compiling") as status:
        report = build.build(Path(args.out), progress=lambda name: status.update(f"mpy-cross {name}"))
    console.print(f"[green]built[/] {len(report.compiled)} modules (.mpy v{report.mpy_version}) into {report.out}")
    for name in report.fetched:
        console.print(f"  fetched {name} (sha256 checked)")
    return EXIT_OK


def cmd_demo(args) -> int:
    from . import demo

    return demo.run(firmware=Path(args.firmware) if args.firmware else None, out=Path(args.out), quick=args.quick)


def _board_files(args) -> list:
    from . import boards

    files = [Path(f) for f in args.files] or boards.default_files()
    if not files:
        raise VoltgateError("no board files in boards/", "set VOLTGATE_TREE to the repository root", EXIT_ENVIRONMENT)
    return files


def cmd_boards_validate(args) -> int:
    from . import boards

    reports = [boards.validate(f) for f in _board_files(args)]
    if args.json:
        print(json.dumps({"valid": all(r.ok for r in reports), "files": [r.as_dict() for r in reports]}, indent=2))
    else:
        for r in reports:
            print(f"{r.file}: {_verdict(len(r.errors), len(r.warnings))}")
            for m in r.errors:
                print(f"  error: {m}")
            for m in r.warnings:
                print(f"  warning: {m}")
    bad = sum(not r.ok for r in reports)
    if bad:
        raise VoltgateError(f"{bad} of {_count(len(reports), 'board file')} {'has' if bad == 1 else 'have'} errors", exit_code=EXIT_USAGE)
    return EXIT_OK


def cmd_boards_list(args) -> int:
    from . import boards

    rows = [boards.summary(boards.validate(f)) for f in _board_files(args)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    table = [("NAME", "KIND", "CHIP", "HAL", "SIZE", "CHECK")]
    for r in rows:
        size = _count(r["slots"], "slot") if r["slots"] is not None else _count(r["outlets"], "outlet") if r["outlets"] is not None else "-"
        name = r["name"] or f"({r['file']})"
        table.append((name, r["kind"] or "-", r["chip"] or "-", r["hal"] or "-", size, _verdict(r["errors"], r["warnings"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return EXIT_OK


def _count(n, word) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _verdict(errors, warnings) -> str:
    return ", ".join(_count(n, w) for n, w in ((errors, "error"), (warnings, "warning")) if n) or "valid"


def cmd_broker_config(args) -> int:
    from . import broker, keys

    try:
        registry = json.loads(Path(args.devices).read_text())
    except FileNotFoundError:
        raise VoltgateError(f"no device list at {args.devices}", "write a JSON list of {device, site, key_version}", EXIT_USAGE) from None
    except json.JSONDecodeError as e:
        raise VoltgateError(f"{args.devices} is not JSON: {e.msg} at line {e.lineno}", None, EXIT_USAGE) from None
    if not isinstance(registry, list):
        raise VoltgateError(f"{args.devices} must hold a JSON list", None, EXIT_USAGE)
    master = keys.load_master(args.keystore)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.server_password_file:
        server_pw = Path(args.server_password_file).read_text().strip()
    else:
        server_pw = broker.server_password(out)
    config = broker.from_registry(registry, master, server_pw, host=args.host, port=args.port)
    conf = config.write(out)
    if args.json:
        print(json.dumps({"conf": str(conf), "devices": [d.device for d in config.devices], "server_user": config.server_user}))
    else:
        print(f"wrote {conf}, {out / broker.PASSWD} and {out / broker.ACL} for {_count(len(config.devices), 'device')}")
        print(f"run it with: mosquitto -c {conf}")
    return EXIT_OK


def cmd_version(args) -> int:
    print(f"voltgate {__version__}")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="voltgate",
        description="Host software for voltgate battery-swap stations and permit-gated outlets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"voltgate {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "build",
        help="compile firmware/ and the protocol modules to .mpy for boards",
        description="Compile firmware/, the protocol codec modules and the pinned third-party MicroPython "
        "libraries (fetched from PyPI, sha256-checked) to .mpy with mpy-cross.",
        epilog="example:\n  voltgate build --out build/firmware",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="build/firmware", help="output folder, replaced as a whole (default: %(default)s)")
    p.set_defaults(fn=cmd_build)

    p = sub.add_parser(
        "demo",
        help="the whole mission on this machine: broker, server, four simulated boards, a narrated scenario",
        description="Start a private Mosquitto and `voltgate server` (SQLite in the demo folder), provision two "
        "4-slot stations and two 2-relay outlets through `voltgate provision` against simulated boards, run them "
        "on the MicroPython unix port, and play a scenario: permits granted and refused, a battery rented at one "
        "station and returned at the other, an outlet cut off from the broker that takes a permit offline and is "
        "booked when its link comes back, forged and replayed permits refused, fees settled with points, the "
        "ledger verified. Each step is checked; exits 1 at the first one that did not happen. Everything it "
        "started is stopped at the end; the folder keeps the database and the logs.",
        epilog="examples:\n  voltgate demo                            about 2 minutes, into demo-run/\n"
        "  voltgate demo --quick --out /tmp/demo    the same steps with a 10 s outlet window",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--firmware", help="the compiled board tree (make firmware: build/firmware); the demo checks the boards hold exactly it")
    p.add_argument("--out", default="demo-run", help="folder for the database, logs and board flash (default: %(default)s; replaced by the next run)")
    p.add_argument("--quick", action="store_true", help="a shorter outlet window and faster pulls (what the tests run)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser(
        "boards",
        help="validate and list the board files (boards/*.json)",
        description="Board files describe a board design: chip, pins per function, slots or outlets, sensors "
        "and their calibration, RTC, link (format: boards/README.md).",
        epilog="examples:\n  voltgate boards validate\n  voltgate boards list --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(fn=lambda args, p=p: _usage(p))
    bsub = p.add_subparsers(dest="boards_command", metavar="SUBCOMMAND")
    b = bsub.add_parser(
        "validate",
        help="check board files against format 1 and the ESP32 pin rules",
        description="Check board files: unknown or missing keys, slot/outlet counts, duplicate GPIOs, flash pins "
        "(6-11), outputs on input-only pins (34-39), ADC1 pins, bus/expander references, I2C addresses. Strapping "
        "pins (0, 2, 5, 12, 15) are warnings. Every message names the file and the key. Exits 0 when every file is "
        "valid (warnings are printed), 2 when any file has errors.",
        epilog="examples:\n  voltgate boards validate                     every file in boards/\n"
        "  voltgate boards validate my-board.json\n  voltgate boards validate --json | jq .valid",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("files", nargs="*", metavar="FILE", help="board files (default: every boards/*.json)")
    b.add_argument("--json", action="store_true", help="print {valid, files: [{file, valid, errors, warnings}]} as JSON")
    b.set_defaults(fn=cmd_boards_validate, command="boards validate")
    b = bsub.add_parser(
        "list",
        help="name, kind, chip, hal and slot/outlet count of each board file",
        description="List board files with their name, kind, chip, hardware layer, slot or outlet count and "
        "whether they validate.",
        epilog="examples:\n  voltgate boards list\n  voltgate boards list --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("files", nargs="*", metavar="FILE", help="board files (default: every boards/*.json)")
    b.add_argument("--json", action="store_true", help="print a list of {file, name, kind, chip, hal, slots, outlets, errors, warnings}")
    b.set_defaults(fn=cmd_boards_list, command="boards list")

    p = sub.add_parser(
        "broker",
        help="Mosquitto configuration for the boards of a registry",
        description="Write mosquitto.conf, a password file and an ACL for a list of boards: each board may "
        "publish only to vg/<site>/<device>/up and .../state and read only .../down; the server user reads every "
        "up/state and writes every down. Board passwords are derived from the device keys (master secret).",
        epilog="example:\n  voltgate broker config --devices devices.json --keystore ~/.voltgate/master.key --out broker/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(fn=lambda args, p=p: _usage(p))
    bsub = p.add_subparsers(dest="broker_command", metavar="SUBCOMMAND")
    b = bsub.add_parser(
        "config",
        help="write mosquitto.conf, passwd and acl for a device list",
        description="devices.json is a JSON list of {\"device\": id, \"site\": site, \"key_version\": n}. "
        "The server's password is read from --server-password-file, or from <out>/server-password, or made and "
        "written there (mode 0600); it is never printed.",
        epilog="example:\n  voltgate broker config --devices devices.json --keystore master.key --out broker/ --port 1883",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--devices", required=True, help="JSON list of the boards")
    b.add_argument("--keystore", required=True, help="the master secret file (mode 0600)")
    b.add_argument("--out", required=True, help="folder for mosquitto.conf, passwd, acl and data/")
    b.add_argument("--host", default="127.0.0.1", help="listener address (default: %(default)s)")
    b.add_argument("--port", type=int, default=1883, help="listener port (default: %(default)s)")
    b.add_argument("--server-password-file", help="file holding the server user's password")
    b.add_argument("--json", action="store_true", help="print {conf, devices, server_user} as JSON")
    b.set_defaults(fn=cmd_broker_config, command="broker config")

    _server_parser(sub)
    _operator_parsers(sub)
    from . import cli_tech

    cli_tech.register(sub)
    if "sim" in sub.choices:  # `voltgate sim fleet` is parsed by fleet_parser() (main dispatches to it)
        sim = sub.choices["sim"]
        sim.epilog = (sim.epilog or "") + "\nA fleet of simulated boards with users, faults and link drops: voltgate sim fleet --help\n"

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(fn=cmd_version)
    return ap


# -- voltgate server (the management server: gateway, pulls, REST API) -------------------------

SERVER_EXAMPLES = """\
examples:
  voltgate server                           SQLite file voltgate.sqlite, broker 127.0.0.1:1883, API on 127.0.0.1:8080
  voltgate server --db postgresql://vg@db.example/voltgate --broker 10.0.0.5:1883 \\
      --broker-user voltgate-server-2 --broker-password-file /etc/voltgate/server-2.password
                                            a second process against the same PostgreSQL and broker
  voltgate server --http off --pull-interval 60
                                            boards only, each pulled every minute

Several processes may run against one PostgreSQL and one broker, each with its own
broker account (the broker forces client id = user name). Ctrl-C or SIGTERM stops
the server cleanly.
"""


def cmd_server(args) -> int:
    from .server import bootstrap

    bootstrap.configure_logging()
    opts = bootstrap.ServerOptions(
        db=args.db,
        broker=args.broker,
        broker_user=args.broker_user,
        broker_password_file=args.broker_password_file,
        keystore=args.keystore,
        http=args.http,
        pull_interval=args.pull_interval,
    )
    return bootstrap.serve(opts)


def _server_parser(sub) -> None:
    from .server import bootstrap

    p = sub.add_parser(
        "server",
        help="run the management server: board gateway, log pulls, REST API",
        description="Run the management server in one process: the MQTT gateway (pulls every board's log into "
        "the database, stored once per record, and sends queued commands), the pull scheduler and the REST API. "
        "The database is migrated to the newest schema first. Boards and their sites come from the registry "
        "(the devices table); their keys are derived from the master secret.",
        epilog=SERVER_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", help="database URL (default: $VOLTGATE_DB, else sqlite:///voltgate.sqlite)")
    p.add_argument("--broker", default=bootstrap.DEFAULT_BROKER, metavar="HOST:PORT", help="MQTT broker (default: %(default)s)")
    p.add_argument("--broker-user", default=bootstrap.SERVER_USER, help="this process's broker account (default: %(default)s)")
    p.add_argument(
        "--broker-password-file", default=bootstrap.DEFAULT_PASSWORD_FILE, help="file holding that account's password (default: %(default)s)"
    )
    p.add_argument(
        "--keystore",
        default=os.environ.get("VOLTGATE_KEYSTORE", bootstrap.DEFAULT_KEYSTORE),
        help="the master secret file, mode 0600 (default: $VOLTGATE_KEYSTORE, else %(default)s)",
    )
    p.add_argument("--http", default=bootstrap.DEFAULT_HTTP, metavar="HOST:PORT", help="REST API address, or 'off' (default: %(default)s)")
    p.add_argument("--pull-interval", type=float, default=300.0, metavar="SECONDS", help="pull each board this often (default: %(default)s)")
    p.set_defaults(fn=cmd_server)


# -- operator commands on the server's database: users, tariffs, settings, devices, permits, ledger --

DB_HELP = "database URL (default: $VOLTGATE_DB, else sqlite:///voltgate.sqlite)"


def _open_db(args):
    """(session factory, engine) of --db, migrated to the newest schema."""
    from .server import bootstrap

    eng, factory = bootstrap.open_database(args.db)
    return eng, factory


def _in_db(args, work):
    """work(session) in one transaction on --db; the engine is closed after."""
    from .server import services

    eng, factory = _open_db(args)
    try:
        return services.retrying(factory, work)
    finally:
        eng.dispose()


def _when(text: str | None, tz_name: str | None, what: str) -> int | None:
    """Unix seconds, or an ISO 8601 time; without an offset it is local time
    in tz_name (the server's timezone), or this computer's when None."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    from datetime import datetime
    from zoneinfo import ZoneInfo

    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise VoltgateError(f"bad {what} {text!r}", "Unix seconds or ISO 8601, e.g. 2026-05-01T18:00", EXIT_USAGE) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=ZoneInfo(tz_name)) if tz_name else t.astimezone()
    return int(t.timestamp())


def _iso(ts: int | None) -> str:
    from datetime import UTC, datetime

    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: list[tuple]) -> None:
    rows = [tuple("-" if c is None else str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _print_json(value) -> None:
    print(json.dumps(value, indent=2))


def cmd_users_add(args) -> int:
    import time

    from .server import services

    def work(s):
        u = services.add_user(s, args.user, name=args.name or "")
        if args.balance:
            services.pay(s, u.id, args.balance, now=int(time.time()), ref=f"opening:{u.id}")
        return services.user_dict(u)

    u = _in_db(args, work)
    if args.json:
        _print_json(u)
    else:
        print(f"added user {u['id']} (balance {u['balance']} cents)")
    return EXIT_OK


def cmd_users_list(args) -> int:
    from .server import services

    rows = _in_db(args, lambda s: [services.user_dict(u) for u in services.users(s)])
    if args.json:
        _print_json(rows)
    elif rows:
        _table(
            [("USER", "NAME", "STATUS", "BALANCE", "POINTS")]
            + [(u["id"], u["name"] or "-", u["status"], u["balance"], u["points"]) for u in rows]
        )
    else:
        print("no users (add one with: voltgate users add ID)")
    return EXIT_OK


def cmd_users_show(args) -> int:
    import time

    from .server import services

    def work(s):
        u = services.user(s, args.user)
        out = services.user_dict(u, services.load_policy(s))
        out["open_rentals"] = [services.rental_dict(r) for r in services.rentals(s, user_id=u.id, open_only=True)]
        out["live_permits"] = [services.permit_dict(p) for p in services.list_permits(s, user_id=u.id, live_at=int(time.time()))]
        out["ledger"] = [services.entry_dict(e) for e in services.ledger(s, user_id=u.id, limit=args.limit)]
        return out

    u = _in_db(args, work)
    if args.json:
        _print_json(u)
        return EXIT_OK
    print(f"user {u['id']}{' (' + u['name'] + ')' if u['name'] else ''}: {u['status']}")
    print(f"  balance {u['balance']} cents, {u['points']} points (worth {u['points_value']} cents towards fees)")
    print(f"  {_count(len(u['open_rentals']), 'open rental')}, {_count(len(u['live_permits']), 'live permit')}")
    for e in u["ledger"]:
        print(f"  #{e['seq']} {e['kind']} {e['amount']:+d} cents {e['points']:+d} points {e['energy_mwh']} mWh ({e['ref']})")
    return EXIT_OK


def cmd_users_pay(args) -> int:
    import time

    from .server import services

    def work(s):
        services.pay(s, args.user, args.cents, now=int(time.time()))
        return services.user_dict(services.user(s, args.user))

    u = _in_db(args, work)
    if args.json:
        _print_json(u)
    else:
        print(f"user {u['id']}: balance {u['balance']} cents")
    return EXIT_OK


def cmd_tariffs_set(args) -> int:
    from .server import services

    def work(s):
        t = services.set_tariff(s, args.name, args.cents_per_kwh, args.start_hour, args.end_hour)
        return {"name": t.name, "start_hour": t.start_hour, "end_hour": t.end_hour, "cents_per_kwh": t.cents_per_kwh}

    t = _in_db(args, work)
    if args.json:
        _print_json(t)
    else:
        print(f"tariff {t['name']}: {t['cents_per_kwh']} cents/kWh from {t['start_hour']:02d}:00 to {t['end_hour']:02d}:00")
    return EXIT_OK


def cmd_tariffs_list(args) -> int:
    from .server import services

    def work(s):
        rows = [
            {"name": t.name, "start_hour": t.start_hour, "end_hour": t.end_hour, "cents_per_kwh": t.cents_per_kwh}
            for t in services.tariffs(s)
        ]
        p = services.load_policy(s)
        return {"timezone": p.timezone, "default_cents_per_kwh": p.default_cents_per_kwh, "tariffs": rows}

    out = _in_db(args, work)
    if args.json:
        _print_json(out)
        return EXIT_OK
    if out["tariffs"]:
        _table(
            [("NAME", "FROM", "TO", "CENTS/KWH")]
            + [(t["name"], f"{t['start_hour']:02d}:00", f"{t['end_hour']:02d}:00", t["cents_per_kwh"]) for t in out["tariffs"]]
        )
    print(f"hours no tariff covers: {out['default_cents_per_kwh']} cents/kWh; local time: {out['timezone']}")
    return EXIT_OK


def cmd_settings_list(args) -> int:
    from .server import services

    values = _in_db(args, services.settings)
    if args.json:
        _print_json(values)
    else:
        _table([("SETTING", "VALUE")] + [(k, json.dumps(v)) for k, v in values.items()])
    return EXIT_OK


def cmd_settings_set(args) -> int:
    from .server import services

    try:
        value = json.loads(args.value)
    except json.JSONDecodeError:
        value = args.value  # a bare word: a timezone name
    v = _in_db(args, lambda s: services.set_setting(s, args.key, value))
    print(json.dumps({args.key: v}) if args.json else f"{args.key} = {json.dumps(v)}")
    return EXIT_OK


def cmd_devices_add(args) -> int:
    from .server import services

    def work(s):
        d = services.add_device(
            s,
            args.device,
            site_id=args.site,
            kind=args.kind,
            board=args.board,
            slots=args.slots or 0,
            outlets=args.outlets or 0,
            key_version=args.key_version,
            fw_version=args.fw,
            enabled=not args.disabled,
        )
        return services.device_dict(d)

    d = _in_db(args, work)
    if args.json:
        _print_json(d)
    else:
        n = args.slots if args.kind == "station" else args.outlets
        print(
            f"added {d['kind']} {d['id']} at site {d['site']} ({_count(n or 0, 'slot' if d['kind'] == 'station' else 'outlet')}, key version {d['key_version']})"
        )
    return EXIT_OK


def cmd_devices_list(args) -> int:
    from .server import services

    rows = _in_db(args, lambda s: [services.device_dict(d) for d in services.devices(s)])
    if args.json:
        _print_json(rows)
    elif rows:
        _table(
            [("DEVICE", "SITE", "KIND", "BOARD", "FIRMWARE", "KEY", "ENABLED", "ONLINE", "LAST SEEN")]
            + [
                (
                    d["id"],
                    d["site"],
                    d["kind"],
                    d["board"],
                    d["fw_version"],
                    d["key_version"],
                    "yes" if d["enabled"] else "no",
                    "yes" if d["online"] else "no",
                    _iso(d["last_seen"]),
                )
                for d in rows
            ]
        )
    else:
        print("no devices (add one with: voltgate devices add ID --site S --kind station|outlet --board B)")
    return EXIT_OK


def cmd_devices_enable(args) -> int:
    from .server import services

    enabled = args.devices_command == "enable"
    _in_db(args, lambda s: services.set_device_enabled(s, args.device, enabled))
    print(f"device {args.device} {'enabled' if enabled else 'disabled'}")
    return EXIT_OK


def cmd_permits_request(args) -> int:
    import base64
    import time

    from . import keys
    from .server import services

    if not args.keystore:
        raise VoltgateError("permits request needs the master secret", "give --keystore FILE or set VOLTGATE_KEYSTORE", EXIT_USAGE)
    if (args.end is None) == (args.minutes is None):
        raise VoltgateError("give the window's end", "either --end TIME or --minutes N", EXIT_USAGE)
    scope = None
    if args.scope is not None:
        try:
            scope = [int(x) for x in args.scope.split(",")]
        except ValueError:
            raise VoltgateError(f"bad scope {args.scope!r}", "slot or outlet indexes separated by commas, e.g. 0,2", EXIT_USAGE) from None
    master = keys.load_master(args.keystore)
    now = int(time.time())

    def work(s):
        tz = services.load_policy(s).timezone
        start = _when(args.start, tz, "--start")
        issued = services.request_permit(
            s,
            master,
            user_id=args.user,
            device_id=args.device,
            action=args.action,
            now=now,
            nbf=start,
            exp=_when(args.end, tz, "--end"),
            duration_s=args.minutes * 60 if args.minutes is not None else None,
            scope=scope,
            max_wh=args.max_wh,
            max_w=args.max_w,
            single_use=not args.many,
            battery=args.battery,
            compact=args.compact,
        )
        return services.permit_dict(issued.permit), issued.token, issued.estimate

    p, token, est = _in_db(args, work)
    if args.out:
        Path(args.out).write_bytes(token)
    if args.json:
        p.update(
            token_hex=token.hex(),
            token_b64url=base64.urlsafe_b64encode(token).rstrip(b"=").decode(),
            estimate={"energy_mwh": est.energy_mwh, "energy_cents": est.energy_cents, "fee_cents": est.fee_cents},
        )
        _print_json(p)
    else:
        print(
            f"permit {p['cti']}: {p['action']} on {p['device']} for {p['user']}, {_iso(p['nbf'])} to {_iso(p['exp'])}, {len(token)} bytes"
        )
        print(f"  estimated {est.energy_cents + est.fee_cents} cents ({est.energy_cents} energy + {est.fee_cents} fee)")
        print(f"  written to {args.out}" if args.out else f"  token {token.hex()}")
    return EXIT_OK


def cmd_permits_list(args) -> int:
    import time

    from .server import services

    rows = _in_db(
        args,
        lambda s: [
            services.permit_dict(p)
            for p in services.list_permits(s, user_id=args.user, device_id=args.device, live_at=int(time.time()) if args.live else None)
        ],
    )
    if args.json:
        _print_json(rows)
    elif rows:
        _table(
            [("PERMIT", "USER", "DEVICE", "ACTION", "SCOPE", "NBF", "EXP", "REVOKED")]
            + [
                (
                    p["cti"],
                    p["user"],
                    p["device"],
                    p["action"],
                    ",".join(map(str, p["scope"])) if p["scope"] else "any",
                    _iso(p["nbf"]),
                    _iso(p["exp"]),
                    _iso(p["revoked_at"]),
                )
                for p in rows
            ]
        )
    else:
        print("no permits")
    return EXIT_OK


def cmd_permits_revoke(args) -> int:
    import time

    from .server import services

    if (args.cti is None) == (args.user is None):
        raise VoltgateError("revoke what?", "give a permit id, or --user ID to revoke a user", EXIT_USAGE)
    now = int(time.time())
    if args.user is not None:
        cmds = _in_db(args, lambda s: [services.command_dict(c) for c in services.revoke_user(s, args.user, now=now)])
        what = f"user {args.user} suspended"
    else:
        cmds = _in_db(args, lambda s: [services.command_dict(c) for c in [services.revoke_permit(s, args.cti, now=now)] if c is not None])
        what = f"permit {args.cti} revoked"
    if args.json:
        _print_json({"revoked": args.user or args.cti, "commands": cmds})
    else:
        boards = sorted({c["device"] for c in cmds})
        print(f"{what}; revocation queued for {_count(len(boards), 'board')}{': ' + ', '.join(boards) if boards else ''}")
    return EXIT_OK


def cmd_ledger_verify(args) -> int:
    from .server import services

    head = None
    if args.head:
        seq, sep, digest = args.head.partition(":")
        try:
            head = (int(seq), bytes.fromhex(digest))
        except ValueError:
            head = None
        if not sep or head is None or len(head[1]) != 32:
            raise VoltgateError(f"bad --head {args.head!r}", "SEQ:HASH as printed by an earlier verify", EXIT_USAGE)
    check = _in_db(args, lambda s: services.ledger_verify(s, head))
    c = check.chain
    if args.json:
        _print_json(
            {
                "ok": check.ok,
                "entries": c.entries,
                "head": f"{c.head_seq}:{c.head_hash.hex()}",
                "problem": None if c.problem is None else {"seq": c.problem.seq, "code": c.problem.code, "message": c.problem.message},
                "mismatches": check.mismatches,
            }
        )
    elif check.ok:
        print(f"ledger ok: {c.entries} {'entry' if c.entries == 1 else 'entries'}, head {c.head_seq}:{c.head_hash.hex()}")
        print("  keep the head somewhere else; `voltgate ledger verify --head SEQ:HASH` then also finds entries deleted at the end")
    if not check.ok:
        if c.problem is not None:
            raise VoltgateError(
                f"ledger {c.problem.code} at entry {c.problem.seq}: {c.problem.message}",
                "restore the database from a backup and compare",
                EXIT_FAILURE,
            )
        m = check.mismatches[0]
        raise VoltgateError(
            f"user {m['user']}'s balance/points ({m['balance']}/{m['points']}) differ from the ledger ({m['ledger_balance']}/{m['ledger_points']})",
            "the users table was changed outside the ledger",
            EXIT_FAILURE,
        )
    return EXIT_OK


def cmd_ledger_show(args) -> int:
    from .server import services

    rows = _in_db(args, lambda s: [services.entry_dict(e) for e in services.ledger(s, user_id=args.user, limit=args.limit)])
    if args.json:
        _print_json(rows)
    elif rows:
        _table(
            [("SEQ", "TIME", "USER", "KIND", "MWH", "CENTS", "POINTS", "REF", "HASH")]
            + [
                (e["seq"], _iso(e["ts"]), e["user"], e["kind"], e["energy_mwh"], e["amount"], e["points"], e["ref"], e["hash"][:16])
                for e in rows
            ]
        )
    else:
        print("the ledger is empty")
    return EXIT_OK


def cmd_ledger_settle(args) -> int:
    import time

    from .server import services

    now = int(time.time())

    def work(s):
        tz = services.load_policy(s).timezone
        start, end = _when(args.start, tz, "--from"), _when(args.end, tz, "--to")
        sts = [services.settle_fees(s, args.user, start, end, now=now)] if args.user else services.settle_all(s, start, end, now=now)
        return [
            {
                "user": x.user_id,
                "sessions": x.sessions,
                "rentals": x.rentals,
                "fee": x.fee_cents,
                "points_spent": x.points_spent,
                "points_cents": x.points_cents,
                "due": x.due_cents,
            }
            for x in sts
        ]

    rows = _in_db(args, work)
    if args.json:
        _print_json(rows)
    elif rows:
        _table(
            [("USER", "SESSIONS", "RENTALS", "FEE", "POINTS", "PAID BY POINTS", "DUE")]
            + [(r["user"], r["sessions"], r["rentals"], r["fee"], r["points_spent"], r["points_cents"], r["due"]) for r in rows]
        )
    else:
        print("no uses in that period")
    return EXIT_OK


def _group(sub, name, help_text, description, examples):
    p = sub.add_parser(name, help=help_text, description=description, epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(fn=lambda args, p=p: _usage(p))
    return p.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")


def _cmd(gsub, group, name, fn, help_text, example, json_help=None):
    p = gsub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".", epilog="example:\n  " + example,
                        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--db", help=DB_HELP)
    if json_help:
        p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(fn=fn, command=f"{group} {name}")
    return p


def _operator_parsers(sub) -> None:
    g = _group(
        sub,
        "users",
        "the server's users: add, list, show, pay",
        "Users of the management server, with their balance (cents) and value points. Balances move only through ledger entries.",
        "examples:\n  voltgate users add alice --name 'Alice A.' --balance 2000\n  voltgate users list --json\n  voltgate users show alice",
    )
    p = _cmd(g, "users", "add", cmd_users_add, "register a user", "voltgate users add alice --balance 2000", "print the user as JSON")
    p.add_argument("user", metavar="ID", help="user id (goes into permits as sub; at most 64 bytes)")
    p.add_argument("--name", help="display name")
    p.add_argument("--balance", type=int, default=0, metavar="CENTS", help="an opening payment onto the balance")
    _cmd(
        g,
        "users",
        "list",
        cmd_users_list,
        "list users with balance and points",
        "voltgate users list",
        "print a list of {id, name, status, balance, points}",
    )
    p = _cmd(
        g,
        "users",
        "show",
        cmd_users_show,
        "one user: balance, points, open rentals, live permits, last ledger entries",
        "voltgate users show alice",
        "print it as JSON",
    )
    p.add_argument("user", metavar="ID")
    p.add_argument("--limit", type=int, default=10, help="ledger entries to show (default: %(default)s)")
    p = _cmd(
        g, "users", "pay", cmd_users_pay, "book a payment onto a user's balance", "voltgate users pay alice 1500", "print the user as JSON"
    )
    p.add_argument("user", metavar="ID")
    p.add_argument("cents", type=int, metavar="CENTS", help="amount (negative: a refund paid out)")

    g = _group(
        sub,
        "tariffs",
        "prices of energy by local hour of day",
        "Energy taken is charged at the tariff of each local hour (the narrowest window containing the hour; "
        "windows may wrap midnight, e.g. --from 22 --to 7). Hours no tariff covers use the setting "
        "default_cents_per_kwh; local time is the setting timezone.",
        "examples:\n  voltgate tariffs set day --cents-per-kwh 30 --from 7 --to 22\n  voltgate tariffs set night --cents-per-kwh 12 --from 22 --to 7\n  voltgate tariffs list",
    )
    p = _cmd(
        g,
        "tariffs",
        "set",
        cmd_tariffs_set,
        "add or change a tariff window",
        "voltgate tariffs set day --cents-per-kwh 30 --from 7 --to 22",
        "print the tariff as JSON",
    )
    p.add_argument("name")
    p.add_argument("--cents-per-kwh", type=int, required=True, metavar="CENTS")
    p.add_argument("--from", dest="start_hour", type=int, default=0, metavar="HOUR", help="first local hour, 0-23 (default: %(default)s)")
    p.add_argument("--to", dest="end_hour", type=int, default=24, metavar="HOUR", help="end hour, exclusive, 0-24 (default: %(default)s)")
    _cmd(
        g,
        "tariffs",
        "list",
        cmd_tariffs_list,
        "list the tariff windows",
        "voltgate tariffs list",
        "print {timezone, default_cents_per_kwh, tariffs}",
    )

    g = _group(
        sub,
        "settings",
        "approval policy, prices, points and fees settings",
        "The operator's settings: approval conditions (grace_s, max_window_s, max_advance_s, min_balance_cents, "
        "refuse_overdue, check_overlap, max_open_permits, max_open_rentals, require_funds; null switches one off), "
        "estimates, fees, points and the timezone. Values are JSON.",
        "examples:\n  voltgate settings list\n  voltgate settings set max_window_s 7200\n  voltgate settings set grace_s null\n  voltgate settings set timezone Europe/Berlin",
    )
    _cmd(g, "settings", "list", cmd_settings_list, "every setting with its value", "voltgate settings list", "print {setting: value}")
    p = _cmd(
        g,
        "settings",
        "set",
        cmd_settings_set,
        "set one setting",
        "voltgate settings set fee_per_session_cents 40",
        "print {setting: value}",
    )
    p.add_argument("key", metavar="SETTING")
    p.add_argument("value", metavar="VALUE", help="JSON: a number, true/false, null, or a timezone name")

    g = _group(
        sub,
        "devices",
        "the registry's boards: add, list, enable, disable",
        "Stations and outlets the server knows; their permit keys are derived from the master secret and the key version.",
        "examples:\n  voltgate devices add st-1 --site depot --kind station --board station-8 --slots 8\n  voltgate devices add ou-1 --site depot --kind outlet --board outlet-2 --outlets 2\n  voltgate devices list --json",
    )
    p = _cmd(
        g,
        "devices",
        "add",
        cmd_devices_add,
        "register a board",
        "voltgate devices add ou-1 --site depot --kind outlet --board outlet-2 --outlets 2",
        "print the device as JSON",
    )
    p.add_argument("device", metavar="ID", help="device id (1-32 of A-Z a-z 0-9 . _ -)")
    p.add_argument("--site", required=True, help="site id (made if new)")
    p.add_argument("--kind", required=True, choices=("station", "outlet"))
    p.add_argument("--board", required=True, help="board file name (boards/<board>.json)")
    p.add_argument("--slots", type=int, help="a station's slot count")
    p.add_argument("--outlets", type=int, help="an outlet board's relay count")
    p.add_argument("--key-version", type=int, default=1, help="device key version (default: %(default)s)")
    p.add_argument("--fw", help="firmware version")
    p.add_argument("--disabled", action="store_true", help="register it out of service")
    _cmd(g, "devices", "list", cmd_devices_list, "list the boards", "voltgate devices list", "print a list of devices")
    for name in ("enable", "disable"):
        p = _cmd(g, "devices", name, cmd_devices_enable, f"{name} a board for new permits", f"voltgate devices {name} ou-1")
        p.add_argument("device", metavar="ID")

    g = _group(
        sub,
        "permits",
        "issue permits through the approval policy, list and revoke them",
        "A permit is issued only when the request meets every approval condition (user active and in good "
        "standing, funds, device enabled, window, no overlap, per-user limits); a refusal says which one and why "
        "(exit code 1). Revocations are queued for the boards and sent at their next pull.",
        "examples:\n  voltgate permits request --user alice --device ou-1 --action power --minutes 60 --keystore master.key\n"
        "  voltgate permits request --user alice --device st-1 --action rent --start 2026-05-01T18:00 --minutes 30 --out permit.cbor\n"
        "  voltgate permits list --live\n  voltgate permits revoke 3f2a9c0d11b2e4f5\n  voltgate permits revoke --user mallory",
    )
    p = _cmd(
        g,
        "permits",
        "request",
        cmd_permits_request,
        "ask for a permit as a user would",
        "voltgate permits request --user alice --device ou-1 --action power --minutes 60",
        "print the permit with its token as JSON",
    )
    p.add_argument("--user", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--action", required=True, choices=("rent", "return", "power", "service"))
    p.add_argument("--start", help="window start: Unix seconds or ISO 8601 (default: now)")
    p.add_argument("--end", help="window end: Unix seconds or ISO 8601")
    p.add_argument("--minutes", type=int, help="window length from the start")
    p.add_argument("--scope", help="slot or outlet indexes, e.g. 0,2 (default: any)")
    p.add_argument("--max-wh", type=int, help="energy cap (power permits; default: the estimate's energy)")
    p.add_argument("--max-w", type=int, help="power cap")
    p.add_argument("--battery", help="the battery a return permit is for (hex id)")
    p.add_argument("--many", action="store_true", help="many uses within the window (default: single use)")
    p.add_argument("--compact", action="store_true", help="HMAC 256/64: a smaller token for QR codes")
    p.add_argument("--keystore", default=os.environ.get("VOLTGATE_KEYSTORE"), help="the master secret file (default: $VOLTGATE_KEYSTORE)")
    p.add_argument("--out", help="write the token (CBOR bytes) to this file")
    p = _cmd(
        g,
        "permits",
        "list",
        cmd_permits_list,
        "list issued permits",
        "voltgate permits list --user alice --live",
        "print a list of permits",
    )
    p.add_argument("--user")
    p.add_argument("--device")
    p.add_argument("--live", action="store_true", help="only permits not revoked, expired or used up")
    p = _cmd(
        g,
        "permits",
        "revoke",
        cmd_permits_revoke,
        "revoke a permit, or suspend a user and revoke theirs",
        "voltgate permits revoke 3f2a9c0d11b2e4f5",
        "print {revoked, commands}",
    )
    p.add_argument("cti", nargs="?", metavar="PERMIT", help="permit id (hex)")
    p.add_argument("--user", help="suspend this user and revoke all their live permits")

    g = _group(
        sub,
        "ledger",
        "the hash-chained ledger: verify, show, settle fees",
        "Every money, point and energy movement tied to a user is one ledger entry, chained by SHA-256. "
        "verify finds an altered, deleted or reordered entry and balances that differ from the ledger (exit 1).",
        "examples:\n  voltgate ledger verify\n  voltgate ledger verify --head 1207:9c1e...\n  voltgate ledger show --user alice --limit 20\n"
        "  voltgate ledger settle --from 2026-05-01 --to 2026-06-01",
    )
    p = _cmd(
        g,
        "ledger",
        "verify",
        cmd_ledger_verify,
        "check the hash chain and the balances",
        "voltgate ledger verify --json",
        "print {ok, entries, head, problem, mismatches}",
    )
    p.add_argument("--head", metavar="SEQ:HASH", help="a head noted earlier: the ledger must still hold it unchanged")
    p = _cmd(
        g, "ledger", "show", cmd_ledger_show, "the last ledger entries", "voltgate ledger show --user alice", "print a list of entries"
    )
    p.add_argument("--user")
    p.add_argument("--limit", type=int, default=50, help="entries (default: %(default)s; 0: all)")
    p = _cmd(
        g,
        "ledger",
        "settle",
        cmd_ledger_settle,
        "compute and book the fees of a period from the ledger",
        "voltgate ledger settle --from 2026-05-01 --to 2026-06-01",
        "print the statements",
    )
    p.add_argument("--from", dest="start", required=True, metavar="TIME", help="period start: Unix seconds or ISO 8601")
    p.add_argument("--to", dest="end", required=True, metavar="TIME", help="period end (exclusive)")
    p.add_argument("--user", help="one user (default: every user with a use in the period)")

def _usage(p) -> int:
    p.print_help(sys.stderr)
    return EXIT_USAGE


# -- voltgate sim fleet (voltgate.fleet) -----------------------------------------------------------

FLEET_EXAMPLES = """\
examples:
  voltgate sim fleet                                  2 stations, 2 outlets, 10x time, 60 s
  voltgate sim fleet --stations 6 --outlets 4 --speed 30 --seconds 300 --out fleet-run
  voltgate sim fleet --no-users --reading-s 10 --speed 20 --seconds 120
                                                      readings only: a load test of the gateway

The fleet runs its own private Mosquitto and the server's gateway (the board side of
`voltgate server`: pulls, stores and books every record) on a SQLite file in --out, with
the fleet's clock. Users arrive at random: they rent batteries and return them elsewhere
with less (now and then more) charge, plug loads into outlets (some trip the outlet's
limit), and a technician clears the faults that occur; boards lose their link now and
then and come back. Ctrl-C stops it early; the summary follows either way.
"""


def fleet_parser() -> argparse.ArgumentParser:
    from . import fleet

    d = fleet.FleetOptions(out=Path("fleet-run"))
    p = argparse.ArgumentParser(
        prog="voltgate sim fleet",
        description="Run N simulated boards (the firmware on the MicroPython unix port, hal.sim's physics) with a "
        "broker and the server's gateway, and simulated users, faults and link drops; the clock may run faster "
        "than real time.",
        epilog=FLEET_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stations", type=int, default=d.stations, help="4-slot stations (default: %(default)s)")
    p.add_argument("--outlets", type=int, default=d.outlets, help="2-relay outlets (default: %(default)s)")
    p.add_argument("--speed", type=int, default=d.speed, help="simulated seconds per real second, a whole number (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=d.seconds, help="real seconds to run; 0: until Ctrl-C (default: %(default)s)")
    p.add_argument("--users", type=int, default=d.users, help="how many users (default: %(default)s)")
    p.add_argument("--seed", type=int, help="random seed, for a run that goes the same way")
    p.add_argument("--arrival", type=float, default=d.arrival_s, metavar="SECONDS", help="mean simulated time between users at one board (default: %(default)s)")
    p.add_argument("--no-users", action="store_true", help="no users, faults or drops: the boards log readings, the gateway pulls")
    p.add_argument("--no-faults", action="store_true", help="no faults")
    p.add_argument("--no-drops", action="store_true", help="no link drops")
    p.add_argument("--reading-s", type=int, help="the boards' reading interval, simulated seconds (stations 10-86400, outlets 5-3600; default: the firmware's 60)")
    p.add_argument("--pull-interval", type=float, default=d.pull_s, metavar="SECONDS", help="the gateway pulls each board this often, real seconds (default: %(default)s)")
    p.add_argument("--firmware", help="a `voltgate build` tree to run (default: built into the fleet folder)")
    p.add_argument("--db", help="database URL (default: SQLite in the fleet folder)")
    p.add_argument("--out", default="fleet-run", help="folder for the boards, broker, database and logs (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(fn=cmd_sim_fleet, command="sim fleet")
    return p


def cmd_sim_fleet(args) -> int:
    from rich.console import Console

    from . import fleet, simrun

    console = Console(stderr=True, highlight=False)
    o = fleet.FleetOptions(
        out=Path(args.out), stations=args.stations, outlets=args.outlets, speed=args.speed, seconds=args.seconds or None,
        users=args.users, seed=args.seed, behave=not args.no_users, faults=not args.no_faults, drops=not args.no_drops,
        arrival_s=args.arrival, reading_s=args.reading_s, pull_s=args.pull_interval,
        code=Path(args.firmware) if args.firmware else None, db=args.db,
    )  # fmt: skip
    f = fleet.Fleet(o, say=lambda text: console.print(text, soft_wrap=True))
    with simrun.Closer():  # SIGTERM stops the fleet as Ctrl-C does
        try:
            f.start()
            if not f.wait_online():
                raise VoltgateError("not every board came online with a trusted clock within 60 s", f"see the consoles in {f.out / 'boards'}", EXIT_FAILURE)
            console.print("every board is online and the gateway has set its clock" + ("; users start arriving" if o.behave else ""))
            try:
                f.run(o.seconds)
            except KeyboardInterrupt:
                console.print("stopping")
            console.print("the gateway pulls every board once more")
            if not f.settle():
                console.print("[yellow]not every board's log reached the database (see logs/gateway.log)[/]")
            summary = f.summary()
        finally:
            f.stop()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        s, srv = summary["fleet"], summary["server"]
        print(f"{summary['boards']} boards at speed {summary['speed']}: rented {s['rented']}, returned {s['returned']}, outlet sessions {s['sessions']}, "
              f"faults {s['faults']} (cleared {s['cleared']}), link drops {s['drops']}")  # fmt: skip
        print(f"server: {summary['records_stored']} records stored in {summary['gateway']['pulls']} pulls ({summary['gateway']['failed_pulls']} failed); "
              f"rentals {srv['rentals']} ({srv['rentals_closed']} closed), sessions {srv['sessions']} ({srv['sessions_ended']} ended); "
              f"ledger {srv['ledger_entries']} entries, {'verifies' if srv['ledger_ok'] else 'DOES NOT VERIFY'}")  # fmt: skip
        print(f"database {summary['database']}; boards, broker and logs in {f.out}")
    return EXIT_OK if summary["server"]["ledger_ok"] else EXIT_FAILURE


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:2] == ["sim", "fleet"]:  # a subcommand of issue 7's `voltgate sim BOARD_FILE`, parsed on its own
        ap, argv = fleet_parser(), argv[2:]
    else:
        ap = parser()
    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.fn(args)
    except VoltgateError as e:
        print(e.render(args.command), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"voltgate: {args.command}: interrupted", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
