"""The server's rules without a database (voltgate.server.domain): approval
conditions and their order, tariffs by local hour, the cost of energy,
points, fees, and the ledger's hash chain with its tamper findings."""

import dataclasses
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from voltgate import wire
from voltgate.server import domain
from voltgate.server.domain import DeviceFacts, LivePermit, Policy, Request, Tariff, UserFacts

NOW = 1_800_000_000
OUTLET = DeviceFacts("outlet", True, (0, 1))
STATION = DeviceFacts("station", True, (0, 1, 2, 3))
RICH = UserFacts("active", balance=100_000, points=0)


def req(**kw):
    base = dict(user_id="u1", device_id="ou-1", action="power", nbf=NOW, exp=NOW + 3600, scope=None, max_wh=None)
    base.update(kw)
    return Request(**base)


def check(r=None, policy=Policy(), user=RICH, device=OUTLET, live=(), tariffs=()):
    return domain.check_request(policy, r or req(), now=NOW, user=user, device=device, live=live, tariffs=tariffs)


def code(refusal):
    return refusal.code if refusal is not None else None


# ---------------------------------------------------------------- policy


def test_policy_from_settings_checks_names_and_values():
    p = Policy.from_settings({"grace_s": None, "max_window_s": 600, "timezone": "Europe/Berlin", "refuse_overdue": False})
    assert (p.grace_s, p.max_window_s, p.timezone, p.refuse_overdue) == (None, 600, "Europe/Berlin", False)
    for bad, why in [
        ({"grace": 5}, "unknown setting 'grace'"),
        ({"grace_s": -1}, "must not be negative"),
        ({"grace_s": "5"}, "whole number"),
        ({"cents_per_point": None}, "cannot be switched off"),
        ({"timezone": "Mars/Olympus"}, "unknown timezone"),
        ({"check_overlap": 1}, "true or false"),
    ]:
        with pytest.raises(ValueError, match=why):
            Policy.from_settings(bad)


# ---------------------------------------------------------------- approval, condition by condition


def test_a_plain_request_is_approved():
    assert check() is None


@pytest.mark.parametrize(
    "kw, expect",
    [
        (dict(user=None), "unknown_user"),
        (dict(user=dataclasses.replace(RICH, status="suspended")), "user_inactive"),
        (dict(device=None), "unknown_device"),
        (dict(device=dataclasses.replace(OUTLET, enabled=False)), "device_disabled"),
        (dict(r=req(action="rent")), "wrong_action"),
        (dict(r=req(action="power"), device=STATION), "wrong_action"),
        (dict(r=req(scope=(2,))), "out_of_scope"),
        (dict(r=req(exp=NOW)), "bad_window"),
        (dict(r=req(nbf=NOW - 301, exp=NOW + 100)), "starts_too_early"),
        (dict(r=req(nbf=NOW + 7 * 86400 + 1, exp=NOW + 7 * 86400 + 60)), "starts_too_late"),
        (dict(r=req(exp=NOW + 12 * 3600 + 1)), "window_too_long"),
        (dict(user=dataclasses.replace(RICH, balance=-1)), "in_debt"),
        (dict(user=dataclasses.replace(RICH, overdue_rentals=1)), "overdue_rental"),
        (dict(live=[LivePermit("aa", NOW + 1800, NOW + 7200, (1,))]), "overlap"),
        (dict(user=dataclasses.replace(RICH, open_permits=5)), "too_many_permits"),
        (dict(r=req(action="rent", device_id="st-1"), device=STATION, user=dataclasses.replace(RICH, open_rentals=1)), "too_many_rentals"),
        (dict(user=dataclasses.replace(RICH, balance=10)), "insufficient_funds"),
    ],
)
def test_each_condition_refuses_with_its_code(kw, expect):
    refusal = check(**kw)
    assert code(refusal) == expect
    assert refusal.message and "\n" not in refusal.message


@pytest.mark.parametrize(
    "kw",
    [
        dict(r=req(scope=(1,))),
        dict(r=req(action="service")),
        dict(r=req(action="rent", device_id="st-1"), device=STATION),
        dict(r=req(nbf=NOW - 300, exp=NOW + 100)),  # exactly the grace
        dict(r=req(nbf=NOW + 7 * 86400, exp=NOW + 7 * 86400 + 60)),  # exactly the advance
        dict(r=req(exp=NOW + 12 * 3600, max_wh=1000)),  # exactly the longest window
        dict(user=dataclasses.replace(RICH, balance=0), r=req(action="service")),  # a balance of 0 is not debt
        dict(live=[LivePermit("aa", NOW + 3600, NOW + 7200, None)]),  # back to back: no overlap
        dict(live=[LivePermit("aa", NOW, NOW + 3600, (0,))], r=req(scope=(1,))),  # another outlet
        dict(user=dataclasses.replace(RICH, open_permits=4)),
        dict(
            r=req(action="return", device_id="st-1"), device=STATION, user=dataclasses.replace(RICH, open_rentals=1)
        ),  # a return is no new rental
        dict(device=DeviceFacts("outlet", True, ()), r=req(scope=(7,))),  # indexes not known yet
    ],
)
def test_requests_at_the_limits_are_approved(kw):
    assert check(**kw) is None


def test_station_permits_without_a_scope_claim_no_slot():
    live = [LivePermit("aa", NOW, NOW + 3600, None), LivePermit("bb", NOW, NOW + 3600, (2,))]
    rent = dict(device=STATION)
    assert check(req(action="rent", device_id="st-1"), live=live, **rent) is None
    assert code(check(req(action="rent", device_id="st-1", scope=(2,)), live=live, **rent)) == "overlap"
    assert check(req(action="rent", device_id="st-1", scope=(3,)), live=live, **rent) is None
    # on an outlet a permit without a scope holds every outlet
    assert code(check(req(scope=(0,)), live=[LivePermit("cc", NOW, NOW + 60, None)])) == "overlap"


def test_conditions_are_checked_in_the_documented_order():
    # everything wrong at once: the user comes first, then the device, the window, standing, overlap, limits, funds
    broke = UserFacts("active", balance=-5, points=0, overdue_rentals=1, open_permits=9, open_rentals=9)
    bad = req(scope=(1,), nbf=NOW - 3600, exp=NOW + 20 * 3600)
    live = [LivePermit("aa", NOW, NOW + 60, None)]
    steps = [
        (dict(user=None), "unknown_user"),
        (dict(user=dataclasses.replace(broke, status="closed")), "user_inactive"),
        (dict(device=None), "unknown_device"),
        (dict(device=dataclasses.replace(OUTLET, enabled=False)), "device_disabled"),
        (dict(device=DeviceFacts("outlet", True, (0,))), "out_of_scope"),
        (dict(), "starts_too_early"),
    ]
    for kw, expect in steps:
        args = dict(r=bad, user=broke, device=OUTLET, live=live)
        args.update(kw)
        assert code(check(**args)) == expect
    later = req(scope=(1,), nbf=NOW, exp=NOW + 60)
    assert code(check(later, user=broke, live=live)) == "in_debt"
    assert code(check(later, user=dataclasses.replace(broke, balance=0), live=live)) == "overdue_rental"
    ok_standing = dataclasses.replace(broke, balance=0, overdue_rentals=0)
    assert code(check(later, user=ok_standing, live=live)) == "overlap"
    assert code(check(later, user=ok_standing)) == "too_many_permits"
    assert code(check(later, user=dataclasses.replace(ok_standing, open_permits=0))) == "insufficient_funds"


def test_every_condition_can_be_switched_off():
    off = Policy(
        grace_s=None,
        max_advance_s=None,
        max_window_s=None,
        min_balance_cents=None,
        refuse_overdue=False,
        check_overlap=False,
        max_open_permits=None,
        max_open_rentals=None,
        require_funds=False,
    )
    user = UserFacts("active", balance=-(10**6), points=0, overdue_rentals=3, open_permits=99, open_rentals=99)
    r = req(action="rent", device_id="st-1", nbf=NOW - 10**6, exp=NOW + 10**8, scope=(0,))
    assert check(r, policy=off, user=user, device=STATION, live=[LivePermit("aa", 0, NOW + 10**9, (0,))]) is None
    assert code(check(r, policy=Policy(), user=user, device=STATION)) == "starts_too_early"


def test_funds_count_points_only_towards_the_fee():
    # power for 1 h without max_wh: 2300 W -> 2.3 kWh at the default 30 c = 69 c, fee 50 c: 119 c
    est = domain.estimate(Policy(), (), req())
    assert (est.energy_mwh, est.energy_cents, est.fee_cents) == (2_300_000, 69, 50)
    assert check(user=UserFacts("active", 119, 0)) is None
    assert code(check(user=UserFacts("active", 118, 0))) == "insufficient_funds"
    assert check(user=UserFacts("active", 69, 50)) is None  # 50 points pay the 50 c fee
    assert code(check(user=UserFacts("active", 68, 1000))) == "insufficient_funds"  # points never pay energy
    # a stricter floor: the balance must stay at or above it after the use
    assert code(check(user=UserFacts("active", 119, 0), policy=Policy(min_balance_cents=1))) == "insufficient_funds"
    # max_wh sets the energy of the estimate
    assert domain.estimate(Policy(), (), req(max_wh=1000)).energy_cents == 30


# ---------------------------------------------------------------- tariffs and cost

DAY = Tariff(7, 22, 30, "day", 1)
NIGHT = Tariff(22, 7, 10, "night", 2)
PEAK = Tariff(17, 19, 50, "peak", 3)


def test_the_narrowest_window_containing_the_hour_applies():
    ts = [DAY, NIGHT, PEAK]
    assert [domain.rate_at(ts, h, 99) for h in (0, 6, 7, 16, 17, 18, 19, 21, 22, 23)] == [10, 10, 30, 30, 50, 50, 30, 30, 10, 10]
    assert domain.rate_at([DAY], 3, 99) == 99  # not covered: the default
    assert domain.rate_at([Tariff(0, 24, 20, "flat", 5), Tariff(5, 5, 21, "all day too", 4)], 12, 99) == 21  # tie: lower id


def test_energy_is_spread_over_the_local_hours_it_took():
    berlin = Policy(timezone="Europe/Berlin")
    start = int(datetime(2026, 1, 15, 21, 30, tzinfo=ZoneInfo("Europe/Berlin")).timestamp())
    # 2 kWh from 21:30 to 22:30 local: 1 kWh at 30 c + 1 kWh at 10 c
    assert domain.energy_cost([DAY, NIGHT], berlin, start, start + 3600, 2_000_000) == 40
    # the same UTC times read in UTC (20:30-21:30) are all day rate
    assert domain.energy_cost([DAY, NIGHT], Policy(), start, start + 3600, 2_000_000) == 60
    # an instant is priced at its hour
    assert domain.energy_cost([DAY, NIGHT], berlin, start, start, 1_000_000) == 30
    # rounded half up, once: 50 Wh at 30 c = 1.5 c -> 2; 49 Wh = 1.47 -> 1
    assert domain.energy_cost([DAY], Policy(), 8 * 3600, 9 * 3600, 50_000) == 2
    assert domain.energy_cost([DAY], Policy(), 8 * 3600, 9 * 3600, 49_000) == 1
    with pytest.raises(ValueError):
        domain.energy_cost([DAY], Policy(), 0, 1, -1)


def test_long_or_impossible_windows_are_priced_with_bounded_work():
    # whole days priced as one day times their number: a year costs what 365 days do
    day = domain.energy_cost([DAY, NIGHT], Policy(), 0, 86400, 24_000_000)
    assert domain.energy_cost([DAY, NIGHT], Policy(), 0, 365 * 86400, 365 * 24_000_000) == 365 * day
    # a board clock far off (before 1970, after 2106) is clamped, not an error
    assert domain.energy_cost([DAY], Policy(), -5, 10**15, 1_000_000) >= 0


def test_hour_pieces_follow_daylight_saving_time():
    tz = ZoneInfo("Europe/Berlin")
    start = int(datetime(2026, 3, 29, 0, 30, tzinfo=tz).timestamp())  # clocks jump 02:00 -> 03:00
    pieces = list(domain._hours(start, start + 3 * 3600, tz))
    assert [h for h, _ in pieces] == [0, 1, 3, 4]
    assert sum(sec for _, sec in pieces) == 3 * 3600


def test_rental_energy_points_and_redemption():
    assert domain.rental_energy_mwh(100, 40, 500_000) == 300_000  # taken
    assert domain.rental_energy_mwh(50, 90, 500_000) == -200_000  # given back
    assert domain.rental_energy_mwh(None, 90, 500_000) == 0
    p = Policy(points_per_kwh=100, cents_per_point=3)
    assert domain.points_for(200_000, p) == 20
    assert domain.points_for(9_999, p) == 0  # rounded down
    assert domain.redeem(20, 50, p) == (16, 48)  # never beyond the fee, whole points
    assert domain.redeem(5, 50, p) == (5, 15)
    assert domain.redeem(5, 0, p) == (0, 0)
    assert domain.redeem(5, 50, Policy(cents_per_point=0)) == (0, 0)


@dataclasses.dataclass
class E:
    seq: int
    ts: int
    user_id: str
    kind: str
    energy_mwh: int = 0
    amount: int = 0
    points: int = 0
    ref: str = ""
    prev_hash: bytes = b""
    hash: bytes = b""


def test_fees_count_the_uses_of_the_period():
    es = [
        E(1, 100, "u1", "energy_taken", ref="session:1"),
        E(2, 200, "u1", "energy_given", ref="rental:4"),
        E(3, 300, "u1", "energy_taken", ref="rental:5"),
        E(4, 300, "u2", "energy_taken", ref="rental:6"),  # another user
        E(5, 400, "u1", "energy_taken", ref="session:2"),  # after the period
        E(6, 250, "u1", "payment", ref="payment:1"),  # not a use
        E(7, 260, "u1", "energy_taken", ref="report:ou-1:7"),  # a reported flow: no use fee
    ]
    st = domain.fees(es, "u1", 100, 400, Policy(fee_per_session_cents=50, fee_per_rental_cents=100, cents_per_point=2), points_available=30)
    assert (st.sessions, st.rentals, st.fee_cents) == (1, 2, 250)
    assert (st.points_spent, st.points_cents, st.due_cents) == (30, 60, 190)
    assert st.refs == ("session:1", "rental:4", "rental:5")


# ---------------------------------------------------------------- the hash chain


def chain(n=5):
    out, prev = [], domain.GENESIS
    for i in range(1, n + 1):
        e = E(i, 1000 + i, f"u{i % 2}", "payment", amount=i * 10, ref=f"payment:{i}", prev_hash=prev)
        e.hash = domain.hash_of(e)
        prev = e.hash
        out.append(e)
    return out


def test_an_untouched_chain_verifies():
    es = chain()
    r = domain.verify_chain(es)
    assert r.ok and r.entries == 5 and r.head_seq == 5 and r.head_hash == es[-1].hash
    assert domain.verify_chain([]).ok
    assert domain.verify_chain(es, head=(3, es[2].hash)).ok


@pytest.mark.parametrize(
    "field_name, value", [("amount", 31), ("user_id", "u9"), ("kind", "fee"), ("ref", "x"), ("ts", 1), ("points", 1), ("energy_mwh", 1)]
)
def test_an_altered_field_is_found(field_name, value):
    es = chain()
    setattr(es[2], field_name, value)
    p = domain.verify_chain(es).problem
    assert (p.seq, p.code) == (3, "altered")


def test_an_altered_entry_with_a_recomputed_hash_breaks_the_next_link():
    es = chain()
    es[2].amount = 1
    es[2].hash = domain.hash_of(es[2])
    p = domain.verify_chain(es).problem
    assert (p.seq, p.code) == (4, "deleted")


def test_a_deleted_entry_is_found_with_or_without_renumbering():
    es = chain()
    del es[2]
    p = domain.verify_chain(es).problem
    assert (p.seq, p.code) == (3, "deleted") and "entry 3 is missing" in p.message
    es = chain()
    del es[2]
    for e in es[2:]:
        e.seq -= 1  # renumbered to hide the gap
    p = domain.verify_chain(es).problem
    assert (p.seq, p.code) == (3, "deleted")


def test_reordered_entries_are_found():
    es = chain()
    es[2], es[3] = es[3], es[2]  # read in another order
    p = domain.verify_chain(es).problem
    assert (p.seq, p.code) == (4, "reordered")
    es = chain()
    es[2].seq, es[3].seq = 4, 3  # seqs swapped in storage
    es[2], es[3] = es[3], es[2]
    p = domain.verify_chain(es).problem
    assert (p.seq, p.code) == (3, "reordered") and "chained after entry 4" in p.message


def test_a_deleted_tail_is_found_only_against_a_noted_head():
    es = chain()
    head = (5, es[-1].hash)
    assert domain.verify_chain(es[:-1]).ok  # the chain alone cannot tell
    p = domain.verify_chain(es[:-1], head=head).problem
    assert (p.seq, p.code) == (5, "deleted")
    p = domain.verify_chain(es, head=(5, bytes(32))).problem
    assert (p.seq, p.code) == (5, "altered")


# ---------------------------------------------------------------- records


def test_record_index_and_battery():
    assert domain.record_index(wire.LOG_SLOT_READING, [2, 41999, 2322, 252]) == 2
    assert domain.record_index(wire.LOG_ALARM, [17, 3, 560]) == 3
    assert domain.record_index(wire.LOG_ALARM, [34]) is None
    assert domain.record_index(wire.LOG_PERMIT, [0, b"\x01", "u", 3, 1]) == 1
    assert domain.record_index(wire.LOG_BOOT, [1]) is None
    assert domain.record_index(wire.LOG_STATE, [True, 1, 1]) is None
    assert domain.record_battery(wire.LOG_BATTERY_IN, [0, b"\xab\xcd", 50]) == "abcd"
    assert domain.record_battery(wire.LOG_ALARM, [31, 1, 29, b"\x01\x02"]) == "0102"
    assert domain.record_battery(wire.LOG_ALARM, [25, 1, b"\x09"]) == "09"
    assert domain.record_battery(wire.LOG_ALARM, [17, 1, 560]) is None
    assert domain.record_name(wire.LOG_SESSION_END) == "session_end" and domain.record_name(99) == "99"
