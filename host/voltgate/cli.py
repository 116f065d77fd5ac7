"""The `voltgate` command: parses arguments and calls the library.

Errors users can act on are printed as `voltgate: <command>: <problem> (<hint>)`
with no traceback; exit codes are listed in EPILOG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, VoltgateError

EPILOG = """\
exit codes:
  0  success
  1  the operation ran and failed (e.g. a demo step did not happen)
  2  bad command line or bad input
  3  a tool, file or device the command needs is missing

examples:
  voltgate build --out build/firmware     compile the board image tree (.mpy)
  voltgate demo                           issue permits, verify them on MicroPython
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

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(fn=cmd_version)
    return ap


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
