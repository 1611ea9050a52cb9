"""track_event and track_events against real databases (INTERFACE sections 1, 3 and 6).

Every test that takes `engine` runs on a SQLite file and on a PostgreSQL
database of its own. The race on an idempotency key is PostgreSQL only: SQLite
has a single writer, so two transactions can never insert at the same time.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tests.conftest import rows
from worker import InvalidEvent, db, track_event, track_events
from worker.schema import outbox_events

UTC = dt.timezone.utc


# -- helpers -------------------------------------------------------------------


class Base(DeclarativeBase):
    # Its own MetaData: the application's tables, not the outbox's.
    metadata = sa.MetaData()


class Widget(Base):
    """A stand-in for the application's business row."""

    __tablename__ = "test_widgets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))


@pytest.fixture(params=["session", "connection"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@contextmanager
def caller(engine: sa.Engine, kind: str) -> Iterator[Session | sa.Connection]:
    """The application's open transaction: a Session or a Connection (rolled back unless committed)."""
    if kind == "session":
        with Session(engine) as session:
            yield session
    else:
        with engine.connect() as connection:
            yield connection


def execute(handle: Session | sa.Connection, sql: str, **params: Any) -> sa.CursorResult[Any]:
    """Plain SQL in the caller's transaction, without flushing a Session's pending objects."""
    connection = handle.connection() if isinstance(handle, Session) else handle
    return connection.execute(sa.text(sql), params)


@contextmanager
def statements_sent(engine: sa.Engine) -> Iterator[list[str]]:
    """Every SQL statement the engine's connections send while the block runs.

    Register it before the caller's connection is opened: a connection only
    fires the events that were listened for when it was created.
    """
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def count(engine: sa.Engine) -> int:
    """Rows of outbox_events as another connection sees them (committed only)."""
    return rows(engine, "SELECT count(*) FROM outbox_events")[0][0]


def as_json(value: Any) -> Any:
    """A JSON column read with plain SQL: decoded by psycopg on PostgreSQL, text on SQLite."""
    return json.loads(value) if isinstance(value, str) else value


def raw_row(engine: sa.Engine, id_: int) -> Any:
    return rows(
        engine,
        "SELECT id, email, event, status, attempts, properties, eventdata,"
        " properties IS NULL AS properties_is_null, eventdata IS NULL AS eventdata_is_null,"
        f" idempotency_key FROM outbox_events WHERE id = {int(id_)}",
    )[0]


def events_by_id(engine: sa.Engine) -> dict[int, str]:
    return {r.id: r.event for r in rows(engine, "SELECT id, event FROM outbox_events")}


def next_attempt_utc_text(engine: sa.Engine, id_: int) -> str:
    """next_attempt_at as the database stores it, in UTC, to the second: 'YYYY-MM-DD HH:MM:SS'."""
    if engine.dialect.name == "postgresql":
        sql = "SELECT to_char(next_attempt_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')"
    else:
        sql = "SELECT substr(next_attempt_at, 1, 19)"
    return rows(engine, f"{sql} FROM outbox_events WHERE id = {int(id_)}")[0][0]


def ev(n: int | str, **fields: Any) -> dict[str, Any]:
    return {"email": f"user{n}@example.com", "event": f"e{n}", **fields}


EVENTDATA = {
    "id": "cart:123",
    "data": {"added_product": [{"name": "Wrist watch", "price": "50.00"}]},
}


# -- writing one event ---------------------------------------------------------


def test_track_event_returns_id_of_pending_row_with_given_json(engine, kind):
    with caller(engine, kind) as handle:
        new_id = track_event(
            handle,
            email="jane@example.com",
            event="cart_updated",
            properties={"plan": "pro", "name": "Zoë", "seats": 3},
            eventdata=EVENTDATA,
        )
        handle.commit()
    row = raw_row(engine, new_id)
    assert isinstance(new_id, int)
    assert (row.id, row.email, row.event) == (new_id, "jane@example.com", "cart_updated")
    assert (row.status, row.attempts) == ("pending", 0)
    assert as_json(row.properties) == {"plan": "pro", "name": "Zoë", "seats": 3}
    assert as_json(row.eventdata) == EVENTDATA


def test_track_event_without_json_fields_stores_sql_null_not_json_null(engine, kind):
    with caller(engine, kind) as handle:
        new_id = track_event(handle, email="jane@example.com", event="signed_up")
        handle.commit()
    row = raw_row(engine, new_id)
    assert bool(row.properties_is_null) and bool(row.eventdata_is_null)


def test_track_event_stores_empty_properties_as_empty_object(engine):
    # "{} is sent as given": an empty object is not the same as no properties.
    with Session(engine) as session:
        new_id = track_event(session, email="jane@example.com", event="e", properties={})
        session.commit()
    row = raw_row(engine, new_id)
    assert not row.properties_is_null
    assert as_json(row.properties) == {}


def test_track_event_stores_email_and_event_exactly_as_given(engine):
    with Session(engine) as session:
        new_id = track_event(session, email="Jane.Doe+x@Example.COM", event="Cart Updated")
        session.commit()
    row = raw_row(engine, new_id)
    assert (row.email, row.event) == ("Jane.Doe+x@Example.COM", "Cart Updated")


def test_track_event_accepts_a_body_just_under_64_kib(engine):
    with Session(engine) as session:
        new_id = track_event(
            session, email="jane@example.com", event="e", properties={"blob": "x" * 65_000}
        )
        session.commit()
    assert len(as_json(raw_row(engine, new_id).properties)["blob"]) == 65_000


def test_track_event_size_limit_is_configurable(engine):
    with Session(engine) as session, pytest.raises(InvalidEvent, match="size"):
        track_event(
            session,
            email="jane@example.com",
            event="e",
            properties={"blob": "x" * 2000},
            max_body_bytes=1024,
        )


def test_track_event_ids_increase_in_insertion_order(engine):
    with Session(engine) as session:
        ids = [track_event(session, **ev(n)) for n in range(5)]
        session.commit()
    assert ids == sorted(ids) and len(set(ids)) == 5


def test_track_event_is_invisible_to_other_connections_before_commit(engine, kind):
    with caller(engine, kind) as handle:
        track_event(handle, email="jane@example.com", event="signed_up")
        assert count(engine) == 0
        handle.commit()
    assert count(engine) == 1


def test_rollback_removes_the_event(engine, kind):
    with caller(engine, kind) as handle:
        track_event(handle, email="jane@example.com", event="signed_up")
        handle.rollback()
    assert count(engine) == 0


def test_track_event_never_commits_the_callers_work(engine, kind):
    Base.metadata.create_all(engine)
    with caller(engine, kind) as handle:
        execute(handle, "INSERT INTO test_widgets (id, name) VALUES (1, 'order')")
        track_event(handle, email="jane@example.com", event="signed_up")
        handle.rollback()
    assert rows(engine, "SELECT * FROM test_widgets") == []
    assert count(engine) == 0


def test_track_event_does_not_flush_pending_orm_objects(engine):
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        widget = Widget(id=1, name="order")
        session.add(widget)
        track_event(session, email="jane@example.com", event="signed_up")
        assert widget in session.new
        # Connection.execute never autoflushes: this is what the transaction holds.
        assert execute(session, "SELECT count(*) FROM test_widgets").scalar() == 0
        assert execute(session, "SELECT count(*) FROM outbox_events").scalar() == 1


def test_track_event_commits_with_the_callers_orm_objects(engine):
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add(Widget(id=1, name="order"))
        track_event(session, email="jane@example.com", event="order_placed")
    assert [tuple(r) for r in rows(engine, "SELECT id, name FROM test_widgets")] == [(1, "order")]
    assert count(engine) == 1


# -- invalid input ---------------------------------------------------------------

# (what is wrong, the text the error must contain: the field, or "size")
INVALID = [
    pytest.param({"email": "jane.example.com"}, "email", id="email-without-at"),
    pytest.param({"email": "jane@@example.com"}, "email", id="email-two-ats"),
    pytest.param({"email": "jane doe@example.com"}, "email", id="email-with-space"),
    pytest.param({"email": "@example.com"}, "email", id="email-empty-local-part"),
    pytest.param({"email": "jane@localhost"}, "email", id="email-domain-without-dot"),
    pytest.param({"email": None}, "email", id="email-missing"),
    pytest.param({"event": ""}, "event", id="event-empty"),
    pytest.param({"event": "  \t"}, "event", id="event-blank"),
    pytest.param({"event": None}, "event", id="event-missing"),
    pytest.param({"properties": ["plan", "pro"]}, "properties", id="properties-not-object"),
    pytest.param({"properties": {"email": "x@example.com"}}, "properties", id="reserved-email"),
    pytest.param({"properties": {"event": "x"}}, "properties", id="reserved-event"),
    pytest.param({"properties": {"ratio": float("nan")}}, "properties", id="properties-nan"),
    pytest.param({"properties": {"ratio": float("inf")}}, "properties", id="properties-inf"),
    pytest.param({"properties": {"when": object()}}, "properties", id="properties-not-json"),
    pytest.param({"eventdata": "cart:123"}, "eventdata", id="eventdata-not-object"),
    pytest.param({"eventdata": {"id": 123}}, "eventdata", id="eventdata-id-not-string"),
    pytest.param({"eventdata": {"data": ["x"]}}, "eventdata", id="eventdata-data-not-object"),
    pytest.param({"properties": {"blob": "x" * 70_000}}, "size", id="body-over-64KiB"),
    pytest.param({"deliver_after": "tomorrow"}, "deliver_after", id="deliver-after-not-time"),
]


def valid(**overrides: Any) -> dict[str, Any]:
    return {"email": "jane@example.com", "event": "signed_up", **overrides}


def test_invalid_event_is_a_value_error():
    assert issubclass(InvalidEvent, ValueError)


@pytest.mark.parametrize(("fields", "named"), INVALID)
def test_invalid_input_raises_invalid_event_naming_the_field(engine, fields, named):
    with Session(engine) as session, pytest.raises(InvalidEvent) as raised:
        track_event(session, **valid(**fields))
    assert named in str(raised.value)


@pytest.mark.parametrize(("fields", "named"), INVALID)
def test_invalid_input_sends_no_sql(engine, kind, fields, named):
    with statements_sent(engine) as sent, caller(engine, kind) as handle:
        track_event(handle, **valid())
        assert sent, "the listener must see the valid insert"
        sent.clear()
        with pytest.raises(InvalidEvent):
            track_event(handle, **valid(**fields))
        assert sent == []


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"email": None}, id="email-missing"),
        pytest.param({"properties": {"ratio": float("nan")}}, id="properties-nan"),
        pytest.param({"properties": {"email": "x@example.com"}}, id="reserved-email"),
        pytest.param({"eventdata": {"id": 123}}, id="eventdata-id-not-string"),
    ],
)
def test_callers_transaction_stays_usable_after_invalid_input(engine, kind, fields):
    Base.metadata.create_all(engine)
    with caller(engine, kind) as handle:
        track_event(handle, **valid(event="before"))
        with pytest.raises(InvalidEvent):
            track_event(handle, **valid(**fields))
        execute(handle, "INSERT INTO test_widgets (id, name) VALUES (1, 'after')")
        track_event(handle, **valid(event="after"))
        handle.commit()
    assert [r.event for r in rows(engine)] == ["before", "after"]
    assert len(rows(engine, "SELECT * FROM test_widgets")) == 1


# -- the caller's handle ---------------------------------------------------------


@pytest.mark.parametrize(
    "make_handle",
    [
        pytest.param(lambda engine: engine, id="engine"),
        pytest.param(lambda engine: str(engine.url), id="url-string"),
        pytest.param(lambda engine: None, id="none"),
        pytest.param(lambda engine: engine.raw_connection(), id="dbapi-connection"),
    ],
)
def test_track_event_rejects_a_non_session_with_type_error(engine, make_handle):
    handle = make_handle(engine)
    try:
        with pytest.raises(TypeError):
            track_event(handle, email="jane@example.com", event="signed_up")
    finally:
        if hasattr(handle, "close"):
            handle.close()
    assert count(engine) == 0


def test_track_events_rejects_an_engine_with_type_error(engine):
    with pytest.raises(TypeError):
        track_events(engine, [ev(1)])
    assert count(engine) == 0


def test_track_events_rejects_an_engine_even_with_no_events(engine):
    # The mistake must show on the first call, not only once a batch is non-empty.
    with pytest.raises(TypeError):
        track_events(engine, [])


# -- idempotency_key -------------------------------------------------------------


def test_repeated_key_in_same_transaction_returns_first_id(engine, kind):
    with caller(engine, kind) as handle:
        first = track_event(handle, **ev(1, idempotency_key="order-1"))
        second = track_event(handle, **ev(2, idempotency_key="order-1"))
        handle.commit()
    assert second == first
    assert [(r.id, r.event) for r in rows(engine)] == [(first, "e1")]


def test_repeated_key_in_later_transaction_returns_first_id(engine, kind):
    with caller(engine, kind) as handle:
        first = track_event(handle, **ev(1, idempotency_key="order-1"))
        handle.commit()
    with caller(engine, kind) as handle:
        second = track_event(handle, **ev(2, idempotency_key="order-1"))
        handle.commit()
    assert second == first
    assert [(r.id, r.event) for r in rows(engine)] == [(first, "e1")]


def test_repeated_key_leaves_the_transaction_usable(engine, kind):
    Base.metadata.create_all(engine)
    with caller(engine, kind) as handle:
        track_event(handle, **ev(1, idempotency_key="order-1"))
        handle.commit()
    with caller(engine, kind) as handle:
        track_event(handle, **ev(2, idempotency_key="order-1"))
        execute(handle, "INSERT INTO test_widgets (id, name) VALUES (1, 'after')")
        later = track_event(handle, **ev(3))
        handle.commit()
    assert [r.event for r in rows(engine)] == ["e1", "e3"]
    assert events_by_id(engine)[later] == "e3"
    assert len(rows(engine, "SELECT * FROM test_widgets")) == 1


def test_different_keys_insert_different_rows(engine):
    with Session(engine) as session:
        a = track_event(session, **ev(1, idempotency_key="order-1"))
        b = track_event(session, **ev(2, idempotency_key="order-2"))
        session.commit()
    assert a != b
    assert count(engine) == 2


def test_racing_transactions_on_one_key_second_gets_first_id(pg_url):
    engine = db.create_engine(pg_url)
    first = engine.connect()
    second = engine.connect()
    try:
        first_id = track_event(first, **ev(1, idempotency_key="race"))
        second_pid = second.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        outcome: dict[str, Any] = {}

        def insert_second() -> None:
            try:
                outcome["id"] = track_event(second, **ev(2, idempotency_key="race"))
                outcome["after"] = track_event(second, **ev(3))
                second.commit()
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=insert_second)
        thread.start()
        # The second insert must be waiting on the first's uncommitted row.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            wait = rows(
                engine, f"SELECT wait_event_type FROM pg_stat_activity WHERE pid = {second_pid}"
            )[0][0]
            if wait == "Lock":
                break
            time.sleep(0.02)
        assert wait == "Lock" and thread.is_alive()
        first.commit()
        thread.join(10)
        assert not thread.is_alive()
        assert "error" not in outcome, outcome.get("error")
        assert outcome["id"] == first_id
        assert [r.event for r in rows(engine)] == ["e1", "e3"]
    finally:
        first.close()
        second.close()
        engine.dispose()


# -- deliver_after ---------------------------------------------------------------


def stored_times(engine: sa.Engine, id_: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(outbox_events.c.created_at, outbox_events.c.next_attempt_at).where(
                outbox_events.c.id == id_
            )
        ).one()


def test_deliver_after_timedelta_sets_next_attempt_that_far_ahead(engine):
    with Session(engine) as session:
        new_id = track_event(session, **ev(1, deliver_after=dt.timedelta(hours=1)))
        session.commit()
    # created_at is the database's clock when the row was written.
    created_at, next_attempt_at = stored_times(engine, new_id)
    ahead = (next_attempt_at - created_at).total_seconds()
    assert 3600 - 2 <= ahead <= 3600 + 2


def test_deliver_after_absent_makes_the_event_due_now(engine):
    with Session(engine) as session:
        new_id = track_event(session, **ev(1))
        session.commit()
    created_at, next_attempt_at = stored_times(engine, new_id)
    assert abs((next_attempt_at - created_at).total_seconds()) <= 2
    assert next_attempt_at <= dt.datetime.now(UTC) + dt.timedelta(seconds=2)


def test_deliver_after_aware_datetime_is_stored_in_utc(engine):
    when = dt.datetime(2031, 5, 6, 14, 30, 15, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with Session(engine) as session:
        new_id = track_event(session, **ev(1, deliver_after=when))
        session.commit()
    assert next_attempt_utc_text(engine, new_id) == "2031-05-06 12:30:15"
    assert stored_times(engine, new_id).next_attempt_at == when


@pytest.fixture
def local_zone_far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make this process's local time zone UTC+05:30, so that "naive is local" would show."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_deliver_after_naive_datetime_is_taken_as_utc(engine, local_zone_far_from_utc):
    with Session(engine) as session:
        if engine.dialect.name == "postgresql":
            # A naive timestamp given to timestamptz would be read in the session's zone.
            execute(session, "SET LOCAL TIME ZONE 'America/New_York'")
        new_id = track_event(session, **ev(1, deliver_after=dt.datetime(2031, 5, 6, 12, 30, 15)))
        session.commit()
    assert next_attempt_utc_text(engine, new_id) == "2031-05-06 12:30:15"


def test_deliver_after_as_text_is_a_timestamp_or_a_duration(engine):
    with Session(engine) as session:
        at = track_event(session, **ev(1, deliver_after="2031-05-06T14:30:15+02:00"))
        later = track_event(session, **ev(2, deliver_after="1h"))
        soon = track_event(session, **ev(3, deliver_after=90))
        session.commit()
    assert next_attempt_utc_text(engine, at) == "2031-05-06 12:30:15"
    for id_, seconds in ((later, 3600), (soon, 90)):
        created_at, next_attempt_at = stored_times(engine, id_)
        assert abs((next_attempt_at - created_at).total_seconds() - seconds) <= 2


@pytest.mark.parametrize("value", ["-5m", "2031-05-06T14:30:15", "soon", "99999999999d"])
def test_deliver_after_text_that_is_no_time_is_refused_naming_the_field(engine, value):
    with Session(engine) as session, pytest.raises(InvalidEvent) as caught:
        track_event(session, **ev(1, deliver_after=value))
    assert caught.value.field == "deliver_after"
    assert rows(engine) == []


# -- track_events ----------------------------------------------------------------


def test_track_events_returns_ids_in_input_order(engine, kind):
    events = [ev(n) for n in (3, 1, 4, 0, 2)]
    with caller(engine, kind) as handle:
        ids = track_events(handle, events)
        handle.commit()
    assert len(ids) == 5 and ids == sorted(ids)
    stored = events_by_id(engine)
    assert [stored[i] for i in ids] == ["e3", "e1", "e4", "e0", "e2"]


def test_track_events_sends_one_insert_statement(engine):
    with statements_sent(engine) as sent, Session(engine) as session:
        track_events(session, [ev(n) for n in range(300)])
        session.commit()
    inserts = [s for s in sent if s.lstrip().upper().startswith("INSERT")]
    assert len(inserts) == 1
    assert count(engine) == 300


def test_track_events_stores_pending_rows_with_their_json(engine):
    with Session(engine) as session:
        ids = track_events(
            session,
            [
                ev(1, properties={"plan": "pro"}, eventdata=EVENTDATA),
                ev(2),
            ],
        )
        session.commit()
    one, two = raw_row(engine, ids[0]), raw_row(engine, ids[1])
    assert (one.status, one.attempts, two.status, two.attempts) == ("pending", 0, "pending", 0)
    assert as_json(one.properties) == {"plan": "pro"}
    assert as_json(one.eventdata) == EVENTDATA
    assert bool(two.properties_is_null) and bool(two.eventdata_is_null)


def test_track_events_mixing_keys_returns_existing_ids_for_known_keys(engine):
    with Session(engine) as session:
        old_1 = track_event(session, **ev("old1", idempotency_key="k1"))
        old_2 = track_event(session, **ev("old2", idempotency_key="k2"))
        session.commit()
    batch = [
        ev("p0"),
        ev("dup2", idempotency_key="k2"),
        ev("n1", idempotency_key="new-1"),
        ev("p1"),
        ev("dup1", idempotency_key="k1"),
        ev("n2", idempotency_key="new-2"),
        ev("p2"),
    ]
    with Session(engine) as session:
        ids = track_events(session, batch)
        session.commit()
    assert ids[1] == old_2 and ids[4] == old_1
    stored = events_by_id(engine)
    assert [stored[i] for i in ids] == ["ep0", "eold2", "en1", "ep1", "eold1", "en2", "ep2"]
    assert len(stored) == 2 + 5
    assert len(set(ids)) == 7  # five new ids and the two old ones


def test_track_events_key_repeated_within_the_batch_is_inserted_once(engine):
    with Session(engine) as session:
        ids = track_events(
            session,
            [ev(0), ev(1, idempotency_key="k"), ev(2), ev(3, idempotency_key="k"), ev(4)],
        )
        session.commit()
    assert ids[1] == ids[3]
    stored = events_by_id(engine)
    assert [stored[i] for i in ids] == ["e0", "e1", "e2", "e1", "e4"]
    assert len(stored) == 4


# Enough rows for several INSERT statements, whether they hold 500 rows or 1000.
MANY = 2345


def test_track_events_over_500_events_keeps_input_order(engine):
    with Session(engine) as session:
        ids = track_events(session, [ev(i) for i in range(MANY)])
        session.commit()
    assert len(ids) == MANY and len(set(ids)) == MANY
    stored = events_by_id(engine)
    assert len(stored) == MANY
    assert [stored[i] for i in ids] == [f"e{i}" for i in range(MANY)]


def test_track_events_key_repeated_across_chunks_is_inserted_once(engine):
    events = [ev(i) for i in range(MANY)]
    events[10]["idempotency_key"] = "across"
    events[2100]["idempotency_key"] = "across"
    events[600]["idempotency_key"] = "only-once"
    with Session(engine) as session:
        ids = track_events(session, events)
        session.commit()
    assert ids[2100] == ids[10]
    stored = events_by_id(engine)
    assert len(stored) == MANY - 1
    expected = [f"e{i}" for i in range(MANY)]
    expected[2100] = "e10"
    assert [stored[i] for i in ids] == expected


def test_track_events_with_one_invalid_event_writes_nothing(engine, kind):
    events = [ev(n) for n in range(10)]
    events[7]["properties"] = {"email": "x@example.com"}
    with caller(engine, kind) as handle:
        with pytest.raises(InvalidEvent):
            track_events(handle, events)
        handle.commit()
    assert count(engine) == 0


def test_track_events_error_names_the_invalid_events_position(engine):
    events = [ev(n) for n in range(10)]
    events[7]["eventdata"] = {"id": 42}
    with Session(engine) as session, pytest.raises(InvalidEvent) as raised:
        track_events(session, events)
    message = str(raised.value)
    assert "eventdata" in message
    # Position 7 counted from 0, or 8 counted from 1; nothing else in the list is 7 or 8.
    assert re.search(r"\b[78]\b", message), message


def test_track_events_invalid_event_sends_no_sql_and_leaves_transaction_usable(engine):
    events = [ev(n) for n in range(10)]
    events[7]["properties"] = {"ratio": float("nan")}
    with statements_sent(engine) as sent, Session(engine) as session:
        track_event(session, **ev("before"))
        sent.clear()
        with pytest.raises(InvalidEvent):
            track_events(session, events)
        assert sent == []
        track_events(session, [ev("after")])
        session.commit()
    assert [r.event for r in rows(engine)] == ["ebefore", "eafter"]


def test_track_events_of_nothing_returns_nothing(engine):
    with Session(engine) as session:
        assert track_events(session, []) == []
        session.commit()
    assert count(engine) == 0
