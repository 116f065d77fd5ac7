"""Pull sync of a board's flash log (DESIGN.md, Readings log; seed 000):
the server asks for the records after the last one it stores, stores them,
then acks, so the board may free them.

Storage is idempotent on (device, boot epoch, seq): a repeated batch, a
retry after a lost reply or a lost ack, or two server processes pulling the
same board store nothing twice. Seqs missing between what is stored and
what arrives are reported as gaps, with the board's own count of records it
thinned when its log was full, so a gap is never silent.

    store = RecordStore("voltgate.sqlite")
    result = pull(link.Board(transport, "ou-0001", key=k), store)
    print(result.new, result.gaps)

RecordStore is the minimal SQLite table the links need; the management
server keeps the same key in its own schema.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import cbor2

from . import messages
from .link import Board

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log_records (
    device TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    type INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (device, epoch, seq)
);
CREATE INDEX IF NOT EXISTS log_records_seq ON log_records (device, seq);
CREATE TABLE IF NOT EXISTS log_gaps (
    device TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    thinned INTEGER NOT NULL,
    PRIMARY KEY (device, first_seq)
);
CREATE TABLE IF NOT EXISTS sync_position (
    device TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL
);
"""


class RecordStore:
    """Pulled records in SQLite, each stored once."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def add(self, device: str, records: Iterable[messages.Record], position: tuple[int, int] | None = None) -> int:
        """Store records, and move the pull position to position (seq,
        epoch) in the same transaction when given; returns how many were new."""
        rows = [(device, r.epoch, r.seq, r.ts, r.type, cbor2.dumps(r.body)) for r in records]
        with self._lock, self._db:
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO log_records VALUES (?, ?, ?, ?, ?, ?)", rows)
            new = self._db.total_changes - before
            if position is not None:
                self._db.execute("INSERT OR REPLACE INTO sync_position VALUES (?, ?, ?)", (device, *position))
            return new

    def last_seq(self, device: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM log_records WHERE device = ?", (device,)).fetchone()
        return row[0] or 0

    def count(self, device: str | None = None) -> int:
        with self._lock:
            if device is None:
                return self._db.execute("SELECT COUNT(*) FROM log_records").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM log_records WHERE device = ?", (device,)).fetchone()[0]

    def records(self, device: str) -> list[messages.Record]:
        with self._lock:
            rows = self._db.execute(
                "SELECT epoch, seq, ts, type, body FROM log_records WHERE device = ? ORDER BY seq, epoch", (device,)
            ).fetchall()
        return [messages.Record(e, s, t, ty, cbor2.loads(b)) for e, s, t, ty, b in rows]

    def position(self, device: str) -> tuple[int, int] | None:
        """(seq, epoch) of the last record pulled from the board's current
        log, or None before the first pull."""
        with self._lock:
            row = self._db.execute("SELECT seq, epoch FROM sync_position WHERE device = ?", (device,)).fetchone()
        return None if row is None else (row[0], row[1])

    def add_gap(self, device: str, first: int, last: int, thinned: int) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO log_gaps VALUES (?, ?, ?, ?)", (device, first, last, thinned))

    def gaps(self, device: str) -> list[tuple[int, int]]:
        with self._lock:
            return [tuple(r) for r in self._db.execute("SELECT first_seq, last_seq FROM log_gaps WHERE device = ? ORDER BY first_seq", (device,))]


@dataclass
class PullResult:
    device: str
    new: int = 0
    received: int = 0
    batches: int = 0
    acked: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)
    restarted: bool = False  # the board's log starts over (its flash was erased)

    @property
    def duplicates(self) -> int:
        return self.received - self.new


def pull(
    board: Board,
    store: RecordStore,
    *,
    batch: int = 64,
    ack: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> PullResult:
    """Pull every record the board holds after the last one stored, then
    ack it. progress(last seq stored, board's next seq) after each batch."""
    res = PullResult(board.device)
    hello = board.hello()
    first, last, nxt, acked = hello["log"]
    thinned = sum(hello["dropped"])
    pos = store.position(board.device)
    have, have_epoch = pos if pos is not None else (0, None)
    if have and (have + 1 > nxt or first <= have and _moved(board, have, have_epoch)):
        # the board's log is not the one this store followed: it was erased
        # (or the board replaced) and begins again under new boot epochs, so
        # nothing collides; follow the new log from its start
        res.restarted = True
        have = 0
    frm = have + 1
    while frm < nxt:
        b = board.get_log(frm, batch)
        res.batches += 1
        if not b.records:
            break
        expect = frm
        for r in b.records:
            if r.seq > expect:  # thinned on the board, or freed by an ack this store never saw
                res.gaps.append((expect, r.seq - 1))
                store.add_gap(board.device, expect, r.seq - 1, thinned)
            expect = r.seq + 1
        res.received += len(b.records)
        last = b.records[-1]
        res.new += store.add(board.device, b.records, position=(last.seq, last.epoch))  # one transaction
        frm = last.seq + 1
        nxt = max(nxt, b.next_seq)
        if progress is not None:
            progress(frm - 1, nxt)
    # ack what this pull stored (from its start to its end, gaps reported);
    # never records of a log this store did not follow
    if ack and frm - 1 > acked and frm > 1:
        res.acked = board.ack(frm - 1)
    else:
        res.acked = acked
    return res


def _moved(board: Board, seq: int, epoch: int | None) -> bool:
    """Whether the board's record at seq (the last one stored) has another
    boot epoch than the stored one: its log was erased and refilled past it."""
    b = board.get_log(seq, 1)
    return bool(b.records) and b.records[0].seq == seq and b.records[0].epoch != epoch


class Puller:
    """Pull scheduling for many boards: each known board every interval
    seconds, a board as soon as it comes online (on_state, for
    voltgate.mqttlink.MqttTransport), and on demand (pull_now). One pull per
    board at a time, at most `workers` boards at once; a pull asked for
    while one of that board runs follows it. Each pull's outcome goes to
    report(device, result, error): a PullResult, or the exception it raised
    (a LinkTimeout while the board or the broker is away, a BoardError, ...).

        puller = Puller(lambda d: Board(transport, d, key=key_of(d)), store, interval=300, report=log)
        transport.on_state = puller.on_state
        with puller:            # start(); stop() on leaving
            puller.add("ou-0001")

    board_for(device) makes the link.Board a pull uses; pull_args go to
    pull() (batch, ack). Threads: one scheduler and a pool of workers.
    """

    def __init__(
        self,
        board_for: Callable[[str], Board],
        store: RecordStore,
        *,
        interval: float = 300.0,
        report: Callable[[str, PullResult | None, Exception | None], None] | None = None,
        workers: int = 4,
        clock: Callable[[], float] = time.monotonic,
        **pull_args,
    ):
        self._board_for = board_for
        self._store = store
        self.interval = interval
        self._report = report
        self._clock = clock
        self._pull_args = pull_args
        self._cv = threading.Condition()
        self._due: dict[str, float] = {}  # device -> when its next pull is due
        self._busy: set[str] = set()
        self._stopping = False
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="voltgate-pull")
        self._thread: threading.Thread | None = None

    def add(self, device: str, *, now: bool = False) -> None:
        """Pull this board every interval from now on (the first time now, or after one interval)."""
        with self._cv:
            if device not in self._due or now:
                self._due[device] = self._clock() + (0 if now else self.interval)
            self._cv.notify()

    def remove(self, device: str) -> None:
        with self._cv:
            self._due.pop(device, None)

    def pull_now(self, device: str) -> None:
        """Pull this board as soon as it is not being pulled (adds it if new)."""
        with self._cv:
            self._due[device] = float("-inf")
            self._cv.notify()

    def on_state(self, device: str, online: bool) -> None:
        """A board came online (or went offline): pull it when it comes."""
        if online:
            self.pull_now(device)

    @property
    def devices(self) -> list[str]:
        with self._cv:
            return sorted(self._due)

    def start(self) -> Puller:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="voltgate-puller", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop scheduling; pulls under way finish (their own timeouts bound them)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Puller:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        with self._cv:
            while not self._stopping:
                now = self._clock()
                wait = None
                for device, due in list(self._due.items()):
                    if device in self._busy:
                        continue
                    if due <= now:
                        self._busy.add(device)
                        self._due[device] = now + self.interval
                        self._pool.submit(self._pull, device)
                        due = now + self.interval
                    wait = due - now if wait is None else min(wait, due - now)
                self._cv.wait(wait)

    def _pull(self, device: str) -> None:
        try:
            result = error = None
            try:
                result = pull(self._board_for(device), self._store, **self._pull_args)
            except Exception as e:  # reported, never lost in the pool
                error = e
            if self._report is not None:
                self._report(device, result, error)
        finally:
            with self._cv:
                self._busy.discard(device)
                self._cv.notify()
