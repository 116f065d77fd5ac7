"""log_records.battery: the battery id a station record names, stored at ingest.

Booking a rental looks up the battery's later returns and departures among
the stations' records; with the id only inside the CBOR body, every such
lookup fetched and decoded all battery records after the rental's start
(work that grew with the square of a late pull). Existing rows are filled
in from their bodies.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import cbor2
import sqlalchemy as sa
from alembic import op

from voltgate import wire
from voltgate.server import domain

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("log_records") as b:
        b.add_column(sa.Column("battery", sa.String(64), nullable=True))
    op.create_index("log_records_battery", "log_records", ["battery", "type", "ts"])
    t = sa.table("log_records", sa.column("device_id"), sa.column("epoch"), sa.column("seq"), sa.column("type"), sa.column("body"), sa.column("battery"))
    conn = op.get_bind()
    rows = conn.execute(sa.select(t.c.device_id, t.c.epoch, t.c.seq, t.c.type, t.c.body).where(t.c.type.in_([wire.LOG_BATTERY_OUT, wire.LOG_BATTERY_IN, wire.LOG_ALARM]))).all()
    for device_id, epoch, seq, rtype, body in rows:
        try:
            bid = domain.record_battery(rtype, cbor2.loads(body))
        except (ValueError, TypeError, EOFError):  # a body that is not CBOR names no battery
            bid = None
        if bid is not None:
            conn.execute(t.update().where(t.c.device_id == device_id, t.c.epoch == epoch, t.c.seq == seq).values(battery=bid))


def downgrade() -> None:
    op.drop_index("log_records_battery", table_name="log_records")
    with op.batch_alter_table("log_records") as b:
        b.drop_column("battery")
