"""Management server throughput (shared/DESIGN.md, Budgets: the server
ingests pulled batches at a rate reported as a ratio to the broker's own
raw publish rate, measured in the same run).

measure() reports
- permits issued per second: voltgate.permits.issue alone (the COSE/CWT
  work), and through services.request_permit (approval conditions, the
  permit row, one transaction each) on SQLite and PostgreSQL;
- the ingest rate of pulled batches into SQLite and PostgreSQL: what one
  pull costs the database per batch, ServerRecordStore.add (INSERT ... ON
  CONFLICT DO NOTHING RETURNING, and services.process_records for the new
  records, and the pull position, in one transaction), with batches as the
  boards send them (64 outlet readings); one puller, and four pulling four
  boards at once (sync.Puller's default); and a batch delivered again
  (every record already stored);
- the broker's raw rates for messages of a batch's size, measured in the
  same run by bench/mqtt_bench.py's _raw_rates (a private Mosquitto, paho
  QoS 1, pipelined and in lock step), and the ingest rates as ratios to
  them (above 1: the database keeps up with the broker).

PostgreSQL is a private cluster (voltgate.server.pgcluster, durable: fsync
on) when its server binaries are installed; else its figures are None.

    python bench/server_bench.py [--batches 300] [--permits 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import cbor2

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import mqtt_bench  # noqa: E402

from voltgate import keys, messages, permits, wire  # noqa: E402
from voltgate.broker import Broker, BrokerConfig  # noqa: E402
from voltgate.server import db  # noqa: E402
from voltgate.server.store import ServerRecordStore  # noqa: E402

BATCH = 64  # records per get_log reply (SPEC.md 3: at most 64 and 1536 bytes)
READING = [0, 2_000_000, 230_000, 8695]  # LOG_OUTLET_READING of a 2 kW load
MASTER = b"bench master secret, not secret!"
T0 = 1_800_000_000


def batch(device_no: int, first_seq: int, epoch: int = 7) -> list[messages.Record]:
    return [
        messages.Record(epoch, s, T0 + s * 60, wire.LOG_OUTLET_READING, [s & 1, READING[1] + s % 1000, READING[2], READING[3]])
        for s in range(first_seq, first_seq + BATCH)
    ]


def batch_reply_bytes() -> int:
    """The size of a get_log reply holding one such batch, as the board sends it."""
    recs = batch(0, 1)
    body = [BATCH + 1, [7] + [[r.seq, r.ts, r.type, r.body] for r in recs]]
    return len(cbor2.dumps({wire.ENV_TYPE: wire.MSG_REPLY + wire.MSG_GET_LOG, wire.ENV_ID: 0x12345678, wire.ENV_BODY: body}))


# ---------------------------------------------------------------- permits


def permits_issue_rate(n: int) -> float:
    key = keys.derive_device_key(MASTER, "ou-bench-1", 1)
    t0 = time.perf_counter()
    for i in range(n):
        permits.issue(
            key, 1, device_id="ou-bench-1", user_id=f"user-{i:06d}", action="power",
            not_before=T0 - 60, expires=T0 + 3600, issued_at=T0 - 60, scope=[0], max_wh=2000, cti=i.to_bytes(8, "big"),
        )  # fmt: skip
    return n / (time.perf_counter() - t0)


def request_permit_rate(url: str, n: int) -> float:
    """services.request_permit, one transaction per permit, each for its own
    user and outlet (so no approval condition refuses it)."""
    from voltgate.server import services

    eng = db.engine(url)
    factory = db.sessions(eng)
    now = int(time.time())
    devices = (n + 1) // 2
    try:
        with db.transaction(factory) as s:
            for d in range(devices):
                services.add_device(s, f"ou-b{d:05d}", site_id="bench", kind="outlet", board="outlet-2-devkitc", outlets=2)
            for u in range(n):
                services.add_user(s, f"user-{u:06d}")
                services.pay(s, f"user-{u:06d}", 100_000, now=now)
        t0 = time.perf_counter()
        for i in range(n):
            with db.transaction(factory) as s:
                services.request_permit(
                    s, MASTER, user_id=f"user-{i:06d}", device_id=f"ou-b{i // 2:05d}", action="power",
                    now=now, duration_s=3600, scope=[i % 2], max_wh=2000,
                )  # fmt: skip
        return n / (time.perf_counter() - t0)
    finally:
        eng.dispose()


# ---------------------------------------------------------------- ingest


def ingest_rates(url: str, batches: int) -> dict:
    """Batches per second a pull's writes reach: one puller, four at once, and a repeated batch."""
    eng = db.engine(url, pool_size=8)
    try:
        store = ServerRecordStore(db.sessions(eng))

        def pull_like(device: str, n: int, start_seq: int = 1) -> None:
            for k in range(n):
                recs = batch(0, start_seq + k * BATCH)
                store.add(device, recs, position=(recs[-1].seq, recs[-1].epoch))

        pull_like("ou-warm", 5)  # connections, caches, statements
        t0 = time.perf_counter()
        pull_like("ou-one", batches)
        one = batches / (time.perf_counter() - t0)

        per = max(1, batches // 4)
        threads = [threading.Thread(target=pull_like, args=(f"ou-four-{i}", per)) for i in range(4)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        four = 4 * per / (time.perf_counter() - t0)

        again = max(10, batches // 4)
        t0 = time.perf_counter()
        for k in range(again):  # a batch delivered again: nothing new
            assert store.add("ou-one", batch(0, 1 + (k % batches) * BATCH)) == 0
        dup = again / (time.perf_counter() - t0)
        assert store.count("ou-one") == batches * BATCH
    finally:
        eng.dispose()
    return {"batches_per_s": one, "records_per_s": one * BATCH, "batches_per_s_4_pullers": four, "repeated_batches_per_s": dup}


def _raw(tmp: Path, size: int, n: int) -> dict:
    cfg = BrokerConfig(((mqtt_bench.SITE, mqtt_bench.DEVICE, keys.mqtt_password(mqtt_bench.KEY)),), mqtt_bench.SERVER_PW)
    (tmp / "broker").mkdir()
    b = Broker(cfg, tmp / "broker").start()
    try:
        return mqtt_bench._raw_rates(b, size, n)
    finally:
        b.stop()


def measure(batches: int = 300, n_permits: int = 1000, raw_n: int = 800) -> dict:
    from voltgate.server import pgcluster

    out: dict = {"batch_records": BATCH, "batch_reply_bytes": batch_reply_bytes()}
    out["permits_issued_per_s"] = permits_issue_rate(n_permits)
    with tempfile.TemporaryDirectory(prefix="vg-server-bench-") as tmp:
        tmp = Path(tmp)
        out.update(_raw(tmp, out["batch_reply_bytes"], raw_n))
        urls = {"sqlite": f"sqlite:///{tmp / 'ingest.sqlite'}"}
        pg = None
        if pgcluster.find_bindir() is not None:
            pg = pgcluster.PgCluster(durable=True).start()
        try:
            if pg is not None:
                urls["postgresql"] = pg.url(pg.create_database("ingest"))
            for name, url in urls.items():
                db.upgrade(url)
                r = ingest_rates(url, batches)
                out[f"ingest_{name}"] = r
                out[f"ingest_{name}"]["ratio_to_raw_publish"] = r["batches_per_s"] / out["raw_publish_per_s"]
                out[f"ingest_{name}"]["ratio_to_raw_lockstep"] = r["batches_per_s"] / out["raw_lockstep_per_s"]
                out[f"ingest_{name}"]["ratio_4_pullers_to_raw_publish"] = r["batches_per_s_4_pullers"] / out["raw_publish_per_s"]
            for name in ("sqlite", "postgresql"):
                if name not in urls:
                    out[f"ingest_{name}"] = None
                    out[f"request_permit_{name}_per_s"] = "no PostgreSQL server binaries"
                    continue
                purl = urls[name].replace("ingest", "permits") if name == "sqlite" else pg.url(pg.create_database("permits"))
                db.upgrade(purl)
                out[f"request_permit_{name}_per_s"] = request_permit_rate(purl, max(10, n_permits // 5))
        finally:
            if pg is not None:
                pg.stop()
    out["postgresql_durable"] = True
    return out


def _print(d: dict, indent: str = "") -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{indent}{k}")
            _print(v, indent + "  ")
        else:
            print(f"{indent}{k:34} {v:.3f}" if isinstance(v, float) else f"{indent}{k:34} {v}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=300, help="batches of 64 records per ingest run")
    ap.add_argument("--permits", type=int, default=1000, help="permits issued by permits.issue (a fifth of them through services)")
    args = ap.parse_args(argv)
    _print(measure(args.batches, args.permits))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
