"""Fleet size one server process keeps in sync at a given reading interval
(issue 8; shared/DESIGN.md, Management server).

k simulated stations (boards/sim-station-4.json: three packs charging or
ready and one empty slot, so three slot readings every reading_s; the
firmware from the .mpy build on the MicroPython unix port, hal.sim's
physics) run `speed` times as fast as real time against a private
Mosquitto; one gateway (voltgate.server.gateway.Gateway: the board side of
`voltgate server`, with its pull scheduler and four pull workers) pulls
each board every pull_s real seconds into SQLite, storing and booking every
record (voltgate.fleet.Fleet with no users).

Speed stands in for boards: a board at speed s logs in one real second
what s real-time boards log, and pulled every pull_s real seconds it hands
over, per pull, what a real-time board logs in s x pull_s seconds. So the
gateway's work for k boards at speed s (k / pull_s pulls a second, each
with s x pull_s x 3 / reading_s readings) is its work for k x s real-time
boards pulled every s x pull_s seconds; only the broker's connection count
(k, not k x s) differs.

For each k in a rising list: the boards boot, the gateway sets their
clocks, a warm-up, then over `window` real seconds each board's log head
(its hello, asked at the start and at the end) is compared with what the
database stores. The gateway keeps up when no pull failed and the backlog
(heads minus stored) grew by less than one pull's worth of readings per
board. The answer: the largest k that kept up, as k x s real-time boards.
The list stops at the first k that did not keep up, or when the host is
the limit: the boards' clocks fall behind, or the boards, the broker and
the gateway together use more than 85 % of its cores (then the gateway's
own limit lies further out, and the figure says so).

    python bench/fleet_bench.py [--ks 4,8,16,32,48] [--speed 300] [--reading-s 60] [--pull-s 1] [--window 15]

Defaults: readings every 60 s (the firmware's default), pulls every 300 s of
board time (`voltgate server`'s default), each simulated board standing
for 300 real-time ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from voltgate import build, fleet, tree

SLOTS_WITH_PACKS = 3  # the fleet's stations: slot 2 is left empty for returns


def _cpu_s(pid: int) -> float:
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _heads(f: fleet.Fleet) -> dict[str, tuple[int, float]]:
    """Each board's log head (last seq) and its clock, asked now."""
    out = {}
    for d in f.devices:
        try:
            h = f.gateway.board(d).hello()
        except Exception:
            continue
        out[d] = (h["log"][1] or 0, h["clock"][2])
    return out


def _stored(f: fleet.Fleet) -> dict[str, int]:
    return {d: f.gateway.store.last_seq(d) for d in f.devices}


def one(k: int, *, speed: int, reading_s: int, pull_s: float, window: float, warmup: float, code: Path, work: Path) -> dict:
    """k stations for `window` real seconds: the figures of one step."""
    o = fleet.FleetOptions(out=work / f"k{k}", stations=k, outlets=0, speed=speed, behave=False, reading_s=reading_s, pull_s=pull_s, code=code)
    f = fleet.Fleet(o).start()
    try:
        if not f.wait_online(timeout=60 + 2 * k):
            return {"k": k, "error": "not every board came online with a trusted clock"}
        time.sleep(warmup)  # boot records pulled; the readings flow at their steady rate
        g0 = dict(f.gateway.stats)
        heads0, stored0, t0 = _heads(f), _stored(f), time.monotonic()
        cpu0 = {d: _cpu_s(p.proc.pid) for d, p in f.boards.items()}
        broker0 = _cpu_s(f.broker.proc.pid)
        me0 = time.process_time()
        time.sleep(window)
        heads1, stored1, t1 = _heads(f), _stored(f), time.monotonic()
        dt = t1 - t0
        cpu = sum(_cpu_s(p.proc.pid) - cpu0[d] for d, p in f.boards.items()) / dt
        broker_cpu = (_cpu_s(f.broker.proc.pid) - broker0) / dt
        gateway_cpu = (time.process_time() - me0) / dt
        g1 = f.gateway.stats
        both = [d for d in f.devices if d in heads0 and d in heads1]
        produced = sum(heads1[d][0] - heads0[d][0] for d in both)
        stored = sum(stored1[d] - stored0[d] for d in both)
        backlog0 = sum(max(0, heads0[d][0] - stored0[d]) for d in both)
        backlog1 = sum(max(0, heads1[d][0] - stored1[d]) for d in both)
        # board time passed per real second: below speed, the host could not run them in time
        clock_rate = min((heads1[d][1] - heads0[d][1]) / dt for d in both) if both else 0.0
        per_pull = SLOTS_WITH_PACKS * speed * pull_s / reading_s
        failed = g1["failed_pulls"] - g0["failed_pulls"]
        # a failed pull (a timeout) is tried again at the next interval: what counts is the backlog
        keeps_up = len(both) == k and backlog1 - backlog0 < k * per_pull + 1 and stored >= 0.95 * produced
        busy = cpu + broker_cpu + gateway_cpu
        return {
            "k": k,
            "boards_equivalent": k * speed,
            "produced_per_s": round(produced / dt, 1),
            "stored_per_s": round(stored / dt, 1),
            "backlog_start": backlog0,
            "backlog_end": backlog1,
            "pulls_per_s": round((g1["pulls"] - g0["pulls"]) / dt, 2),
            "failed_pulls": failed,
            "readings_per_pull": round(per_pull, 1),
            "board_clock_rate": round(clock_rate, 1),
            "boards_cpu_cores": round(cpu, 2),
            "broker_cpu_cores": round(broker_cpu, 2),
            "gateway_cpu_cores": round(gateway_cpu, 2),
            "keeps_up": keeps_up,
            # the boards' clocks fell behind, or the host's cores are nearly all in use
            "host_limited": clock_rate < 0.9 * speed or busy > 0.85 * (os.cpu_count() or 1),
        }
    finally:
        f.stop()


def measure(ks=(4, 8, 16, 32, 48), speed: int = 300, reading_s: int = 60, pull_s: float = 1.0, window: float = 15.0, warmup: float | None = None,
            firmware: Path | None = None) -> dict:  # fmt: skip
    """The largest fleet one gateway keeps in sync at reading interval
    reading_s (board seconds), as real-time boards pulled every
    speed x pull_s seconds; with every step's figures."""
    warmup = max(3.0, 2 * pull_s) if warmup is None else warmup
    with tempfile.TemporaryDirectory(prefix="vgfleet_") as tmp:
        work = Path(tmp)
        code = firmware
        if code is None:
            code = work / "firmware"
            build.build(code, cache=tree.root() / "build" / "cache")
        steps = []
        for k in ks:
            r = one(k, speed=speed, reading_s=reading_s, pull_s=pull_s, window=window, warmup=warmup, code=Path(code), work=work)
            steps.append(r)
            if "error" in r or not r["keeps_up"] or r["host_limited"]:
                break
    kept = [r for r in steps if r.get("keeps_up") and not r.get("host_limited")]
    best = kept[-1] if kept else None
    last = steps[-1] if steps else {}
    if not best:
        limit = "none kept up"
    elif last is best:
        limit = f"not reached: every step kept up (largest k tried: {best['k']})"
    elif last.get("host_limited"):
        limit = (f"this host: at k={last['k']} the boards, broker and gateway used {last['boards_cpu_cores'] + last['broker_cpu_cores'] + last['gateway_cpu_cores']:.2f} "
                 f"of {os.cpu_count()} cores (board clocks at {last['board_clock_rate']} of {speed})")  # fmt: skip
    else:
        limit = f"the gateway: at k={last['k']} the backlog grew ({last.get('backlog_start')} -> {last.get('backlog_end')}) or pulls failed"
    return {
        "reading_s": reading_s,
        "speed": speed,
        "pull_s_real": pull_s,
        "pull_s_board": speed * pull_s,
        "readings_per_board_per_s": SLOTS_WITH_PACKS / reading_s,
        "fleet_in_sync": best["boards_equivalent"] if best else 0,
        "simulated_boards": best["k"] if best else 0,
        "limit": limit,
        "steps": steps,
        "cores": os.cpu_count(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="4,8,16,32,48", help="simulated stations per step (default: %(default)s)")
    ap.add_argument("--speed", type=int, default=300, help="simulated seconds per real second (default: %(default)s)")
    ap.add_argument("--reading-s", type=int, default=60, help="the boards' reading interval, board seconds (default: %(default)s)")
    ap.add_argument("--pull-s", type=float, default=1.0, help="the gateway's pull interval, real seconds (default: %(default)s: 300 board seconds)")
    ap.add_argument("--window", type=float, default=15.0, help="real seconds measured per step (default: %(default)s)")
    ap.add_argument("--firmware", help="a `voltgate build` tree (default: built)")
    a = ap.parse_args()
    res = measure(tuple(int(x) for x in a.ks.split(",")), a.speed, a.reading_s, a.pull_s, a.window, firmware=Path(a.firmware) if a.firmware else None)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
