"""The server's database on SQLite and PostgreSQL (the db_url fixture): the
Alembic migrations build exactly the tables of voltgate.server.models, and
ServerRecordStore stores each pulled record once per (device, epoch, seq)
and hands each new record once to process_records, in the same
transaction, also when several writers store the same batch at once."""

from __future__ import annotations

import threading
from collections import Counter

import cbor2
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select

from voltgate import wire
from voltgate.messages import Record
from voltgate.server import db, domain, models
from voltgate.server.store import ServerRecordStore, index_of

DEV = "ou-0001"
EPOCH = 123456


def readings(first, n, epoch=EPOCH, ts0=1_800_000_000):
    return [Record(epoch, s, ts0 + s, wire.LOG_OUTLET_READING, [s & 1, 2_000_000 + s, 230_000, 8695]) for s in range(first, first + n)]


class Recorder:
    """process_records stand-in: what it was given, per call (thread-safe)."""

    def __init__(self, fail=False):
        self.calls: list[tuple[str, list]] = []
        self.lock = threading.Lock()
        self.fail = fail

    def __call__(self, s, device, records):
        # it runs inside the store's transaction: the rows are visible to it
        keys = {(r.epoch, r.seq) for r in records}
        q = select(models.LogRecord.epoch, models.LogRecord.seq).where(models.LogRecord.device_id == device)
        seen = {tuple(r) for r in s.execute(q)}
        assert keys <= seen
        with self.lock:
            self.calls.append((device, list(records)))
        if self.fail:
            raise RuntimeError("booking failed")

    def keys(self):
        return [(d, r.epoch, r.seq) for d, rs in self.calls for r in rs]


@pytest.fixture
def factory(db_url):
    eng = db.engine(db_url)
    yield db.sessions(eng)
    eng.dispose()


# ---------------------------------------------------------------- migrations


def test_the_migrations_build_exactly_the_models_tables(db_url):
    eng = db.engine(db_url)
    try:
        with eng.connect() as c:
            diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), models.Base.metadata)
            current = MigrationContext.configure(c).get_current_revision()
            tables = set(inspect(c).get_table_names())
    finally:
        eng.dispose()
    # a difference here means models.py changed without a migration: add one
    # (versions/000N_*.py) rather than editing 0001
    assert diff == [], diff
    assert current == ScriptDirectory.from_config(db.alembic_config(db_url)).get_current_head()
    assert tables == set(models.Base.metadata.tables) | {"alembic_version"}


def test_upgrading_again_changes_nothing_and_downgrade_removes_everything(db_url):
    db.upgrade(db_url)  # the fixture upgraded already: a no-op
    cfg = db.alembic_config(db_url)
    command.downgrade(cfg, "base")
    eng = db.engine(db_url)
    try:
        with eng.connect() as c:
            assert set(inspect(c).get_table_names()) <= {"alembic_version"}
    finally:
        eng.dispose()
    db.upgrade(db_url)
    eng = db.engine(db_url)
    try:
        with eng.connect() as c:
            assert set(inspect(c).get_table_names()) == set(models.Base.metadata.tables) | {"alembic_version"}
    finally:
        eng.dispose()


def test_the_migrations_ship_inside_the_package():
    # db.upgrade needs no alembic.ini: the script folder is found beside db.py
    cfg = db.alembic_config("sqlite://")
    script = ScriptDirectory.from_config(cfg)
    assert script.dir == str(db.MIGRATIONS) and (db.MIGRATIONS / "env.py").is_file()
    assert [r.revision for r in script.walk_revisions()][-1] == "0001"
    import tomllib

    from voltgate import tree

    data = tomllib.loads((tree.root() / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["voltgate"]
    assert "server/migrations/*.py" in data and "server/migrations/versions/*.py" in data


# ---------------------------------------------------------------- ingest


BID = bytes.fromhex("0102030405060708")


def battery_records():
    """(type, body) of records that name BID, and of one that names none."""
    return [
        (wire.LOG_BATTERY_OUT, [0, BID, 90, 98, "u", b"c", 12, 345_000, 180, 310]),
        (wire.LOG_ALARM, [domain.STATION_ALARM_REFUSED, 1, "unknown", BID]),
        (wire.LOG_OUTLET_READING, [0, 2_000_000, 230_000, 8695]),
    ]


def stored_batteries(url):
    eng = db.engine(url)
    try:
        with eng.connect() as c:
            return [b for (b,) in c.execute(select(models.LogRecord.battery).order_by(models.LogRecord.seq))]
    finally:
        eng.dispose()


def test_a_record_that_names_a_battery_is_stored_with_its_id(factory, db_url):
    store = ServerRecordStore(factory, process=Recorder())
    store.add(DEV, [Record(EPOCH, i + 1, 1_800_000_000 + i, t, b) for i, (t, b) in enumerate(battery_records())])
    assert stored_batteries(db_url) == [BID.hex(), BID.hex(), None]


def test_the_battery_migration_fills_in_the_records_stored_before_it(db_url):
    command.downgrade(db.alembic_config(db_url), "0001")
    cols = ("device_id", "epoch", "seq", "ts", "type", "body")  # log_records as of 0001: no battery column
    t = sa.table("log_records", *(sa.column(c) for c in cols))
    rows = [(DEV, EPOCH, i + 1, 1_800_000_000 + i, rt, cbor2.dumps(b)) for i, (rt, b) in enumerate(battery_records())]
    rows.append((DEV, EPOCH, 4, 1_800_000_004, wire.LOG_BATTERY_IN, b"\xff"))  # not CBOR: names nothing
    eng = db.engine(db_url)
    try:
        with eng.begin() as c:
            c.execute(t.insert(), [dict(zip(cols, r)) for r in rows])
    finally:
        eng.dispose()
    db.upgrade(db_url)
    assert stored_batteries(db_url) == [BID.hex(), BID.hex(), None, None]


def test_a_repeated_batch_stores_nothing_twice(factory):
    rec = Recorder()
    store = ServerRecordStore(factory, process=rec)
    batch = readings(1, 64)
    assert store.add(DEV, batch) == 64
    assert store.add(DEV, batch) == 0  # the same batch again (a lost ack)
    assert store.add(DEV, readings(33, 64)) == 32  # overlapping: only 65..96 are new
    assert store.add(DEV, readings(40, 3) + readings(40, 3)) == 0  # a record twice in one batch
    assert store.count(DEV) == store.count() == 96 and store.last_seq(DEV) == 96
    # process_records saw every new record once, in order, and nothing else
    assert rec.keys() == [(DEV, EPOCH, s) for s in range(1, 97)]
    assert [len(rs) for _, rs in rec.calls] == [64, 32]
    assert store.records(DEV) == readings(1, 96)


def test_the_key_is_device_epoch_and_seq(factory):
    rec = Recorder()
    store = ServerRecordStore(factory, process=rec)
    assert store.add(DEV, readings(1, 5)) == 5
    # the board's flash was erased: seqs start again under a new boot epoch
    assert store.add(DEV, readings(1, 5, epoch=EPOCH + 1)) == 5
    assert store.add("ou-0002", readings(1, 5)) == 5
    assert store.add(DEV, readings(1, 5, epoch=EPOCH + 1)) == 0
    assert store.count(DEV) == 10 and store.count() == 15
    assert len(rec.keys()) == len(set(rec.keys())) == 15


def test_a_failed_booking_stores_nothing_and_the_next_pull_books_it(factory):
    store = ServerRecordStore(factory, process=Recorder(fail=True))
    with pytest.raises(RuntimeError, match="booking failed"):
        store.add(DEV, readings(1, 10))
    assert store.count(DEV) == 0 and store.last_seq(DEV) == 0  # rolled back with the booking
    rec = Recorder()
    assert ServerRecordStore(factory, process=rec).add(DEV, readings(1, 10)) == 10
    assert len(rec.keys()) == 10


def test_writers_storing_the_same_batches_at_once_store_and_book_each_record_once(db_url):
    rec = Recorder()
    n_writers, n = 4, 640
    errors = []
    go = threading.Barrier(n_writers)
    engines = [db.engine(db_url) for _ in range(n_writers)]

    def writer(i):
        # each its own engine, as separate server processes have: every
        # writer stores all batches, starting at a different one
        store = ServerRecordStore(db.sessions(engines[i]), process=rec)
        order = [(i * 3 + k) % (n // 64) for k in range(n // 64)]
        go.wait()
        try:
            for b in order:
                store.add(DEV, readings(1 + 64 * b, 64))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for e in engines:
        e.dispose()
    assert not errors, errors
    assert sorted(Counter(rec.keys()).values()) == [1] * n  # booked once each
    assert ServerRecordStore(db.sessions(db.engine(db_url))).count(DEV) == n


def test_records_keep_their_body_and_index(factory):
    store = ServerRecordStore(factory, process=Recorder())
    recs = [
        Record(EPOCH, 1, 10, wire.LOG_SLOT_READING, [3, 41999, 2322, -12]),
        Record(EPOCH, 2, 11, wire.LOG_STATE, [1, "open", "session"]),
        Record(EPOCH, 3, 12, wire.LOG_ALARM, [17, 5, 551]),
        Record(EPOCH, 4, 13, wire.LOG_ALARM, ["trip", 1, "over_power", 3700000, 3680000, 1]),
        Record(EPOCH, 5, 14, wire.LOG_ALARM, ["permit_store_lost"]),
        Record(EPOCH, 6, 15, wire.LOG_SESSION_END, [0, b"\x01" * 8, "u1", 100, 400, 300, 166, "exp", 166]),
        Record(EPOCH, 7, 16, wire.LOG_COMMAND, [wire.MSG_ACK, wire.OK, 5]),
        Record(EPOCH, 8, 17, wire.LOG_BATTERY_OUT, [2, b"\xaa" * 8, 97, 99, "u1", b"\x02" * 8, 3, 1500, 180, 310]),
        Record(EPOCH, 9, 18, wire.LOG_BOOT, None),
    ]
    assert store.add(DEV, recs) == len(recs)
    assert store.records(DEV) == recs
    with factory() as s:
        got = {seq: index for seq, index in s.execute(select(models.LogRecord.seq, models.LogRecord.index))}
        body = s.scalar(select(models.LogRecord.body).where(models.LogRecord.seq == 1))
    assert got == {1: 3, 2: 1, 3: 5, 4: 1, 5: None, 6: 0, 7: None, 8: 2, 9: None}
    assert cbor2.loads(body) == [3, 41999, 2322, -12]


def test_index_of_takes_the_first_field_of_slot_and_outlet_records():
    assert index_of(wire.LOG_OUTLET_READING, [1, 2, 3, 4]) == 1
    assert index_of(wire.LOG_ENERGY, [0, 12345]) == 0
    assert index_of(wire.LOG_STATE, [True, 1, 1]) is None  # not an index
    assert index_of(wire.LOG_PERMIT, [0, b"x", "u", 3, 1]) == 1  # [reason, cti, sub, action, index]
    assert index_of(wire.LOG_BOOT, [1, "0.1.0", "b", []]) is None
    assert index_of(wire.LOG_ALARM, [34]) is None
    assert index_of(wire.LOG_SLOT_READING, "garbage") is None


def test_gaps_are_kept_once(factory):
    store = ServerRecordStore(factory, process=Recorder())
    store.add_gap(DEV, 10, 19, 7)
    store.add_gap(DEV, 10, 19, 7)
    store.add_gap(DEV, 40, 41, 9)
    assert store.gaps(DEV) == [(10, 19), (40, 41)]


def test_without_a_stand_in_the_store_books_through_the_services(factory, monkeypatch):
    # the default booking is services.process_records, given the new records once
    from voltgate.server import services

    booked = Recorder()
    monkeypatch.setattr(services, "process_records", booked)
    store = ServerRecordStore(factory)
    assert store.add(DEV, readings(1, 10)) == 10
    assert store.add(DEV, readings(1, 10)) == 0
    assert booked.keys() == [(DEV, EPOCH, s) for s in range(1, 11)]


def test_the_pull_position_rises_within_an_epoch_and_follows_a_new_log(factory):
    store = ServerRecordStore(factory, process=Recorder())
    assert store.position(DEV) is None
    store.add(DEV, readings(1, 64), position=(64, EPOCH))
    store.add(DEV, readings(65, 64), position=(128, EPOCH))
    store.add(DEV, readings(37, 64), position=(100, EPOCH))  # another process, late: the position stays
    assert store.position(DEV) == (128, EPOCH)
    store.add(DEV, readings(1, 5, epoch=EPOCH + 7), position=(5, EPOCH + 7))  # the board's log began again
    assert store.position(DEV) == (5, EPOCH + 7)
    assert store.position("ou-0002") is None


def test_a_disabled_board_with_queued_revocations_stays_in_the_gateways_care(tmp_path):
    from voltgate.server import gateway, services

    url = f"sqlite:///{tmp_path / 'g.sqlite'}"
    db.upgrade(url)
    factory = db.sessions(db.engine(url))
    with db.transaction(factory) as s:
        services.add_device(s, "ou-1", site_id="n", kind="outlet", board="sim-outlet-2", outlets=2)
        services.add_device(s, "ou-2", site_id="n", kind="outlet", board="sim-outlet-2", outlets=2)
        services.add_user(s, "u1")
        services.set_device_enabled(s, "ou-1", False)
        services.set_device_enabled(s, "ou-2", False)
        s.add(models.PendingCommand(device_id="ou-1", type=wire.MSG_REVOKE, body={"sub": "u1", "until": 1}, created=1))
    gw = gateway.Gateway(factory, bytes(32), port=9)  # not started: refresh() reads the registry only
    gw.refresh()
    # ou-1 is disabled but a revocation waits for it; ou-2 has nothing to receive
    assert gw.devices == ["ou-1"]
