"""The server's use cases on a real SQLite file (voltgate.server.services):
permits through every approval condition, revocations queued for boards,
rentals across stations (in any order of arrival), outlet sessions from log
records, the worked example of points and fees, ledger tamper detection,
readings queries, and idempotent record processing."""

import csv
import io
import os
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import delete, func, select, update
from voltgate import keys, messages, permits, wire
from voltgate.server import db, models, services
from voltgate.server.models import Battery, LedgerEntry, Outlet, PendingCommand, Permit, Rental, Session, Slot, User
from voltgate.server.store import ServerRecordStore

NOW = 1_768_467_600  # 2026-01-15 09:00 UTC
H = 3600


@pytest.fixture
def factory(db_url):
    # a fresh migrated database: SQLite, and PostgreSQL when a server is at hand
    eng = db.engine(db_url)
    yield db.sessions(eng)
    eng.dispose()


@pytest.fixture
def master():
    return os.urandom(32)


@pytest.fixture
def world(factory):
    """Two stations (4 slots), two outlet boards (2 outlets), alice with
    100.00 and bob with nothing."""
    with db.transaction(factory) as s:
        services.add_device(s, "st-a", site_id="north", kind="station", board="station-4", slots=4)
        services.add_device(s, "st-b", site_id="south", kind="station", board="station-4", slots=4)
        services.add_device(s, "ou-1", site_id="north", kind="outlet", board="outlet-2", outlets=2)
        services.add_device(s, "ou-2", site_id="north", kind="outlet", board="outlet-2", outlets=2, key_version=3)
        services.add_user(s, "alice", name="Alice")
        services.add_user(s, "bob")
        services.pay(s, "alice", 10_000, now=NOW - H, ref="opening:alice")
    return factory


class Board:
    """Makes log records as a board would: seq rising, one boot epoch."""

    def __init__(self, device, epoch=7):
        self.device, self.epoch, self.seq = device, epoch, 0

    def rec(self, ts, rtype, body):
        self.seq += 1
        return messages.Record(self.epoch, self.seq, ts, rtype, body)

    def out(self, ts, slot, bid, soc, user=None, cti=None):
        return self.rec(ts, wire.LOG_BATTERY_OUT, [slot, bid, soc, 98, user, cti, 12, 345_000, 180, 310])

    def into(self, ts, slot, bid, soc, user=None, cti=None):
        return self.rec(ts, wire.LOG_BATTERY_IN, [slot, bid, soc, 97, user, cti, 40, 39_800, 260])

    def start(self, ts, outlet, cti, sub, register):
        return self.rec(ts, wire.LOG_SESSION_START, [outlet, cti, sub, ts, register, 0])

    def end(self, ts, outlet, cti, sub, start, energy, register, reason="exp"):
        return self.rec(ts, wire.LOG_SESSION_END, [outlet, cti, sub, start, ts, ts - start, energy, reason, register])


def feed(factory, device, *records):
    """The server's ingest: store each record once, process the new ones in the same transaction."""
    ServerRecordStore(factory).add(device, records)


def snapshot(factory):
    """Every row of every table, to show that nothing changed."""
    with factory() as s:
        out = {}
        for table in models.Base.metadata.sorted_tables:
            out[table.name] = sorted(tuple(map(repr, row)) for row in s.execute(select(table)))
        return out


def ask(factory, master, now=NOW, **kw):
    args = dict(user_id="alice", device_id="ou-1", action="power", duration_s=H, now=now)
    args.update(kw)
    with db.transaction(factory) as s:
        issued = services.request_permit(s, master, **args)
        return issued.cti, issued.token, issued.estimate


def user_of(factory, uid):
    with factory() as s:
        u = s.get(User, uid)
        return u.balance, u.points


def test_an_issued_permit_is_made_with_the_device_key(world, master):
    cti, token, est = ask(world, master, device_id="ou-2", scope=[1], nbf=NOW + 60, exp=NOW + 60 + H)
    key = keys.derive_device_key(master, "ou-2", 3)
    ctx = permits.CheckContext("ou-2", keys={keys.kid_for(3): key}, now=NOW + 120)
    v = permits.verify(token, ctx, wire.ACTION_POWER, 1)
    assert v.ok, v.reason_name
    claims = permits.describe(v.claims)
    assert claims["sub"] == "alice" and claims["cti"] == cti and claims["nbf"] == NOW + 60 and claims["iat"] == NOW
    # no max_wh asked: capped at the estimate (2300 W for an hour)
    assert claims["limits"] == {"max_wh": 2300} and est.energy_mwh == 2_300_000
    # under another board's key it is worthless
    other = permits.CheckContext("ou-2", keys={keys.kid_for(3): keys.derive_device_key(master, "ou-1", 3)}, now=NOW + 120)
    assert permits.verify(token, other, wire.ACTION_POWER, 1).reason == wire.BAD_MAC
    with world() as s:
        p = s.get(Permit, cti)
        assert (p.user_id, p.device_id, p.scope, p.key_version, p.token) == ("alice", "ou-2", [1], 3, token)


# ---------------------------------------------------------------- approval conditions, refused then approved


def _setting(**kv):
    def setup(s, board_a, factory):
        for k, v in kv.items():
            services.set_setting(s, k, v)

    return setup


def _rent_out(user, ts):
    def setup(s, board_a, factory):
        services.process_records(s, "st-a", [board_a.out(ts, 0, b"\x0b\x01", 100, user)])

    return setup


def _return(factory, board_a):
    feed(factory, "st-a", board_a.into(NOW, 1, b"\x0b\x01", 60))


CASES = {
    # code: (setup in the world, request refused, fix-up between (None: none), request approved)
    "unknown_user": (None, dict(user_id="carol"), None, dict()),
    "user_inactive": (
        lambda s, a, f: services.set_user_status(s, "alice", "suspended"),
        dict(),
        lambda f, a, m: _tx(f, lambda s: services.set_user_status(s, "alice", "active")),
        dict(),
    ),
    "unknown_device": (None, dict(device_id="ou-9"), None, dict()),
    "device_disabled": (
        lambda s, a, f: services.set_device_enabled(s, "ou-1", False),
        dict(),
        lambda f, a, m: _tx(f, lambda s: services.set_device_enabled(s, "ou-1", True)),
        dict(),
    ),
    "wrong_action": (None, dict(action="rent"), None, dict(action="power")),
    "out_of_scope": (None, dict(scope=[2]), None, dict(scope=[1])),
    "bad_window": (None, dict(duration_s=None, nbf=NOW + 60, exp=NOW + 60), None, dict(duration_s=None, nbf=NOW + 60, exp=NOW + 61)),
    "starts_too_early": (None, dict(nbf=NOW - 301), None, dict(nbf=NOW - 300)),
    "starts_too_late": (_setting(max_advance_s=86400), dict(nbf=NOW + 86401), None, dict(nbf=NOW + 86400)),
    "window_too_long": (_setting(max_window_s=2 * H), dict(duration_s=2 * H + 1), None, dict(duration_s=2 * H)),
    "in_debt": (
        lambda s, a, f: (services.set_setting(s, "require_funds", False), services.pay(s, "bob", -1, now=NOW)),
        dict(user_id="bob"),
        lambda f, a, m: _tx(f, lambda s: services.pay(s, "bob", 1, now=NOW)),
        dict(user_id="bob"),
    ),
    "overdue_rental": (_rent_out("alice", NOW - 25 * H), dict(), lambda f, a, m: _return(f, a), dict()),
    "overlap": (lambda s, a, f: None, dict(scope=[0]), None, dict(scope=[1])),
    "too_many_permits": (_setting(max_open_permits=1), dict(scope=[1]), "revoke_first", dict(scope=[1])),
    "too_many_rentals": (
        _rent_out("alice", NOW - H),
        dict(device_id="st-b", action="rent"),
        lambda f, a, m: _return(f, a),
        dict(device_id="st-b", action="rent"),
    ),
    "insufficient_funds": (
        None,
        dict(user_id="bob"),
        lambda f, a, m: _tx(f, lambda s: services.pay(s, "bob", 119, now=NOW)),
        dict(user_id="bob"),
    ),
}


def _tx(factory, fn):
    with db.transaction(factory) as s:
        return fn(s)


@pytest.mark.parametrize("expect", list(CASES))
def test_each_approval_condition_refuses_and_then_approves(world, master, expect):
    setup, refused, fix, approved = CASES[expect]
    board_a = Board("st-a")
    first = None
    with db.transaction(world) as s:
        if setup is not None:
            setup(s, board_a, world)
    if expect in ("overlap", "too_many_permits"):
        first, _, _ = ask(world, master, scope=[0])
    before = snapshot(world)
    with pytest.raises(services.Refused) as e:
        ask(world, master, **refused)
    assert e.value.code == expect and e.value.message
    assert e.value.render("permits request").startswith(f"voltgate: permits request: refused ({expect}): ")
    assert snapshot(world) == before  # a refusal changes nothing
    if fix == "revoke_first":
        _tx(world, lambda s: services.revoke_permit(s, first, now=NOW))
    elif fix is not None:
        fix(world, board_a, master)
    cti, token, _ = ask(world, master, **approved)
    with world() as s:
        assert s.get(Permit, cti).token == token


def test_a_bad_scope_or_battery_is_invalid_not_refused(world, master):
    with pytest.raises(services.Invalid, match="negative"):
        ask(world, master, max_wh=-1)
    with pytest.raises(services.Invalid, match="not hex"):
        ask(world, master, device_id="st-a", action="return", battery="zz")


def test_a_used_single_use_permit_frees_its_outlet(world, master):
    cti, _, _ = ask(world, master, scope=[0])
    with pytest.raises(services.Refused, match="overlap"):
        ask(world, master, scope=[0])
    b = Board("ou-1")
    feed(
        world,
        "ou-1",
        b.start(NOW + 10, 0, bytes.fromhex(cti), "alice", 0),
        b.end(NOW + 70, 0, bytes.fromhex(cti), "alice", NOW + 10, 5_000, 5_000),
    )
    ask(world, master, scope=[0])  # the first is used up


# ---------------------------------------------------------------- revocation


def test_revocations_are_queued_for_the_affected_boards(world, master):
    a, _, _ = ask(world, master, scope=[0])
    b, _, _ = ask(world, master, device_id="ou-2", duration_s=2 * H)
    c, _, _ = ask(world, master, device_id="st-a", action="rent", duration_s=600)
    cmd = _tx(world, lambda s: services.command_dict(services.revoke_permit(s, a, now=NOW + 5)))
    assert (cmd["device"], cmd["type"], cmd["body"]) == ("ou-1", wire.MSG_REVOKE, {"cti": {"hex": a}, "exp": NOW + H})
    assert _tx(world, lambda s: services.revoke_permit(s, a, now=NOW + 6)) is None  # twice: nothing more
    with pytest.raises(services.NotFound):
        _tx(world, lambda s: services.revoke_permit(s, "00" * 8, now=NOW))
    cmds = _tx(world, lambda s: [services.command_dict(x) for x in services.revoke_user(s, "alice", now=NOW + 7)])
    assert [(x["device"], x["body"]) for x in cmds] == [
        ("ou-2", {"sub": "alice", "until": NOW + 2 * H}),
        ("st-a", {"sub": "alice", "until": NOW + 600}),
    ]
    with world() as s:
        assert s.get(User, "alice").status == "suspended"
        assert all(s.get(Permit, x).revoked_at is not None for x in (a, b, c))
        assert s.scalar(select(func.count()).select_from(PendingCommand)) == 3
    with pytest.raises(services.Refused, match="user_inactive"):
        ask(world, master, scope=[1])


# ---------------------------------------------------------------- rentals across stations

B1, B2 = b"\xb1\x00\x00\x01", b"\xb2\x00\x00\x02"


def rental_rows(factory):
    with factory() as s:
        return [services.rental_dict(r) for r in services.rentals(s)]


def test_a_battery_returned_at_another_station_closes_the_same_rental(world, master):
    cti, _, _ = ask(world, master, device_id="st-a", action="rent", duration_s=600)
    a, b = Board("st-a"), Board("st-b")
    feed(world, "st-a", a.out(NOW + 60, 2, B1, 100, "alice", bytes.fromhex(cti)))
    with world() as s:
        bat = s.get(Battery, B1.hex())
        assert (bat.device_id, bat.slot, bat.renter_id, bat.soc, bat.soh, bat.cycles) == (None, None, "alice", 100, 98, 12)
    [r] = rental_rows(world)
    assert r["open"] and (r["out_device"], r["out_slot"], r["permit"], r["user"]) == ("st-a", 2, cti, "alice")
    feed(world, "st-b", b.into(NOW + 2 * H, 3, B1, 40))
    [r] = rental_rows(world)
    assert not r["open"] and (r["in_device"], r["in_slot"], r["in_soc"]) == ("st-b", 3, 40)
    with world() as s:
        bat = s.get(Battery, B1.hex())
        assert (bat.device_id, bat.slot, bat.renter_id, bat.soc) == ("st-b", 3, None, 40)
        assert s.get(Slot, ("st-b", 3)).battery_id == B1.hex()
        e = s.scalar(select(LedgerEntry).where(LedgerEntry.ref == f"rental:{r['id']}"))
        # 60 % of 500 Wh = 300 Wh at the default 30 c/kWh = 9 c
        assert (e.user_id, e.kind, e.energy_mwh, e.amount) == ("alice", "energy_taken", 300_000, -9)
    assert user_of(world, "alice") == (10_000 - 9, 0)
    # the rent permit is used up: it no longer counts as open
    with world() as s:
        assert services.list_permits(s, user_id="alice", live_at=NOW + 120) == []


def test_rentals_match_whatever_order_the_stations_are_pulled_in(world):
    a, b = Board("st-a"), Board("st-b")
    rent = a.out(NOW, 0, B1, 90, "alice")
    back = b.into(NOW + H, 1, B1, 50)
    again = b.out(NOW + 2 * H, 1, B1, 95, "bob")
    home = a.into(NOW + 3 * H, 0, B1, 80)
    feed(world, "st-b", back, again)  # station b is pulled first
    feed(world, "st-a", rent, home)
    rows = rental_rows(world)
    assert [(r["user"], r["out_device"], r["out_ts"], r["in_device"], r["in_ts"], r["in_soc"]) for r in rows] == [
        ("alice", "st-a", NOW, "st-b", NOW + H, 50),
        ("bob", "st-b", NOW + 2 * H, "st-a", NOW + 3 * H, 80),
    ]
    with world() as s:
        bat = s.get(Battery, B1.hex())
        assert (bat.device_id, bat.slot, bat.soc, bat.last_seen) == ("st-a", 0, 80, NOW + 3 * H)
    # 40 % and 15 % of 500 Wh at 30 c/kWh
    assert user_of(world, "alice") == (10_000 - 6, 0) and user_of(world, "bob") == (-2, 0)


def test_a_station_pulled_late_corrects_a_rental_closed_too_late(world):
    """Station b was offline: a's return at 3 h first closes alice's rental
    (wrongly); b's records then show she returned it at 1 h and bob took it
    at 2 h. The rentals are put right and the ledger gets corrections, not
    rewrites."""
    a, b = Board("st-a"), Board("st-b")
    feed(world, "st-a", a.out(NOW, 0, B1, 90, "alice"), a.into(NOW + 3 * H, 0, B1, 80))
    [r] = rental_rows(world)
    assert (r["in_device"], r["in_soc"]) == ("st-a", 80)
    assert user_of(world, "alice") == (10_000 - 2, 0)  # 10 % of 500 Wh = 1.5 -> 2 c, for now
    feed(world, "st-b", b.into(NOW + H, 1, B1, 50), b.out(NOW + 2 * H, 1, B1, 95, "bob"))
    rows = rental_rows(world)
    assert [(r["user"], r["out_device"], r["in_device"], r["in_ts"], r["in_soc"]) for r in rows] == [
        ("alice", "st-a", "st-b", NOW + H, 50),
        ("bob", "st-b", "st-a", NOW + 3 * H, 80),
    ]
    assert user_of(world, "alice") == (10_000 - 6, 0) and user_of(world, "bob") == (-2, 0)
    with world() as s:
        kinds = [(e.user_id, e.kind, e.amount) for e in services.ledger(s)][1:]
        assert kinds == [("alice", "energy_taken", -2), ("alice", "rental_correction", -4), ("bob", "energy_taken", -2)]
        bat = s.get(Battery, B1.hex())
        assert (bat.device_id, bat.slot, bat.soc) == ("st-a", 0, 80)  # the latest place, not the last pulled
    assert _tx(world, lambda s: services.ledger_verify(s)).ok


@pytest.mark.parametrize("b_first", [True, False])
def test_a_lost_return_ends_the_rental_where_the_battery_left_next(world, b_first):
    """Station b's return record was lost (thinned): b's next rent shows the
    battery was back by then, whichever station is pulled first."""
    a, b = Board("st-a"), Board("st-b")
    at_a = [a.out(NOW, 0, B1, 90, "alice"), a.into(NOW + 3 * H, 0, B1, 80)]
    at_b = [b.out(NOW + 2 * H, 1, B1, 95, "bob")]
    for dev, recs in [("st-b", at_b), ("st-a", at_a)] if b_first else [("st-a", at_a), ("st-b", at_b)]:
        feed(world, dev, *recs)
    rows = rental_rows(world)
    assert [(r["user"], r["in_device"], r["in_ts"], r["in_soc"]) for r in rows] == [
        ("alice", "st-b", NOW + 2 * H, None),
        ("bob", "st-a", NOW + 3 * H, 80),
    ]
    assert user_of(world, "alice") == (10_000, 0) and user_of(world, "bob") == (-2, 0)
    assert _tx(world, lambda s: services.ledger_verify(s)).ok


def test_a_technicians_battery_moves_are_not_billed(world, master):
    _tx(world, lambda s: services.pay(s, "bob", 500, now=NOW))
    cti, _, _ = ask(world, master, user_id="bob", device_id="st-a", action="service", duration_s=600)
    a = Board("st-a")
    feed(world, "st-a", a.out(NOW + 10, 0, B1, 90, "bob", bytes.fromhex(cti)), a.into(NOW + 300, 0, B1, 10, "bob", bytes.fromhex(cti)))
    [r] = rental_rows(world)
    assert not r["open"] and user_of(world, "bob") == (500, 0)


def test_a_return_never_logged_is_closed_by_the_next_rent(world):
    a, b = Board("st-a"), Board("st-b")
    feed(world, "st-a", a.out(NOW, 0, B1, 90, "alice"))
    feed(world, "st-b", b.out(NOW + 5 * H, 2, B1, 100, "bob"))  # it came back to b unseen
    first, second = rental_rows(world)
    assert (first["in_device"], first["in_ts"], first["in_soc"], second["open"]) == ("st-b", NOW + 5 * H, None, True)
    with world() as s:
        e = s.scalar(select(LedgerEntry).where(LedgerEntry.ref == f"rental:{first['id']}"))
        assert (e.energy_mwh, e.amount) == (0, 0)  # the SoC it came back with is unknown


def test_overdue_rentals_are_flagged_and_hold_the_user_back(world, master):
    a = Board("st-a")
    feed(world, "st-a", a.out(NOW - 30 * H, 0, B1, 90, "bob"), a.out(NOW - H, 1, B2, 90, "alice"))
    flagged = _tx(world, lambda s: [r.user_id for r in services.flag_overdue_rentals(s, NOW)])
    assert flagged == ["bob"]  # 30 h > the default 24 h; alice's hour is fine
    assert _tx(world, lambda s: services.flag_overdue_rentals(s, NOW)) == []  # once
    _tx(world, lambda s: services.pay(s, "bob", 10_000, now=NOW))
    with pytest.raises(services.Refused, match="overdue_rental"):
        ask(world, master, user_id="bob")
    feed(world, "st-a", a.into(NOW, 2, B1, 20))
    [r] = [r for r in rental_rows(world) if r["user"] == "bob"]
    assert r["flagged"] and not r["open"]
    ask(world, master, user_id="bob")


# ---------------------------------------------------------------- outlet sessions


def test_sessions_are_booked_from_the_log(world, master):
    cti, _, _ = ask(world, master, scope=[1], duration_s=2 * H)
    c = bytes.fromhex(cti)
    o = Board("ou-1")
    feed(world, "ou-1", o.start(NOW + 60, 1, c, "alice", 1_000_000), o.rec(NOW + 600, wire.LOG_ENERGY, [1, 1_200_000]))
    with world() as s:
        [x] = services.sessions(s, user_id="alice")
        assert (x.outlet, x.cti, x.end_ts, x.energy_mwh) == (1, cti, None, None)
        assert s.get(Outlet, ("ou-1", 1)).energy_mwh == 1_200_000
    # the end record: 1.5 kWh in 50 min; sub null (the permit says who)
    feed(world, "ou-1", o.end(NOW + 3060, 1, c, None, NOW + 60, 1_500_000, 2_500_000, "energy_cap"))
    with world() as s:
        [x] = services.sessions(s, user_id="alice")
        assert (x.end_ts, x.duration_s, x.energy_mwh, x.reason) == (NOW + 3060, 3000, 1_500_000, "energy_cap")
        assert s.get(Outlet, ("ou-1", 1)).energy_mwh == 2_500_000
        e = s.scalar(select(LedgerEntry).where(LedgerEntry.ref == f"session:{x.id}"))
        assert (e.user_id, e.kind, e.energy_mwh, e.amount, e.ts) == ("alice", "energy_taken", 1_500_000, -45, NOW + 3060)
    # a session whose start record was lost to a power cut is booked from its end alone
    feed(world, "ou-1", o.end(NOW + 4000, 0, b"\x99" * 8, "bob", NOW + 3900, 100_000, 2_600_000, "power_cut"))
    with world() as s:
        [y] = services.sessions(s, user_id="bob")
        assert (y.start_ts, y.energy_mwh, y.reason) == (NOW + 3900, 100_000, "power_cut")
    assert user_of(world, "bob") == (-3, 0)


# ---------------------------------------------------------------- the worked example of points and fees


def test_worked_example_energy_points_and_fees(world):
    """Alice's 15 January 2026 in Berlin (UTC+1), written out.

    Settings: timezone Europe/Berlin, a 500 Wh battery, fee 50 c per outlet
    session and 100 c per rental, 100 points per kWh given back, a point
    worth 2 c against fees. Tariffs: day 07-22 at 30 c/kWh, night 22-07 at
    10 c/kWh. Alice starts with 100.00 (10 000 c).

    1. Rental 1: battery B1 out of station a at 10:00 at 100 %, back at
       station b at 12:00 at 40 %: 60 % of 500 Wh = 300 Wh taken, all in
       day hours: 300 Wh x 30 c/kWh = 9 c.              balance 9 991
    2. Rental 2: battery B2 out of b at 13:00 at 50 %, back at a at 15:00
       at 90 % (charged at home from solar): 40 % = 200 Wh given back
       -> 0.2 kWh x 100 = 20 points.                   points 20
    3. Outlet session 21:30-22:30, 2 kWh, spread evenly: 1 kWh in the day
       hour at 30 c + 1 kWh in the night hour at 10 c = 40 c.
                                                        balance 9 951
    4. Fees for the day [00:00, 24:00): 1 session x 50 + 2 rentals x 100
       = 250 c. 20 points x 2 c = 40 c of it paid by points.
                                                        balance 9 951 - 250 + 40 = 9 741, points 0
    """
    tz = ZoneInfo("Europe/Berlin")

    def at(h, m=0):
        return int(datetime(2026, 1, 15, h, m, tzinfo=tz).timestamp())

    with db.transaction(world) as s:
        for k, v in dict(timezone="Europe/Berlin", battery_capacity_mwh=500_000, fee_per_session_cents=50, fee_per_rental_cents=100,
                         points_per_kwh=100, cents_per_point=2).items():  # fmt: skip
            services.set_setting(s, k, v)
        services.set_tariff(s, "day", 30, 7, 22)
        services.set_tariff(s, "night", 10, 22, 7)
    a, b, o = Board("st-a"), Board("st-b"), Board("ou-1")

    feed(world, "st-a", a.out(at(10), 0, B1, 100, "alice"))
    feed(world, "st-b", b.into(at(12), 1, B1, 40))
    assert user_of(world, "alice") == (9_991, 0)

    feed(world, "st-b", b.out(at(13), 2, B2, 50, "alice"))
    feed(world, "st-a", a.into(at(15), 0, B2, 90))
    assert user_of(world, "alice") == (9_991, 20)

    cti = b"\x5e" * 8
    feed(world, "ou-1", o.start(at(21, 30), 0, cti, "alice", 0), o.end(at(22, 30), 0, cti, "alice", at(21, 30), 2_000_000, 2_000_000))
    assert user_of(world, "alice") == (9_951, 20)

    st = _tx(world, lambda s: services.settle_fees(s, "alice", at(0), at(0) + 24 * H, now=at(23, 59)))
    assert (st.sessions, st.rentals, st.fee_cents, st.points_spent, st.points_cents, st.due_cents) == (1, 2, 250, 20, 40, 210)
    assert user_of(world, "alice") == (9_741, 0)

    with world() as s:
        rows = [(e.kind, e.energy_mwh, e.amount, e.points) for e in services.ledger(s, user_id="alice")]
    assert rows == [
        ("payment", 0, 10_000, 0),
        ("energy_taken", 300_000, -9, 0),
        ("energy_given", 200_000, 0, 20),
        ("energy_taken", 2_000_000, -40, 0),
        ("fee", 0, -250, 0),
        ("points_redeemed", 0, 40, -20),
    ]
    # the same day again, or a period overlapping it, is refused: nothing is charged twice
    with pytest.raises(services.Invalid, match="settled"):
        _tx(world, lambda s: services.settle_fees(s, "alice", at(12), at(0) + 30 * H, now=at(23, 59)))
    assert _tx(world, lambda s: services.ledger_verify(s)).ok


def test_reported_energy_is_charged_or_earns_points(world):
    with db.transaction(world) as s:
        given = services.record_energy(
            s, user_id="bob", device_id="ou-1", direction="given", energy_mwh=1_000_000, start=NOW, end=NOW + H, ref="v2g-1"
        )
        again = services.record_energy(
            s, user_id="bob", device_id="ou-1", direction="given", energy_mwh=1_000_000, start=NOW, end=NOW + H, ref="v2g-1"
        )
        assert given.seq == again.seq
        services.record_energy(
            s, user_id="bob", device_id="ou-1", direction="taken", energy_mwh=500_000, start=NOW, end=NOW + H, ref="v2g-2"
        )
    assert user_of(world, "bob") == (-15, 100)
    for kw, err in [
        (dict(energy_mwh=-1), services.Invalid),
        (dict(device_id="ou-9"), services.NotFound),
        (dict(user_id="carol"), services.NotFound),
        (dict(end=NOW - 1), services.Invalid),
        (dict(direction="sideways"), services.Invalid),
    ]:
        args = dict(user_id="bob", device_id="ou-1", direction="given", energy_mwh=1, start=NOW, end=NOW, ref="x")
        args.update(kw)
        before = snapshot(world)
        with pytest.raises(err):
            _tx(world, lambda s, args=args: services.record_energy(s, **args))
        assert snapshot(world) == before


# ---------------------------------------------------------------- the ledger


@pytest.fixture
def ledger5(world):
    with db.transaction(world) as s:
        for i in range(4):
            services.pay(s, "bob", 100 + i, now=NOW + i, ref=f"p{i}")
    assert _tx(world, lambda s: services.ledger_verify(s)).ok  # 5 entries with alice's opening payment
    return world


def problem(factory):
    check = _tx(factory, lambda s: services.ledger_verify(s))
    assert not check.ok
    p = check.chain.problem
    return (p.seq, p.code) if p is not None else check.mismatches


def test_an_altered_ledger_entry_is_found(ledger5):
    _tx(ledger5, lambda s: s.execute(update(LedgerEntry).where(LedgerEntry.seq == 3).values(amount=100_000)))
    assert problem(ledger5) == (3, "altered")


def test_a_deleted_ledger_entry_is_found(ledger5):
    _tx(ledger5, lambda s: s.execute(delete(LedgerEntry).where(LedgerEntry.seq == 2)))
    assert problem(ledger5) == (2, "deleted")


def test_reordered_ledger_entries_are_found(ledger5):
    def swap(s):
        s.execute(update(LedgerEntry).where(LedgerEntry.seq == 3).values(seq=-3))
        s.execute(update(LedgerEntry).where(LedgerEntry.seq == 4).values(seq=3))
        s.execute(update(LedgerEntry).where(LedgerEntry.seq == -3).values(seq=4))

    _tx(ledger5, swap)
    assert problem(ledger5) == (3, "reordered")


def test_a_balance_changed_outside_the_ledger_is_found(ledger5):
    _tx(ledger5, lambda s: s.execute(update(User).where(User.id == "bob").values(balance=1_000_000)))
    [m] = problem(ledger5)
    assert (m["user"], m["balance"], m["ledger_balance"]) == ("bob", 1_000_000, 406)


def test_a_deleted_last_entry_is_found_against_the_noted_head(ledger5):
    check = _tx(ledger5, lambda s: services.ledger_verify(s))
    head = (check.chain.head_seq, check.chain.head_hash)

    def drop_last(s):
        e = s.get(LedgerEntry, 5)
        s.execute(update(User).where(User.id == e.user_id).values(balance=User.balance - e.amount))  # covering the tracks
        s.delete(e)

    _tx(ledger5, drop_last)
    assert _tx(ledger5, lambda s: services.ledger_verify(s)).ok
    p = _tx(ledger5, lambda s: services.ledger_verify(s, head)).chain.problem
    assert (p.seq, p.code) == (5, "deleted")


def test_the_ledger_books_each_kind_and_ref_once(world):
    with db.transaction(world) as s:
        e1 = services.ledger_append(s, user_id="bob", kind="payment", amount=5, ts=NOW, ref="once")
        e2 = services.ledger_append(s, user_id="bob", kind="payment", amount=5, ts=NOW, ref="once")
        assert e1.seq == e2.seq
        with pytest.raises(services.NotFound):
            services.ledger_append(s, user_id="carol", kind="payment", amount=5, ts=NOW, ref="x")
        with pytest.raises(services.Invalid):
            services.ledger_append(s, user_id="bob", kind="energy_taken", energy_mwh=-5, ts=NOW, ref="y")
    assert user_of(world, "bob") == (5, 0)


# ---------------------------------------------------------------- idempotency


def test_processing_records_twice_books_nothing_twice(world, master):
    cti, _, _ = ask(world, master, scope=[0])
    a, b, o = Board("st-a"), Board("st-b"), Board("ou-1")
    station_a = [a.out(NOW, 0, B1, 100, "alice"), a.out(NOW + 10, 1, B2, 80, "bob")]
    station_b = [b.into(NOW + H, 2, B1, 30)]
    outlet = [
        o.start(NOW + 5, 0, bytes.fromhex(cti), "alice", 0),
        o.end(NOW + 605, 0, bytes.fromhex(cti), "alice", NOW + 5, 250_000, 250_000),
    ]
    for dev, recs in (("st-a", station_a), ("st-b", station_b), ("ou-1", outlet)):
        feed(world, dev, *recs)
    once = snapshot(world)
    for dev, recs in (("st-a", station_a), ("st-b", station_b), ("ou-1", outlet)):
        _tx(world, lambda s, dev=dev, recs=recs: services.process_records(s, dev, recs))  # the same records processed again
    assert snapshot(world) == once
    with world() as s:
        assert s.scalar(select(func.count()).select_from(Rental)) == 2
        assert s.scalar(select(func.count()).select_from(Session)) == 1
        assert s.scalar(select(func.count()).select_from(LedgerEntry)) == 3  # opening payment, rental, session


def test_batches_through_the_server_record_store(world):
    """The real ingest path (store.ServerRecordStore): a whole batch stored,
    then processed; repeating the batch stores and books nothing."""
    from voltgate.server.store import ServerRecordStore

    store = ServerRecordStore(world)
    a = Board("st-a")
    batch = [a.out(NOW, 0, B1, 100, "alice"), a.rec(NOW + 1, wire.LOG_STATE, [0, 0, 3]), a.into(NOW + H, 3, B1, 70)]
    assert store.add("st-a", batch) == 3
    assert store.add("st-a", batch) == 0
    [r] = rental_rows(world)
    assert (r["in_device"], r["in_slot"], r["in_soc"]) == ("st-a", 3, 70)
    with world() as s:
        assert s.get(Slot, ("st-a", 0)).state == "empty" and s.get(Slot, ("st-a", 3)).battery_id == B1.hex()
    assert user_of(world, "alice") == (10_000 - 5, 0)  # 30 % of 500 Wh at 30 c/kWh = 4.5 -> 5 c


# ---------------------------------------------------------------- readings


def test_readings_by_device_index_battery_type_and_time(world):
    a, o = Board("st-a"), Board("ou-1")
    feed(
        world,
        "st-a",
        a.rec(NOW, wire.LOG_SLOT_READING, [0, 41000, 2000, 250]),
        a.rec(NOW + 60, wire.LOG_SLOT_READING, [1, 40000, 1500, 240]),
        a.rec(NOW + 70, wire.LOG_ALARM, [17, 1, 560]),
        a.out(NOW + 80, 0, B1, 100, "alice"),
        a.rec(NOW + 90, wire.LOG_ALARM, [31, 2, 29, B2]),
    )
    feed(world, "ou-1", o.rec(NOW + 30, wire.LOG_OUTLET_READING, [1, 2_000_000, 230_000, 8695]))
    with world() as s:
        q = lambda **kw: [(r["device"], r["seq"]) for r in services.readings(s, **kw)]
        assert q() == [("st-a", 1), ("ou-1", 1), ("st-a", 2), ("st-a", 3), ("st-a", 4), ("st-a", 5)]
        assert q(device_id="st-a", index=1) == [("st-a", 2), ("st-a", 3)]
        assert q(battery_id=B1.hex()) == [("st-a", 4)]
        assert q(battery_id=B2.hex().upper()) == [("st-a", 5)]
        assert q(types=[wire.LOG_ALARM]) == [("st-a", 3), ("st-a", 5)]
        assert q(start=NOW + 30, end=NOW + 80) == [("ou-1", 1), ("st-a", 2), ("st-a", 3)]
        assert q(limit=2) == [("st-a", 1), ("ou-1", 1)]
        rows = services.readings(s, device_id="st-a", types=[wire.LOG_BATTERY_OUT])
        assert rows[0]["body"][1] == B1.hex() and rows[0]["type_name"] == "battery_out" and rows[0]["battery"] == B1.hex()
        text = services.readings_csv(services.readings(s, device_id="st-a"))
    lines = list(csv.DictReader(io.StringIO(text)))
    assert len(lines) == 5 and list(lines[0]) == list(services.CSV_COLUMNS)
    assert lines[2]["type_name"] == "alarm" and lines[2]["index"] == "1" and lines[2]["body"] == "[17,1,560]"
    assert lines[0]["time_utc"] == "2026-01-15T09:00:00Z"
