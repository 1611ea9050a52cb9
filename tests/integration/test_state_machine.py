"""Every row's life against a model: a hypothesis state machine over real databases.

The machine enqueues with track_events, claims with OutboxStore.claim_due,
records outcomes (delivered, retry, dead, rejected, and the releases: halt,
throttle, unsent), lets leases run out
("a daemon crashed": claim, forget the claim, and the lease elapses), rescues,
requeues and purges, in any order, on a real SQLite file and a real PostgreSQL
database. A small in-memory model says what each row must be: its status, its
attempts, which claim holds it. After every step the whole table is checked
against the model: no row lost or invented, statuses, attempts, leases, the
due set, the dead-letter view and the attempt history.

Per-contact order follows the contract's definition of "due" (INTERFACE.md
section 6): a row is claimed only when no older row of its contact is pending
or in flight. Requeueing an older dead row while a newer one of its contact is
in flight re-opens the older one, and the definition then lets both be in
flight at once; the model allows exactly that case and no other.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.conftest import new_pg_database
from worker import admin_reports, db, track_events
from worker.admin import EventFilter, OutboxAdmin
from worker.backends.sql import seconds_from_now, utcnow
from worker.policy import Action, Outcome
from worker.schema import outbox_attempts, outbox_events
from worker.store import ClaimedEvent, OutboxStore, Record

e = outbox_events
a = outbox_attempts
LEASE = 3600.0  # never runs out by itself during a run: the machine decides when it does
EMAILS = ["ann@example.com", "ANN@Example.COM", "bob@example.com", "cy@example.com"]
KEYS = [None, None, None, "k1", "k2"]
LATER = dt.timedelta(hours=1)
LATERS = st.sampled_from([False, False, False, True])  # deliver_after=LATER, now and then
BATCHES = st.lists(
    st.tuples(st.sampled_from(EMAILS), st.sampled_from(KEYS), LATERS),
    min_size=1,
    max_size=4,
)

# What a daemon writes for an answer (worker.policy.decide and the daemon's
# own outcomes), by name.
OUTCOMES = {
    "delivered": Outcome(Action.DELIVERED, 204, None),
    "retry now": Outcome(Action.RETRY, 503, "HTTP 503", retry_in=0.0),
    "retry later": Outcome(Action.RETRY, None, "timeout", retry_in=3600.0),
    "dead": Outcome(Action.DEAD, 400, "HTTP 400: invalid_parameter"),
    "rejected": Outcome(Action.REJECTED, None, "invalid event: email: bad"),
    "released, halted": Outcome(Action.HALT, 401, "HTTP 401"),
    "released, throttled": Outcome(Action.THROTTLE, 429, "HTTP 429", retry_in=3600.0),
    "released, unsent": Outcome(Action.UNSENT),
}

# The model's own word for what each action writes, not worker.policy's:
# (the row's status, an attempt spent, released: keeps the answer that stopped it).
WRITES = {
    Action.DELIVERED: ("delivered", True, False),
    Action.RETRY: ("pending", True, False),
    Action.DEAD: ("dead", True, False),
    Action.REJECTED: ("dead", False, False),
    Action.HALT: ("pending", False, True),
    Action.THROTTLE: ("pending", False, True),
    Action.UNSENT: ("pending", False, True),
}


@dataclasses.dataclass
class Row:
    """What the model knows of one row."""

    id: int
    email: str
    event: str
    key: str | None
    status: str = "pending"
    attempts: int = 0
    due: bool = True  # pending and next_attempt_at has passed
    token: str | None = None  # the claim that holds it, while in flight
    expired: bool = False  # its lease has run out (not yet rescued)
    attempt_log: list[tuple[int, int | None]] = dataclasses.field(default_factory=list)
    last_code: int | None = None
    last_error: str | None = None
    claimed_at: int = -1  # the machine's clock at its latest claim
    requeued_at: int = -1  # the machine's clock at its latest requeue

    @property
    def contact(self) -> str:
        return self.email.lower()


class OutboxMachine(RuleBasedStateMachine):
    engine: sa.Engine | None = None  # set for each backend by the `machine_engine` fixture

    def __init__(self) -> None:
        super().__init__()
        assert self.engine is not None
        with self.engine.begin() as conn:
            conn.execute(sa.delete(a))
            conn.execute(sa.delete(e))
        self.store = OutboxStore(self.engine)
        self.admin = OutboxAdmin(self.engine)
        self.rows: dict[int, Row] = {}
        self.claims: dict[str, list[ClaimedEvent]] = {}  # every claim ever made, by token
        self.rescued: list[tuple[str, ClaimedEvent]] = []  # claims that lease rescue voided
        self.tokens = itertools.count(1)
        self.events = itertools.count(1)
        self.clock = itertools.count(1)

    # -- helpers -------------------------------------------------------------------

    def live(self, token: str) -> list[ClaimedEvent]:
        """The events of a claim whose rows it still holds."""
        held = []
        for c in self.claims[token]:
            row = self.rows.get(c.id)
            if row and row.status == "in_flight" and row.token == token:
                held.append(c)
        return held

    def live_tokens(self) -> list[str]:
        return [t for t in self.claims if self.live(t)]

    def eligible(self) -> set[int]:
        """Due by the contract: pending, next_attempt_at passed, no older open row of
        the same contact."""
        result = set()
        for row in self.rows.values():
            if row.status != "pending" or not row.due:
                continue
            if any(
                o.id < row.id and o.contact == row.contact and o.status in ("pending", "in_flight")
                for o in self.rows.values()
            ):
                continue
            result.add(row.id)
        return result

    def snapshot(self) -> tuple[list[Any], list[Any]]:
        with self.engine.connect() as conn:  # type: ignore[union-attr]
            return (
                [tuple(r) for r in conn.execute(sa.select(e).order_by(e.c.id))],
                [tuple(r) for r in conn.execute(sa.select(a).order_by(a.c.id))],
            )

    def do_claim(self, limit: int, lease: float) -> list[ClaimedEvent]:
        eligible = self.eligible()
        with self.engine.connect() as conn:  # type: ignore[union-attr]
            query = sa.select(e.c.id, e.c.next_attempt_at).where(e.c.id.in_(eligible))
            due_at = {r.id: r.next_attempt_at for r in conn.execute(query)}
        token = f"host:1:{next(self.tokens)}"
        claimed = self.store.claim_due(limit, lease, token)
        ids = [c.id for c in claimed]
        assert ids == sorted(ids)
        oldest_due_first = sorted(eligible, key=lambda i: (due_at[i], i))[:limit]
        assert set(ids) == set(oldest_due_first), (
            f"claimed {ids}; due by the contract, oldest first: {oldest_due_first}"
        )
        for c in claimed:
            row = self.rows[c.id]
            assert (c.email, c.event, c.attempts, c.lease_token) == (
                row.email,
                row.event,
                row.attempts,
                token,
            )
            row.status, row.token, row.expired = "in_flight", token, lease <= 0
            row.claimed_at = next(self.clock)
        self.claims[token] = claimed
        event(f"claimed {min(len(claimed), 3)}{'+' if len(claimed) >= 3 else ''} rows")
        return claimed

    def apply(self, claimed: ClaimedEvent, outcome: Outcome) -> None:
        """What recording an outcome does to a row still held by the claim."""
        row = self.rows[claimed.id]
        status, charged, released = WRITES[outcome.action]
        if charged and status != "delivered":  # a charged failure is in the history
            row.attempt_log.append((claimed.attempts + 1, outcome.status_code))
        row.attempts += 1 if charged else 0
        if released:  # keeps what stopped it
            if outcome.status_code is not None:
                row.last_code = outcome.status_code
            if outcome.error is not None:
                row.last_error = outcome.error
        else:
            row.last_code = outcome.status_code
            row.last_error = None if status == "delivered" else outcome.error
        row.due = status == "pending" and outcome.retry_in <= 0
        row.status, row.token, row.expired = status, None, False

    # -- rules -----------------------------------------------------------------------

    @initialize(
        batch=st.lists(
            st.tuples(st.sampled_from(EMAILS), st.sampled_from(KEYS), LATERS),
            min_size=2,
            max_size=6,
        )
    )
    def start(self, batch: list[tuple[str, str | None, bool]]) -> None:
        self.enqueue(batch, commit=True)

    @rule(batch=BATCHES, commit=st.sampled_from([True, True, True, False]))
    def enqueue(self, batch: list[tuple[str, str | None, bool]], commit: bool) -> None:
        specs = [
            {
                "email": email,
                "event": f"event-{next(self.events)}",
                "idempotency_key": key,
                "deliver_after": LATER if later else None,
            }
            for email, key, later in batch
        ]
        with self.engine.connect() as conn, conn.begin() as transaction:  # type: ignore[union-attr]
            ids = track_events(conn, specs)
            if not commit:
                transaction.rollback()
        keys = {row.key: row.id for row in self.rows.values() if row.key is not None}
        newest = max(self.rows, default=0)
        new: list[Row] = []
        for spec, id_ in zip(specs, ids, strict=True):
            key = spec["idempotency_key"]
            if key is not None and key in keys:
                assert id_ == keys[key], f"key {key!r}: got {id_}, the row with it is {keys[key]}"
                continue
            assert id_ > newest, f"new id {id_} is not after {newest}"
            newest = id_
            if key is not None:
                keys[key] = id_
            new.append(Row(id_, spec["email"], spec["event"], key, due=not spec["deliver_after"]))
        if commit:
            self.rows.update((row.id, row) for row in new)

    @rule(limit=st.sampled_from([1, 2, 3, 100]))
    def claim(self, limit: int) -> None:
        self.do_claim(limit, LEASE)

    @rule(limit=st.sampled_from([1, 100]))
    def crash(self, limit: int) -> None:
        """A daemon claims and dies: its claim is forgotten and its lease already over."""
        self.do_claim(limit, -1.0)

    @precondition(lambda self: self.live_tokens())
    @rule(data=st.data())
    def record(self, data: st.DataObject) -> None:
        token = data.draw(st.sampled_from(self.live_tokens()), label="claim")
        events = data.draw(
            st.lists(st.sampled_from(self.live(token)), min_size=1, unique_by=lambda c: c.id),
            label="events",
        )
        names = data.draw(st.lists(st.sampled_from(sorted(OUTCOMES)), min_size=len(events),
                                   max_size=len(events)), label="outcomes")  # fmt: skip
        self.store.record([Record(c, OUTCOMES[n]) for c, n in zip(events, names, strict=True)])
        for c, name in zip(events, names, strict=True):
            self.apply(c, OUTCOMES[name])

    @precondition(lambda self: self.live_tokens())
    @rule(data=st.data())
    def lease_elapses(self, data: st.DataObject) -> None:
        """Time passes for one claim: its daemon is gone and its lease runs out."""
        token = data.draw(st.sampled_from(self.live_tokens()), label="claim")
        with self.engine.begin() as conn:  # type: ignore[union-attr]
            conn.execute(
                sa.update(e)
                .where(e.c.lease_token == token)
                .values(lease_expires_at=seconds_from_now(-1.0))
            )
        for c in self.live(token):
            self.rows[c.id].expired = True

    @rule()
    def rescue(self) -> None:
        rescued = self.store.rescue_expired_leases()
        expected = sorted(r.id for r in self.rows.values() if r.status == "in_flight" and r.expired)
        assert rescued == expected, f"rescued {rescued}, expired leases {expected}"
        for id_ in rescued:
            row = self.rows[id_]
            self.rescued.extend((row.token, c) for c in self.claims[row.token] if c.id == id_)  # type: ignore[index]
            row.status, row.token, row.expired, row.due = "pending", None, False, True

    @precondition(lambda self: self.rescued)
    @rule(data=st.data(), outcome=st.sampled_from(sorted(OUTCOMES)))
    def answer_after_rescue(self, data: st.DataObject, outcome: str) -> None:
        """A late answer for a claim that lease rescue voided (the row may be claimed
        again, or finished, or purged since): recording it changes nothing."""
        token, claimed = data.draw(st.sampled_from(self.rescued), label="stale claim")
        row = self.rows.get(claimed.id)
        assert row is None or row.token != token
        event(f"late answer after rescue: row {'purged' if row is None else row.status}")
        before = self.snapshot()
        self.store.record([Record(claimed, OUTCOMES[outcome])])
        assert self.snapshot() == before, "an outcome under a voided claim changed the table"

    @precondition(lambda self: self.claims)
    @rule(data=st.data(), outcome=st.sampled_from(sorted(OUTCOMES)))
    def answer_twice(self, data: st.DataObject, outcome: str) -> None:
        """A second answer for a claim that no longer holds its row changes nothing."""
        done = [
            (t, c)
            for t, events in self.claims.items()
            for c in events
            if (row := self.rows.get(c.id)) is None or row.token != t
        ]
        if not done:
            return
        _, claimed = data.draw(st.sampled_from(done), label="finished claim")
        before = self.snapshot()
        self.store.record([Record(claimed, OUTCOMES[outcome])])
        assert self.snapshot() == before, "an outcome under a finished claim changed the table"

    @precondition(lambda self: any(r.status == "pending" and not r.due for r in self.rows.values()))
    @rule(data=st.data())
    def time_passes(self, data: st.DataObject) -> None:
        """A backoff or a deliver_after runs out."""
        waiting = sorted(r.id for r in self.rows.values() if r.status == "pending" and not r.due)
        ids = data.draw(st.lists(st.sampled_from(waiting), min_size=1, unique=True), label="ids")
        with self.engine.begin() as conn:  # type: ignore[union-attr]
            conn.execute(
                sa.update(e).where(e.c.id.in_(ids)).values(next_attempt_at=seconds_from_now(-1.0))
            )
        for id_ in ids:
            self.rows[id_].due = True

    @rule(data=st.data(), how=st.sampled_from(["ids", "status code", "all"]))
    def requeue(self, data: st.DataObject, how: str) -> None:
        kwargs: dict[str, Any] = {}
        if how == "ids":
            if not self.rows:
                return
            ids = data.draw(
                st.lists(st.sampled_from(sorted(self.rows)), min_size=1, unique=True), label="ids"
            )
            kwargs["selection"] = EventFilter(ids=tuple(ids))
            chosen = [self.rows[i] for i in ids]
        elif how == "status code":
            code = data.draw(st.sampled_from([400, 503, 401, 204]), label="code")
            kwargs["selection"] = EventFilter(status_code=code)
            chosen = [r for r in self.rows.values() if r.last_code == code]
        else:
            kwargs.update(selection=EventFilter(), everything=True)
            chosen = list(self.rows.values())
        dead = [r for r in chosen if r.status == "dead"]
        assert self.admin.requeue(**kwargs).count == len(dead)
        for row in dead:
            row.status, row.attempts, row.due = "pending", 0, True
            row.requeued_at = next(self.clock)
            if any(
                o.id > row.id and o.contact == row.contact and o.status == "in_flight"
                for o in self.rows.values()
            ):
                event("requeued behind a newer in-flight row of its contact")

    @rule(data=st.data(), everything=st.booleans())
    def purge(self, data: st.DataObject, everything: bool) -> None:
        if everything or not self.rows:
            count, chosen = self.admin.purge(EventFilter(), everything=True).count, list(self.rows)
        else:
            chosen = data.draw(
                st.lists(st.sampled_from(sorted(self.rows)), min_size=1, unique=True), label="ids"
            )
            count = self.admin.purge(EventFilter(ids=tuple(chosen))).count
        dead = [i for i in chosen if self.rows[i].status == "dead"]
        assert count == len(dead)
        for id_ in dead:
            del self.rows[id_]

    @rule()
    def stats(self) -> None:
        stats = admin_reports.stats(self.engine)
        counts = Counter(r.status for r in self.rows.values())
        assert stats.counts == {
            s: counts.get(s, 0) for s in ("pending", "in_flight", "delivered", "dead")
        }
        assert stats.due == sum(r.status == "pending" and r.due for r in self.rows.values())

    # -- the whole table against the model, after every step ------------------------------

    @invariant()
    def table_matches_model(self) -> None:
        with self.engine.connect() as conn:  # type: ignore[union-attr]
            table = {r.id: r for r in conn.execute(sa.select(e))}
            due = set(
                conn.execute(
                    sa.select(e.c.id).where(
                        e.c.status == "pending", e.c.next_attempt_at <= utcnow()
                    )
                ).scalars()
            )
            dead_letters = {
                r.id: r
                for r in conn.execute(
                    sa.text("SELECT id, attempts, last_status_code FROM outbox_dead_letters")
                )
            }
            attempts: dict[int, list[tuple[int, int | None]]] = {}
            for event_id, attempt, code in conn.execute(
                sa.select(a.c.event_id, a.c.attempt, a.c.status_code).order_by(a.c.id)
            ):
                attempts.setdefault(event_id, []).append((attempt, code))
        assert set(table) == set(self.rows), (
            f"lost {sorted(set(self.rows) - set(table))}, unknown {sorted(set(table) - set(self.rows))}"
        )
        for id_, row in self.rows.items():
            got = table[id_]
            assert (got.status, got.attempts, got.last_status_code, got.last_error) == (
                row.status,
                row.attempts,
                row.last_code,
                row.last_error,
            ), f"outbox id {id_}"
            assert got.lease_token == row.token, f"outbox id {id_}: lease token"
            in_flight = got.status == "in_flight"
            assert in_flight == (got.lease_token is not None) == (got.lease_expires_at is not None)
            assert (got.status == "delivered") == (got.delivered_at is not None)
            assert (got.status == "dead") == (got.failed_at is not None)
            assert attempts.get(id_, []) == row.attempt_log, f"outbox id {id_}: attempt rows"
        assert due == {r.id for r in self.rows.values() if r.status == "pending" and r.due}
        assert set(attempts) <= set(self.rows), "attempt rows of a purged event"
        dead = {i: r for i, r in self.rows.items() if r.status == "dead"}
        assert set(dead_letters) == set(dead), "outbox_dead_letters"
        for id_, row in dead.items():
            assert (dead_letters[id_].attempts, dead_letters[id_].last_status_code) == (
                row.attempts,
                row.last_code,
            )
        # One row of a contact in flight at a time, but for the case the contract's
        # "due" allows: an older row requeued after the newer one was claimed.
        in_flight = sorted(
            (r for r in self.rows.values() if r.status == "in_flight"), key=lambda r: r.id
        )
        for older, newer in itertools.combinations(in_flight, 2):
            if older.contact == newer.contact:
                assert older.requeued_at > newer.claimed_at, (
                    f"outbox ids {older.id} and {newer.id} of one contact are both in flight"
                )


class OnSQLite(OutboxMachine):
    backend = "sqlite"


class OnPostgreSQL(OutboxMachine):
    backend = "postgresql"


MACHINE_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
TestOutboxOnSQLite = OnSQLite.TestCase
TestOutboxOnSQLite.settings = MACHINE_SETTINGS
TestOutboxOnSQLite.machine = OnSQLite  # type: ignore[attr-defined]
TestOutboxOnPostgreSQL = OnPostgreSQL.TestCase
TestOutboxOnPostgreSQL.settings = MACHINE_SETTINGS
TestOutboxOnPostgreSQL.machine = OnPostgreSQL  # type: ignore[attr-defined]


@pytest.fixture(autouse=True, scope="class")
def machine_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """A migrated database for each machine class, kept for all its examples (each
    example starts by emptying the tables)."""
    machine = getattr(request.cls, "machine", None)
    if machine is None:
        yield
        return
    if machine.backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('machine') / 'outbox.db'}"
        engine = db.create_engine(url)
        db.migrate(engine)
    else:
        engine = db.create_engine(new_pg_database(request.getfixturevalue("pg_server")))
    machine.engine = engine
    yield
    machine.engine = None
    engine.dispose()


def test_the_machine_records_every_action_and_models_each() -> None:
    assert {o.action for o in OUTCOMES.values()} == set(WRITES) == set(Action)
