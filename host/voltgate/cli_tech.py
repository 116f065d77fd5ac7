"""The technician's commands: provision, board, permit, sim.

register(sub) adds them to `voltgate`'s subcommands (cli.parser()). Each
command is a small function over the library (voltgate.provision,
voltgate.boardtool, voltgate.permitview, voltgate.simboard); errors are
VoltgateError, printed by cli.main as `voltgate: <command>: <problem> (<hint>)`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, VoltgateError

RAW = argparse.RawDescriptionHelpFormatter
KEYSTORE_HELP = "the master secret file, mode 0600 (default: $VOLTGATE_KEYSTORE, else ~/.voltgate/master.key)"
DB_HELP = "the server's database (default: $VOLTGATE_DB, else sqlite:///voltgate.sqlite)"


def _keystore_default() -> str:
    from .provision import default_keystore

    return str(default_keystore())


def _print_json(value) -> None:
    print(json.dumps(value, indent=2))


def _iso(t) -> str:
    from datetime import datetime

    return "-" if t is None else datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _when(text: str | None, what: str) -> int | None:
    """Unix seconds, or ISO 8601 (this computer's local time when it has no offset)."""
    from .cli import _when as when

    return when(text, None, what)


def _span(text: str) -> int:
    """'7d', '12h', '30m', '90s' or plain seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    try:
        if text and text[-1] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text)
    except ValueError:
        raise VoltgateError(f"bad duration {text!r}", "e.g. 7d, 12h, 30m or seconds", EXIT_USAGE) from None


# -- provision ---------------------------------------------------------------------------------

PROVISION_EXAMPLES = """\
examples:
  voltgate provision boards/station-8-devkitc.json --port /dev/ttyUSB0 \\
      --firmware ESP32_GENERIC-v1.29.0.bin --site depot --mqtt 10.0.0.5:1883 --broker-dir broker/
                                  a new ESP32: MicroPython, identity, firmware, registry, broker
  voltgate provision boards/station-8-devkitc.json --port /dev/ttyUSB0
                                  again: changes only what differs (nothing, on a provisioned board)
  voltgate provision boards/sim-outlet-2.json --port socket://127.0.0.1:4000 --device-id ou-1 --site depot
                                  a simulated board (voltgate sim): its NVS is the store file in its flash folder
  voltgate provision boards/outlet-2-devkitc.json --port /dev/ttyUSB0 --rotate-key --overlap 7d
                                  a new key version on the board and in the registry; the old one
                                  verifies permits for 7 more days
  voltgate provision boards/outlet-2-devkitc.json --port /dev/ttyUSB0 --dry-run
                                  the plan, touching nothing

Steps: board, keystore, connect, device, key, flash, build, upload, identity, reset,
registry, broker. Each is idempotent: a run that failed (a cable pulled mid-upload)
is finished by running the same command again. Errors name the step.
"""


class _RichReporter:
    """Provisioning's steps as lines and its byte counts as bars, on stderr."""

    MARK = {"done": "[green]✓[/]", "ok": "[green]✓[/]", "unchanged": "[dim]=[/]", "skipped": "[yellow]-[/]", "planned": "[cyan]·[/]"}

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet

    def step(self, s) -> None:
        if not self.quiet:
            from rich.markup import escape

            self.console.print(f"{self.MARK.get(s.status, '?')} {s.name:<9} {escape(s.detail)}")

    @contextmanager
    def progress(self, what: str, total: int):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        if self.quiet:
            yield lambda done: None
            return
        with Progress(TextColumn("  {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=self.console, transient=True) as p:
            task = p.add_task(what, total=total)
            yield lambda done: p.update(task, completed=done)


def cmd_provision(args) -> int:
    from . import provision

    o = provision.Options(
        board_file=Path(args.board_file),
        port=args.port,
        device_id=args.device_id,
        esptool_port=args.esptool_port,
        firmware=Path(args.firmware) if args.firmware else None,
        site=args.site,
        mqtt=args.mqtt,
        keystore=Path(args.keystore).expanduser(),
        db=args.db,
        registry=not args.no_registry,
        broker_dir=Path(args.broker_dir) if args.broker_dir else None,
        broker_listen=args.broker_listen,
        rotate=args.rotate_key,
        overlap_s=_span(args.overlap),
        flash_nvs=args.flash_nvs,
        reset=not args.no_reset,
        dry_run=args.dry_run,
        firmware_offset=int(args.firmware_offset, 0) if args.firmware_offset else None,
    )
    ui = _RichReporter(quiet=args.json)
    res = provision.run(o, ui)
    if args.json:
        _print_json(res.as_dict())
    elif args.dry_run:
        print("dry run: nothing was changed")
    else:
        what = ", ".join(res.changed) if res.changed else "nothing (the board was provisioned already)"
        print(f"{res.device}: provisioned, key version {res.key_version}; changed: {what}")
        for w in res.warnings:
            print(f"  warning: {w}")
    return EXIT_OK


def _provision_parser(sub) -> None:
    p = sub.add_parser(
        "provision",
        help="flash, key and set up one board, and register it (idempotent)",
        description="Provision a board from its board file: validate it; derive the device key from the master "
        "secret (created with mode 0600 if missing, never printed); flash the MicroPython image and the NVS "
        "partition with esptool; compile firmware/ to .mpy matching the board's MicroPython and upload it with "
        "mpremote; write the identity into NVS; register the device and its broker account. A simulated board "
        "(hal \"sim\", `voltgate sim`) takes its NVS entries through the REPL into its store file.",
        epilog=PROVISION_EXAMPLES,
        formatter_class=RAW,
    )
    p.add_argument("board_file", metavar="BOARD_FILE", help="the board file (boards/*.json)")
    p.add_argument("--port", required=True, help="the board's console: /dev/ttyUSB0, a pty, or socket://127.0.0.1:PORT")
    p.add_argument("--device-id", help="device id (default: <st|ou>-<MAC> read from the chip with esptool)")
    p.add_argument("--esptool-port", help="the ROM bootloader's port (default: --port; none for a simulated board)")
    p.add_argument("--firmware", metavar="IMAGE", help="MicroPython firmware image to flash (e.g. ESP32_GENERIC-v1.29.0.bin)")
    p.add_argument("--firmware-offset", metavar="ADDR", help="where the image goes (default: 0x1000 on an ESP32)")
    p.add_argument("--site", help="the device's site (default: the registry's)")
    p.add_argument("--mqtt", metavar="HOST:PORT", help="the broker the board connects to, written into its link settings (default: keep them; 'off' removes them)")
    p.add_argument("--keystore", default=_keystore_default(), help=KEYSTORE_HELP)
    p.add_argument("--db", help=DB_HELP)
    p.add_argument("--no-registry", action="store_true", help="leave the server's registry alone")
    p.add_argument("--broker-dir", help="rewrite the broker's passwd/acl here from the registry (as `voltgate broker config`)")
    p.add_argument("--broker-listen", metavar="HOST:PORT", help="the broker's listener (default: the existing conf's, else 127.0.0.1 on the --mqtt port)")
    p.add_argument("--rotate-key", action="store_true", help="move the board and the registry to the next key version")
    p.add_argument("--overlap", default="7d", help="with --rotate-key: how long permits under the old key still verify (default: %(default)s)")
    p.add_argument("--flash-nvs", action="store_true", help="flash the NVS partition even on a board that holds an identity (erases the board's own NVS entries)")
    p.add_argument("--no-reset", action="store_true", help="leave the board in the REPL at the end")
    p.add_argument("--dry-run", action="store_true", help="print the plan; touch nothing")
    p.add_argument("--json", action="store_true", help="print {device, key_version, changed, steps, warnings} as JSON")
    p.set_defaults(fn=cmd_provision, command="provision")


# -- board -------------------------------------------------------------------------------------

BOARD_EXAMPLES = """\
examples:
  voltgate board info --port /dev/ttyUSB0
  voltgate board status --port socket://127.0.0.1:4000 --json
  voltgate board log --port /dev/ttyUSB0 --out ou-1.jsonl           records into a JSON-lines file (no ack)
  voltgate board log --port /dev/ttyUSB0 --to-db --keystore master.key
                                                                    into the server's database, then acked
  voltgate board time-sync --port /dev/ttyUSB0 --keystore master.key
  voltgate board clear-fault 2 --port /dev/ttyUSB0 --keystore master.key
  voltgate board unlock 2 --permit service.cbor --port /dev/ttyUSB0  a service permit, as a technician's phone would
  voltgate board present permit.cbor --port /dev/ttyUSB0             the offline path: a permit handed to the board
  voltgate board info --mqtt 127.0.0.1:1883 --device ou-1 --site depot

Over serial the board must run its firmware (not mpremote's REPL). Commands that change
the board (log ack, time-sync, clear-fault, unlock without a permit) are signed with the
device key: --keystore, and --key-version or --db for the key version (default 1).
"""


def _target(args):
    from .boardtool import Target

    return Target(
        port=args.port,
        mqtt=args.mqtt,
        broker_user=args.broker_user,
        broker_password_file=args.broker_password_file,
        site=args.site,
        device=args.device,
        keystore=args.keystore,
        key_version=args.key_version,
        db=args.db,
        timeout=args.timeout,
    )


@contextmanager
def _session(args):
    from .boardtool import Session

    s = Session.open(_target(args))
    try:
        yield s
    finally:
        s.close()


def _clock_text(clock) -> str:
    trusted, floor, now = clock
    return f"trusted, {_iso(now)}" if trusted else f"not trusted (floor {_iso(floor) if floor else 'none'})"


def _jsonable(v):
    from . import wire

    return wire.json_form(v)


def cmd_board_info(args) -> int:
    with _session(args) as s:
        h = s.call(s.board.hello)
    if args.json:
        _print_json(_jsonable(h))
        return EXIT_OK
    first, last, nxt, acked = h["log"]
    print(f"{h['dev']}: {h['kind']} {h.get('board')}, firmware {h.get('fw')}, site {h.get('site')}")
    print(f"  clock: {_clock_text(h['clock'])}")
    print(f"  log: records {first}..{last}, next {nxt}, acked up to {acked}; dropped {h['dropped']} (readings, events, billing)")
    print(f"  boot epoch {h['epoch']}, last command counter {h['ctr']}, refused junk {h.get('junk', 0)}")
    return EXIT_OK


def cmd_board_status(args) -> int:
    from .server.domain import STATION_STATES  # firmware/station.py's slot states, in order

    with _session(args) as s:
        st = s.call(s.board.status)
        kind = st.get("kind")
    if args.json:
        _print_json(_jsonable(st))
        return EXIT_OK
    print(f"{st['dev']}: {kind}, clock {_clock_text(st['clock'])}")
    app = st.get("app") or []
    if kind == "station":
        rows = [("SLOT", "STATE", "WHY", "BATTERY", "SOC", "MV", "MA", "DEGC")]
        for i, r in enumerate(app):
            state, why, bid, soc, mv, ma, dc = (list(r) + [None] * 7)[:7]
            rows.append((i, _name(state, STATION_STATES), why, bid.hex() if isinstance(bid, bytes) else bid, soc, mv, ma, None if dc is None else f"{dc / 10:.1f}"))
    else:
        rows = [("OUTLET", "STATE", "LATCH", "MW", "MWH", "USER", "PERMIT")]
        for i, r in enumerate(app):
            state, latch, mw, mwh, user, cti = (list(r) + [None] * 6)[:6]
            rows.append((i, _name(state, OUTLET_STATES), latch or None, mw, mwh, user, cti.hex() if isinstance(cti, bytes) else cti))
    _table(rows)
    return EXIT_OK


OUTLET_STATES = ("idle", "on", "waiting", "latched")  # firmware/outlet.py status()


def _name(v, names):
    return names[v] if isinstance(v, int) and 0 <= v < len(names) else v


def _table(rows) -> None:
    rows = [tuple("-" if c is None or c == "" else str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_board_log(args) -> int:
    from . import sync
    from .boardtool import JsonlStore

    if not args.out and not args.to_db:
        raise VoltgateError("where to?", "give --out FILE.jsonl and/or --to-db", EXIT_USAGE)
    results = {}
    with _session(args) as s:
        if args.out:
            ack = args.ack
            if ack:
                s.need_key("the ack")
            store = JsonlStore(args.out)
            r = s.call(sync.pull, s.board, store, ack=ack)
            results["file"] = {"path": args.out, "new": r.new, "received": r.received, "gaps": r.gaps, "acked": r.acked}
        if args.to_db:
            from .server import bootstrap
            from .server.store import ServerRecordStore

            eng, factory = bootstrap.open_database(args.db)
            try:
                ack = s.board.key is not None and not args.no_ack
                r = s.call(sync.pull, s.board, ServerRecordStore(factory), ack=ack)
            finally:
                eng.dispose()
            results["db"] = {"new": r.new, "received": r.received, "gaps": r.gaps, "acked": r.acked if ack else None}
    if args.json:
        _print_json(results)
        return EXIT_OK
    for where, r in results.items():
        dest = r.get("path") if where == "file" else "the server's database"
        acked = r.get("acked") is not None and (where == "db" or args.ack)
        ack = f", board acked up to {r['acked']}" if acked else " (not acked: the board keeps them for the server)"
        print(f"{r['new']} new records of {r['received']} into {dest}{ack}")
        for first, last in r["gaps"]:
            print(f"  gap: records {first}..{last} are not on the board any more (thinned or acked before)")
    return EXIT_OK


def cmd_board_time_sync(args) -> int:
    with _session(args) as s:
        s.need_key("a time sync")
        t = s.call(s.board.sync_time)
    if args.json:
        _print_json({"time": t})
    else:
        print(f"{s.board.device}: clock set to {_iso(t)} (trusted)")
    return EXIT_OK


def cmd_board_clear_fault(args) -> int:
    from . import wire

    with _session(args) as s:
        s.need_key("clear_fault")
        r = s.call(s.board.command, wire.MSG_CLEAR_FAULT, args.index)
    if args.json:
        _print_json({"cleared": args.index, "reply": _jsonable(r)})
    else:
        print(f"{s.board.device}: fault cleared on {'every slot/outlet' if args.index is None else f'index {args.index}'}")
    return EXIT_OK


def _present_result(res, device: str, what: str, as_json: bool) -> int:
    from . import wire

    reason, detail = (list(res) + [None, None])[:2]
    name = wire.reason_name(reason) if isinstance(reason, int) else str(reason)
    if as_json:
        _print_json({"device": device, "reason": name, "ok": reason == wire.OK, "detail": detail})
    elif reason == wire.OK:
        print(f"{device}: ok {detail or ''}".rstrip())
    if reason != wire.OK:
        from .permitview import WHY

        raise VoltgateError(f"{device} refused the {what}: {name}", WHY.get(name), EXIT_FAILURE)
    return EXIT_OK


def cmd_board_unlock(args) -> int:
    from . import wire
    from .permitview import read_token

    with _session(args) as s:
        if args.permit:
            token = read_token(args.permit)
            res = s.call(s.board.present, token, args.slot)
            return _present_result(res, s.board.device, "service permit", args.json)
        s.need_key("an unlock without a permit")
        r = s.call(s.board.command, wire.MSG_UNLOCK, args.slot)
    if args.json:
        _print_json({"unlocked": args.slot, "reply": _jsonable(r)})
    else:
        print(f"{s.board.device}: slot {args.slot} unlocked")
    return EXIT_OK


def cmd_board_present(args) -> int:
    from .permitview import read_token

    token = read_token(args.permit)
    if args.console:
        return _present_console(args, token)
    with _session(args) as s:
        res = s.call(s.board.present, token, args.index)
        return _present_result(res, s.board.device, "permit", args.json)


def _present_console(args, token: bytes) -> int:
    """The text line a terminal would send: `present <hex>`; the board answers one line."""
    from .serlink import SerialTransport

    if not args.port:
        raise VoltgateError("--console is the serial console", "give --port", EXIT_USAGE)
    if args.index is not None:
        raise VoltgateError("the console line has no index", "leave --index out, or use the link (without --console)", EXIT_USAGE)
    with SerialTransport(args.port) as t:
        t.write_line("present " + token.hex())
        line = t.read_line(args.timeout)
    if line is None:
        raise VoltgateError(f"no answer on {args.port}'s console", "its console may be in link mode: wait 10 s after the last link use", EXIT_FAILURE)
    word, _, rest = line.partition(" ")
    if args.json:
        _print_json({"answer": line, "ok": word == "ok"})
    elif word == "ok":
        print(line)
    if word != "ok":
        raise VoltgateError(f"the board answered: {line}", None, EXIT_FAILURE)
    return EXIT_OK


def _board_parsers(sub) -> None:
    g = sub.add_parser(
        "board",
        help="talk to one board over serial or MQTT: info, status, log, time, faults, permits",
        description="A technician's commands for one board, over its serial line (--port: a device, pty or "
        "socket://host:port, with the firmware running) or through the MQTT broker (--mqtt HOST:PORT --device ID).",
        epilog=BOARD_EXAMPLES,
        formatter_class=RAW,
    )
    g.set_defaults(fn=lambda args, p=g: (p.print_help(sys.stderr), EXIT_USAGE)[1])
    gs = g.add_subparsers(dest="board_command", metavar="SUBCOMMAND")

    def add(name, fn, help_text, example, json_help="print the result as JSON"):
        p = gs.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".", epilog="example:\n  " + example, formatter_class=RAW)
        p.add_argument("--port", help="serial: /dev/ttyUSB0, a pty, or socket://127.0.0.1:PORT")
        p.add_argument("--mqtt", metavar="HOST:PORT", help="or through this MQTT broker")
        p.add_argument("--broker-user", default="voltgate-server", help="the broker account (default: %(default)s)")
        p.add_argument("--broker-password-file", default="broker/server-password", help="its password (default: %(default)s)")
        p.add_argument("--site", help="the device's site (MQTT; default: the registry's, or its retained state)")
        p.add_argument("--device", help="device id (MQTT; on serial the board says it)")
        p.add_argument("--keystore", default=os.environ.get("VOLTGATE_KEYSTORE"), help="the master secret, for signed commands (default: $VOLTGATE_KEYSTORE)")
        p.add_argument("--key-version", type=int, help="the device key's version (default: the registry's with --db, else 1)")
        p.add_argument("--db", help=DB_HELP)
        p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for each answer (default: %(default)s)")
        p.add_argument("--json", action="store_true", help=json_help)
        p.set_defaults(fn=fn, command=f"board {name}")
        return p

    add("info", cmd_board_info, "the board's hello: id, kind, firmware, clock, log counters", "voltgate board info --port /dev/ttyUSB0")
    add("status", cmd_board_status, "slots or outlets with their state and readings", "voltgate board status --port /dev/ttyUSB0")
    p = add("log", cmd_board_log, "pull the board's log into a JSON-lines file and/or the server's database",
            "voltgate board log --port /dev/ttyUSB0 --out ou-1.jsonl")  # fmt: skip
    p.add_argument("--out", metavar="FILE", help="append new records to this JSON-lines file")
    p.add_argument("--to-db", action="store_true", help="store them in the server's database (--db), acked when the key is given")
    p.add_argument("--ack", action="store_true", help="with --out: ack them too, so the board may free them (the server will not get them then)")
    p.add_argument("--no-ack", action="store_true", help="with --to-db: do not ack")
    add("time-sync", cmd_board_time_sync, "set the board's clock from this computer's (signed, with the board's nonce)",
        "voltgate board time-sync --port /dev/ttyUSB0 --keystore master.key")  # fmt: skip
    p = add("clear-fault", cmd_board_clear_fault, "clear a latched fault (signed)", "voltgate board clear-fault 2 --port /dev/ttyUSB0 --keystore master.key")
    p.add_argument("index", type=int, nargs="?", help="slot or outlet (default: all)")
    p = add("unlock", cmd_board_unlock, "open a slot's door: with a service permit, or a signed unlock",
            "voltgate board unlock 2 --permit service.cbor --port /dev/ttyUSB0")  # fmt: skip
    p.add_argument("slot", type=int, help="the slot")
    p.add_argument("--permit", metavar="PERMIT", help="a service permit (file, hex or base64url); without it: the signed unlock command")
    p = add("present", cmd_board_present, "hand a permit to the board, as a phone relays one offline", "voltgate board present permit.cbor --port /dev/ttyUSB0")
    p.add_argument("permit", metavar="PERMIT", help="a permit file (CBOR, or hex/base64url text) or the token itself")
    p.add_argument("--index", type=int, help="the slot or outlet it is presented at (a reader fixed at one)")
    p.add_argument("--console", action="store_true", help="as a text line `present <hex>` on the serial console, not a link frame")


# -- permit ------------------------------------------------------------------------------------

PERMIT_EXAMPLES = """\
examples:
  voltgate permit issue --device ou-1 --user alice --action power --minutes 60 --out permit.cbor
  voltgate permit issue --device st-1 --user tech --action service --scope 2 --minutes 15 --compact
  voltgate permit show permit.cbor                        claims and window, MAC not checked
  voltgate permit show permit.cbor --keystore master.key  ... with the verdict a board would give
  voltgate permit verify d18443a10105a1044101...  --keystore master.key --action power --index 0
  voltgate permit qr permit.cbor --out permit.png

`permit issue` makes a permit directly from the master secret, without the server's approval
policy: a technician's tool for service and tests. Users get theirs from the server
(`voltgate permits request`).
"""


def _master(args):
    from . import keys

    if not args.keystore:
        raise VoltgateError("this needs the master secret", "give --keystore FILE or set VOLTGATE_KEYSTORE", EXIT_USAGE)
    return keys.load_master(Path(args.keystore).expanduser())


def cmd_permit_issue(args) -> int:
    from . import keys, permits, wire
    from .permitview import b64url

    if (args.minutes is None) == (args.until is None):
        raise VoltgateError("give the window's end", "either --minutes N or --until TIME", EXIT_USAGE)
    scope = None
    if args.scope is not None:
        try:
            scope = [int(x) for x in args.scope.split(",")]
        except ValueError:
            raise VoltgateError(f"bad scope {args.scope!r}", "slot or outlet indexes separated by commas, e.g. 0,2", EXIT_USAGE) from None
    master = _master(args)
    keys.check_device_id(args.device)
    version = args.key_version
    if version is None and args.db:
        from .provision import _registry_get

        reg = _registry_get(args.db, args.device)
        if reg is None:
            raise VoltgateError(f"device {args.device} is not in the registry", "register it (voltgate provision), or give --key-version", EXIT_USAGE)
        version = reg["key_version"]
    version = version or 1
    now = int(time.time())
    start = _when(args.start, "--start") or now
    end = _when(args.until, "--until") if args.until else start + args.minutes * 60
    token = permits.issue(
        keys.derive_device_key(master, args.device, version),
        version,
        wire.ALG_HMAC256_64 if args.compact else wire.ALG_HMAC256_256,
        device_id=args.device,
        user_id=args.user,
        action=args.action,
        not_before=start,
        expires=end,
        issued_at=now,
        exi=args.exi,
        scope=scope,
        max_wh=args.max_wh,
        max_w=args.max_w,
        single_use=not args.many,
    )
    if args.out:
        Path(args.out).write_bytes(token)
    cti = permits.claims_of(token)[wire.CLAIM_CTI].hex()
    if args.json:
        _print_json({"cti": cti, "device": args.device, "user": args.user, "action": args.action, "nbf": start, "exp": end,
                     "key_version": version, "bytes": len(token), "token_hex": token.hex(), "token_b64url": b64url(token), "out": args.out})  # fmt: skip
    else:
        print(f"permit {cti}: {args.action} on {args.device} for {args.user}, {_iso(start)} to {_iso(end)}, key version {version}, {len(token)} bytes")
        print(f"  written to {args.out}" if args.out else f"  {token.hex()}")
    return EXIT_OK


def _keys_for(args, token):
    """{version: key} for the permit's kid and audience, from the keystore."""
    from . import keys, permits, wire

    claims = permits.claims_of(token)
    _, kid, *_ = permits._board.permit.parse(bytes(token))
    version = keys.version_of(kid) if isinstance(kid, bytes) else None
    device = args.device or claims.get(wire.CLAIM_AUD)
    if version is None or not isinstance(device, str):
        return {}, device
    try:
        keys.check_device_id(device)
    except VoltgateError:
        return {}, device
    return {version: keys.derive_device_key(_master(args), device, version)}, device


def _show(args, verify: bool) -> int:
    from .permitview import inspect, read_token

    token = read_token(args.permit)
    kv, device = (None, args.device)
    if verify or args.keystore:
        kv, device = _keys_for(args, token)
    now = _when(args.now, "--now") if getattr(args, "now", None) else None
    view = inspect(
        token, keys_by_version=kv, device_id=args.device or device, now=now, tz=args.tz, action=getattr(args, "action", None), index=getattr(args, "index", None)
    )
    v = view["verdict"]
    if args.json:
        _print_json(view)
    elif not verify:
        c = view["claims"]
        print(f"permit {c.get('cti')}: {c.get('action')} on {c.get('aud')} for {c.get('sub', '-')}")
        w = view["window"]
        print(f"  window: {w['not_before'] or 'from issue'} to {w['expires']}" + (f", {w['exi_s']} s from first use" if w["exi_s"] else ""))
        print(f"  issued: {w['issued'] or '-'}; {view['alg']}, key version {view['key_version']}, {view['bytes']} bytes")
        extra = {k: val for k, val in c.items() if k not in ("cti", "action", "aud", "sub", "nbf", "exp", "iat", "exi")}
        for k, val in extra.items():
            print(f"  {k}: {val}")
        print(f"  verdict: {_verdict(v)}")
    else:
        print(_verdict(v) if v["ok"] else f"refused: {v['reason']} ({v['why']})")
    if verify and not v["ok"]:
        return EXIT_FAILURE
    return EXIT_OK


def _verdict(v) -> str:
    if not v["checked"]:
        return v["why"]
    return f"{'valid' if v['ok'] else 'refused: ' + v['reason']} for {v['device']} at {v['at']} ({v['why']})"


def cmd_permit_show(args) -> int:
    return _show(args, verify=False)


def cmd_permit_verify(args) -> int:
    return _show(args, verify=True)


def cmd_permit_qr(args) -> int:
    from .permitview import qr_png, read_token

    token = read_token(args.permit)
    text = qr_png(token, args.out)
    if args.json:
        _print_json({"out": args.out, "text": text, "chars": len(text)})
    else:
        print(f"wrote {args.out}: {len(token)}-byte permit as {len(text)} characters of base64url")
    return EXIT_OK


def _permit_parsers(sub) -> None:
    g = sub.add_parser(
        "permit",
        help="issue, show, verify a permit, or draw it as a QR code",
        description="One permit at a time (COSE_Mac0 CWT, protocol/SPEC.md section 2). A permit is a CBOR file, or "
        "hex / base64url text, or the text itself on the command line.",
        epilog=PERMIT_EXAMPLES,
        formatter_class=RAW,
    )
    g.set_defaults(fn=lambda args, p=g: (p.print_help(sys.stderr), EXIT_USAGE)[1])
    gs = g.add_subparsers(dest="permit_command", metavar="SUBCOMMAND")
    p = gs.add_parser(
        "issue",
        help="make a permit for a device and a user, from the master secret",
        description="Make a permit with the device's key (derived from the master secret). No approval policy: see "
        "`voltgate permits request` for users' permits.",
        epilog="example:\n  voltgate permit issue --device ou-1 --user alice --action power --minutes 60 --out permit.cbor",
        formatter_class=RAW,
    )
    p.add_argument("--device", required=True)
    p.add_argument("--user", required=True, help="the user id (sub)")
    p.add_argument("--action", required=True, choices=("rent", "return", "power", "service"))
    p.add_argument("--start", metavar="TIME", help="window start: Unix seconds or ISO 8601 (default: now)")
    p.add_argument("--minutes", type=int, help="window length")
    p.add_argument("--until", metavar="TIME", help="or the window's end")
    p.add_argument("--exi", type=int, metavar="SECONDS", help="valid for this long from first use (boards without a trusted clock)")
    p.add_argument("--scope", help="slot or outlet indexes, e.g. 0,2 (default: any)")
    p.add_argument("--max-wh", type=int)
    p.add_argument("--max-w", type=int)
    p.add_argument("--many", action="store_true", help="many uses within the window (default: single use)")
    p.add_argument("--compact", action="store_true", help="HMAC 256/64: a smaller token for QR codes")
    p.add_argument("--key-version", type=int, help="the device key's version (default: the registry's with --db, else 1)")
    p.add_argument("--keystore", default=os.environ.get("VOLTGATE_KEYSTORE"), help="the master secret (default: $VOLTGATE_KEYSTORE)")
    p.add_argument("--db", help=DB_HELP)
    p.add_argument("--out", metavar="FILE", help="write the token (CBOR bytes) here")
    p.add_argument("--json", action="store_true", help="print {cti, ..., token_hex, token_b64url} as JSON")
    p.set_defaults(fn=cmd_permit_issue, command="permit issue")
    for name, fn, text, ex in (
        ("show", cmd_permit_show, "decode a permit: claims, window in local time, and the verdict when the keystore is given",
         "voltgate permit show permit.cbor --keystore master.key"),
        ("verify", cmd_permit_verify, "check a permit as a board would; exit 1 with the reason when refused",
         "voltgate permit verify permit.cbor --keystore master.key --action power"),
    ):
        p = gs.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", epilog="example:\n  " + ex, formatter_class=RAW)
        p.add_argument("permit", metavar="PERMIT", help="a permit file, or hex / base64url text")
        p.add_argument("--keystore", default=os.environ.get("VOLTGATE_KEYSTORE"), help="the master secret (default: $VOLTGATE_KEYSTORE)")
        p.add_argument("--device", help="the board checking it (default: the permit's aud)")
        p.add_argument("--tz", help="time zone for the window (default: this computer's)")
        p.add_argument("--json", action="store_true", help="print the decoded permit and verdict as JSON")
        if name == "verify":
            p.add_argument("--now", metavar="TIME", help="check at this time (default: now)")
            p.add_argument("--action", choices=("rent", "return", "power", "service"), help="the action the board is about to take")
            p.add_argument("--index", type=int, help="the slot or outlet")
        p.set_defaults(fn=fn, command=f"permit {name}")
    p = gs.add_parser(
        "qr",
        help="draw a permit as a QR code (PNG) of its base64url text",
        description="Draw a permit as a QR code (PNG) of its base64url text: what a phone shows a reader, or `present <text>` on a console.",
        epilog="example:\n  voltgate permit qr permit.cbor --out permit.png",
        formatter_class=RAW,
    )
    p.add_argument("permit", metavar="PERMIT")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--json", action="store_true", help="print {out, text, chars}")
    p.set_defaults(fn=cmd_permit_qr, command="permit qr")


# -- sim ---------------------------------------------------------------------------------------

SIM_EXAMPLES = """\
examples:
  voltgate sim boards/sim-outlet-2.json --flash sim/ou-1           console on a pty (its path is printed)
  voltgate sim boards/sim-station-4.json --flash sim/st-1 --tcp 4000
  mpremote connect socket://127.0.0.1:4000 fs ls                    then, from another terminal
  voltgate provision boards/sim-station-4.json --port socket://127.0.0.1:4000 --device-id st-1 --site depot

The flash folder is the board's filesystem. At power-up its /main.py runs (provisioning
writes one that starts the firmware); Ctrl-C on the console stops the firmware and gives
the REPL; mpremote's soft resets and `mpremote reset` behave as on an ESP32. Ctrl-C (or
SIGTERM) here stops the board; the flash folder stays.
"""


def cmd_sim(args) -> int:
    import signal
    import threading

    from .simboard import SimulatedBoard

    sim = SimulatedBoard(args.board_file, args.flash, tcp_port=args.tcp, heapsize=args.heapsize, log=args.log)
    stop = threading.Event()
    restore = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            restore[sig] = signal.signal(sig, lambda n, f: stop.set())
    try:
        sim.start()
        info = {"board": sim.board.get("name"), "kind": sim.board.get("kind"), "url": sim.url, "pty": sim.pty, "port": sim.port}
        info["flash"] = str(Path(args.flash).resolve())
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print(f"{info['board']} ({info['kind']}): console on {sim.url}", flush=True)
            print(f"  flash {info['flash']}; try: mpremote connect {sim.url} fs ls", flush=True)
            print("  Ctrl-C stops it", flush=True)
        stop.wait()
    finally:
        sim.stop()
        for sig, h in restore.items():
            signal.signal(sig, h)
    if not args.json:
        print(f"stopped after {sim.boots} boot(s), {sim.soft_reboots} soft reboot(s)", flush=True)
    return EXIT_OK


def _sim_parser(sub) -> None:
    p = sub.add_parser(
        "sim",
        help="run a simulated board whose console mpremote, pyserial and provisioning can reach",
        description="Run a simulated board (the MicroPython unix port with the firmware's simulated hardware) "
        "whose console - the REPL, and the firmware's console with the serial link - is on a pty or on "
        "127.0.0.1:PORT. Its flash is a folder.",
        epilog=SIM_EXAMPLES,
        formatter_class=RAW,
    )
    p.add_argument(
        "board_file", metavar="BOARD_FILE", help='a board file with "hal": "sim" (e.g. boards/sim-outlet-2.json); copied to /board.json when the flash has none'
    )
    p.add_argument("--flash", required=True, metavar="DIR", help="the board's flash: a folder (made if missing)")
    p.add_argument("--tcp", type=int, metavar="PORT", help="serve the console on 127.0.0.1:PORT (0: a free port) instead of a pty")
    p.add_argument("--heapsize", type=int, metavar="BYTES", help="MicroPython heap (e.g. 98304 for a station's budget)")
    p.add_argument("--log", metavar="FILE", help="append everything the board writes to its console here")
    p.add_argument("--json", action="store_true", help="print {board, kind, url, pty, port, flash} as one JSON line")
    p.set_defaults(fn=cmd_sim, command="sim")


def register(sub) -> None:
    """Add provision, board, permit and sim to voltgate's subcommands."""
    _provision_parser(sub)
    _board_parsers(sub)
    _permit_parsers(sub)
    _sim_parser(sub)
