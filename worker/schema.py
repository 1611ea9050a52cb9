"""The outbox tables, states and indexes as SQLAlchemy metadata.

The migrations under migrations/ are written from this and a test checks the
migrated database against it, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from worker.backends.sql import UTCDateTime, contact_key, utcnow

# Literal status values (not bound parameters), so that PostgreSQL's planner
# matches the partial indexes' predicates on every plan, generic ones included.
PENDING: sa.ColumnClause[str] = sa.literal_column("'pending'")
IN_FLIGHT: sa.ColumnClause[str] = sa.literal_column("'in_flight'")
DELIVERED: sa.ColumnClause[str] = sa.literal_column("'delivered'")
DEAD: sa.ColumnClause[str] = sa.literal_column("'dead'")

_JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

outbox_events = sa.Table(
    "outbox_events",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("created_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    sa.Column("email", sa.Text(), nullable=False),
    sa.Column("event", sa.Text(), nullable=False),
    sa.Column("properties", _JSON, nullable=True),
    sa.Column("eventdata", _JSON, nullable=True),
    sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    sa.Column("delivered_at", UTCDateTime(), nullable=True),
    sa.Column("failed_at", UTCDateTime(), nullable=True),
    sa.Column("last_status_code", sa.Integer(), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.Column("idempotency_key", sa.Text(), nullable=True),
    # Who holds an in_flight row ("host:pid:claim") and until when.
    sa.Column("lease_token", sa.String(128), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
    # The W3C trace context of the span that enqueued the event, when OpenTelemetry
    # was active there: the daemon's delivery spans join that trace.
    sa.Column("traceparent", sa.Text(), nullable=True),
    sa.Column("tracestate", sa.Text(), nullable=True),
    sa.CheckConstraint(
        "status IN ('pending', 'in_flight', 'delivered', 'dead')",
        name="ck_outbox_events_status",
    ),
    sa.UniqueConstraint("idempotency_key", name="uq_outbox_events_idempotency_key"),
    # An id is never given twice, even after the newest rows are pruned or purged.
    sqlite_autoincrement=True,
)

_open = "status IN ('pending', 'in_flight')"
_pending = "status = 'pending'"
_in_flight = "status = 'in_flight'"
_delivered = "status = 'delivered'"
_dead = "status = 'dead'"

# Claiming reads only pending rows, in due order: the index holds no history, so
# its cost does not grow with the delivered rows kept in the table.
sa.Index(
    "ix_outbox_events_due",
    outbox_events.c.next_attempt_at,
    outbox_events.c.id,
    postgresql_where=sa.text(_pending),
    sqlite_where=sa.text(_pending),
)
# Per-contact order: "is an older event of this contact still open?" is one probe.
sa.Index(
    "ix_outbox_events_open_contact",
    contact_key(outbox_events.c.email),
    outbox_events.c.id,
    postgresql_where=sa.text(_open),
    sqlite_where=sa.text(_open),
)
# Lease rescue finds expired claims without reading history.
sa.Index(
    "ix_outbox_events_lease",
    outbox_events.c.lease_expires_at,
    postgresql_where=sa.text(_in_flight),
    sqlite_where=sa.text(_in_flight),
)
# Pruning and recent throughput read delivered history by time. Partial, so
# that no planner prefers it to the due index for claiming (SQLite did).
sa.Index(
    "ix_outbox_events_delivered",
    outbox_events.c.delivered_at,
    postgresql_where=sa.text(_delivered),
    sqlite_where=sa.text(_delivered),
)
# The dead-letter view, newest first, without reading history.
sa.Index(
    "ix_outbox_events_dead",
    outbox_events.c.id,
    postgresql_where=sa.text(_dead),
    sqlite_where=sa.text(_dead),
)
# The console's searches, newest first whatever the history's size: one contact's
# events (by the contact key, as the daemon compares contacts) and one event name's.
# Both take an entry for every row written or changed (migration 0008).
sa.Index("ix_outbox_events_contact", contact_key(outbox_events.c.email), outbox_events.c.id)
sa.Index("ix_outbox_events_event", outbox_events.c.event, outbox_events.c.id)

# The column each status's partial index above is ordered by: a statement over
# one status that orders by it reads that index. SQLite's planner otherwise
# scans the table for the status most rows have (the console's capped counts).
STATUS_INDEX_ORDER: dict[str, sa.Column[Any]] = {
    "pending": outbox_events.c.next_attempt_at,
    "in_flight": outbox_events.c.lease_expires_at,
    "delivered": outbox_events.c.delivered_at,
    "dead": outbox_events.c.id,
}

outbox_attempts = sa.Table(
    "outbox_attempts",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column(
        "event_id",
        _ID,
        sa.ForeignKey("outbox_events.id", ondelete="CASCADE", name="fk_outbox_attempts_event_id"),
        nullable=False,
    ),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("attempted_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    sa.Column("status_code", sa.Integer(), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("duration_ms", sa.Integer(), nullable=True),
    # The transport the attempt went by (NULL for attempts written before 0009).
    sa.Column("transport", sa.String(20), nullable=True),
    sqlite_autoincrement=True,
)
sa.Index("ix_outbox_attempts_event_id", outbox_attempts.c.event_id)
# Failed attempts per minute over the last hour (the console) without reading them all.
sa.Index("ix_outbox_attempts_attempted_at", outbox_attempts.c.attempted_at)

# One row per running daemon, written by its maintenance thread: which daemons
# are alive, and whether one has halted delivery (for `stats` and operators).
outbox_daemons = sa.Table(
    "outbox_daemons",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),  # host:pid
    sa.Column("started_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    sa.Column("seen_at", UTCDateTime(), nullable=False, server_default=utcnow()),
    sa.Column("halted_reason", sa.Text(), nullable=True),
    sa.Column("delivered", sa.BigInteger(), nullable=False, server_default="0"),
    # The end of a long pause the endpoint asked for (a 429, a used-up rate limit).
    sa.Column("paused_until", UTCDateTime(), nullable=True),
    # When the current halt began (by the database's clock), NULL while delivering.
    sa.Column("halted_since", UTCDateTime(), nullable=True),
    # What the daemon's requests carried since it started, by its transport (0009):
    # `stats` sums them per transport. Cumulative, like `delivered`.
    sa.Column("transport", sa.String(20), nullable=True),
    sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("events_sent", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("largest_batch", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("dead", sa.BigInteger(), nullable=False, server_default="0"),  # dead-lettered
)
# The account's rate limit, shared by every daemon on PostgreSQL (worker.shared_limit):
# one row, the next free send slot on one timeline for all of them, and the pause
# an answer asked for. Chunks of slots are granted in one statement each. UNLOGGED
# on PostgreSQL (migration 0005): nothing in it outlives a crash's worth of seconds.
outbox_rate_limit = sa.Table(
    "outbox_rate_limit",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("next_slot_at", UTCDateTime(), nullable=False),
    sa.Column("paused_until", UTCDateTime(), nullable=True),
    sa.Column("paused_by", sa.String(200), nullable=True),  # host:pid of the daemon answered
    sa.Column("pause_reason", sa.Text(), nullable=True),
    sa.Column("rate_limit", sa.Text(), nullable=True),  # as the last daemon granted wrote it
    sa.Column("granted", sa.BigInteger(), nullable=False, server_default="0"),  # slots
    sa.Column("grants", sa.BigInteger(), nullable=False, server_default="0"),  # statements
    sa.Column("updated_at", UTCDateTime(), nullable=False, server_default=utcnow()),
)
