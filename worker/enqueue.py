"""track_event and track_events: validate, then one INSERT in the caller's transaction."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session

from worker import v3event
from worker.backends import all_backends, backend_for
from worker.backends.sql import UTCDateTime, seconds_from_now
from worker.event import MAX_BODY_BYTES, InvalidEvent, validate
from worker.schema import outbox_events
from worker.tracecontext import current_context
from worker.when import InvalidTime, parse_when

# Also text or a number of seconds: "2031-05-06T14:30:00Z", "10m", 90 (see worker.when).
DeliverAfter = dt.datetime | dt.timedelta | str | float | None


def track_event(
    session: Session | sa.Connection,
    *,
    email: str,
    event: str,
    properties: Mapping[str, Any] | None = None,
    eventdata: Mapping[str, Any] | None = None,
    deliver_after: DeliverAfter = None,
    idempotency_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    transport: str = "tracker",
) -> int:
    """Record one event in the caller's open transaction and return its outbox id.

    Nothing is committed or flushed: the event exists if and only if the
    caller's transaction commits. A repeated idempotency_key inserts nothing
    and returns the id of the row that has it. `transport` ("v3", "v3-batch"):
    also check the rules of the transport the daemon runs with, so an event it
    could not carry is refused here rather than dead-lettered there.
    """
    row = prepare_row(
        {
            "email": email,
            "event": event,
            "properties": properties,
            "eventdata": eventdata,
            "deliver_after": deliver_after,
            "idempotency_key": idempotency_key,
        },
        max_body_bytes,
        transport,
    )
    return insert_rows(_connection(session), [row])[0]


def track_events(
    session: Session | sa.Connection,
    events: Iterable[Mapping[str, Any]],
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    transport: str = "tracker",
) -> list[int]:
    """Record many events in multi-row INSERTs; return their ids in the order given.

    Every event is validated before any SQL is sent: one invalid event raises
    InvalidEvent (naming its position) and nothing is written.
    """
    rows = []
    for index, spec in enumerate(events):
        try:
            rows.append(prepare_row(spec, max_body_bytes, transport))
        except InvalidEvent as exc:
            raise InvalidEvent(exc.field, f"{exc.rule} (event #{index})") from None
    connection = _connection(session)  # a wrong argument fails even with no events
    return insert_rows(connection, rows) if rows else []


def _connection(session: Session | sa.Connection) -> sa.Connection:
    if isinstance(session, sa.Connection):
        return session
    if isinstance(session, scoped_session):  # e.g. Flask-SQLAlchemy's db.session
        session = session()
    if isinstance(session, Session):
        # Session.connection() joins the caller's transaction without flushing
        # their pending objects, which Session.execute() would do.
        return session.connection()
    raise TypeError(
        f"track_event needs a SQLAlchemy Session or Connection, not {type(session).__name__}"
    )


_FIELDS = frozenset(
    {"email", "event", "properties", "eventdata", "deliver_after", "idempotency_key"}
)


def prepare_row(
    spec: Mapping[str, Any], max_body_bytes: int = MAX_BODY_BYTES, transport: str = "tracker"
) -> dict[str, Any]:
    """Validate one event's arguments and return the row to insert, or raise InvalidEvent."""
    if not isinstance(spec, Mapping):
        raise InvalidEvent("event", f"must be a mapping of fields, not {type(spec).__name__}")
    unknown = sorted(set(spec) - _FIELDS)
    if unknown:
        raise InvalidEvent(unknown[0], "is not an argument of track_event")
    event = validate(
        spec.get("email"),
        spec.get("event"),
        spec.get("properties"),
        spec.get("eventdata"),
        max_body_bytes=max_body_bytes,
    )
    v3event.check(event, transport)
    key = _idempotency_key(spec.get("idempotency_key"))
    deliver_after = _deliver_after(spec.get("deliver_after"))
    # The database's clock, not this host's, says when "now" and "in 5 minutes" are.
    return {
        "email": event.email,
        "event": event.event,
        "properties": event.properties,
        "eventdata": event.eventdata,
        "idempotency_key": key,
        "b_at": deliver_after if isinstance(deliver_after, dt.datetime) else None,
        "b_delay": deliver_after.total_seconds()
        if isinstance(deliver_after, dt.timedelta)
        else 0.0,
    }


MAX_KEY_LENGTH = 200


def _idempotency_key(key: Any) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not key:
        raise InvalidEvent("idempotency_key", "must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidEvent("idempotency_key", f"is longer than {MAX_KEY_LENGTH} characters")
    if "\x00" in key:
        raise InvalidEvent("idempotency_key", "must not contain a NUL character")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent("idempotency_key", "is not valid UTF-8 text") from None
    return key


def _deliver_after(value: Any) -> dt.datetime | dt.timedelta | None:
    if value is None:
        return None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        # Text and numbers, as JSON Lines and flags give them: the one parser for times.
        try:
            return parse_when(value, "deliver_after")
        except InvalidTime as exc:
            raise InvalidEvent("deliver_after", exc.rule) from None
    # The time it names must exist between the years 1 and 9999, where both
    # databases and Python can hold it.
    try:
        if isinstance(value, dt.timedelta):
            dt.datetime.now(dt.timezone.utc) + value
            return value
        if isinstance(value, dt.datetime):
            if value.tzinfo is not None:
                value.astimezone(dt.timezone.utc)
            return value
    except OverflowError:
        raise InvalidEvent("deliver_after", "is out of range (years 1 to 9999)") from None
    raise InvalidEvent(
        "deliver_after",
        "must be a datetime, a timedelta, an ISO 8601 timestamp with an offset, or a duration",
    )


def _insert_statement(insert: Any) -> Any:
    next_attempt_at = sa.func.coalesce(
        sa.bindparam("b_at", type_=UTCDateTime()),
        seconds_from_now(sa.bindparam("b_delay", type_=sa.Float)),
    )
    return (
        insert.values(next_attempt_at=next_attempt_at)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(outbox_events.c.id, outbox_events.c.idempotency_key)
    )


# Built once: executed with a list of rows, SQLAlchemy sends them as multi-row
# INSERTs ("insertmanyvalues") from one cached statement.
_INSERT = {b.name: _insert_statement(b.insert(outbox_events)) for b in all_backends()}


# insert_rows' default: the trace context of the span active in the caller.
_ACTIVE_SPAN: Any = object()


def insert_rows(
    connection: sa.Connection, rows: list[dict[str, Any]], trace: Any = _ACTIVE_SPAN
) -> list[int]:
    """Insert prepared rows through the caller's connection; their ids in the order given."""
    return insert_rows_reporting_new(connection, rows, trace)[0]


def insert_rows_reporting_new(
    connection: sa.Connection, rows: list[dict[str, Any]], trace: Any = _ACTIVE_SPAN
) -> tuple[list[int], set[int]]:
    """Like insert_rows, and also the ids this call inserted (a repeated idempotency key
    gives the id of the row that already had it).

    With `trace` (or, by default, the application's active OpenTelemetry span),
    every row records that trace context.
    """
    trace = current_context() if trace is _ACTIVE_SPAN else trace
    if trace:
        rows = [{**row, **trace} for row in rows]
    inserted = connection.execute(_INSERT[backend_for(connection).name], rows).all()
    new = {r.id for r in inserted}
    # Ids are assigned in VALUES order, so unkeyed rows map back by position.
    unkeyed = iter(sorted(r.id for r in inserted if r.idempotency_key is None))
    by_key = {r.idempotency_key: r.id for r in inserted if r.idempotency_key is not None}
    missing = {row["idempotency_key"] for row in rows if row["idempotency_key"]} - set(by_key)
    if missing:
        existing = connection.execute(
            sa.select(outbox_events.c.idempotency_key, outbox_events.c.id).where(
                outbox_events.c.idempotency_key.in_(missing)
            )
        )
        by_key.update({key: id_ for key, id_ in existing})
    ids = [
        by_key[row["idempotency_key"]] if row["idempotency_key"] else next(unkeyed) for row in rows
    ]
    return ids, new
