"""The server's tables (SQLAlchemy 2). Alembic migrations in
host/voltgate/server/migrations create them; tests and `voltgate server`
upgrade the database to head before use.

Units, everywhere: times are Unix seconds (BigInteger, as the boards count),
energy is mWh (the boards' registers), money is integer minor units of the
operator's currency ("cents"), points are integers.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, JSON, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


# -- registry


class Site(Base):
    __tablename__ = "sites"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    kind: Mapped[str] = mapped_column(String(16))  # "station" | "outlet"
    board: Mapped[str] = mapped_column(String(100))  # board file name (boards/<board>.json)
    fw_version: Mapped[str | None] = mapped_column(String(32))
    key_version: Mapped[int] = mapped_column(Integer, default=1)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[int | None] = mapped_column(BigInteger)
    epoch: Mapped[int | None] = mapped_column(BigInteger)  # the boot epoch of its latest hello


class Slot(Base):
    """A station's battery slot, as last reported."""

    __tablename__ = "slots"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="unknown")
    battery_id: Mapped[str | None] = mapped_column(String(32))


class Outlet(Base):
    """An outlet board's relay, as last reported."""

    __tablename__ = "outlets"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="unknown")
    energy_mwh: Mapped[int] = mapped_column(BigInteger, default=0)  # its register, last seen


class Battery(Base):
    __tablename__ = "batteries"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # hex of the battery id
    cycles: Mapped[int] = mapped_column(Integer, default=0)
    soh: Mapped[int | None] = mapped_column(Integer)  # %
    soc: Mapped[int | None] = mapped_column(Integer)  # %, when last seen
    device_id: Mapped[str | None] = mapped_column(ForeignKey("devices.id"))  # in a station ...
    slot: Mapped[int | None] = mapped_column(Integer)
    renter_id: Mapped[str | None] = mapped_column(ForeignKey("users.id"))  # ... or rented out
    energy_in_mwh: Mapped[int] = mapped_column(BigInteger, default=0)
    temp_min_dc: Mapped[int | None] = mapped_column(Integer)
    temp_max_dc: Mapped[int | None] = mapped_column(Integer)
    last_seen: Mapped[int | None] = mapped_column(BigInteger)


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | suspended | closed
    balance: Mapped[int] = mapped_column(BigInteger, default=0)  # cents; kept equal to the ledger's sum
    points: Mapped[int] = mapped_column(BigInteger, default=0)  # kept equal to the ledger's sum


class Tariff(Base):
    """Price of energy taken, by time of day (local hours [start_hour, end_hour));
    the row with the most specific window that contains the hour applies."""

    __tablename__ = "tariffs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    start_hour: Mapped[int] = mapped_column(Integer, default=0)
    end_hour: Mapped[int] = mapped_column(Integer, default=24)
    cents_per_kwh: Mapped[int] = mapped_column(Integer)


class Setting(Base):
    """Operator settings (approval policy, points rates, fees): key -> JSON value."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[object] = mapped_column(JSON)


# -- permits and commands


class Permit(Base):
    __tablename__ = "permits"
    cti: Mapped[str] = mapped_column(String(64), primary_key=True)  # hex
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    action: Mapped[str] = mapped_column(String(16))  # rent | return | power | service
    scope: Mapped[list | None] = mapped_column(JSON)  # slot/outlet indexes, None: any
    nbf: Mapped[int] = mapped_column(BigInteger)
    exp: Mapped[int] = mapped_column(BigInteger)
    max_wh: Mapped[int | None] = mapped_column(Integer)
    single_use: Mapped[bool] = mapped_column(Boolean, default=True)
    issued_at: Mapped[int] = mapped_column(BigInteger)
    key_version: Mapped[int] = mapped_column(Integer)
    token: Mapped[bytes] = mapped_column(LargeBinary)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (Index("permits_device_window", "device_id", "nbf", "exp"), Index("permits_user", "user_id"))


class PendingCommand(Base):
    """A command queued for a board (revocations, relay off ...), sent when it
    is reachable; done_at and result once it answered."""

    __tablename__ = "pending_commands"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    type: Mapped[int] = mapped_column(Integer)  # wire.MSG_*
    body: Mapped[object] = mapped_column(JSON)  # JSON form; bytes as hex under {"hex": ...}
    created: Mapped[int] = mapped_column(BigInteger)
    done_at: Mapped[int | None] = mapped_column(BigInteger)
    result: Mapped[int | None] = mapped_column(Integer)  # wire reason code


# -- what boards reported


class LogRecord(Base):
    """A record pulled from a board's flash log, stored once."""

    __tablename__ = "log_records"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    ts: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[int] = mapped_column(Integer)
    body: Mapped[bytes] = mapped_column(LargeBinary)  # CBOR, as the board stored it
    index: Mapped[int | None] = mapped_column(Integer)  # slot/outlet the record is about, when it has one
    battery: Mapped[str | None] = mapped_column(String(64))  # battery id (hex) a station record names, when it names one

    __table_args__ = (
        Index("log_records_query", "device_id", "type", "ts"),
        Index("log_records_seq", "device_id", "seq"),
        Index("log_records_battery", "battery", "type", "ts"),
    )


class LogGap(Base):
    __tablename__ = "log_gaps"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    thinned: Mapped[int] = mapped_column(BigInteger, default=0)  # the board's count of records it dropped


class LogPosition(Base):
    """Where the pull of a board's log stands: the (seq, epoch) of the last
    record pulled from its current log (voltgate.sync.pull: position)."""

    __tablename__ = "log_positions"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    epoch: Mapped[int] = mapped_column(BigInteger)


class Rental(Base):
    """A battery out of a station (BatteryOut) until it is back in any station (BatteryIn)."""

    __tablename__ = "rentals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str | None] = mapped_column(String(64))
    battery_id: Mapped[str] = mapped_column(String(32))
    permit_cti: Mapped[str | None] = mapped_column(String(64))
    out_device: Mapped[str] = mapped_column(String(64))
    out_slot: Mapped[int] = mapped_column(Integer)
    out_ts: Mapped[int] = mapped_column(BigInteger)
    out_soc: Mapped[int | None] = mapped_column(Integer)
    in_device: Mapped[str | None] = mapped_column(String(64))
    in_slot: Mapped[int | None] = mapped_column(Integer)
    in_ts: Mapped[int | None] = mapped_column(BigInteger)
    in_soc: Mapped[int | None] = mapped_column(Integer)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)  # open longer than the policy allows

    __table_args__ = (UniqueConstraint("out_device", "out_ts", "battery_id", name="rentals_once"), Index("rentals_battery", "battery_id"))


class Session(Base):
    """An outlet session, from LOG_SESSION_START / LOG_SESSION_END."""

    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    outlet: Mapped[int] = mapped_column(Integer)
    cti: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(String(64))
    start_ts: Mapped[int] = mapped_column(BigInteger)
    end_ts: Mapped[int | None] = mapped_column(BigInteger)
    duration_s: Mapped[int | None] = mapped_column(BigInteger)
    energy_mwh: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (UniqueConstraint("device_id", "outlet", "cti", "start_ts", name="sessions_once"),)


class LedgerEntry(Base):
    """Append-only, hash-chained: hash = SHA-256(prev_hash || canonical
    encoding of the entry's fields). Every money, point and energy movement
    tied to a user is one entry; balances and points are sums of entries."""

    __tablename__ = "ledger"
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # 1, 2, ... without gaps
    ts: Mapped[int] = mapped_column(BigInteger)
    user_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))  # energy_taken | energy_given | fee | points_redeemed | payment | ...
    energy_mwh: Mapped[int] = mapped_column(BigInteger, default=0)
    amount: Mapped[int] = mapped_column(BigInteger, default=0)  # cents: + credit to the user, - charge
    points: Mapped[int] = mapped_column(BigInteger, default=0)  # + earned, - spent
    ref: Mapped[str] = mapped_column(String(128), default="")  # what caused it, e.g. "session:12"
    prev_hash: Mapped[bytes] = mapped_column(LargeBinary)
    hash: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (UniqueConstraint("kind", "ref", name="ledger_once"),)
