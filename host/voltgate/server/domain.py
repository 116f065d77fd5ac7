"""The management server's rules, in pure Python (no I/O, no database): the
approval policy for permits, tariffs, the cost of energy, value points,
fees and the hash chain of the ledger. services.py gathers the facts from
the database and asks these functions; tests call them directly.

Units as in models.py: Unix seconds, mWh, integer cents, integer points.

Approval (DESIGN.md, Permits; seed 004). `check_request()` runs these
conditions in this order and returns the first that fails as a
Refusal(code, message); the code is stable, the message is for the user:

    unknown_user, user_inactive              the user exists and is active
    unknown_device, device_disabled          the device exists and is enabled
    wrong_action, out_of_scope               the action suits the device's kind
                                             (station: rent/return/service;
                                             outlet: power/service), the
                                             indexes are its slots/outlets
    bad_window                               the window is not empty
    starts_too_early                         nbf >= now - grace_s
    starts_too_late                          nbf <= now + max_advance_s
    window_too_long                          exp - nbf <= max_window_s
    in_debt, overdue_rental                  good standing: balance >=
                                             min_balance_cents and no open
                                             rental flagged overdue
    overlap                                  no live permit on the same
                                             slot/outlet in an overlapping
                                             window (below)
    too_many_permits, too_many_rentals       per-user limits
    insufficient_funds                       balance and points cover the
                                             estimated cost (below)

Every condition is switched off by setting its policy value to None (or
refuse_overdue / check_overlap to False). Request validity comes before
the user's standing, so a user is told first what is wrong with the
request; money comes last because the estimate needs a valid window.

Overlap. A live permit (not revoked, exp after now, and not a single-use
permit whose session has ended) conflicts when the windows intersect and
the indexes do: on an outlet a permit without a scope claims every outlet;
on a station a rent/return permit without a scope claims no particular slot
(the board picks a ready or empty one), so only explicit scopes conflict.

Tariffs. Price of energy taken by local hour of day (the `timezone`
setting, zoneinfo); a tariff row covers [start_hour, end_hour), a window
with start > end wraps midnight, and the narrowest window containing an
hour applies (ties: the lower id). Hours no row covers cost
default_cents_per_kwh. The energy of a session or rental is spread evenly
over its wall time and each hour's share is priced at that hour's rate; the
total is rounded half up to a whole cent once.

Energy of a rental (seed 003 + seed 001). The battery's charge is
soc % of battery_capacity_mwh. Energy taken = charge when it left - charge
when it came back; if the battery comes back fuller than it left (the user
charged it elsewhere, e.g. from a vehicle or solar at home), the difference
is energy given back. A returned battery's remaining charge as such earns
nothing: paying points for it would reward renting and returning a full
battery at once. A rental with an unknown SoC on either side books 0 mWh.

Value points (seed 001). Energy given back (above, and feed-in reported for
a bidirectional outlet) earns points_per_kwh points per kWh, rounded down.
Points are worth cents_per_point each, but only against fees: they are
redeemed when fees are settled, never beyond the fee, in whole points.

Fees (seed 002). Computed from the ledger for a period [start, end): each
use booked in the period (one energy entry per outlet session, ref
"session:...", and per rental, ref "rental:...") costs fee_per_session_cents
or fee_per_rental_cents. Energy is charged at the tariff when the use is
booked (entries energy_taken); the fee settlement adds one `fee` entry and,
when the user has points, one `points_redeemed` entry that pays as much of
the fee as whole points can.

Estimated cost of a permit (approval): energy at the tariff spread over
the window (power: max_wh, else default_power_w for the whole window; rent:
a full battery) plus the use's fee. It is covered when balance - energy -
fee + min(points value, fee) >= min_balance_cents (0 when that is None).

Ledger hash chain. hash = SHA-256(prev_hash || CBOR array [seq, ts,
user_id, kind, energy_mwh, amount, points, ref]) (a fixed-position array of
ints and texts: the encoding is canonical by construction); the first
entry's prev_hash is 32 zero bytes. verify() walks the entries in the order
given and reports the first problem: a seq out of place (reordered, or
deleted when the missing seq is nowhere), a prev_hash that is not the hash
before (deleted or reordered), a hash that does not match the fields
(altered), or a head that does not match the expected (seq, hash) the
operator kept (deleted at the end).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import cbor2

from .. import wire

# ---------------------------------------------------------------- policy


@dataclass(frozen=True)
class Policy:
    """Operator settings (models.Setting rows override these by name)."""

    timezone: str = "UTC"
    # approval conditions (None: not checked)
    grace_s: int | None = 300  # a window may start this long before now
    max_advance_s: int | None = 7 * 86400  # ... and at most this far ahead
    max_window_s: int | None = 12 * 3600
    min_balance_cents: int | None = 0  # good standing: balance at or above
    refuse_overdue: bool = True  # good standing: no open rental flagged overdue
    check_overlap: bool = True
    max_open_permits: int | None = 5  # live permits per user
    max_open_rentals: int | None = 1  # open rentals per user, for a rent permit
    require_funds: bool = True
    # estimates
    default_power_w: int = 2300  # an outlet window without max_wh
    battery_capacity_mwh: int = 500_000  # a swap battery's full charge
    # prices
    default_cents_per_kwh: int = 30  # hours no tariff row covers
    fee_per_session_cents: int = 50
    fee_per_rental_cents: int = 100
    points_per_kwh: int = 100  # points earned per kWh given back
    cents_per_point: int = 1  # a point's value against fees
    # rentals
    max_rental_s: int = 24 * 3600  # open longer: flagged overdue

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Policy:
        """A policy from {name: value}; unknown names and wrong types raise
        ValueError naming the setting."""
        base = cls()
        values = {}
        for name, value in settings.items():
            values[name] = check_setting(name, value)
        return dataclasses.replace(base, **values)


_FIELDS = {f.name: f for f in dataclasses.fields(Policy)}
_NONNEG = {
    "grace_s",
    "max_advance_s",
    "max_window_s",
    "max_open_permits",
    "max_open_rentals",
    "default_power_w",
    "battery_capacity_mwh",
    "default_cents_per_kwh",
    "fee_per_session_cents",
    "fee_per_rental_cents",
    "points_per_kwh",
    "cents_per_point",
    "max_rental_s",
}


def setting_names() -> list[str]:
    return list(_FIELDS)


def check_setting(name: str, value: Any) -> Any:
    """The value of one policy setting, checked; ValueError says what is wrong."""
    if name not in _FIELDS:
        raise ValueError(f"unknown setting {name!r} (one of {', '.join(_FIELDS)})")
    default = getattr(Policy(), name)
    if name == "timezone":
        if not isinstance(value, str):
            raise ValueError("timezone must be a zone name such as Europe/Berlin")
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r}") from None
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        return value
    optional = _FIELDS[name].type.endswith("None")
    if value is None:
        if not optional:
            raise ValueError(f"{name} cannot be switched off")
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number")
    if name in _NONNEG and value < 0:
        raise ValueError(f"{name} must not be negative")
    return value


# ---------------------------------------------------------------- approval

STATION_ACTIONS = ("rent", "return", "service")
OUTLET_ACTIONS = ("power", "service")


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str


@dataclass(frozen=True)
class Request:
    user_id: str
    device_id: str
    action: str
    nbf: int
    exp: int
    scope: tuple[int, ...] | None = None
    max_wh: int | None = None


@dataclass(frozen=True)
class UserFacts:
    status: str
    balance: int
    points: int
    overdue_rentals: int = 0
    open_permits: int = 0
    open_rentals: int = 0


@dataclass(frozen=True)
class DeviceFacts:
    kind: str  # station | outlet
    enabled: bool
    indexes: tuple[int, ...]  # its slots or outlets (empty: not known yet, any index passes)


@dataclass(frozen=True)
class LivePermit:
    cti: str
    nbf: int
    exp: int
    scope: tuple[int, ...] | None


@dataclass(frozen=True)
class Tariff:
    start_hour: int
    end_hour: int
    cents_per_kwh: int
    name: str = ""
    id: int = 0


@dataclass(frozen=True)
class Estimate:
    energy_mwh: int
    energy_cents: int
    fee_cents: int

    @property
    def total_cents(self) -> int:
        return self.energy_cents + self.fee_cents


def _span(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def overlapping(kind: str, req: Request, live: Iterable[LivePermit]) -> LivePermit | None:
    """The first live permit whose window and indexes intersect the request's."""
    for p in live:
        if not (p.nbf < req.exp and req.nbf < p.exp):
            continue
        if kind == "station" and (p.scope is None or req.scope is None):
            continue  # the board picks a slot: no slot is claimed
        if p.scope is None or req.scope is None or set(p.scope) & set(req.scope):
            return p
    return None


def estimate(policy: Policy, tariffs: Sequence[Tariff], req: Request) -> Estimate:
    """What a permit may cost at most, for the funds check."""
    if req.action == "power":
        mwh = req.max_wh * 1000 if req.max_wh is not None else policy.default_power_w * max(req.exp - req.nbf, 0) * 1000 // 3600
        fee = policy.fee_per_session_cents
    elif req.action == "rent":
        mwh = policy.battery_capacity_mwh
        fee = policy.fee_per_rental_cents
    else:  # a return is billed with its rental; service costs nothing
        return Estimate(0, 0, 0)
    return Estimate(mwh, energy_cost(tariffs, policy, req.nbf, req.exp, mwh), fee)


def check_request(
    policy: Policy,
    req: Request,
    *,
    now: int,
    user: UserFacts | None,
    device: DeviceFacts | None,
    live: Sequence[LivePermit] = (),
    tariffs: Sequence[Tariff] = (),
) -> Refusal | None:
    """None when the request meets every approval condition, else the first
    condition it fails (order in the module docstring)."""
    if user is None:
        return Refusal("unknown_user", f"there is no user {req.user_id!r}")
    if user.status != "active":
        return Refusal("user_inactive", f"user {req.user_id!r} is {user.status}; only active users get permits")
    if device is None:
        return Refusal("unknown_device", f"there is no device {req.device_id!r}")
    if not device.enabled:
        return Refusal("device_disabled", f"device {req.device_id!r} is out of service")
    allowed = STATION_ACTIONS if device.kind == "station" else OUTLET_ACTIONS
    if req.action not in allowed:
        return Refusal(
            "wrong_action",
            f"{'an' if device.kind == 'outlet' else 'a'} {device.kind} does not {req.action}; ask for {' or '.join(allowed)}",
        )
    if req.scope is not None:
        if not req.scope:
            return Refusal("out_of_scope", "the scope lists no slot or outlet; leave it out for any")
        if device.indexes:
            missing = sorted(set(req.scope) - set(device.indexes))
            if missing:
                what = "slot" if device.kind == "station" else "outlet"
                return Refusal(
                    "out_of_scope",
                    f"device {req.device_id!r} has no {what} {', '.join(map(str, missing))} (it has {', '.join(map(str, device.indexes))})",
                )
    if req.exp <= req.nbf:
        return Refusal("bad_window", "the window ends before it starts")
    if policy.grace_s is not None and req.nbf < now - policy.grace_s:
        return Refusal("starts_too_early", f"the window starts {_span(now - req.nbf)} ago; at most {_span(policy.grace_s)} in the past")
    if policy.max_advance_s is not None and req.nbf > now + policy.max_advance_s:
        return Refusal("starts_too_late", f"the window starts in {_span(req.nbf - now)}; at most {_span(policy.max_advance_s)} ahead")
    if policy.max_window_s is not None and req.exp - req.nbf > policy.max_window_s:
        return Refusal("window_too_long", f"the window lasts {_span(req.exp - req.nbf)}; at most {_span(policy.max_window_s)}")
    if policy.min_balance_cents is not None and user.balance < policy.min_balance_cents:
        return Refusal("in_debt", f"the balance is {user.balance} cents, below {policy.min_balance_cents}; top it up first")
    if policy.refuse_overdue and user.overdue_rentals:
        return Refusal("overdue_rental", f"{user.overdue_rentals} rented battery overdue; return it first")
    if policy.check_overlap:
        other = overlapping(device.kind, req, live)
        if other is not None:
            return Refusal(
                "overlap",
                f"permit {other.cti} holds this {'slot' if device.kind == 'station' else 'outlet'} from {other.nbf} to {other.exp}",
            )
    if policy.max_open_permits is not None and user.open_permits >= policy.max_open_permits:
        return Refusal("too_many_permits", f"{user.open_permits} permits are open; at most {policy.max_open_permits} at a time")
    if req.action == "rent" and policy.max_open_rentals is not None and user.open_rentals >= policy.max_open_rentals:
        return Refusal("too_many_rentals", f"{user.open_rentals} batteries are rented; at most {policy.max_open_rentals} at a time")
    if policy.require_funds:
        est = estimate(policy, tariffs, req)
        floor = policy.min_balance_cents or 0
        points_value = min(user.points * policy.cents_per_point, est.fee_cents)
        if user.balance - est.total_cents + points_value < floor:
            return Refusal(
                "insufficient_funds",
                f"this may cost {est.total_cents} cents ({est.energy_cents} energy + {est.fee_cents} fee); "
                f"the balance is {user.balance} cents and points pay at most {points_value} of the fee",
            )
    return None


# ---------------------------------------------------------------- tariffs and energy


def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _covers(t: Tariff, hour: int) -> bool:
    if t.start_hour < t.end_hour:
        return t.start_hour <= hour < t.end_hour
    if t.start_hour > t.end_hour:  # wraps midnight
        return hour >= t.start_hour or hour < t.end_hour
    return True  # start == end: the whole day


def _width(t: Tariff) -> int:
    return (t.end_hour - t.start_hour) % 24 or 24


def check_tariff(start_hour: int, end_hour: int, cents_per_kwh: int) -> None:
    if not (isinstance(start_hour, int) and 0 <= start_hour <= 23):
        raise ValueError("the start hour must be 0..23")
    if not (isinstance(end_hour, int) and 0 <= end_hour <= 24):
        raise ValueError("the end hour must be 0..24")
    if not isinstance(cents_per_kwh, int) or cents_per_kwh < 0:
        raise ValueError("the price must be a whole, non-negative number of cents per kWh")


def rate_at(tariffs: Sequence[Tariff], hour: int, default: int) -> int:
    """cents per kWh at a local hour (0..23)."""
    best = None
    for t in tariffs:
        if _covers(t, hour) and (best is None or (_width(t), t.id) < (_width(best), best.id)):
            best = t
    return best.cents_per_kwh if best is not None else default


MAX_TS = 2**32 - 1  # Unix seconds the boards can count (u32), year 2106
MAX_WINDOW_S = 366 * 86400  # the longest flow a report may price
_DAY = 86400


def _hours(start: int, end: int, tz: ZoneInfo):
    """(local hour, seconds) pieces of [start, end), cut at local hour boundaries."""
    t = start
    while t < end:
        local = datetime.fromtimestamp(t, tz)
        nxt = min(end, t + 3600 - (local.minute * 60 + local.second))
        yield local.hour, nxt - t
        t = nxt


def energy_cost(tariffs: Sequence[Tariff], policy: Policy, start: int, end: int, mwh: int) -> int:
    """Cents for mwh taken evenly over [start, end), priced per local hour,
    rounded half up once. An instant (end <= start) is priced at start."""
    if mwh < 0:
        raise ValueError("energy must not be negative")
    tz = zone(policy.timezone)
    d = policy.default_cents_per_kwh
    # a board's clock may be wrong: times outside what a board can count are
    # clamped, and long windows priced by whole days (bounded work)
    start = min(max(int(start), 0), MAX_TS)
    end = min(max(int(end), 0), MAX_TS)
    if end <= start:
        num, den = mwh * rate_at(tariffs, datetime.fromtimestamp(start, tz).hour, d), 1_000_000
    else:
        days, _ = divmod(end - start, _DAY)
        weighted = 0
        if days > 1:
            day = sum(secs * rate_at(tariffs, hour, d) for hour, secs in _hours(start, start + _DAY, tz))
            weighted = day * days
            start_rest = start + days * _DAY
        else:
            start_rest = start
        weighted += sum(secs * rate_at(tariffs, hour, d) for hour, secs in _hours(start_rest, end, tz))
        num, den = mwh * weighted, (end - start) * 1_000_000
    return (num + den // 2) // den


def rental_energy_mwh(out_soc: int | None, in_soc: int | None, capacity_mwh: int) -> int:
    """Energy a rental took out of the battery (negative: it came back fuller)."""
    if out_soc is None or in_soc is None:
        return 0
    return (out_soc - in_soc) * capacity_mwh // 100


def points_for(mwh_given: int, policy: Policy) -> int:
    if mwh_given < 0:
        raise ValueError("energy must not be negative")
    return mwh_given * policy.points_per_kwh // 1_000_000


def redeem(points: int, fee_cents: int, policy: Policy) -> tuple[int, int]:
    """(points spent, cents they pay) towards a fee: whole points, never beyond the fee."""
    if policy.cents_per_point <= 0 or points <= 0 or fee_cents <= 0:
        return 0, 0
    p = min(points, fee_cents // policy.cents_per_point)
    return p, p * policy.cents_per_point


# ---------------------------------------------------------------- fees

USE_PREFIXES = {"session:": "fee_per_session_cents", "rental:": "fee_per_rental_cents"}
USE_KINDS = ("energy_taken", "energy_given")


@dataclass(frozen=True)
class FeeStatement:
    user_id: str
    start: int
    end: int
    sessions: int
    rentals: int
    fee_cents: int
    points_spent: int
    points_cents: int
    refs: tuple[str, ...] = field(default=())

    @property
    def due_cents(self) -> int:
        """What the balance pays after points."""
        return self.fee_cents - self.points_cents


def fees(entries: Iterable[Any], user_id: str, start: int, end: int, policy: Policy, points_available: int) -> FeeStatement:
    """The fee of a user's uses booked in [start, end), from ledger entries
    (anything with ts, user_id, kind, ref), and the points that pay it."""
    sessions = rentals = 0
    refs = []
    for e in entries:
        if e.user_id != user_id or not start <= e.ts < end or e.kind not in USE_KINDS:
            continue
        if e.ref.startswith("session:"):
            sessions += 1
        elif e.ref.startswith("rental:"):
            rentals += 1
        else:
            continue
        refs.append(e.ref)
    fee = sessions * policy.fee_per_session_cents + rentals * policy.fee_per_rental_cents
    p, c = redeem(points_available, fee, policy)
    return FeeStatement(user_id, start, end, sessions, rentals, fee, p, c, tuple(refs))


# ---------------------------------------------------------------- ledger chain

GENESIS = bytes(32)
HASH_FIELDS = ("seq", "ts", "user_id", "kind", "energy_mwh", "amount", "points", "ref")


def entry_hash(prev_hash: bytes, seq: int, ts: int, user_id: str, kind: str, energy_mwh: int, amount: int, points: int, ref: str) -> bytes:
    body = cbor2.dumps([int(seq), int(ts), str(user_id), str(kind), int(energy_mwh), int(amount), int(points), str(ref)])
    return hashlib.sha256(bytes(prev_hash) + body).digest()


def hash_of(e: Any, prev_hash: bytes | None = None) -> bytes:
    """The hash an entry (anything with the HASH_FIELDS) should carry."""
    return entry_hash(e.prev_hash if prev_hash is None else prev_hash, *(getattr(e, f) for f in HASH_FIELDS))


@dataclass(frozen=True)
class ChainProblem:
    seq: int  # the first entry found wrong (for a deleted tail: the expected head seq)
    code: str  # altered | deleted | reordered | head
    message: str


@dataclass(frozen=True)
class ChainReport:
    entries: int
    head_seq: int
    head_hash: bytes
    problem: ChainProblem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_chain(entries: Sequence[Any], head: tuple[int, bytes] | None = None) -> ChainReport:
    """Check a ledger given in storage order (by seq). head: the (seq, hash)
    the operator noted earlier; the chain must still contain it unchanged
    (a chain alone cannot show that its last entries were deleted)."""
    entries = list(entries)
    seqs = {e.seq for e in entries}
    hashes = {bytes(e.hash): e.seq for e in entries}
    prev_hash, expected = GENESIS, 1

    def report(problem):
        last = entries[-1] if entries else None
        return ChainReport(len(entries), last.seq if last else 0, bytes(last.hash) if last else GENESIS, problem)

    for e in entries:
        if e.seq != expected:
            if expected in seqs:
                msg = f"entry {e.seq} stands where entry {expected} belongs"
                return report(ChainProblem(e.seq, "reordered", msg))
            return report(ChainProblem(expected, "deleted", f"entry {expected} is missing (the next is {e.seq})"))
        if bytes(e.prev_hash) != prev_hash:
            other = hashes.get(bytes(e.prev_hash))
            if other is not None and other != e.seq - 1:
                msg = f"entry {e.seq} was chained after entry {other}, not after entry {e.seq - 1}"
                return report(ChainProblem(e.seq, "reordered", msg))
            msg = f"entry {e.seq} does not follow entry {e.seq - 1}: an entry before it was deleted or replaced"
            return report(ChainProblem(e.seq, "deleted", msg))
        if hash_of(e) != bytes(e.hash):
            return report(ChainProblem(e.seq, "altered", f"entry {e.seq} does not match its hash: its fields were changed"))
        prev_hash, expected = bytes(e.hash), expected + 1
    if head is not None:
        hseq, hhash = head
        found = next((e for e in entries if e.seq == hseq), None)
        if found is None:
            return report(ChainProblem(hseq, "deleted", f"the noted head, entry {hseq}, is gone: the ledger ends at {expected - 1}"))
        if bytes(found.hash) != bytes(hhash):
            return report(ChainProblem(hseq, "altered", f"entry {hseq} is not the one noted as the head"))
    return report(None)


# ---------------------------------------------------------------- log records

STATION_STATES = ("empty", "charging", "ready", "reserved", "open", "fault", "disabled")  # firmware/station.py, in order
RECORD_NAMES = {v: k[4:].lower() for k, v in vars(wire).items() if k.startswith("LOG_") and k not in ("LOG_READINGS_END", "LOG_EVENTS_END")}
_FIRST_IS_INDEX = {
    wire.LOG_SLOT_READING,
    wire.LOG_OUTLET_READING,
    wire.LOG_STATE,
    wire.LOG_BATTERY_OUT,
    wire.LOG_BATTERY_IN,
    wire.LOG_SESSION_START,
    wire.LOG_SESSION_END,
    wire.LOG_ENERGY,
}
STATION_ALARM_BATTERY_MISSING = 25
STATION_ALARM_REFUSED = 31


def record_name(rtype: int) -> str:
    return RECORD_NAMES.get(rtype, str(rtype))


def record_index(rtype: int, body: Any) -> int | None:
    """The slot or outlet a record is about (SPEC.md sections 8 and 9), or None."""
    if not isinstance(body, list):
        return None
    pos = 0 if rtype in _FIRST_IS_INDEX else 1 if rtype == wire.LOG_ALARM else 4 if rtype == wire.LOG_PERMIT else None
    if pos is None or len(body) <= pos:
        return None
    v = body[pos]
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def record_battery(rtype: int, body: Any) -> str | None:
    """The battery id (hex) a station record names, or None."""
    if not isinstance(body, list):
        return None
    v = None
    if rtype in (wire.LOG_BATTERY_OUT, wire.LOG_BATTERY_IN) and len(body) > 1:
        v = body[1]
    elif rtype == wire.LOG_ALARM and body and body[0] == STATION_ALARM_REFUSED and len(body) > 3:
        v = body[3]
    elif rtype == wire.LOG_ALARM and body and body[0] == STATION_ALARM_BATTERY_MISSING and len(body) > 2:
        v = body[2]
    return bytes(v).hex() if isinstance(v, (bytes, bytearray)) else None
