"""The initial schema: every table of voltgate.server.models as of issue 6.

Revision ID: 0001
Revises:
Create Date: 2026-05-20
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # -- registry
    op.create_table(
        "sites",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("site_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("board", sa.String(100), nullable=False),
        sa.Column("fw_version", sa.String(32), nullable=True),
        sa.Column("key_version", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "slots",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("battery_id", sa.String(32), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("device_id", "index"),
    )
    op.create_table(
        "outlets",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("energy_mwh", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("device_id", "index"),
    )
    op.create_table(
        "batteries",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("cycles", sa.Integer(), nullable=False),
        sa.Column("soh", sa.Integer(), nullable=True),
        sa.Column("soc", sa.Integer(), nullable=True),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("slot", sa.Integer(), nullable=True),
        sa.Column("renter_id", sa.String(64), nullable=True),
        sa.Column("energy_in_mwh", sa.BigInteger(), nullable=False),
        sa.Column("temp_min_dc", sa.Integer(), nullable=True),
        sa.Column("temp_max_dc", sa.Integer(), nullable=True),
        sa.Column("last_seen", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.ForeignKeyConstraint(["renter_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "tariffs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("start_hour", sa.Integer(), nullable=False),
        sa.Column("end_hour", sa.Integer(), nullable=False),
        sa.Column("cents_per_kwh", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )

    # -- permits and commands
    op.create_table(
        "permits",
        sa.Column("cti", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("scope", sa.JSON(), nullable=True),
        sa.Column("nbf", sa.BigInteger(), nullable=False),
        sa.Column("exp", sa.BigInteger(), nullable=False),
        sa.Column("max_wh", sa.Integer(), nullable=True),
        sa.Column("single_use", sa.Boolean(), nullable=False),
        sa.Column("issued_at", sa.BigInteger(), nullable=False),
        sa.Column("key_version", sa.Integer(), nullable=False),
        sa.Column("token", sa.LargeBinary(), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("cti"),
    )
    op.create_index("permits_device_window", "permits", ["device_id", "nbf", "exp"])
    op.create_index("permits_user", "permits", ["user_id"])
    op.create_table(
        "pending_commands",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("type", sa.Integer(), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("done_at", sa.BigInteger(), nullable=True),
        sa.Column("result", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("id"),
    )

    # -- what boards reported
    op.create_table(
        "log_records",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.Integer(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("device_id", "epoch", "seq"),
    )
    op.create_index("log_records_query", "log_records", ["device_id", "type", "ts"])
    op.create_index("log_records_seq", "log_records", ["device_id", "seq"])
    op.create_table(
        "log_gaps",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("thinned", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "first_seq"),
    )
    op.create_table(
        "log_positions",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_table(
        "rentals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(64), nullable=True),
        sa.Column("battery_id", sa.String(32), nullable=False),
        sa.Column("permit_cti", sa.String(64), nullable=True),
        sa.Column("out_device", sa.String(64), nullable=False),
        sa.Column("out_slot", sa.Integer(), nullable=False),
        sa.Column("out_ts", sa.BigInteger(), nullable=False),
        sa.Column("out_soc", sa.Integer(), nullable=True),
        sa.Column("in_device", sa.String(64), nullable=True),
        sa.Column("in_slot", sa.Integer(), nullable=True),
        sa.Column("in_ts", sa.BigInteger(), nullable=True),
        sa.Column("in_soc", sa.Integer(), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("out_device", "out_ts", "battery_id", name="rentals_once"),
    )
    op.create_index("rentals_battery", "rentals", ["battery_id"])
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("outlet", sa.Integer(), nullable=False),
        sa.Column("cti", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=True),
        sa.Column("start_ts", sa.BigInteger(), nullable=False),
        sa.Column("end_ts", sa.BigInteger(), nullable=True),
        sa.Column("duration_s", sa.BigInteger(), nullable=True),
        sa.Column("energy_mwh", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "outlet", "cti", "start_ts", name="sessions_once"),
    )
    op.create_table(
        "ledger",
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("energy_mwh", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("ref", sa.String(128), nullable=False),
        sa.Column("prev_hash", sa.LargeBinary(), nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("kind", "ref", name="ledger_once"),
    )


def downgrade() -> None:
    for index, table in (
        ("rentals_battery", "rentals"),
        ("log_records_seq", "log_records"),
        ("log_records_query", "log_records"),
        ("permits_user", "permits"),
        ("permits_device_window", "permits"),
    ):
        op.drop_index(index, table_name=table)
    for table in (
        "ledger",
        "sessions",
        "rentals",
        "log_positions",
        "log_gaps",
        "log_records",
        "pending_commands",
        "permits",
        "settings",
        "tariffs",
        "batteries",
        "outlets",
        "slots",
        "devices",
        "users",
        "sites",
    ):
        op.drop_table(table)
