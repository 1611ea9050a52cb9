"""What an operator reads at a glance, beyond lists: throughput by minute, blocked
contacts, the events of one contact around one of its events.

Read-only statements over an engine, each served by an index (the delivered and
open-contact ones the daemon keeps; the attempts' time and the contact index for
the console), so that they cost the same with a million rows of history as with
none. The selections and changes are worker.admin's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from worker.admin import LISTED
from worker.backends.sql import contact_key, minute_of, seconds_from_now, utcnow
from worker.schema import DELIVERED, IN_FLIGHT, PENDING, outbox_attempts, outbox_events

e = outbox_events
a = outbox_attempts
_OPEN = (PENDING, IN_FLIGHT)


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
