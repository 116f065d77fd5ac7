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
  voltgate demo                           issue permits, verify them on MicroPython
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

    return demo.run(firmware=Path(args.firmware) if args.firmware else None, out=Path(args.out))


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
    import secrets

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
    pw_file = out / "server-password"
    if args.server_password_file:
        server_pw = Path(args.server_password_file).read_text().strip()
    elif pw_file.exists():
        server_pw = pw_file.read_text().strip()
    else:
        server_pw = secrets.token_hex(16)
        fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(server_pw + "\n")
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
        help="issue permits on the host and verify them inside MicroPython",
        description="Issue permits with the host's COSE library and verify each one on the MicroPython "
        "interpreter running the compiled board modules under the outlet's 64 KB heap budget. "
        "Exits 1 if any verdict is not the expected one.",
        epilog="example:\n  voltgate demo --out demo-run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--firmware", help="compiled board tree to run (default: build it into the demo folder)")
    p.add_argument("--out", default="demo-run", help="folder for the demo's keystore and records (default: %(default)s)")
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

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(fn=cmd_version)
    return ap


def _usage(p) -> int:
    p.print_help(sys.stderr)
    return EXIT_USAGE


def main(argv=None) -> int:
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
