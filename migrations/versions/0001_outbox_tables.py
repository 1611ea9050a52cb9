"""The outbox: events, attempts, the dead-letter view and the wake-up trigger.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from worker.backends.sql import utcnow

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
_TS = sa.DateTime(timezone=True)

_PENDING = "status = 'pending'"
_OPEN = "status IN ('pending', 'in_flight')"
_IN_FLIGHT = "status = 'in_flight'"
_DELIVERED = "status = 'delivered'"
_DEAD = "status = 'dead'"

# Statement-level: one notification per inserting statement, however many rows,
# and plain-SQL inserts from any program wake the daemons too.
_NOTIFY_FUNCTION = """
CREATE FUNCTION outbox_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_events', '');
    RETURN NULL;
END;
$$
"""
_NOTIFY_TRIGGER = """
CREATE TRIGGER outbox_events_notify AFTER INSERT ON outbox_events
FOR EACH STATEMENT EXECUTE FUNCTION outbox_events_notify()
"""
# A queue table is rewritten all day: vacuum it often and in small steps so that
# dead tuples do not pile up, and leave room on each page for the status updates.
_STORAGE = """
ALTER TABLE outbox_events SET (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
)
"""


def upgrade() -> None:
    op.create_table(
        "outbox_events",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("created_at", _TS, nullable=False, server_default=utcnow()),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("properties", _JSON, nullable=True),
        sa.Column("eventdata", _JSON, nullable=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", _TS, nullable=False, server_default=utcnow()),
        sa.Column("delivered_at", _TS, nullable=True),
        sa.Column("failed_at", _TS, nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("lease_token", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", _TS, nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'in_flight', 'delivered', 'dead')",
            name="ck_outbox_events_status",
        ),
        sa.UniqueConstraint("idempotency_key", name="uq_outbox_events_idempotency_key"),
    )
    op.create_index(
        "ix_outbox_events_due",
        "outbox_events",
        ["next_attempt_at", "id"],
        postgresql_where=sa.text(_PENDING),
        sqlite_where=sa.text(_PENDING),
    )
    op.create_index(
        "ix_outbox_events_open_contact",
        "outbox_events",
        [sa.text("lower(email)"), "id"],
        postgresql_where=sa.text(_OPEN),
        sqlite_where=sa.text(_OPEN),
    )
    op.create_index(
        "ix_outbox_events_lease",
        "outbox_events",
        ["lease_expires_at"],
        postgresql_where=sa.text(_IN_FLIGHT),
        sqlite_where=sa.text(_IN_FLIGHT),
    )
    op.create_index(
        "ix_outbox_events_delivered",
        "outbox_events",
        ["delivered_at"],
        postgresql_where=sa.text(_DELIVERED),
        sqlite_where=sa.text(_DELIVERED),
    )
    op.create_index(
        "ix_outbox_events_dead",
        "outbox_events",
        ["id"],
        postgresql_where=sa.text(_DEAD),
        sqlite_where=sa.text(_DEAD),
    )
    op.create_table(
        "outbox_attempts",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column(
            "event_id",
            _ID,
            sa.ForeignKey(
                "outbox_events.id", ondelete="CASCADE", name="fk_outbox_attempts_event_id"
            ),
            nullable=False,
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("attempted_at", _TS, nullable=False, server_default=utcnow()),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
    )
    op.create_index("ix_outbox_attempts_event_id", "outbox_attempts", ["event_id"])
    op.execute(
        "CREATE VIEW outbox_dead_letters AS"
        " SELECT id, email, event, properties, eventdata, attempts,"
        " last_status_code, last_error, created_at, failed_at"
        " FROM outbox_events WHERE status = 'dead'"
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_NOTIFY_FUNCTION)
        op.execute(_NOTIFY_TRIGGER)
        op.execute(_STORAGE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS outbox_events_notify ON outbox_events")
        op.execute("DROP FUNCTION IF EXISTS outbox_events_notify()")
    op.execute("DROP VIEW IF EXISTS outbox_dead_letters")
    op.drop_table("outbox_attempts")
    op.drop_table("outbox_events")
