"""What an operator does to events: find them, look at one, cancel, requeue, purge.

Every selection is one EventFilter, turned into one WHERE clause, so that the
command line and a web console pick the same rows for the same filters. Lists
are keyset-paginated by id, newest first: a page costs the same on the first
and the thousandth, and a filter by email or event name reads only the matching
rows (the contact and event indexes). The daemon's own statements stay in
worker.store, and the operator's readings (stats, reports) are worker.admin_reports'.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from worker import v3event
from worker.backends import backend_for
from worker.backends.sql import UTCDateTime, contact_key, seconds_from_now, utcnow
from worker.event import MAX_BODY_BYTES, InvalidEvent, from_stored
from worker.schema import outbox_attempts, outbox_events
from worker.store import finished_before

e = outbox_events
STATUSES = ("pending", "in_flight", "delivered", "dead")
CANCELLED = "cancelled by operator"
# The timestamps that --since/--until may compare: when a row was written, or when it died.
DATED_BY = ("created_at", "failed_at")
Moment = dt.datetime | dt.timedelta  # a timedelta is that long ago, by the database's clock

# What a list shows of each row; `events show` reads every column.
LISTED = (
    e.c.id,
    e.c.created_at,
    e.c.email,
    e.c.event,
    e.c.status,
    e.c.attempts,
    e.c.next_attempt_at,
    e.c.delivered_at,
    e.c.failed_at,
    e.c.last_status_code,
    e.c.last_error,
    e.c.idempotency_key,
    e.c.properties,
    e.c.eventdata,
)


class InvalidSelection(ValueError):
    """A filter or selection that cannot be used; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class EventFilter:
    """Which events: every criterion given must hold (none given: every event)."""

    status: str | None = None
    event: str | None = None
    email: str | None = None  # the contact: compared as the daemon compares contacts
    since: Moment | None = None  # at or after
    until: Moment | None = None  # before
    status_code: int | None = None  # the last answer's HTTP status
    error_contains: str | None = None  # in last_error, ignoring ASCII case
    ids: tuple[int, ...] = ()
    dated_by: str = "created_at"  # the timestamp since/until compare

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise InvalidSelection(f"status must be one of {', '.join(STATUSES)}")
        if self.dated_by not in DATED_BY:
            raise InvalidSelection(f"dated_by must be one of {', '.join(DATED_BY)}")
        object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))

    @property
    def has_filters(self) -> bool:
        """A criterion besides ids."""
        return dataclasses.replace(self, ids=()) != EventFilter(dated_by=self.dated_by)

    @property
    def is_empty(self) -> bool:
        """No criterion at all: the filter selects every event."""
        return not self.ids and not self.has_filters

    def where(self) -> sa.ColumnElement[bool]:
        conditions: list[sa.ColumnElement[bool]] = []
        if self.ids:
            conditions.append(e.c.id.in_(self.ids))
        if self.status is not None:
            conditions.append(e.c.status == self.status)
        if self.event is not None:
            conditions.append(e.c.event == self.event)
        if self.email is not None:
            conditions.append(contact_key(e.c.email) == contact_key(_text(self.email)))
        dated = e.c[self.dated_by]
        if self.since is not None:
            conditions.append(dated >= _moment(self.since))
        if self.until is not None:
            conditions.append(dated < _moment(self.until))
        if self.status_code is not None:
            conditions.append(e.c.last_status_code == self.status_code)
        if self.error_contains is not None:
            pattern = contact_key(_text(f"%{_escape_like(self.error_contains)}%"))
            conditions.append(contact_key(e.c.last_error).like(pattern, escape="/"))
        return sa.and_(sa.true(), *conditions)


def _text(value: str) -> Any:
    # Typed, so that PostgreSQL knows what the parameter is before COLLATE applies.
    return sa.cast(sa.literal(value), sa.Text)


def _moment(value: Moment) -> Any:
    if isinstance(value, dt.timedelta):
        return seconds_from_now(-value.total_seconds())
    return sa.literal(value, UTCDateTime())


def _escape_like(text: str) -> str:
    return text.replace("/", "//").replace("%", "/%").replace("_", "/_")


@dataclasses.dataclass(frozen=True)
class Page:
    rows: Sequence[Any]
    next_before_id: int | None  # where the next page starts, or None on the last


@dataclasses.dataclass(frozen=True)
class Selected:
    """What a change would touch: how many rows, the newest ids, the highest id."""

    count: int
    newest_ids: list[int]
    max_id: int | None


@dataclasses.dataclass(frozen=True)
class Change:
    """What a change did (or, dry, would do), and why each id asked for was left alone."""

    count: int
    ids: list[int]  # every id changed when ids were given, else the newest few
    missed: dict[int, str]
    skipped_in_flight: int = 0  # cancel: rows a daemon is sending now


@dataclasses.dataclass(frozen=True)
class EventDetail:
    row: Any
    body: str | None  # exactly what is sent, or None when the row cannot be sent
    body_error: str | None
    attempts: Sequence[Any]
    transport: str  # whose body it is: a v3 batch's is this event's element of its list


class OutboxAdmin:
    """The operator's statements over an engine."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def list_events(
        self, selection: EventFilter, limit: int = 50, before_id: int | None = None
    ) -> Page:
        where = selection.where()
        if before_id is not None:
            where = sa.and_(where, e.c.id < before_id)
        statement = sa.select(*LISTED).where(where).order_by(e.c.id.desc()).limit(limit + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(statement).all()
        more = len(rows) > limit
        return Page(rows[:limit], rows[limit - 1].id if more else None)

    def show(
        self,
        event_id: int,
        transport: str = v3event.DEFAULT_TRANSPORT,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> EventDetail | None:
        """The row, the body `transport` sends for it (or why it cannot), every attempt."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    e,
                    sa.cast(e.c.properties, sa.Text).label("properties_json"),
                    sa.cast(e.c.eventdata, sa.Text).label("eventdata_json"),
                ).where(e.c.id == event_id)
            ).first()
            if row is None:
                return None
            attempts = conn.execute(
                sa.select(outbox_attempts)
                .where(outbox_attempts.c.event_id == event_id)
                .order_by(outbox_attempts.c.attempt, outbox_attempts.c.id)
            ).all()
        # The daemon builds the body the same way, from the same stored text.
        try:
            checked = from_stored(
                row.email,
                row.event,
                row.properties_json,
                row.eventdata_json,
                max_body_bytes=max_body_bytes,
            )
        except InvalidEvent as exc:
            return EventDetail(row, None, str(exc), attempts, transport)
        try:
            v3event.check(checked, transport)
        except InvalidEvent as exc:
            reason = f"invalid event for --transport {transport}: {exc}"
            return EventDetail(row, None, reason, attempts, transport)
        body = v3event.encoded(checked, transport, row.created_at)
        return EventDetail(row, body.decode("utf-8"), None, attempts, transport)

    def select(self, where: sa.ColumnElement[bool], shown: int = 10) -> Selected:
        with self.engine.connect() as conn:
            count, max_id = conn.execute(
                sa.select(sa.func.count(), sa.func.max(e.c.id)).where(where)
            ).one()
            newest = conn.execute(
                sa.select(e.c.id).where(where).order_by(e.c.id.desc()).limit(shown)
            ).scalars()
            return Selected(count, list(newest), max_id)

    def count(self, where: sa.ColumnElement[bool], limit: int) -> int:
        """How many rows match, counting no further than limit + 1: a list page's
        figure costs the same on ten million rows as on a thousand."""
        capped = sa.select(e.c.id).where(where).limit(limit + 1).subquery()
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(capped)).scalar_one()

    # -- changes -------------------------------------------------------------

    def dead(self, selection: EventFilter, everything: bool = False) -> sa.ColumnElement[bool]:
        """The dead rows a requeue or purge of this selection touches."""
        _require(selection, everything)
        return sa.and_(e.c.status == "dead", selection.where())

    def cancellable(
        self, selection: EventFilter, everything: bool = False
    ) -> sa.ColumnElement[bool]:
        """Pending rows, retrying or not: in_flight ones belong to a daemon right now."""
        _require(selection, everything)
        return sa.and_(e.c.status == "pending", selection.where())

    def requeue(
        self,
        selection: EventFilter,
        everything: bool = False,
        dry_run: bool = False,
        up_to_id: int | None = None,
    ) -> Change:
        """Dead rows back to pending with a fresh budget, due now; with up_to_id, none
        newer than what the operator was shown."""
        where = _up_to(self.dead(selection, everything), up_to_id)
        statement = (
            sa.update(e)
            .where(where)
            .values(status="pending", attempts=0, next_attempt_at=utcnow(), failed_at=None)
        )
        return self._change(statement, where, selection, "dead", dry_run, wake=True)

    def purge(
        self,
        selection: EventFilter,
        everything: bool = False,
        dry_run: bool = False,
        up_to_id: int | None = None,
    ) -> Change:
        """Delete dead rows (their attempt history goes with them); with up_to_id, none
        newer than what the operator was shown."""
        where = _up_to(self.dead(selection, everything), up_to_id)
        return self._change(sa.delete(e).where(where), where, selection, "dead", dry_run)

    def cancel(
        self,
        selection: EventFilter,
        everything: bool = False,
        dry_run: bool = False,
        reason: str | None = None,
        up_to_id: int | None = None,
    ) -> Change:
        """Pending rows to dead, never sent; they stay visible and can be requeued."""
        where = _up_to(self.cancellable(selection, everything), up_to_id)
        statement = (
            sa.update(e)
            .where(where)
            .values(
                status="dead",
                failed_at=utcnow(),
                last_status_code=None,
                last_error=f"{CANCELLED}: {reason}" if reason else CANCELLED,
            )
        )
        # Cancelling the oldest open event of a contact lets its newer ones go.
        change = self._change(statement, where, selection, "pending", dry_run, wake=True)
        if selection.ids:  # each in-flight id is among the missed, with its reason
            return change
        with self.engine.connect() as conn:
            in_flight = conn.execute(
                sa.select(sa.func.count()).where(e.c.status == "in_flight", selection.where())
            ).scalar_one()
        return dataclasses.replace(change, skipped_in_flight=in_flight)

    def prunable(self, older_than: dt.timedelta | dt.datetime, include_dead: bool) -> Selected:
        return self.select(finished_before(older_than, include_dead))

    def _change(
        self,
        statement: Any,
        where: sa.ColumnElement[bool],
        selection: EventFilter,
        wanted: str,
        dry_run: bool,
        wake: bool = False,
    ) -> Change:
        if dry_run:
            if selection.ids:
                with self.engine.connect() as conn:
                    ids = sorted(conn.execute(sa.select(e.c.id).where(where)).scalars())
                return Change(len(ids), ids, self._missed(selection.ids, ids, wanted))
            selected = self.select(where)
            return Change(selected.count, selected.newest_ids, {})
        with self.engine.begin() as conn:
            if selection.ids:
                ids = sorted(conn.execute(statement.returning(e.c.id)).scalars())
                count = len(ids)
            else:
                ids, count = [], conn.execute(statement).rowcount
            if wake and count:
                backend_for(conn).notify(conn)
        return Change(count, ids, self._missed(selection.ids, ids, wanted))

    def _missed(self, asked: Sequence[int], changed: Sequence[int], wanted: str) -> dict[int, str]:
        """Why each id asked for was not changed: it does not exist, or is not `wanted`."""
        left = sorted(set(asked) - set(changed))
        if not left:
            return {}
        with self.engine.connect() as conn:
            found = dict(conn.execute(sa.select(e.c.id, e.c.status).where(e.c.id.in_(left))).all())
        return {id_: _why_not(found.get(id_), wanted) for id_ in left}


def _why_not(status: str | None, wanted: str) -> str:
    if status is None:
        return "no such event"
    if status == "in_flight":
        return "in flight: a daemon is sending it now"
    if status == wanted:
        return "does not match the other filters"
    return f"{status}, not {wanted}"


def _up_to(where: sa.ColumnElement[bool], up_to_id: int | None) -> sa.ColumnElement[bool]:
    return where if up_to_id is None else sa.and_(where, e.c.id <= up_to_id)


def _require(selection: EventFilter, everything: bool) -> None:
    if selection.is_empty and not everything:
        raise InvalidSelection("name the events: ids, filters, or everything")
    if everything and not selection.is_empty:
        raise InvalidSelection("everything means every event: give no ids or filters with it")
