"""Pulled log records into the server's database (DESIGN.md, Readings log):
the store voltgate.sync.pull and sync.Puller write to, on the tables
models.LogRecord and models.LogGap, in SQLite or PostgreSQL.

    store = ServerRecordStore(db.sessions(db.engine(url)))
    sync.pull(board, store)

Each record is stored once per (device, boot epoch, seq): an
INSERT ... ON CONFLICT DO NOTHING ... RETURNING gives back only the rows
that are new, and those, in the same transaction, go to
services.process_records(session, device, new_records), which books what
they mean (rentals, sessions, ledger entries). A repeated batch, a retry
after a lost ack, or another server process storing the same batch at the
same moment therefore stores and books nothing twice: on PostgreSQL the
second insert of a row waits for the first transaction and then finds the
row there (or takes it over if the first one rolled back).

A transaction that fails for a reason that goes away by itself (a deadlock
or serialization failure between server processes, a unique key taken by
a concurrent booking, SQLite's lock) is tried again, a few times, with a
short backoff (services.retrying, which every server transaction uses).
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

import cbor2
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from .. import messages
from . import db, domain, services
from .models import LogGap, LogPosition, LogRecord

_TRIES = 5

ProcessFn = Callable[[Session, str, list], None]


# the slot or outlet a record is about: one reading of SPEC.md 8 and 9 for
# the whole server (the bookings use it too)
index_of = domain.record_index


def _insert(s: Session):
    return postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert


def _move_position(s: Session, device: str, seq: int, epoch: int) -> None:
    """Move the pull position on. Another server process may have pulled
    further meanwhile: within one boot epoch the position only rises (a late
    writer would make the next pull fetch again what is stored); a new epoch
    (the board rebooted, or its log began again) replaces it."""
    ins = _insert(s)(LogPosition).values(device_id=device, seq=seq, epoch=epoch)
    ex = ins.excluded
    later = (ex.epoch != LogPosition.epoch) | (ex.seq > LogPosition.seq)
    s.execute(ins.on_conflict_do_update(index_elements=["device_id"], set_={"seq": ex.seq, "epoch": ex.epoch}, where=later))


class ServerRecordStore:
    """sync.RecordStore's interface (add with the pull position, add_gap, position,
    last_seq, count, records, gaps) on the server's database. process(session, device, new_records)
    replaces services.process_records (tests, benchmarks)."""

    def __init__(self, session_factory: sessionmaker[Session], *, process: ProcessFn | None = None):
        self._factory = session_factory
        self._process = process
        self._lock = threading.Lock()
        self.stored = 0  # new records this store committed (what this process ingested)

    @classmethod
    def from_url(cls, url: str | None = None, **kw) -> ServerRecordStore:
        return cls(db.sessions(db.engine(url)), **kw)

    def _tx(self, work: Callable[[Session], object]):
        return services.retrying(self._factory, work, _TRIES)

    def add(self, device: str, records: Iterable[messages.Record], position: tuple[int, int] | None = None) -> int:
        """Store the records; the new ones (in batch order) go to
        process_records in the same transaction, and position (seq, epoch),
        when given, moves the pull position on in it too (_move_position).
        Returns how many were new."""
        batch: dict[tuple[int, int], messages.Record] = {}
        for r in records:
            batch.setdefault((r.epoch, r.seq), r)  # a record twice in one batch counts once
        if not batch and position is None:
            return 0
        # ascending key order: concurrent writers lock rows in the same order
        keys = sorted(batch)
        rows = [
            {
                "device_id": device,
                "epoch": r.epoch,
                "seq": r.seq,
                "ts": r.ts,
                "type": r.type,
                "body": cbor2.dumps(r.body),
                "index": index_of(r.type, r.body),
                "battery": domain.record_battery(r.type, r.body),
            }
            for r in (batch[k] for k in keys)
        ]
        process = self._process or services.process_records

        def work(s: Session) -> int:
            new = []
            if rows:
                # one statement, compiled once and cached, executed for many rows
                # (SQLAlchemy's "insertmanyvalues" sends them as multi-row INSERTs)
                t = LogRecord.__table__
                stmt = _insert(s)(t).on_conflict_do_nothing(index_elements=["device_id", "epoch", "seq"]).returning(t.c.epoch, t.c.seq)
                stored = {tuple(row) for row in s.connection().execute(stmt, rows)}
                new = [r for k, r in batch.items() if k in stored]
                if new:
                    process(s, device, new)
            if position is not None:
                _move_position(s, device, *position)
            return len(new)

        n = self._tx(work)
        with self._lock:
            self.stored += n
        return n

    def add_gap(self, device: str, first: int, last: int, thinned: int) -> None:
        def work(s: Session) -> None:
            stmt = _insert(s)(LogGap).values(device_id=device, first_seq=first, last_seq=last, thinned=thinned)
            s.execute(stmt.on_conflict_do_nothing(index_elements=["device_id", "first_seq"]))

        self._tx(work)

    def position(self, device: str) -> tuple[int, int] | None:
        """(seq, epoch) of the last record pulled from the board's current
        log, or None before the first pull."""
        with self._factory() as s:
            row = s.execute(select(LogPosition.seq, LogPosition.epoch).where(LogPosition.device_id == device)).first()
        return None if row is None else (row[0], row[1])

    def last_seq(self, device: str) -> int:
        with self._factory() as s:
            return s.scalar(select(func.max(LogRecord.seq)).where(LogRecord.device_id == device)) or 0

    def count(self, device: str | None = None) -> int:
        q = select(func.count()).select_from(LogRecord)
        if device is not None:
            q = q.where(LogRecord.device_id == device)
        with self._factory() as s:
            return s.scalar(q)

    def records(self, device: str) -> list[messages.Record]:
        q = select(LogRecord.epoch, LogRecord.seq, LogRecord.ts, LogRecord.type, LogRecord.body)
        q = q.where(LogRecord.device_id == device).order_by(LogRecord.seq, LogRecord.epoch)
        with self._factory() as s:
            return [messages.Record(e, sq, ts, ty, cbor2.loads(b)) for e, sq, ts, ty, b in s.execute(q)]

    def gaps(self, device: str) -> list[tuple[int, int]]:
        q = select(LogGap.first_seq, LogGap.last_seq).where(LogGap.device_id == device).order_by(LogGap.first_seq)
        with self._factory() as s:
            return [tuple(r) for r in s.execute(q)]
