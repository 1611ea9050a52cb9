"""One conformance suite for every backend (worker.backends), run against each database.

What a backend promises, checked through a real SQLite file and a real
PostgreSQL server: a batch bound in one statement arrives whole and in order,
the upsert skips a conflict, the clock, a contact's key and a minute read alike, the
maintenance lead and the migration lock exclude as the backend says, and its
wake-ups (where it has them) hear a committed insert.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests.daemons import wait_until
from worker import db
from worker.backends import all_backends, backend_for
from worker.backends.sql import contact_key, minute_of, seconds_from_now, utcnow
from worker.schema import outbox_events

_scratch = sa.MetaData()
scratch = sa.Table(
    "conformance_scratch",
    _scratch,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("word", sa.Text),
    sa.Column("weight", sa.Float),
)
TYPES = {"id": sa.BigInteger(), "word": sa.Text(), "weight": sa.Float()}


@pytest.fixture
def scratch_engine(engine: sa.Engine):
    _scratch.create_all(engine)
    yield engine
    _scratch.drop_all(engine)


def test_each_database_has_exactly_one_backend():
    assert sorted(b.name for b in all_backends()) == ["postgresql", "sqlite"]
    with pytest.raises(ValueError, match="no outbox backend for the database 'mysql'"):
        backend_for("mysql")


def test_a_batch_bound_for_one_statement_arrives_whole_and_in_order(scratch_engine):
    backend = backend_for(scratch_engine)
    columns = ("id", "word", "weight")
    src, from_ = backend.batch_source(columns, TYPES)
    select = sa.select(src.id, src.word, src.weight)
    if from_ is not None:
        select = select.select_from(from_)
    statement = sa.insert(scratch).from_select(list(columns), select)
    rows = [(i, f"w{i}" if i % 3 else None, i / 4) for i in range(1, 251)]
    with scratch_engine.begin() as conn:
        conn.execute(statement, backend.bind(columns, rows))
        stored = conn.execute(sa.select(scratch).order_by(scratch.c.id)).all()
    assert [tuple(r) for r in stored] == rows


def test_the_upsert_insert_skips_a_conflicting_row_and_says_so(scratch_engine):
    backend = backend_for(scratch_engine)
    insert = (
        backend.insert(scratch)
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(scratch.c.id)
    )
    with scratch_engine.begin() as conn:
        first = conn.execute(insert.values(id=1, word="first")).scalars().all()
        again = conn.execute(insert.values(id=1, word="again")).scalars().all()
        words = conn.execute(sa.select(scratch.c.word)).scalars().all()
    assert (first, again, words) == ([1], [], ["first"])


def test_the_clock_is_utc_and_seconds_from_now_adds_seconds(engine):
    with engine.connect() as conn:
        now, later = conn.execute(sa.select(utcnow(), seconds_from_now(90.5))).one()
    assert now.tzinfo is dt.timezone.utc
    assert abs((dt.datetime.now(dt.timezone.utc) - now).total_seconds()) < 60
    assert (later - now).total_seconds() == pytest.approx(90.5, abs=0.01)


def test_the_minute_of_a_stored_timestamp_reads_alike(engine):
    given = dt.datetime(2026, 12, 4, 23, 59, 59, 999_000, tzinfo=dt.timezone.utc)
    with engine.begin() as conn:
        (event_id,) = conn.execute(
            sa.insert(outbox_events)
            .values(email="m@example.com", event="e", delivered_at=given)
            .returning(outbox_events.c.id)
        ).one()
        by_clock, stored = conn.execute(
            sa.select(minute_of(utcnow()), minute_of(outbox_events.c.delivered_at)).where(
                outbox_events.c.id == event_id
            )
        ).one()
    assert stored == "2026-12-04 23:59"
    minute = dt.datetime.strptime(by_clock, "%Y-%m-%d %H:%M").replace(tzinfo=dt.timezone.utc)
    assert abs(dt.datetime.now(dt.timezone.utc) - minute) < dt.timedelta(minutes=2)


def test_a_contacts_key_folds_ascii_letters_only(engine):
    with engine.connect() as conn:
        key = conn.execute(sa.select(contact_key(sa.literal("ÉLodie.MÜLLER@Example.COM")))).scalar()
    assert key == "Élodie.mÜller@example.com"


def test_the_maintenance_lead_goes_to_one_transaction_at_a_time_where_daemons_share(engine):
    backend = backend_for(engine)
    other = db.create_engine(engine.url)
    try:
        with engine.begin() as first, other.begin() as second:
            leads = (backend.take_maintenance_lead(first), backend.take_maintenance_lead(second))
        with other.begin() as after:
            lead_after = backend.take_maintenance_lead(after)
    finally:
        other.dispose()
    # One daemon per SQLite file: its one daemon always leads.
    assert leads == ((True, False) if backend.many_daemons else (True, True))
    assert lead_after is True


def test_the_migration_lock_makes_a_second_migrator_wait_for_the_first(engine):
    backend = backend_for(engine)
    other = db.create_engine(engine.url)
    second_locked = threading.Event()

    def second() -> None:
        with other.begin() as conn:
            backend.lock_migrations(conn)
            second_locked.set()

    try:
        with engine.begin() as first:
            backend.lock_migrations(first)
            waiter = threading.Thread(target=second)
            waiter.start()
            # It must still be waiting after a while; then it gets the lock.
            assert not second_locked.wait(1.0)
        waiter.join(15)
        assert second_locked.is_set()
    finally:
        other.dispose()


@contextlib.contextmanager
def listening(engine: sa.Engine) -> Iterator[threading.Event | None]:
    """The backend's wake-ups running and listening, their wake event cleared; None
    where the backend has none (the daemon polls)."""
    backend = backend_for(engine)
    wake = threading.Event()
    wakeups = backend.wakeups(engine.url, wake)
    if wakeups is None:
        yield None  # the daemon polls
        return
    wakeups.start()
    try:
        wait_until(lambda: wakeups.listening.is_set(), 15, "LISTEN")
        wake.clear()
        yield wake
    finally:
        wakeups.stop()
        wakeups.join(5)


def test_wakeups_hear_a_committed_insert_where_the_backend_has_them(engine):
    with listening(engine) as wake:
        with engine.begin() as conn:
            conn.execute(sa.insert(outbox_events).values(email="a@example.com", event="x"))
        assert wake is None or wake.wait(10), "no wake-up within 10 s of the commit"


def test_a_row_made_due_now_with_notify_wakes_the_daemon(engine):
    # What a requeue does: a waiting row becomes due now, and the backend is told.
    backend = backend_for(engine)
    with engine.begin() as conn:
        row_id = conn.execute(
            sa.insert(outbox_events)
            .values(email="a@example.com", event="x", next_attempt_at=seconds_from_now(3600))
            .returning(outbox_events.c.id)
        ).scalar_one()
    with listening(engine) as wake:
        with engine.begin() as conn:
            conn.execute(
                sa.update(outbox_events)
                .where(outbox_events.c.id == row_id)
                .values(next_attempt_at=utcnow())
            )
            backend.notify(conn)
        assert wake is None or wake.wait(10), "no wake-up within 10 s of the requeue"
