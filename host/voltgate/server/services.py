"""The management server's use cases, on a SQLAlchemy session.

Each function works inside the caller's transaction and commits nothing:
the entry point (REST API, CLI, the gateway's ingest) opens one transaction
per call (`db.transaction`) and commits or rolls back as a whole, so a
refused or failed call changes nothing. The rules (approval, prices, points,
fees, the hash chain) are in domain.py; this module gathers the facts and
writes the results.

    with db.transaction(factory) as s:
        issued = services.request_permit(s, master, user_id="u1", device_id="ou-1",
                                         action="power", duration_s=3600, now=now)

Concurrency: several server processes may run against one PostgreSQL
(DESIGN.md, Scale-out). Balances and points are changed with one UPDATE
... SET balance = balance + x, never read-modify-write. A ledger entry takes
seq = last + 1 in its transaction; two transactions appending at once pick
the same seq, and the second one's commit (or flush) fails with
IntegrityError on the ledger's primary key. The caller retries the whole
transaction (`retrying()` does that); nothing of the failed attempt stays.
Bookings are idempotent on the ledger's unique (kind, ref), rentals on
(out_device, out_ts, battery), sessions on (device, outlet, cti, start), so
a retried or repeated call books nothing twice.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import cbor2
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session as DB

from .. import keys, permits, wire
from ..errors import EXIT_FAILURE, EXIT_USAGE, VoltgateError
from . import domain
from .db import transaction
from .models import (
    Battery,
    Device,
    LedgerEntry,
    LogRecord,
    Outlet,
    PendingCommand,
    Permit,
    Rental,
    Session,
    Setting,
    Site,
    Slot,
    Tariff,
    User,
)

T = TypeVar("T")

# ---------------------------------------------------------------- errors


class NotFound(VoltgateError):
    """An unknown user, device, permit ... (HTTP 404)."""

    def __init__(self, problem: str, hint: str | None = None):
        super().__init__(problem, hint, EXIT_USAGE)


class Invalid(VoltgateError):
    """Input that can never succeed as given (HTTP 422)."""

    def __init__(self, problem: str, hint: str | None = None):
        super().__init__(problem, hint, EXIT_USAGE)


class Conflict(VoltgateError):
    """A request that repeats an earlier one's id with other contents (HTTP 409)."""

    def __init__(self, problem: str, hint: str | None = None):
        super().__init__(problem, hint, EXIT_USAGE)


class Refused(VoltgateError):
    """A permit request that fails an approval condition: code is
    domain's stable code, the message says why in words."""

    def __init__(self, code: str, message: str):
        super().__init__(f"refused ({code}): {message}", None, EXIT_FAILURE)
        self.code, self.message = code, message


log = logging.getLogger(__name__)

# PostgreSQL: serialization_failure, deadlock_detected, unique_violation
_RETRY_SQLSTATES = {"40001", "40P01", "23505"}


def _transient(e: DBAPIError) -> bool:
    if getattr(e.orig, "sqlstate", None) in _RETRY_SQLSTATES:
        return True
    # SQLite: a unique key another transaction took first, or its write lock
    return isinstance(e, IntegrityError) and "UNIQUE" in str(e.orig) or isinstance(e, OperationalError) and "locked" in str(e.orig)


def retrying(factory, fn: Callable[[DB], T], attempts: int = 5) -> T:
    """Run fn(session) in a transaction, again when it failed because of a
    concurrent one (two ledger appends that picked the same seq, a
    deadlock, SQLite's write lock), up to attempts times. fn must do
    nothing outside the transaction, since it may run more than once."""
    for i in range(attempts):
        try:
            with transaction(factory) as s:
                return fn(s)
        except (IntegrityError, OperationalError) as e:
            if i == attempts - 1 or not _transient(e):
                raise
            log.info("retrying a transaction after %s", type(e.orig).__name__)
            time.sleep(0.01 * 2**i)  # back off before retrying; not synchronisation
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- settings and tariffs


def load_policy(s: DB) -> domain.Policy:
    rows = {r.key: r.value for r in s.scalars(select(Setting))}
    try:
        return domain.Policy.from_settings(rows)
    except ValueError as e:
        raise VoltgateError(f"stored setting is invalid: {e}", "set it again with `voltgate settings set`", EXIT_USAGE) from None


def set_setting(s: DB, key: str, value: Any) -> Any:
    """Set one policy setting (domain.Policy's field names); None switches a condition off."""
    try:
        value = domain.check_setting(key, value)
    except ValueError as e:
        raise Invalid(str(e)) from None
    row = s.get(Setting, key)
    if row is None:
        s.add(Setting(key=key, value=value))
    else:
        row.value = value
    s.flush()
    return value


def settings(s: DB) -> dict[str, Any]:
    """Every policy setting with its value (stored or default)."""
    p = load_policy(s)
    return {name: getattr(p, name) for name in domain.setting_names()}


def set_tariff(s: DB, name: str, cents_per_kwh: int, start_hour: int = 0, end_hour: int = 24) -> Tariff:
    """Add a tariff window, or change the one with this name."""
    try:
        domain.check_tariff(start_hour, end_hour, cents_per_kwh)
    except ValueError as e:
        raise Invalid(str(e)) from None
    if not name or len(name) > 64:
        raise Invalid("a tariff needs a name of 1-64 characters")
    row = s.scalar(select(Tariff).where(Tariff.name == name))
    if row is None:
        row = Tariff(name=name)
        s.add(row)
    row.cents_per_kwh, row.start_hour, row.end_hour = cents_per_kwh, start_hour, end_hour
    s.flush()
    return row


def tariffs(s: DB) -> list[Tariff]:
    return list(s.scalars(select(Tariff).order_by(Tariff.start_hour, Tariff.id)))


def _tariffs(s: DB) -> list[domain.Tariff]:
    return [domain.Tariff(t.start_hour, t.end_hour, t.cents_per_kwh, t.name, t.id) for t in tariffs(s)]


# ---------------------------------------------------------------- registry

USER_STATUSES = ("active", "suspended", "closed")
KINDS = ("station", "outlet")


def add_site(s: DB, site_id: str, name: str = "") -> Site:
    site = s.get(Site, site_id)
    if site is None:
        if not site_id or len(site_id) > 64 or any(c in site_id for c in "/+# "):
            raise Invalid(f"invalid site id {site_id!r}", "1-64 characters, no '/', '+', '#' or spaces")
        site = Site(id=site_id, name=name)
        s.add(site)
    elif name:
        site.name = name
    s.flush()
    return site


def add_device(
    s: DB,
    device_id: str,
    *,
    site_id: str,
    kind: str,
    board: str,
    slots: int = 0,
    outlets: int = 0,
    key_version: int = 1,
    fw_version: str | None = None,
    enabled: bool = True,
) -> Device:
    """Register a board (its site is made if new) with its slots or outlets."""
    try:
        keys.check_device_id(device_id)
        keys.check_key_version(key_version)
    except VoltgateError as e:
        raise Invalid(e.problem, e.hint) from None
    if kind not in KINDS:
        raise Invalid(f"unknown device kind {kind!r}", "station or outlet")
    count = slots if kind == "station" else outlets
    if (kind == "station" and outlets) or (kind == "outlet" and slots):
        raise Invalid(f"a {kind} has {'slots' if kind == 'station' else 'outlets'} only")
    if not 0 <= count <= wire.MAX_SCOPE:
        raise Invalid(f"a board has 0..{wire.MAX_SCOPE} {'slots' if kind == 'station' else 'outlets'}")
    if s.get(Device, device_id) is not None:
        raise Invalid(f"device {device_id!r} is registered already")
    add_site(s, site_id)
    dev = Device(id=device_id, site_id=site_id, kind=kind, board=board, key_version=key_version, fw_version=fw_version, enabled=enabled)
    s.add(dev)
    s.flush()
    row = Slot if kind == "station" else Outlet
    for i in range(count):
        s.add(row(device_id=device_id, index=i))
    s.flush()
    return dev


def device(s: DB, device_id: str) -> Device:
    dev = s.get(Device, device_id)
    if dev is None:
        raise NotFound(f"there is no device {device_id!r}", "see `voltgate devices list`")
    return dev


def set_device_enabled(s: DB, device_id: str, enabled: bool) -> Device:
    dev = device(s, device_id)
    dev.enabled = enabled
    s.flush()
    return dev


def devices(s: DB) -> list[Device]:
    return list(s.scalars(select(Device).order_by(Device.id)))


def add_user(s: DB, user_id: str, *, name: str = "", status: str = "active") -> User:
    if not user_id or len(user_id.encode()) > wire.MAX_TEXT_CLAIM:
        raise Invalid(f"invalid user id {user_id!r}", f"1-{wire.MAX_TEXT_CLAIM} bytes (it goes into permits as sub)")
    if status not in USER_STATUSES:
        raise Invalid(f"unknown status {status!r}", " / ".join(USER_STATUSES))
    if s.get(User, user_id) is not None:
        raise Invalid(f"user {user_id!r} exists already")
    u = User(id=user_id, name=name, status=status, balance=0, points=0)
    s.add(u)
    s.flush()
    return u


def user(s: DB, user_id: str) -> User:
    u = s.get(User, user_id)
    if u is None:
        raise NotFound(f"there is no user {user_id!r}", "see `voltgate users list`")
    return u


def users(s: DB) -> list[User]:
    return list(s.scalars(select(User).order_by(User.id)))


def set_user_status(s: DB, user_id: str, status: str) -> User:
    if status not in USER_STATUSES:
        raise Invalid(f"unknown status {status!r}", " / ".join(USER_STATUSES))
    u = user(s, user_id)
    u.status = status
    s.flush()
    return u


def add_battery(s: DB, battery_id: str, *, soh: int | None = None, cycles: int = 0) -> Battery:
    try:
        raw = bytes.fromhex(battery_id)
    except ValueError:
        raise Invalid(f"battery id {battery_id!r} is not hex") from None
    if not 1 <= len(raw) <= wire.MAX_BATTERY_ID:
        raise Invalid(f"a battery id is 1-{wire.MAX_BATTERY_ID} bytes")
    if s.get(Battery, raw.hex()) is not None:
        raise Invalid(f"battery {raw.hex()} is registered already")
    b = Battery(id=raw.hex(), soh=soh, cycles=cycles)
    s.add(b)
    s.flush()
    return b


def battery(s: DB, battery_id: str) -> Battery:
    b = s.get(Battery, battery_id.lower())
    if b is None:
        raise NotFound(f"there is no battery {battery_id!r}", "battery ids are hex, as the stations report them")
    return b


def batteries(s: DB) -> list[Battery]:
    return list(s.scalars(select(Battery).order_by(Battery.id)))


def slots(s: DB, device_id: str | None = None) -> list[Slot]:
    q = select(Slot).order_by(Slot.device_id, Slot.index)
    if device_id is not None:
        device(s, device_id)
        q = q.where(Slot.device_id == device_id)
    return list(s.scalars(q))


def outlets(s: DB, device_id: str | None = None) -> list[Outlet]:
    q = select(Outlet).order_by(Outlet.device_id, Outlet.index)
    if device_id is not None:
        device(s, device_id)
        q = q.where(Outlet.device_id == device_id)
    return list(s.scalars(q))


# ---------------------------------------------------------------- permits


@dataclass
class Issued:
    permit: Permit
    token: bytes
    estimate: domain.Estimate

    @property
    def cti(self) -> str:
        return self.permit.cti


def _live_permits(now: int):
    """Permits not revoked, not expired, and not single-use ones whose session has ended."""
    ended = select(Session.cti).where(Session.end_ts.is_not(None))
    rented = select(Rental.permit_cti).where(Rental.permit_cti.is_not(None))
    return (
        select(Permit)
        .where(Permit.revoked_at.is_(None), Permit.exp > now)
        .where(or_(Permit.single_use.is_(False), Permit.cti.not_in(ended.union(rented))))
    )


def _user_facts(s: DB, u: User, now: int) -> domain.UserFacts:
    open_rentals = select(func.count()).select_from(Rental).where(Rental.user_id == u.id, Rental.in_ts.is_(None))
    return domain.UserFacts(
        status=u.status,
        balance=u.balance,
        points=u.points,
        overdue_rentals=s.scalar(open_rentals.where(Rental.flagged.is_(True))) or 0,
        open_permits=s.scalar(select(func.count()).select_from(_live_permits(now).where(Permit.user_id == u.id).subquery())) or 0,
        open_rentals=s.scalar(open_rentals) or 0,
    )


def _device_facts(s: DB, d: Device) -> domain.DeviceFacts:
    row = Slot if d.kind == "station" else Outlet
    idx = tuple(s.scalars(select(row.index).where(row.device_id == d.id).order_by(row.index)))
    return domain.DeviceFacts(kind=d.kind, enabled=d.enabled, indexes=idx)


def request_permit(
    s: DB,
    master: bytes,
    *,
    user_id: str,
    device_id: str,
    action: str,
    now: int,
    nbf: int | None = None,
    exp: int | None = None,
    duration_s: int | None = None,
    scope: Sequence[int] | None = None,
    max_wh: int | None = None,
    max_w: int | None = None,
    single_use: bool = True,
    battery: str | None = None,
    compact: bool = False,
) -> Issued:
    """Issue a permit when the request meets every approval condition
    (domain.check_request), else raise Refused. The window is [nbf, exp):
    nbf defaults to now, exp to nbf + duration_s. A power permit without
    max_wh is capped at the energy its funds check assumed. compact: alg 4
    (HMAC 256/64, for QR codes)."""
    now = int(now)
    if action not in wire.ACTION_CODES:
        raise Refused("wrong_action", f"unknown action {action!r}; one of {', '.join(wire.ACTION_CODES)}")
    nbf = now if nbf is None else int(nbf)
    if exp is None:
        if duration_s is None:
            raise Refused("bad_window", "the window needs an end or a duration")
        exp = nbf + int(duration_s)
    if max_wh is not None and max_wh < 0 or max_w is not None and max_w < 0:
        raise Invalid("energy and power limits must not be negative")
    req = domain.Request(user_id, device_id, action, nbf, int(exp), tuple(scope) if scope is not None else None, max_wh)
    policy, tariff_rows = load_policy(s), _tariffs(s)
    u, d = s.get(User, user_id), s.get(Device, device_id)
    if u is not None:
        flag_overdue_rentals(s, now, policy.max_rental_s, user_id=user_id)
    live = []
    if d is not None:
        rows = s.scalars(_live_permits(now).where(Permit.device_id == device_id))
        live = [domain.LivePermit(p.cti, p.nbf, p.exp, tuple(p.scope) if p.scope is not None else None) for p in rows]
    refusal = domain.check_request(
        policy,
        req,
        now=now,
        user=_user_facts(s, u, now) if u is not None else None,
        device=_device_facts(s, d) if d is not None else None,
        live=live,
        tariffs=tariff_rows,
    )
    if refusal is not None:
        raise Refused(refusal.code, refusal.message)
    est = domain.estimate(policy, tariff_rows, req)
    if action == "power" and max_wh is None:
        max_wh = -(-est.energy_mwh // 1000)
    battery_raw = None
    if battery is not None:
        try:
            battery_raw = bytes.fromhex(battery)
        except ValueError:
            raise Invalid(f"battery id {battery!r} is not hex") from None
    cti = os.urandom(permits.CTI_LEN)
    try:
        token = permits.issue(
            keys.derive_device_key(master, device_id, d.key_version),
            d.key_version,
            wire.ALG_HMAC256_64 if compact else wire.ALG_HMAC256_256,
            device_id=device_id,
            user_id=user_id,
            action=action,
            not_before=nbf,
            expires=req.exp,
            issued_at=now,
            scope=list(req.scope) if req.scope is not None else None,
            max_wh=max_wh,
            max_w=max_w,
            single_use=single_use,
            battery=battery_raw,
            cti=cti,
        )
    except VoltgateError as e:
        raise Invalid(e.problem, e.hint) from None
    p = Permit(
        cti=cti.hex(),
        user_id=user_id,
        device_id=device_id,
        action=action,
        scope=list(req.scope) if req.scope is not None else None,
        nbf=nbf,
        exp=req.exp,
        max_wh=max_wh,
        single_use=single_use,
        issued_at=now,
        key_version=d.key_version,
        token=token,
    )
    s.add(p)
    s.flush()
    return Issued(p, token, est)


def permit(s: DB, cti: str) -> Permit:
    p = s.get(Permit, cti.lower())
    if p is None:
        raise NotFound(f"there is no permit {cti!r}", "see `voltgate permits list`")
    return p


def list_permits(s: DB, *, user_id: str | None = None, device_id: str | None = None, live_at: int | None = None) -> list[Permit]:
    q = _live_permits(live_at) if live_at is not None else select(Permit)
    if user_id is not None:
        q = q.where(Permit.user_id == user_id)
    if device_id is not None:
        q = q.where(Permit.device_id == device_id)
    return list(s.scalars(q.order_by(Permit.issued_at, Permit.cti)))


def revoke_permit(s: DB, cti: str, *, now: int) -> PendingCommand | None:
    """Revoke a permit and queue the revocation for its board (unless it
    has expired: the board forgets it by itself). Revoking twice queues
    nothing more. Returns the queued command, or None."""
    p = permit(s, cti)
    if p.revoked_at is not None:
        return None
    p.revoked_at = int(now)
    cmd = None
    if p.exp > now:
        cmd = PendingCommand(device_id=p.device_id, type=wire.MSG_REVOKE, body={"cti": {"hex": p.cti}, "exp": p.exp}, created=int(now))
        s.add(cmd)
    s.flush()
    return cmd


def revoke_user(s: DB, user_id: str, *, now: int, status: str = "suspended") -> list[PendingCommand]:
    """Suspend a user (no new permits), revoke their live permits, and queue
    {sub, until} for each board they hold one for; until is the last exp
    there, after which none of those permits is valid anyway."""
    u = set_user_status(s, user_id, status)
    until: dict[str, int] = {}
    for p in s.scalars(select(Permit).where(Permit.user_id == u.id, Permit.revoked_at.is_(None), Permit.exp > now)):
        p.revoked_at = int(now)
        until[p.device_id] = max(until.get(p.device_id, 0), p.exp)
    cmds = [
        PendingCommand(device_id=d, type=wire.MSG_REVOKE, body={"sub": u.id, "until": t}, created=int(now))
        for d, t in sorted(until.items())
    ]
    s.add_all(cmds)
    s.flush()
    return cmds


def pending_commands(s: DB, device_id: str | None = None) -> list[PendingCommand]:
    q = select(PendingCommand).where(PendingCommand.done_at.is_(None)).order_by(PendingCommand.id)
    if device_id is not None:
        q = q.where(PendingCommand.device_id == device_id)
    return list(s.scalars(q))


# ---------------------------------------------------------------- ledger


def ledger_append(
    s: DB, *, user_id: str, kind: str, ref: str, ts: int, energy_mwh: int = 0, amount: int = 0, points: int = 0
) -> LedgerEntry:
    """Append one entry (seq = last + 1, chained to the last hash) and move
    the user's balance and points by it. An entry with this (kind, ref)
    exists already: it is returned and nothing changes. A concurrent append
    may take the same seq: IntegrityError, retry the transaction (module
    docstring)."""
    if not ref or len(ref) > 128 or not kind or len(kind) > 32:
        raise Invalid("a ledger entry needs a kind (1-32 characters) and a ref (1-128)")
    if energy_mwh < 0:
        raise Invalid("energy must not be negative", "the kind says its direction")
    existing = s.scalar(select(LedgerEntry).where(LedgerEntry.kind == kind, LedgerEntry.ref == ref))
    if existing is not None:
        if (existing.user_id, existing.energy_mwh, existing.amount, existing.points) != (user_id, energy_mwh, amount, points):
            raise Conflict(f"ledger ref {ref!r} was booked already with other contents", "use a new ref")
        return existing
    user(s, user_id)
    last = s.scalar(select(LedgerEntry).order_by(LedgerEntry.seq.desc()).limit(1))
    seq, prev = (last.seq + 1, last.hash) if last is not None else (1, domain.GENESIS)
    e = LedgerEntry(
        seq=seq, ts=int(ts), user_id=user_id, kind=kind, energy_mwh=energy_mwh, amount=amount, points=points, ref=ref, prev_hash=prev
    )
    e.hash = domain.hash_of(e)
    s.add(e)
    s.flush()
    if amount or points:
        s.execute(update(User).where(User.id == user_id).values(balance=User.balance + amount, points=User.points + points))
    return e


def pay(s: DB, user_id: str, cents: int, *, now: int, ref: str | None = None) -> LedgerEntry:
    """A payment onto the user's balance (a top-up; negative: a refund paid out)."""
    if not cents:
        raise Invalid("a payment of 0 cents")
    return ledger_append(
        s, user_id=user_id, kind="payment", amount=cents, ts=now, ref=ref or f"payment:{user_id}:{now}:{os.urandom(4).hex()}"
    )


def ledger(s: DB, *, user_id: str | None = None, limit: int | None = None) -> list[LedgerEntry]:
    q = select(LedgerEntry).order_by(LedgerEntry.seq.desc() if limit else LedgerEntry.seq)
    if user_id is not None:
        q = q.where(LedgerEntry.user_id == user_id)
    if limit:
        return list(reversed(list(s.scalars(q.limit(limit)))))
    return list(s.scalars(q))


@dataclass
class LedgerCheck:
    chain: domain.ChainReport
    mismatches: list[dict] = field(default_factory=list)  # users whose balance/points differ from the ledger

    @property
    def ok(self) -> bool:
        return self.chain.ok and not self.mismatches


def ledger_verify(s: DB, head: tuple[int, bytes] | None = None) -> LedgerCheck:
    """The hash chain (domain.verify_chain), then every user's balance and
    points against the sums of their entries."""
    report = domain.verify_chain(list(s.scalars(select(LedgerEntry).order_by(LedgerEntry.seq))), head)
    sums = {
        uid: (b or 0, p or 0)
        for uid, b, p in s.execute(
            select(LedgerEntry.user_id, func.sum(LedgerEntry.amount), func.sum(LedgerEntry.points)).group_by(LedgerEntry.user_id)
        )
    }
    bad = []
    for u in users(s):
        b, p = sums.get(u.id, (0, 0))
        if (u.balance, u.points) != (b, p):
            bad.append({"user": u.id, "balance": u.balance, "ledger_balance": int(b), "points": u.points, "ledger_points": int(p)})
    return LedgerCheck(report, bad)


def _settled_periods(s: DB, user_id: str) -> list[tuple[int, int]]:
    out = []
    for ref in s.scalars(select(LedgerEntry.ref).where(LedgerEntry.kind == "fee", LedgerEntry.user_id == user_id)):
        parts = ref.rsplit(":", 2)
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            out.append((int(parts[1]), int(parts[2])))
    return out


def settle_fees(s: DB, user_id: str, start: int, end: int, *, now: int) -> domain.FeeStatement:
    """Compute a user's fees for [start, end) from the ledger (domain.fees)
    and book them: a `fee` entry, and a `points_redeemed` entry for the part
    points pay. A period that overlaps one settled before is refused, so no
    use is charged twice."""
    if end <= start:
        raise Invalid("the period ends before it starts")
    u = user(s, user_id)
    for a, b in _settled_periods(s, user_id):
        if a < end and start < b:
            raise Invalid(f"fees of {user_id!r} are settled for {a}..{b} already", "settle a period that does not overlap it")
    policy = load_policy(s)
    entries = s.scalars(
        select(LedgerEntry).where(
            LedgerEntry.user_id == user_id, LedgerEntry.ts >= start, LedgerEntry.ts < end, LedgerEntry.kind.in_(domain.USE_KINDS)
        )
    )
    st = domain.fees(entries, user_id, start, end, policy, u.points)
    if st.fee_cents:
        ledger_append(s, user_id=user_id, kind="fee", amount=-st.fee_cents, ref=f"fee:{user_id}:{start}:{end}", ts=now)
    if st.points_spent:
        ledger_append(
            s,
            user_id=user_id,
            kind="points_redeemed",
            points=-st.points_spent,
            amount=st.points_cents,
            ref=f"redeem:{user_id}:{start}:{end}",
            ts=now,
        )
    return st


def settle_all(s: DB, start: int, end: int, *, now: int) -> list[domain.FeeStatement]:
    """settle_fees for every user with a use in [start, end)."""
    uids = s.scalars(
        select(LedgerEntry.user_id)
        .where(LedgerEntry.ts >= start, LedgerEntry.ts < end, LedgerEntry.kind.in_(domain.USE_KINDS))
        .distinct()
        .order_by(LedgerEntry.user_id)
    )
    return [settle_fees(s, uid, start, end, now=now) for uid in list(uids)]


def record_energy(s: DB, *, user_id: str, device_id: str, direction: str, energy_mwh: int, start: int, end: int, ref: str) -> LedgerEntry:
    """An energy flow reported with a user id by a device outside the log
    (seed 001: a bidirectional charger's feed-in, a vehicle's energy given
    to a station): taken is charged at the tariff over [start, end), given
    earns points. ref names the report; repeating it books nothing twice."""
    if direction not in ("taken", "given"):
        raise Invalid(f"unknown direction {direction!r}", "taken or given")
    if energy_mwh < 0:
        raise Invalid("energy must not be negative", "direction says which way it flowed")
    if end < start:
        raise Invalid("the flow ends before it starts")
    if end - start > domain.MAX_WINDOW_S or end > domain.MAX_TS:
        raise Invalid("the flow's window is too long or too far ahead", f"at most {domain.MAX_WINDOW_S // 86400} days, before 2106")
    device(s, device_id)
    user(s, user_id)
    other = "energy_given" if direction == "taken" else "energy_taken"
    if s.scalar(select(LedgerEntry.seq).where(LedgerEntry.kind == other, LedgerEntry.ref == f"report:{device_id}:{ref}")) is not None:
        raise Conflict(f"report {ref!r} was booked already the other way", "use a new ref")
    policy = load_policy(s)
    if direction == "taken":
        cost = domain.energy_cost(_tariffs(s), policy, start, end, energy_mwh)
        return ledger_append(
            s, user_id=user_id, kind="energy_taken", energy_mwh=energy_mwh, amount=-cost, ts=end, ref=f"report:{device_id}:{ref}"
        )
    pts = domain.points_for(energy_mwh, policy)
    return ledger_append(
        s, user_id=user_id, kind="energy_given", energy_mwh=energy_mwh, points=pts, ts=end, ref=f"report:{device_id}:{ref}"
    )


# ---------------------------------------------------------------- records from boards


_CBOR_ERRORS = (cbor2.CBORDecodeError, ValueError, TypeError, EOFError)


def _hex(v) -> str | None:
    return bytes(v).hex() if isinstance(v, (bytes, bytearray)) else None


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _at(body, i):
    return body[i] if isinstance(body, list) and len(body) > i else None


def process_records(s: DB, device_id: str, records: Iterable[Any]) -> None:
    """Apply records pulled from a board (objects with epoch, seq, ts, type
    and the decoded CBOR body, as messages.Record) to the registry, rentals,
    sessions and ledger. The ingest calls it once per newly stored record,
    in the transaction that stores it; calling it again for the same record
    changes nothing. Rentals match across stations and in any order of
    arrival: a return processed before its rent closes the rental when the
    rent arrives (the stored LOG_BATTERY_IN is looked up)."""
    dev = s.get(Device, device_id)
    ctx = _Ctx(s, dev, device_id)
    for r in records:
        handler = _HANDLERS.get(r.type)
        if handler is not None and isinstance(r.body, list):
            handler(ctx, r)
    s.flush()


class _Ctx:
    def __init__(self, s: DB, dev: Device | None, device_id: str):
        self.s, self.dev, self.device_id = s, dev, device_id
        self._policy = None
        self._tariffs = None
        self._stations = None

    @property
    def policy(self) -> domain.Policy:
        if self._policy is None:
            self._policy = load_policy(self.s)
        return self._policy

    @property
    def tariffs(self) -> list[domain.Tariff]:
        if self._tariffs is None:
            self._tariffs = _tariffs(self.s)
        return self._tariffs

    def slot(self, index) -> Slot | None:
        if self.dev is None or _int(index) is None:
            return None
        row = self.s.get(Slot, (self.device_id, index))
        if row is None:
            row = Slot(device_id=self.device_id, index=index)
            self.s.add(row)
        return row

    def outlet(self, index) -> Outlet | None:
        if self.dev is None or _int(index) is None:
            return None
        row = self.s.get(Outlet, (self.device_id, index))
        if row is None:
            row = Outlet(device_id=self.device_id, index=index)
            self.s.add(row)
        return row

    def battery(self, bid: str) -> Battery:
        b = self.s.get(Battery, bid)
        if b is None:
            b = Battery(id=bid, cycles=0, energy_in_mwh=0)
            self.s.add(b)
        return b

    @property
    def stations(self) -> list[str]:
        """The station boards (and this device): where battery records come from."""
        if self._stations is None:
            ids = set(self.s.scalars(select(Device.id).where(Device.kind == "station")))
            self._stations = sorted(ids | {self.device_id})
        return self._stations

    def known_user(self, uid) -> str | None:
        return uid if isinstance(uid, str) and self.s.get(User, uid) is not None else None

    def permit_user(self, cti_hex: str | None) -> str | None:
        p = self.s.get(Permit, cti_hex) if cti_hex else None
        return p.user_id if p is not None else None


def _on_state(ctx: _Ctx, r) -> None:
    index, state = _at(r.body, 0), _at(r.body, 1)
    if isinstance(state, int) and not isinstance(state, bool) and 0 <= state < len(domain.STATION_STATES):
        row = ctx.slot(index)
        if row is not None:
            row.state = domain.STATION_STATES[state]
    elif isinstance(state, str):
        row = ctx.outlet(index)
        if row is not None:
            row.state = state[:16]


def _on_battery_out(ctx: _Ctx, r) -> None:
    b = r.body
    slot, bid = _int(_at(b, 0)), _hex(_at(b, 1))
    if slot is None or bid is None:
        return
    s = ctx.s
    bat = ctx.battery(bid)
    uid = _at(b, 4) if isinstance(_at(b, 4), str) else None
    cti = _hex(_at(b, 5))
    if bat.last_seen is None or r.ts >= bat.last_seen:
        bat.soc, bat.soh = _int(_at(b, 2)), _int(_at(b, 3))
        bat.cycles = _int(_at(b, 6)) or bat.cycles or 0
        bat.energy_in_mwh = _int(_at(b, 7)) or bat.energy_in_mwh or 0
        bat.temp_min_dc, bat.temp_max_dc = _int(_at(b, 8)), _int(_at(b, 9))
        bat.device_id, bat.slot, bat.renter_id, bat.last_seen = None, None, ctx.known_user(uid), r.ts
        row = ctx.slot(slot)
        if row is not None and row.battery_id == bid:
            row.battery_id = None
    if s.scalar(select(Rental).where(Rental.out_device == ctx.device_id, Rental.out_ts == r.ts, Rental.battery_id == bid)) is not None:
        return  # booked already
    # a rental closed by a return after this out was closed wrongly (this
    # station's records came late): the battery was back before r.ts
    for wrong in list(s.scalars(select(Rental).where(Rental.battery_id == bid, Rental.out_ts < r.ts, Rental.in_ts > r.ts))):
        _reopen(wrong)
    # an earlier rental of this battery still open: it came back unseen, or
    # its return is stored and waits for it (records arrive in any order)
    for stale in list(s.scalars(select(Rental).where(Rental.battery_id == bid, Rental.in_ts.is_(None), Rental.out_ts < r.ts))):
        _settle_open(ctx, stale)
    rental = Rental(
        user_id=uid or ctx.permit_user(cti),
        battery_id=bid,
        permit_cti=cti,
        out_device=ctx.device_id,
        out_slot=slot,
        out_ts=r.ts,
        out_soc=_int(_at(b, 2)),
        flagged=False,
    )
    s.add(rental)
    s.flush()
    _settle_open(ctx, rental)


def _returned(s: DB, bid: str, device_id: str, ts: int) -> bool:
    q = select(Rental.id).where(Rental.battery_id == bid, Rental.in_device == device_id, Rental.in_ts == ts)
    return s.scalar(q) is not None


def _settle_open(ctx: _Ctx, rental: Rental) -> None:
    """Close an open rental whose end is known already: a stored
    LOG_BATTERY_IN of its battery between its out and the battery's next
    out that closed no other rental; else, when the battery has left a
    station again since, at that station and time with the SoC unknown (its
    return was never logged)."""
    s = ctx.s
    next_out = _next_out(ctx, rental)
    q = _billing_records(ctx, wire.LOG_BATTERY_IN).where(LogRecord.ts >= rental.out_ts)
    if next_out is not None:
        q = q.where(LogRecord.ts <= next_out[2])
    for rec, body in _records_of(s, q, rental.battery_id):
        if not _returned(s, rental.battery_id, rec.device_id, rec.ts):
            _close_rental(ctx, rental, rec.device_id, _int(_at(body, 0)), rec.ts, _int(_at(body, 2)))
            return
    if next_out is not None:
        _close_rental(ctx, rental, *next_out, None)


def _records_of(s: DB, q, battery_id: str):
    """(record, body) of the stored records q selects that name battery_id
    (found by the battery column: only those bodies are decoded)."""
    for rec in s.scalars(q.where(LogRecord.battery == battery_id)):
        try:
            body = cbor2.loads(rec.body)
        except _CBOR_ERRORS:
            continue
        yield rec, body


def _billing_records(ctx: _Ctx, rtype: int):
    """Stored records of one type from the stations, in time order; the
    device list lets the (device, type, ts) index serve the query."""
    return (
        select(LogRecord)
        .where(LogRecord.device_id.in_(ctx.stations), LogRecord.type == rtype)
        .order_by(LogRecord.ts, LogRecord.device_id, LogRecord.epoch, LogRecord.seq)
    )


def _next_out(ctx: _Ctx, rental: Rental) -> tuple[str, int | None, int] | None:
    """(device, slot, ts) where the rental's battery next left a station
    after the rental began, from the rentals and the stored records."""
    s = ctx.s
    r = s.scalar(
        select(Rental)
        .where(Rental.battery_id == rental.battery_id, Rental.out_ts > rental.out_ts)
        .order_by(Rental.out_ts, Rental.id)
        .limit(1)
    )
    best = (r.out_device, r.out_slot, r.out_ts) if r is not None else None
    q = _billing_records(ctx, wire.LOG_BATTERY_OUT).where(LogRecord.ts > rental.out_ts)
    if best is not None:
        q = q.where(LogRecord.ts < best[2])
    for rec, body in _records_of(s, q, rental.battery_id):
        return rec.device_id, _int(_at(body, 0)), rec.ts
    return best


def _on_battery_in(ctx: _Ctx, r) -> None:
    b = r.body
    slot, bid = _int(_at(b, 0)), _hex(_at(b, 1))
    if slot is None or bid is None:
        return
    s = ctx.s
    bat = ctx.battery(bid)
    if bat.last_seen is None or r.ts >= bat.last_seen:
        bat.soc = _int(_at(b, 2))
        bat.soh = _int(_at(b, 3)) if _int(_at(b, 3)) is not None else bat.soh
        bat.device_id = ctx.device_id if ctx.dev is not None else None
        bat.slot, bat.renter_id, bat.last_seen = slot, None, r.ts
        row = ctx.slot(slot)
        if row is not None:
            row.battery_id = bid
    if _returned(s, bid, ctx.device_id, r.ts):
        return
    q = (
        select(Rental)
        .where(Rental.battery_id == bid, Rental.in_ts.is_(None), Rental.out_ts <= r.ts)
        .order_by(Rental.out_ts.desc())
        .limit(1)
    )
    rental = s.scalar(q)
    if rental is None:
        # a rental closed by a later return than this one was closed
        # wrongly (this station's records came late): this is its return,
        # and the later one is free for the rental after it
        q = (
            select(Rental)
            .where(Rental.battery_id == bid, Rental.out_ts <= r.ts, Rental.in_ts > r.ts)
            .order_by(Rental.out_ts.desc())
            .limit(1)
        )
        rental = s.scalar(q)
        if rental is None:
            return
        freed = rental.in_ts
        _reopen(rental)
        _close_rental(ctx, rental, ctx.device_id, slot, r.ts, _int(_at(b, 2)))
        for later in list(s.scalars(select(Rental).where(Rental.battery_id == bid, Rental.in_ts.is_(None), Rental.out_ts <= freed))):
            _settle_open(ctx, later)
        return
    _close_rental(ctx, rental, ctx.device_id, slot, r.ts, _int(_at(b, 2)))


def _reopen(rental: Rental) -> None:
    rental.in_device = rental.in_slot = rental.in_ts = rental.in_soc = None


def _close_rental(ctx: _Ctx, rental: Rental, device_id: str, slot: int | None, ts: int, soc: int | None) -> None:
    """Close a rental and bill it: energy taken at the tariff over the
    rental, or energy given back as points. A rental closed before (and
    reopened because a return came to light that ended it earlier) gets a
    `rental_correction` entry with the difference: the ledger is never
    rewritten."""
    rental.in_device, rental.in_slot, rental.in_ts, rental.in_soc = device_id, slot, ts, soc
    ctx.s.flush()
    uid = ctx.known_user(rental.user_id)
    p = ctx.s.get(Permit, rental.permit_cti) if rental.permit_cti else None
    if uid is None or (p is not None and p.action == "service"):
        return  # no one to bill: a battery gone without a permit, or a technician's
    pol = ctx.policy
    mwh = domain.rental_energy_mwh(rental.out_soc, soc, pol.battery_capacity_mwh)
    if mwh >= 0:
        kind, energy, amount, points = "energy_taken", mwh, -domain.energy_cost(ctx.tariffs, pol, rental.out_ts, ts, mwh), 0
    else:
        kind, energy, amount, points = "energy_given", -mwh, 0, domain.points_for(-mwh, pol)
    ref = f"rental:{rental.id}"
    booked = list(ctx.s.scalars(select(LedgerEntry).where(or_(LedgerEntry.ref == ref, LedgerEntry.ref.like(ref + ":%")))))
    if not booked:
        ledger_append(ctx.s, user_id=uid, kind=kind, energy_mwh=energy, amount=amount, points=points, ts=ts, ref=ref)
        return
    d_amount, d_points = amount - sum(e.amount for e in booked), points - sum(e.points for e in booked)
    if d_amount or d_points:
        ledger_append(ctx.s, user_id=uid, kind="rental_correction", amount=d_amount, points=d_points, ts=ts, ref=f"{ref}:fix{len(booked)}")


def _session(ctx: _Ctx, outlet: int, cti: str, start: int, sub) -> Session:
    s = ctx.s
    q = select(Session).where(Session.device_id == ctx.device_id, Session.outlet == outlet, Session.cti == cti, Session.start_ts == start)
    row = s.scalar(q)
    if row is None:
        row = Session(
            device_id=ctx.device_id, outlet=outlet, cti=cti, start_ts=start, user_id=sub if isinstance(sub, str) else ctx.permit_user(cti)
        )
        s.add(row)
        s.flush()
    return row


def _on_session_start(ctx: _Ctx, r) -> None:
    outlet, cti, start = _int(_at(r.body, 0)), _hex(_at(r.body, 1)), _int(_at(r.body, 3))
    if outlet is None or cti is None or start is None:
        return
    _session(ctx, outlet, cti, start, _at(r.body, 2))
    row = ctx.outlet(outlet)
    if row is not None and _int(_at(r.body, 4)) is not None:
        row.energy_mwh = _at(r.body, 4)


def _on_session_end(ctx: _Ctx, r) -> None:
    b = r.body
    outlet, cti, start, end = _int(_at(b, 0)), _hex(_at(b, 1)), _int(_at(b, 3)), _int(_at(b, 4))
    energy = _int(_at(b, 6))
    if outlet is None or cti is None or start is None or end is None or energy is None or energy < 0:
        return
    row = _session(ctx, outlet, cti, start, _at(b, 2))
    row.end_ts, row.duration_s, row.energy_mwh = end, _int(_at(b, 5)), energy
    row.reason = _at(b, 7)[:32] if isinstance(_at(b, 7), str) else None
    o = ctx.outlet(outlet)
    if o is not None and _int(_at(b, 8)) is not None:
        o.energy_mwh = _at(b, 8)
    uid = ctx.known_user(row.user_id)
    if uid is not None:
        cost = domain.energy_cost(ctx.tariffs, ctx.policy, start, end, energy)
        ledger_append(ctx.s, user_id=uid, kind="energy_taken", energy_mwh=energy, amount=-cost, ts=end, ref=f"session:{row.id}")


def _on_energy(ctx: _Ctx, r) -> None:
    o = ctx.outlet(_int(_at(r.body, 0)))
    if o is not None and _int(_at(r.body, 1)) is not None:
        o.energy_mwh = _at(r.body, 1)


_HANDLERS = {
    wire.LOG_STATE: _on_state,
    wire.LOG_BATTERY_OUT: _on_battery_out,
    wire.LOG_BATTERY_IN: _on_battery_in,
    wire.LOG_SESSION_START: _on_session_start,
    wire.LOG_SESSION_END: _on_session_end,
    wire.LOG_ENERGY: _on_energy,
}


def flag_overdue_rentals(s: DB, now: int, max_s: int | None = None, *, user_id: str | None = None) -> list[Rental]:
    """Flag open rentals older than max_s (default: the policy's
    max_rental_s), of one user or all; returns the ones flagged now. A
    flagged rental keeps its user from new permits (domain: overdue_rental)
    until it is closed. request_permit flags the asking user's itself; run
    it for all periodically to list the overdue ones."""
    max_s = load_policy(s).max_rental_s if max_s is None else max_s
    q = select(Rental).where(Rental.in_ts.is_(None), Rental.flagged.is_(False), Rental.out_ts < now - max_s)
    if user_id is not None:
        q = q.where(Rental.user_id == user_id)
    rows = list(s.scalars(q))
    for r in rows:
        r.flagged = True
    s.flush()
    return rows


def rentals(
    s: DB, *, user_id: str | None = None, battery_id: str | None = None, open_only: bool = False, flagged: bool | None = None
) -> list[Rental]:
    q = select(Rental).order_by(Rental.out_ts, Rental.id)
    if user_id is not None:
        q = q.where(Rental.user_id == user_id)
    if battery_id is not None:
        q = q.where(Rental.battery_id == battery_id.lower())
    if open_only:
        q = q.where(Rental.in_ts.is_(None))
    if flagged is not None:
        q = q.where(Rental.flagged.is_(flagged))
    return list(s.scalars(q))


def sessions(s: DB, *, user_id: str | None = None, device_id: str | None = None, cti: str | None = None) -> list[Session]:
    q = select(Session).order_by(Session.start_ts, Session.id)
    if user_id is not None:
        q = q.where(Session.user_id == user_id)
    if device_id is not None:
        q = q.where(Session.device_id == device_id)
    if cti is not None:
        q = q.where(Session.cti == cti.lower())
    return list(s.scalars(q))


# ---------------------------------------------------------------- readings and events


def readings(
    s: DB,
    *,
    device_id: str | None = None,
    index: int | None = None,
    battery_id: str | None = None,
    types: Sequence[int] | None = None,
    start: int | None = None,
    end: int | None = None,
    limit: int | None = 1000,
) -> list[dict]:
    """Stored log records, oldest first, filtered by device, slot/outlet
    index, battery, record types and time [start, end); bodies decoded to
    JSON form (bytes as hex)."""
    q = select(LogRecord).order_by(LogRecord.ts, LogRecord.device_id, LogRecord.epoch, LogRecord.seq)
    if device_id is not None:
        q = q.where(LogRecord.device_id == device_id)
    if types:
        q = q.where(LogRecord.type.in_(list(types)))
    if start is not None:
        q = q.where(LogRecord.ts >= start)
    if end is not None:
        q = q.where(LogRecord.ts < end)
    if index is not None:
        q = q.where(LogRecord.index == index)
    if battery_id is not None:
        q = q.where(LogRecord.battery == battery_id.lower())
    out = []
    for rec in s.scalars(q.execution_options(yield_per=500)):
        try:
            body = cbor2.loads(rec.body)
        except _CBOR_ERRORS:
            body = None
        out.append(
            {
                "device": rec.device_id,
                "epoch": rec.epoch,
                "seq": rec.seq,
                "ts": rec.ts,
                "type": rec.type,
                "type_name": domain.record_name(rec.type),
                "index": rec.index,
                "battery": rec.battery,
                "body": wire.json_form(body) if body is not None else {"hex": rec.body.hex()},
            }
        )
        if limit and len(out) >= limit:
            break
    return out


CSV_COLUMNS = ("device", "epoch", "seq", "ts", "time_utc", "type", "type_name", "index", "battery", "body")


def readings_csv(rows: Iterable[dict]) -> str:
    """readings() as CSV: one line per record, the body as compact JSON."""

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        t = datetime.fromtimestamp(r["ts"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        w.writerow(
            [
                r["device"],
                r["epoch"],
                r["seq"],
                r["ts"],
                t,
                r["type"],
                r["type_name"],
                "" if r["index"] is None else r["index"],
                r["battery"] or "",
                json.dumps(r["body"], separators=(",", ":")),
            ]
        )
    return buf.getvalue()


# ---------------------------------------------------------------- plain forms (API, CLI --json)


def device_dict(d: Device) -> dict:
    return {
        "id": d.id,
        "site": d.site_id,
        "kind": d.kind,
        "board": d.board,
        "fw_version": d.fw_version,
        "key_version": d.key_version,
        "enabled": d.enabled,
        "online": d.online,
        "last_seen": d.last_seen,
    }


def user_dict(u: User, policy: domain.Policy | None = None) -> dict:
    out = {"id": u.id, "name": u.name, "status": u.status, "balance": u.balance, "points": u.points}
    if policy is not None:
        out["points_value"] = u.points * policy.cents_per_point
    return out


def battery_dict(b: Battery) -> dict:
    return {
        "id": b.id,
        "cycles": b.cycles,
        "soh": b.soh,
        "soc": b.soc,
        "device": b.device_id,
        "slot": b.slot,
        "renter": b.renter_id,
        "energy_in_mwh": b.energy_in_mwh,
        "temp_min_dc": b.temp_min_dc,
        "temp_max_dc": b.temp_max_dc,
        "last_seen": b.last_seen,
    }


def rental_dict(r: Rental) -> dict:
    return {
        "id": r.id,
        "user": r.user_id,
        "battery": r.battery_id,
        "permit": r.permit_cti,
        "out_device": r.out_device,
        "out_slot": r.out_slot,
        "out_ts": r.out_ts,
        "out_soc": r.out_soc,
        "in_device": r.in_device,
        "in_slot": r.in_slot,
        "in_ts": r.in_ts,
        "in_soc": r.in_soc,
        "open": r.in_ts is None,
        "flagged": r.flagged,
    }


def session_dict(x: Session) -> dict:
    return {
        "id": x.id,
        "device": x.device_id,
        "outlet": x.outlet,
        "permit": x.cti,
        "user": x.user_id,
        "start_ts": x.start_ts,
        "end_ts": x.end_ts,
        "duration_s": x.duration_s,
        "energy_mwh": x.energy_mwh,
        "reason": x.reason,
    }


def permit_dict(p: Permit) -> dict:
    return {
        "cti": p.cti,
        "user": p.user_id,
        "device": p.device_id,
        "action": p.action,
        "scope": p.scope,
        "nbf": p.nbf,
        "exp": p.exp,
        "max_wh": p.max_wh,
        "single_use": p.single_use,
        "issued_at": p.issued_at,
        "key_version": p.key_version,
        "revoked_at": p.revoked_at,
    }


def entry_dict(e: LedgerEntry) -> dict:
    return {
        "seq": e.seq,
        "ts": e.ts,
        "user": e.user_id,
        "kind": e.kind,
        "energy_mwh": e.energy_mwh,
        "amount": e.amount,
        "points": e.points,
        "ref": e.ref,
        "hash": e.hash.hex(),
    }


def command_dict(c: PendingCommand) -> dict:
    return {
        "id": c.id,
        "device": c.device_id,
        "type": c.type,
        "body": c.body,
        "created": c.created,
        "done_at": c.done_at,
        "result": c.result,
    }


def slot_dict(x: Slot) -> dict:
    return {"device": x.device_id, "index": x.index, "state": x.state, "battery": x.battery_id}


def outlet_dict(x: Outlet) -> dict:
    return {"device": x.device_id, "index": x.index, "state": x.state, "energy_mwh": x.energy_mwh}
