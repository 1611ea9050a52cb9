"""What an operator reads at a glance, beyond lists: the outbox's stats (counts,
backlog, the daemons), throughput by minute, blocked contacts, the events of one
contact around one of its events.

Read-only statements over an engine, each served by an index (the status
indexes, the due index, the delivered and open-contact ones the daemon keeps;
the attempts' time and the contact index for the console), so that they cost
the same with a million rows of history as with none. The selections and
changes are worker.admin's; the daemon's own statements are worker.store's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from worker.admin import LISTED
from worker.backends.sql import contact_key, minute_of, seconds_from_now, utcnow
from worker.schema import (
    DEAD,
    DELIVERED,
    IN_FLIGHT,
    PENDING,
    STATUS_INDEX_ORDER,
    outbox_attempts,
    outbox_daemons,
    outbox_events,
)
from worker.shared_limit import shared_state
from worker.store import BACKLOG, age_seconds

e = outbox_events
a = outbox_attempts
_OPEN = (PENDING, IN_FLIGHT)

# A daemon silent for this long (seconds) is not counted as running.
DAEMON_SILENCE = 120.0
# A bounded stats reading groups only this many of the newest dead letters by status code.
DEAD_BY_CODE_SAMPLE = 10_000


@dataclasses.dataclass(frozen=True)
class DaemonSeen:
    name: str
    seen_s_ago: float
    halted_reason: str | None
    delivered: int
    paused_until: dt.datetime | None = None  # a long pause in effect, until then
    halted_since: dt.datetime | None = None  # when the current halt began
    halted_s_ago: float | None = None  # and how long ago, by the database's clock
    # Since the daemon started (migration 0009): its transport and what its requests carried.
    transport: str | None = None
    requests: int = 0
    events_sent: int = 0
    largest_batch: int = 0
    dead: int = 0


@dataclasses.dataclass(frozen=True)
class TransportFigures:
    """The live daemons of one transport, their figures summed since each started."""

    daemons: int
    requests: int
    events_sent: int
    largest_batch: int
    delivered: int
    dead: int

    @property
    def events_per_request(self) -> float | None:
        return self.events_sent / self.requests if self.requests else None

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "events_per_request": self.events_per_request}


@dataclasses.dataclass(frozen=True)
class Stats:
    counts: dict[str, int]
    due: int
    oldest_pending_age_s: float | None
    oldest_due_age_s: float | None
    delivered_last_minute: int
    dead_by_status_code: dict[str, int]
    daemons: list[DaemonSeen]
    counts_capped_at: int | None = None  # counts above this are "at least this many"
    # The limit shared through the database (worker.shared_limit), once a daemon used it.
    rate_limit: dict[str, Any] | None = None

    @property
    def halted(self) -> list[DaemonSeen]:
        return [d for d in self.daemons if d.halted_reason]

    @property
    def transports(self) -> dict[str, TransportFigures]:
        """Per transport, by name, the live daemons' figures (a daemon from before 0009,
        which names none, is left out)."""
        by_name: dict[str, list[DaemonSeen]] = {}
        for d in self.daemons:
            if d.transport:
                by_name.setdefault(d.transport, []).append(d)
        return {
            name: TransportFigures(
                daemons=len(ds),
                requests=sum(d.requests for d in ds),
                events_sent=sum(d.events_sent for d in ds),
                largest_batch=max(d.largest_batch for d in ds),
                delivered=sum(d.delivered for d in ds),
                dead=sum(d.dead for d in ds),
            )
            for name, ds in sorted(by_name.items())
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "daemons": [
                {
                    **dataclasses.asdict(d),
                    "paused_until": _iso(d.paused_until),
                    "halted_since": _iso(d.halted_since),
                }
                for d in self.daemons
            ],
            "counts": self.counts,
            "due": self.due,
            "oldest_pending_age_s": self.oldest_pending_age_s,
            "oldest_due_age_s": self.oldest_due_age_s,
            "delivered_last_minute": self.delivered_last_minute,
            "dead_by_status_code": self.dead_by_status_code,
            "rate_limit": self.rate_limit,
            "transports": {name: f.as_dict() for name, f in self.transports.items()},
        }


def stats(engine: sa.Engine, count_limit: int | None = None) -> Stats:
    """Counts, backlog, and the daemons with their halts and pauses.

    With count_limit, a reading whose cost does not grow with the table (the
    console's overview): each status counted up to that many (`counts_capped_at`),
    dead letters by status code among the newest that many (DEAD_BY_CODE_SAMPLE at
    most), no oldest-pending age."""
    with engine.connect() as conn:
        # One count per status with a literal status: each reads its partial index
        # (three are small), where a GROUP BY reads the whole table.
        counts = {
            status: conn.execute(_status_count(status, count_limit)).scalar_one()
            for status in ("pending", "in_flight", "delivered", "dead")
        }
        now = conn.execute(sa.select(utcnow())).scalar_one()
        oldest_pending = (
            None
            if count_limit
            else conn.execute(
                sa.select(sa.func.min(e.c.created_at)).where(e.c.status == PENDING)
            ).scalar_one()
        )
        due_count, oldest_due = conn.execute(BACKLOG).one()
        recent = conn.execute(
            sa.select(sa.func.count()).where(
                e.c.status == DELIVERED, e.c.delivered_at >= seconds_from_now(-60.0)
            )
        ).scalar_one()
        dead_rows: Any = e
        if count_limit:
            dead_rows = (
                sa.select(e.c.last_status_code)
                .where(e.c.status == DEAD)
                .order_by(e.c.id.desc())
                .limit(min(count_limit, DEAD_BY_CODE_SAMPLE))
                .subquery()
            )
        dead = conn.execute(
            sa.select(dead_rows.c.last_status_code, sa.func.count())
            .where(*([] if count_limit else [e.c.status == DEAD]))
            .group_by(dead_rows.c.last_status_code)
        ).all()
        daemons = conn.execute(
            sa.select(outbox_daemons)
            .where(outbox_daemons.c.seen_at >= seconds_from_now(-DAEMON_SILENCE))
            .order_by(outbox_daemons.c.name)
        ).all()
        shared = shared_state(conn)
    return Stats(
        counts=counts,
        counts_capped_at=count_limit,
        due=due_count,
        oldest_pending_age_s=age_seconds(now, oldest_pending),
        oldest_due_age_s=age_seconds(now, oldest_due),
        delivered_last_minute=recent,
        dead_by_status_code={
            ("none" if code is None else str(code)): n for code, n in sorted(dead, key=str)
        },
        daemons=[
            DaemonSeen(
                d.name,
                age_seconds(now, d.seen_at) or 0.0,
                d.halted_reason,
                d.delivered,
                d.paused_until if d.paused_until and d.paused_until > now else None,
                d.halted_since if d.halted_reason else None,
                age_seconds(now, d.halted_since) if d.halted_reason else None,
                d.transport,
                d.requests,
                d.events_sent,
                d.largest_batch,
                d.dead,
            )
            for d in daemons
        ],
        rate_limit=shared,
    )


def _status_count(status: str, limit: int | None) -> Any:
    where = e.c.status == sa.literal_column(f"'{status}'")
    if limit is None:
        return sa.select(sa.func.count()).where(where)
    # In the partial index's order, so that the count reads that index, not the table.
    capped = (
        sa.select(e.c.id).where(where).order_by(STATUS_INDEX_ORDER[status]).limit(limit + 1)
    ).subquery()
    return sa.select(sa.func.count()).select_from(capped)


def _iso(when: dt.datetime | None) -> str | None:
    return when.isoformat() if when else None


@dataclasses.dataclass(frozen=True)
class Minute:
    start: dt.datetime  # UTC, on the minute
    delivered: int
    failed: int  # charged failed attempts (each one outbox_attempts row)


@dataclasses.dataclass(frozen=True)
class BlockedContact:
    """A contact whose oldest open event is waiting out a retry: its newer events wait too."""

    head: Any  # the oldest open event (LISTED columns)
    waiting: int  # the contact's newer open events, held behind it
    failing_since: dt.datetime | None  # its first failed attempt


@dataclasses.dataclass(frozen=True)
class Neighbours:
    before: Sequence[Any]  # older events of the same contact, oldest first
    after: Sequence[Any]  # newer ones, oldest first


def throughput(engine: sa.Engine, minutes: int = 60) -> list[Minute]:
    """Delivered events and failed attempts in each of the last `minutes` minutes, oldest first."""
    since = seconds_from_now(-60.0 * minutes)
    delivered_minute = minute_of(e.c.delivered_at)
    failed_minute = minute_of(a.c.attempted_at)
    with engine.connect() as conn:
        now = conn.execute(sa.select(utcnow())).scalar_one()
        delivered = dict(
            conn.execute(
                sa.select(delivered_minute, sa.func.count())
                .where(e.c.status == DELIVERED, e.c.delivered_at >= since)
                .group_by(delivered_minute)
            ).all()
        )
        failed = dict(
            conn.execute(
                sa.select(failed_minute, sa.func.count())
                .where(a.c.attempted_at >= since)
                .group_by(failed_minute)
            ).all()
        )
    last = now.replace(second=0, microsecond=0)
    starts = [last - dt.timedelta(minutes=n) for n in range(minutes - 1, -1, -1)]
    return [Minute(s, delivered.get(_key(s), 0), failed.get(_key(s), 0)) for s in starts]


def _key(minute: dt.datetime) -> str:
    return minute.strftime("%Y-%m-%d %H:%M")


def blocked_contacts(engine: sa.Engine, limit: int = 100) -> list[BlockedContact]:
    """Contacts whose oldest open event has failed and waits to be retried, longest first."""
    with engine.connect() as conn:
        rows = conn.execute(blocked_statement(limit)).all()
    return [BlockedContact(r, r.waiting, r.failing_since) for r in rows]


def blocked_statement(limit: int) -> sa.Select[Any]:
    """The heads of blocked contacts: every contact probe is one on the open-contact index."""
    older = e.alias("older")
    newer = e.alias("newer")
    older_open = sa.exists().where(
        contact_key(older.c.email) == contact_key(e.c.email),
        older.c.id < e.c.id,
        older.c.status.in_(_OPEN),
    )
    waiting = (
        sa.select(sa.func.count())
        .where(
            contact_key(newer.c.email) == contact_key(e.c.email),
            newer.c.id > e.c.id,
            newer.c.status.in_(_OPEN),
        )
        .scalar_subquery()
    )
    first_failure = (
        sa.select(sa.func.min(a.c.attempted_at)).where(a.c.event_id == e.c.id).scalar_subquery()
    )
    return (
        sa.select(*LISTED, waiting.label("waiting"), first_failure.label("failing_since"))
        .where(e.c.status == PENDING, e.c.attempts > 0, ~older_open)
        .order_by(e.c.id)
        .limit(limit)
    )


def neighbours(engine: sa.Engine, event: Any, shown: int = 10) -> Neighbours:
    """The events of the same contact just before and just after this one."""
    same = contact_key(e.c.email) == contact_key(sa.cast(sa.literal(event.email), sa.Text))
    with engine.connect() as conn:
        before = conn.execute(
            sa.select(*LISTED).where(same, e.c.id < event.id).order_by(e.c.id.desc()).limit(shown)
        ).all()
        after = conn.execute(
            sa.select(*LISTED).where(same, e.c.id > event.id).order_by(e.c.id).limit(shown)
        ).all()
    return Neighbours(list(reversed(before)), after)
