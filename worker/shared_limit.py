"""The rate limit shared by every daemon on one PostgreSQL database.

One row of outbox_rate_limit holds the next free send slot of the account's one
timeline. A daemon whose senders need slots takes a chunk of them in one
statement: the slots from max(next free, now, the shared pause's end), spaced
`interval` apart, and the row moves past them. The row lock orders concurrent
grants, so no two daemons ever hold the same slot and their sends together
keep the spacing, hence every window of the limit. Each daemon asks for one
chunk at a time, in turn: a fair share of what is free, and an idle daemon
asks for nothing and holds nothing.

Slots are moments, not counters: a daemon killed holding some leaves a gap of
at most one chunk (CHUNK_SECONDS) in the timeline; nothing needs to be given
back or expire. The row's clock is the database's, read as "seconds from now",
so hosts need not agree on the time. Every statement is one autocommitted
statement with no session state, so a transaction-pooling PgBouncer is fine.

A pause (a 429, a used-up x-sib-ratelimit) moves the row's pause end and
NOTIFYs the outbox channel: daemons listening hear of it at once; the others
(behind PgBouncer) at their next grant, so at most one chunk after it began.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from worker.backends.sql import utcnow
from worker.gate import Grant
from worker.policy import MAX_PAUSE
from worker.schema import outbox_rate_limit
from worker.wakeup import CHANNEL, PAUSE_NOTICE

# One account per database, so one row; the name leaves room for more.
BUCKET = "account"

_GRANT = sa.text(
    """
INSERT INTO outbox_rate_limit AS r (name, next_slot_at, rate_limit, granted, grants, updated_at)
VALUES (:bucket, clock_timestamp() + make_interval(secs => :span), :limit, :count, 1,
        clock_timestamp())
ON CONFLICT (name) DO UPDATE SET
    next_slot_at = greatest(r.next_slot_at, clock_timestamp(),
                            coalesce(r.paused_until, '-infinity'))
                   + make_interval(secs => :span),
    rate_limit = :limit,
    granted = r.granted + :count,
    grants = r.grants + 1,
    updated_at = clock_timestamp()
RETURNING extract(epoch FROM r.next_slot_at - clock_timestamp())::float8 - :span AS start_in,
          coalesce(extract(epoch FROM r.paused_until - clock_timestamp())::float8, 0)
              AS paused_for,
          r.paused_by, r.pause_reason
"""
)

_PAUSE = sa.text(
    """
WITH paused AS (
    INSERT INTO outbox_rate_limit AS r
        (name, next_slot_at, paused_until, paused_by, pause_reason, updated_at)
    VALUES (:bucket, clock_timestamp(), clock_timestamp() + make_interval(secs => :seconds),
            :by, :reason, clock_timestamp())
    ON CONFLICT (name) DO UPDATE SET
        paused_until = greatest(r.paused_until, excluded.paused_until),
        paused_by = CASE WHEN r.paused_until >= excluded.paused_until THEN r.paused_by
                         ELSE excluded.paused_by END,
        pause_reason = CASE WHEN r.paused_until >= excluded.paused_until THEN r.pause_reason
                            ELSE excluded.pause_reason END,
        updated_at = clock_timestamp()
    RETURNING r.paused_until
)
SELECT pg_notify(:channel, :notice) FROM paused
"""
)

_READ_PAUSE = sa.text(
    """
SELECT coalesce(extract(epoch FROM paused_until - clock_timestamp())::float8, 0) AS paused_for,
       paused_by, pause_reason
FROM outbox_rate_limit WHERE name = :bucket
"""
)


class SharedSlots:
    """Slots from the shared row; every method is one statement."""

    shared = True

    def __init__(self, engine: sa.Engine, name: str, bucket: str = BUCKET) -> None:
        # Autocommit: one round trip per statement, no BEGIN and COMMIT around it.
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.name = name  # this daemon, host:pid, for "paused by"
        self._bucket = bucket

    def grant(self, count: int, interval: float, limit: str = "") -> Grant:
        params = {"bucket": self._bucket, "span": count * interval, "limit": limit, "count": count}
        with self._engine.connect() as conn:
            row = conn.execute(_GRANT, params).one()
        return Grant(row.start_in, count, _bounded(row.paused_for), row.paused_by, row.pause_reason)

    def publish_pause(self, seconds: float, reason: str) -> None:
        params = {
            "bucket": self._bucket,
            "seconds": min(seconds, MAX_PAUSE),
            "by": self.name,
            "reason": reason,
            "channel": CHANNEL,
            "notice": PAUSE_NOTICE,
        }
        with self._engine.connect() as conn:
            conn.execute(_PAUSE, params)

    def read_pause(self) -> Grant:
        """The shared pause now (no slots): after a notification that one began."""
        with self._engine.connect() as conn:
            row = conn.execute(_READ_PAUSE, {"bucket": self._bucket}).one_or_none()
        if row is None:
            return Grant(0.0, 0)
        return Grant(0.0, 0, _bounded(row.paused_for), row.paused_by, row.pause_reason)


def _bounded(seconds: float | None) -> float:
    # A row written by hand, or by a daemon with another ceiling, never stops us for years.
    return min(max(0.0, seconds or 0.0), MAX_PAUSE)


def shared_state(conn: sa.Connection) -> dict[str, Any] | None:
    """The shared limit as `stats` shows it, or None before any daemon used it."""
    t = outbox_rate_limit
    row = conn.execute(sa.select(t, utcnow().label("now")).where(t.c.name == BUCKET)).first()
    if row is None:
        return None
    paused = row.paused_until is not None and row.paused_until > row.now
    return {
        "rate_limit": row.rate_limit,
        "granted": row.granted,
        "grants": row.grants,
        "paused_until": row.paused_until.isoformat() if paused else None,
        "paused_by": row.paused_by if paused else None,
        "pause_reason": row.pause_reason if paused else None,
    }
