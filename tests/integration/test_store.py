"""OutboxStore against real databases (SQLite and PostgreSQL): claiming, recording
outcomes, lease rescue, pruning and the heartbeat, with the rows checked by SQL
(the operator's requeue, purge and lists are worker.admin's: tests/test_admin.py;
its stats worker.admin_reports': tests/test_admin_reports.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import time
from typing import Any

import pytest
import sqlalchemy as sa

from tests.integration.test_schema import DEAD_LETTER_COLUMNS
from worker import db, track_events
from worker import store as store_module
from worker.backends.sql import utcnow
from worker.policy import Action, Outcome
from worker.schema import outbox_attempts, outbox_daemons, outbox_events
from worker.store import _CLAIM, ClaimedEvent, DaemonReport, OutboxStore, Record

e = outbox_events
LEASE = 30.0


# -- helpers ---------------------------------------------------------------------


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def add(engine: sa.Engine, *emails: str, **fields: Any) -> list[int]:
    """One event per email, inserted in one transaction; ids in the order given."""
    with engine.begin() as conn:
        return track_events(
            conn,
            [
                {"email": email, "event": fields.get("event", "signed_up"), **fields}
                for email in emails
            ],
        )


def set_row(engine: sa.Engine, ids: int | list[int], **values: Any) -> None:
    """Plain SQL (Core) update, behind the store's back."""
    ids = [ids] if isinstance(ids, int) else ids
    with engine.begin() as conn:
        conn.execute(sa.update(e).where(e.c.id.in_(ids)).values(**values))


def row(engine: sa.Engine, event_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(e).where(e.c.id == event_id)).one_or_none()


def attempt_rows(engine: sa.Engine, event_id: int | None = None) -> list[Any]:
    query = sa.select(outbox_attempts).order_by(
        outbox_attempts.c.event_id, outbox_attempts.c.attempt
    )
    if event_id is not None:
        query = query.where(outbox_attempts.c.event_id == event_id)
    with engine.connect() as conn:
        return conn.execute(query).all()


def ids_of(claimed: list[ClaimedEvent]) -> list[int]:
    return [c.id for c in claimed]


def claim(store: OutboxStore, limit: int = 100, token: str = "host:1:1", lease: float = LEASE):
    return store.claim_due(limit, lease, token)


def claim_one(store: OutboxStore, event_id: int, token: str = "host:1:1") -> ClaimedEvent:
    claimed = {c.id: c for c in claim(store, token=token)}
    return claimed[event_id]


def make_dead(
    engine: sa.Engine, ids: int | list[int], code: int | None = 400, **extra: Any
) -> None:
    values = {
        "status": "dead",
        "attempts": 3,
        "last_status_code": code,
        "last_error": f"HTTP {code} refused",
        "failed_at": now(),
        "next_attempt_at": now() + dt.timedelta(days=1),
    }
    set_row(engine, ids, **{**values, **extra})


def make_delivered(engine: sa.Engine, ids: int | list[int], **extra: Any) -> None:
    values = {"status": "delivered", "attempts": 1, "last_status_code": 204, "delivered_at": now()}
    set_row(engine, ids, **{**values, **extra})


# -- claim_due ---------------------------------------------------------------------


def test_claim_takes_due_pending_rows_only(engine, store):
    due, future, delivered, dead = add(engine, "a@x.com", "b@x.com", "c@x.com", "d@x.com")
    set_row(engine, future, next_attempt_at=now() + dt.timedelta(hours=1))
    make_delivered(engine, delivered)
    make_dead(engine, dead)

    assert ids_of(claim(store)) == [due]
    assert row(engine, future).status == "pending"
    assert row(engine, delivered).status == "delivered"
    assert row(engine, dead).status == "dead"


def test_claim_skips_rows_scheduled_with_deliver_after(engine, store):
    (later,) = add(engine, "later@x.com", deliver_after=dt.timedelta(hours=1))
    (due,) = add(engine, "now@x.com")
    assert ids_of(claim(store)) == [due]
    assert row(engine, later).status == "pending"


def test_claim_marks_rows_in_flight_with_the_token_and_a_lease_expiry(engine, store):
    (event_id,) = add(engine, "a@x.com")
    before = now()
    claimed = store.claim_due(10, 30.0, "host:7:3")
    after = now()

    assert [(c.id, c.lease_token) for c in claimed] == [(event_id, "host:7:3")]
    r = row(engine, event_id)
    assert r.status == "in_flight"
    assert r.lease_token == "host:7:3"
    assert before + dt.timedelta(seconds=25) < r.lease_expires_at < after + dt.timedelta(seconds=35)
    assert r.attempts == 0


def test_claimed_event_carries_the_stored_fields(engine, store):
    with engine.begin() as conn:
        (event_id,) = track_events(
            conn,
            [
                {
                    "email": "a@x.com",
                    "event": "cart_updated",
                    "properties": {"plan": "pro"},
                    "eventdata": {"id": "cart:1", "data": {"n": 2}},
                }
            ],
        )
    (c,) = claim(store)
    assert (c.id, c.email, c.event, c.attempts) == (event_id, "a@x.com", "cart_updated", 0)
    assert json.loads(c.properties) == {"plan": "pro"}
    assert json.loads(c.eventdata) == {"id": "cart:1", "data": {"n": 2}}


def test_claim_takes_at_most_one_event_per_contact_ignoring_email_case(engine, store):
    first, same_contact, other = add(engine, "A@x.com", "a@x.com", "b@x.com")
    assert ids_of(claim(store)) == [first, other]
    assert row(engine, same_contact).status == "pending"


def test_claim_holds_back_a_newer_event_while_the_older_is_in_flight(engine, store):
    older, newer = add(engine, "Jane@Example.com", "jane@example.com")
    assert ids_of(claim(store, token="t1")) == [older]
    assert claim(store, token="t2") == []
    assert row(engine, newer).status == "pending"


def test_claim_holds_back_a_newer_event_while_the_older_waits_for_a_retry(engine, store):
    older, newer = add(engine, "JANE@example.com", "jane@EXAMPLE.com")
    set_row(engine, older, attempts=1, next_attempt_at=now() + dt.timedelta(hours=1))
    assert claim(store) == []
    assert row(engine, newer).status == "pending"


@pytest.mark.parametrize("finish", [make_delivered, make_dead], ids=["delivered", "dead"])
def test_claim_releases_the_newer_event_once_the_older_is_finished(engine, store, finish):
    older, newer = add(engine, "jane@example.com", "Jane@example.com")
    finish(engine, older)
    assert ids_of(claim(store)) == [newer]


def test_claim_takes_the_oldest_due_rows_first(engine, store):
    ids = add(engine, *(f"c{n}@x.com" for n in range(5)))
    assert ids_of(claim(store, limit=2, token="t1")) == ids[:2]
    assert ids_of(claim(store, limit=2, token="t2")) == ids[2:4]


def test_claim_takes_a_long_overdue_retry_before_fresh_rows(engine, store):
    _, _, overdue = add(engine, "a@x.com", "b@x.com", "c@x.com")
    set_row(engine, overdue, next_attempt_at=now() - dt.timedelta(hours=1))
    assert ids_of(claim(store, limit=1)) == [overdue]


def test_claim_respects_the_limit(engine, store):
    add(engine, *(f"c{n}@x.com" for n in range(7)))
    assert len(claim(store, limit=3)) == 3
    with engine.connect() as conn:
        in_flight = conn.execute(
            sa.select(sa.func.count()).where(e.c.status == "in_flight")
        ).scalar_one()
    assert in_flight == 3


def test_a_second_claim_does_not_return_rows_already_claimed(engine, store):
    ids = add(engine, *(f"c{n}@x.com" for n in range(4)))
    first = ids_of(claim(store, limit=2, token="t1"))
    second = ids_of(claim(store, limit=10, token="t2"))
    assert set(first).isdisjoint(second)
    assert sorted(first + second) == ids
    assert claim(store, token="t3") == []


# -- the delivery loop's connection ------------------------------------------------


def test_claims_records_and_renewals_run_on_one_kept_connection(engine, store):
    # A checkout (and its pre-ping) per statement cost more client CPU than a small
    # statement: the delivery loop keeps its connection from one statement to the next.
    add(engine, *(f"k{n}@x.com" for n in range(3)))
    checkouts = []
    sa.event.listen(engine, "checkout", lambda *_: checkouts.append(1))
    claimed = claim(store)
    for c in claimed:
        store.renew_leases({c.lease_token}, LEASE)
        store.record([Record(c, Outcome(Action.DELIVERED, 204))])
    assert claim(store, token="again") == []
    # SQLite writes a batch of outcomes as statements in a transaction of its own
    # (a checkout there is no round trip); PostgreSQL binds it to one statement.
    records = 0 if store.backend.batch_is_one_statement else len(claimed)
    assert len(checkouts) == 1 + records
    store.close()
    assert engine.pool.checkedout() == 0


def test_a_kept_connection_that_broke_is_dropped_and_the_next_claim_takes_a_fresh_one(pg_url):
    engine = db.create_engine(pg_url)
    store = OutboxStore(engine)
    assert claim(store, token="t0") == []  # the kept connection is open now
    (event_id,) = add(engine, "k@x.com")
    _terminate_other_backends(engine)
    invalidated: list[BaseException | None] = []
    sa.event.listen(engine, "invalidate", lambda _conn, _record, exc: invalidated.append(exc))
    with pytest.raises(sa.exc.DBAPIError) as failed:
        claim(store, token="t1")
    assert db.is_transient(failed.value)
    assert invalidated, "the broken connection went back to the pool"
    assert ids_of(claim(store, token="t2")) == [event_id]
    store.close()
    assert engine.pool.checkedout() == 0
    engine.dispose()


def test_a_kept_connection_idle_past_keep_idle_is_pinged_before_a_renewal(pg_url, monkeypatch):
    # A server, PgBouncer or load balancer may close a connection left idle; a lease
    # renewal must not be the statement that meets it dead.
    monkeypatch.setattr(store_module, "KEEP_IDLE", 0.05)
    engine = db.create_engine(pg_url)
    store = OutboxStore(engine)
    add(engine, "idle@x.com")
    (c,) = claim(store)
    time.sleep(0.1)
    _terminate_other_backends(engine)
    store.renew_leases({c.lease_token}, LEASE)  # raised OperationalError when kept as it was
    store.record([Record(c, Outcome(Action.DELIVERED, 204))])
    store.close()
    engine.dispose()


def test_with_one_shared_connection_a_batch_of_outcomes_stays_one_transaction():
    # sqlite:// (in memory) pools one connection per thread: engine.begin() gets the
    # same one, which must not be left autocommitting by the store.
    engine = db.create_engine("sqlite://")
    db.migrate(engine)
    store = OutboxStore(engine)
    assert claim(store) == []
    with engine.connect() as conn:
        transaction = conn.begin()
        conn.execute(sa.text("INSERT INTO outbox_events (email, event) VALUES ('r@x.com', 'e')"))
        transaction.rollback()
    assert claim(store, token="t2") == []
    store.close()


def _terminate_other_backends(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
        conn.commit()


# -- record ------------------------------------------------------------------------


def test_record_delivered_marks_the_row_delivered_with_one_more_attempt(engine, store):
    (event_id,) = add(engine, "a@x.com")
    set_row(engine, event_id, attempts=2)
    c = claim_one(store, event_id)
    store.record([Record(c, Outcome(Action.DELIVERED, 204))])

    r = row(engine, event_id)
    assert r.status == "delivered"
    assert r.attempts == 3
    assert r.last_status_code == 204
    assert abs((r.delivered_at - now()).total_seconds()) < 10
    assert r.lease_token is None
    assert attempt_rows(engine, event_id) == []


def test_an_outcome_that_waited_to_be_written_keeps_the_time_its_answer_came(engine, store):
    delivered, dead = add(engine, "a@x.com", "b@x.com")
    a, b = claim(store)
    store.record(
        [
            Record(a, Outcome(Action.DELIVERED, 204), waited=30.0),
            Record(b, Outcome(Action.DEAD, 400, "HTTP 400 bad"), waited=30.0),
        ]
    )
    answered = db_now(engine) - dt.timedelta(seconds=30)
    assert abs((row(engine, delivered).delivered_at - answered).total_seconds()) < 5
    assert abs((row(engine, dead).failed_at - answered).total_seconds()) < 5
    (attempt,) = attempt_rows(engine, dead)
    assert abs((attempt.attempted_at - answered).total_seconds()) < 5


def test_record_retry_puts_the_row_back_to_pending_later(engine, store):
    (event_id,) = add(engine, "a@x.com")
    c = claim_one(store, event_id)
    store.record([Record(c, Outcome(Action.RETRY, 503, "HTTP 503 Service Unavailable", 60.0))])

    r = row(engine, event_id)
    assert r.status == "pending"
    assert r.attempts == 1
    assert r.next_attempt_at > now() + dt.timedelta(seconds=45)
    assert r.last_status_code == 503
    assert r.last_error == "HTTP 503 Service Unavailable"
    assert r.lease_token is None
    assert claim(store, token="t2") == []


def test_record_retry_writes_one_attempt_row(engine, store):
    (event_id,) = add(engine, "a@x.com")
    c = claim_one(store, event_id)
    store.record(
        [Record(c, Outcome(Action.RETRY, 502, "HTTP 502 Bad Gateway", 0.0, duration_ms=12))]
    )

    (a,) = attempt_rows(engine, event_id)
    assert (a.attempt, a.status_code, a.error, a.duration_ms) == (
        1,
        502,
        "HTTP 502 Bad Gateway",
        12,
    )
    assert abs((a.attempted_at - now()).total_seconds()) < 10


def test_attempt_rows_are_numbered_by_attempt(engine, store):
    (event_id,) = add(engine, "a@x.com")
    for token in ("t1", "t2"):
        c = claim_one(store, event_id, token=token)
        store.record([Record(c, Outcome(Action.RETRY, None, "connection error: refused", 0.0))])

    assert [(a.attempt, a.status_code) for a in attempt_rows(engine, event_id)] == [
        (1, None),
        (2, None),
    ]
    assert row(engine, event_id).attempts == 2


def test_record_dead_charged_counts_the_attempt_and_keeps_the_reason(engine, store):
    (event_id,) = add(engine, "a@x.com")
    c = claim_one(store, event_id)
    reason = "HTTP 400 invalid_parameter: email is not valid"
    store.record([Record(c, Outcome(Action.DEAD, 400, reason))])

    r = row(engine, event_id)
    assert r.status == "dead"
    assert r.attempts == 1
    assert r.last_status_code == 400
    assert r.last_error == reason
    assert abs((r.failed_at - now()).total_seconds()) < 10
    assert r.lease_token is None
    assert [(a.attempt, a.status_code, a.error) for a in attempt_rows(engine, event_id)] == [
        (1, 400, reason)
    ]


def test_record_rejected_is_dead_but_spends_no_attempt_and_writes_no_attempt_row(engine, store):
    (event_id,) = add(engine, "a@x.com")
    c = claim_one(store, event_id)
    store.record([Record(c, Outcome(Action.REJECTED, None, "invalid event: email: bad"))])

    r = row(engine, event_id)
    assert r.status == "dead"
    assert r.attempts == 0
    assert r.last_status_code is None
    assert r.last_error == "invalid event: email: bad"
    assert r.failed_at is not None
    assert attempt_rows(engine, event_id) == []


RELEASES = [Action.HALT, Action.THROTTLE, Action.UNSENT]


@pytest.mark.parametrize("action", RELEASES, ids=lambda a: a.value)
def test_record_release_returns_the_row_to_pending_without_spending_an_attempt(
    engine, store, action
):
    (event_id,) = add(engine, "a@x.com")
    set_row(engine, event_id, attempts=2)
    c = claim_one(store, event_id)
    store.record([Record(c, Outcome(action, 401, "HTTP 401 unauthorized"))])

    r = row(engine, event_id)
    assert r.status == "pending"
    assert r.attempts == 2
    assert r.lease_token is None
    assert attempt_rows(engine, event_id) == []
    assert ids_of(claim(store, token="t2")) == [event_id]


@pytest.mark.parametrize("action", RELEASES, ids=lambda a: a.value)
def test_a_released_row_without_an_answer_keeps_the_one_that_stopped_it_before(
    engine, store, action
):
    (event_id,) = add(engine, "a@x.com")
    set_row(engine, event_id, attempts=1, last_status_code=503, last_error="HTTP 503 busy")
    c = claim_one(store, event_id)
    store.record([Record(c, Outcome(action))])

    r = row(engine, event_id)
    assert (r.status, r.attempts, r.last_status_code, r.last_error) == (
        "pending",
        1,
        503,
        "HTTP 503 busy",
    )


def test_a_throttled_row_is_due_again_after_its_pause(engine, store):
    (event_id,) = add(engine, "a@x.com")
    c = claim_one(store, event_id)
    store.record([Record(c, Outcome(Action.THROTTLE, 429, "HTTP 429 slow down", 60.0))])

    assert row(engine, event_id).next_attempt_at > now() + dt.timedelta(seconds=45)
    assert claim(store, token="t2") == []


def test_one_record_call_writes_attempt_rows_for_charged_failures_only(engine, store):
    ids = add(engine, *(f"c{n}@x.com" for n in range(5)))
    by_id = {c.id: c for c in claim(store)}
    outcomes = [
        Outcome(Action.DELIVERED, 204),
        Outcome(Action.RETRY, 500, "HTTP 500 boom", 0.0),
        Outcome(Action.DEAD, 422, "HTTP 422 nope"),
        Outcome(Action.REJECTED, None, "invalid event: event: must not be empty"),
        Outcome(Action.THROTTLE, 429, "HTTP 429 slow down", 1.0),
    ]
    store.record([Record(by_id[i], o) for i, o in zip(ids, outcomes, strict=True)])

    assert [(a.event_id, a.status_code) for a in attempt_rows(engine)] == [
        (ids[1], 500),
        (ids[2], 422),
    ]
    assert [row(engine, i).status for i in ids] == [
        "delivered",
        "pending",
        "dead",
        "dead",
        "pending",
    ]
    assert [row(engine, i).attempts for i in ids] == [1, 1, 1, 0, 0]


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome(Action.DELIVERED, 204),
        Outcome(Action.RETRY, 503, "HTTP 503 late", 60.0),
        Outcome(Action.DEAD, 400, "HTTP 400 late"),
        Outcome(Action.REJECTED, None, "invalid event: late"),
        Outcome(Action.HALT, 401, "HTTP 401 late"),
        Outcome(Action.THROTTLE, 429, "HTTP 429 late", 60.0),
        Outcome(Action.UNSENT),
    ],
    ids=lambda o: o.action.value,
)
def test_record_is_ignored_for_a_row_taken_back_and_claimed_again(engine, store, outcome):
    (event_id,) = add(engine, "a@x.com")
    (first,) = store.claim_due(10, 0.01, "first:1:1")
    time.sleep(0.1)
    assert store.rescue_expired_leases() == [event_id]
    (second,) = store.claim_due(10, LEASE, "second:1:1")
    assert second.id == event_id

    store.record([Record(first, outcome)])

    r = row(engine, event_id)
    assert r.status == "in_flight"
    assert r.lease_token == "second:1:1"
    assert r.attempts == 0
    assert r.last_status_code is None
    assert r.last_error is None
    assert attempt_rows(engine, event_id) == []


# -- lease rescue -------------------------------------------------------------------


def test_rescue_returns_expired_claims_to_pending_and_leaves_live_ones(engine, store):
    expired, live = add(engine, "a@x.com", "b@x.com")
    assert ids_of(store.claim_due(1, 0.01, "gone:1:1")) == [expired]
    assert ids_of(store.claim_due(1, LEASE, "alive:1:1")) == [live]
    time.sleep(0.1)

    assert store.rescue_expired_leases() == [expired]

    r = row(engine, expired)
    assert (r.status, r.lease_token, r.lease_expires_at) == ("pending", None, None)
    assert r.attempts == 0
    assert (row(engine, live).status, row(engine, live).lease_token) == ("in_flight", "alive:1:1")
    assert ids_of(claim(store, token="t3")) == [expired]


def test_rescue_with_nothing_expired_changes_nothing(engine, store):
    (event_id,) = add(engine, "a@x.com")
    claim(store)
    assert store.rescue_expired_leases() == []
    assert row(engine, event_id).status == "in_flight"


# -- prune ---------------------------------------------------------------------------


def test_prune_deletes_delivered_rows_older_than_the_age_only(engine, store):
    old, recent, pending, old_dead = add(engine, "a@x.com", "b@x.com", "c@x.com", "d@x.com")
    ten_days_ago = now() - dt.timedelta(days=10)
    make_delivered(engine, [old, recent])
    set_row(engine, old, delivered_at=ten_days_ago, created_at=ten_days_ago)
    set_row(engine, pending, created_at=ten_days_ago)
    make_dead(engine, old_dead, failed_at=ten_days_ago, created_at=ten_days_ago)

    assert store.prune(dt.timedelta(days=7)) == 1

    assert row(engine, old) is None
    assert row(engine, recent).status == "delivered"
    assert row(engine, pending).status == "pending"
    assert row(engine, old_dead).status == "dead"


def test_prune_with_include_dead_also_deletes_old_dead_rows(engine, store):
    old_dead, recent_dead, old_delivered = add(engine, "a@x.com", "b@x.com", "c@x.com")
    ten_days_ago = now() - dt.timedelta(days=10)
    make_dead(engine, old_dead, failed_at=ten_days_ago)
    make_dead(engine, recent_dead)
    make_delivered(engine, old_delivered, delivered_at=ten_days_ago)

    assert store.prune(dt.timedelta(days=7), include_dead=True) == 2

    assert row(engine, old_dead) is None
    assert row(engine, old_delivered) is None
    assert row(engine, recent_dead).status == "dead"


def test_prune_keeps_deleting_batch_after_batch_until_done(engine, store):
    ids = add(engine, *(f"c{n}@x.com" for n in range(7)))
    make_delivered(engine, ids, delivered_at=now() - dt.timedelta(days=30))
    assert store.prune(dt.timedelta(days=7), batch_size=2) == 7
    assert all(row(engine, i) is None for i in ids)


# -- the heartbeat ---------------------------------------------------------------------


def daemon_row(engine: sa.Engine, name: str = "host:1") -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(outbox_daemons).where(outbox_daemons.c.name == name)).one()


def db_now(engine: sa.Engine) -> dt.datetime:
    with engine.connect() as conn:
        return conn.execute(sa.select(utcnow())).scalar_one()


def test_heartbeat_of_a_new_halted_daemon_says_since_when(engine, store):
    before = db_now(engine)
    store.heartbeat("host:1", DaemonReport("HTTP 401", 0))
    since = daemon_row(engine).halted_since
    assert since is not None and before <= since <= db_now(engine)


def test_heartbeat_sets_halted_since_when_a_halt_begins(engine, store):
    store.heartbeat("host:1", DaemonReport(None, 3))
    assert daemon_row(engine).halted_since is None
    before = db_now(engine)
    store.heartbeat("host:1", DaemonReport("HTTP 401", 3))
    since = daemon_row(engine).halted_since
    assert since is not None and before <= since <= db_now(engine)


def test_heartbeat_keeps_halted_since_while_the_daemon_stays_halted(engine, store):
    store.heartbeat("host:1", DaemonReport("HTTP 401", 0))
    began = (now() - dt.timedelta(hours=2)).replace(microsecond=0)
    with engine.begin() as conn:
        conn.execute(sa.update(outbox_daemons).values(halted_since=began))
    store.heartbeat("host:1", DaemonReport("HTTP 403", 0))  # another reason, still the same halt
    assert daemon_row(engine).halted_since == began


def test_heartbeat_clears_halted_since_once_delivery_resumes(engine, store):
    store.heartbeat("host:1", DaemonReport("HTTP 401", 0))
    store.heartbeat("host:1", DaemonReport(None, 1))
    assert daemon_row(engine).halted_since is None
    before = db_now(engine)
    store.heartbeat("host:1", DaemonReport("HTTP 401", 1))  # a new halt starts its own clock
    assert daemon_row(engine).halted_since >= before


def test_heartbeat_writes_the_transport_and_what_its_requests_carried(engine, store):
    store.heartbeat("host:1", DaemonReport(transport="v3-batch"))
    sent = DaemonReport(None, 7, transport="v3-batch", requests=2, events_sent=9, largest_batch=5)
    store.heartbeat("host:1", dataclasses.replace(sent, dead=2))
    row = daemon_row(engine)
    assert (row.transport, row.requests, row.events_sent, row.largest_batch, row.dead) == (
        "v3-batch",
        2,
        9,
        5,
        2,
    )
    assert row.delivered == 7


# -- the dead-letter view ------------------------------------------------------------


def test_dead_letters_view_shows_dead_rows_with_their_reason(engine, store):
    dead, delivered, pending = add(engine, "a@x.com", "b@x.com", "c@x.com", event="cart_updated")
    by_id = {c.id: c for c in claim(store)}
    reason = "HTTP 400 invalid_parameter: properties are too big"
    store.record(
        [
            Record(by_id[dead], Outcome(Action.DEAD, 400, reason)),
            Record(by_id[delivered], Outcome(Action.DELIVERED, 204)),
            Record(by_id[pending], Outcome(Action.RETRY, 503, "HTTP 503", 60.0)),
        ]
    )

    with engine.connect() as conn:
        result = conn.execute(sa.text("SELECT * FROM outbox_dead_letters"))
        columns = set(result.keys())
        view_rows = result.mappings().all()

    assert columns >= DEAD_LETTER_COLUMNS
    assert len(view_rows) == 1
    (v,) = view_rows
    assert (v["id"], v["email"], v["event"]) == (dead, "a@x.com", "cart_updated")
    assert (v["attempts"], v["last_status_code"], v["last_error"]) == (1, 400, reason)
    assert v["failed_at"] is not None


def test_the_claim_probes_one_contact_at_a_time_even_with_stale_statistics(pg_url):
    """PostgreSQL planned the per-contact check as a scan of every open row per
    candidate once ANALYZE had seen only delivered history: 98 ms a claim at
    1M rows. The claim must probe the open-contact index with the candidate's
    email, whatever the statistics say."""
    engine = db.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_events (email, event, status, delivered_at)"
                " SELECT 'h' || g || '@example.com', 'x', 'delivered', now()"
                " FROM generate_series(1, 20000) AS g"
            )
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE outbox_events"))
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_events (email, event)"
                " SELECT 'p' || g || '@example.com', 'x' FROM generate_series(1, 2000) AS g"
            )
        )
    claim = _CLAIM[True].compile(dialect=engine.dialect)
    params = {**claim.params, "b_limit": 100, "b_token": "t", "b_lease": 60.0}
    with engine.begin() as conn:
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {claim.string}", params).scalars())
        conn.rollback()
    assert "ix_outbox_events_open_contact" in plan
    assert re.search(
        # The contact key, however PostgreSQL prints its collation cast.
        r"Index Cond: \(\(lower\(\(?email\b[^=]*= lower\(\(?outbox_events\w*\.email\b",
        plan,
    ), plan
    engine.dispose()
