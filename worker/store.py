"""The daemon's statements: claim, renew, record, rescue, backlog, heartbeat, the
maintenance lead, and the prune that maintenance (and the operator's `prune`) runs.

Every statement is SQLAlchemy Core, built once at import and shared by
SQLite and PostgreSQL; what differs between them (binding a batch, the upsert,
the maintenance lock, whether the claim and a one-statement record run on the
driver's cursor) is the backend's (worker.backends). The operator's side
imports this module, never the reverse: its selections and changes (lists,
requeue, purge, cancel) are worker.admin's, its readings (stats, reports)
worker.admin_reports'. Hot-path work is set-based: one claim statement per
batch, one transaction per batch of outcomes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from worker.backends import all_backends, backend_for
from worker.backends.sql import UTCDateTime, contact_key, seconds_from_now, utcnow
from worker.policy import Action, Outcome
from worker.schema import (
    DEAD,
    DELIVERED,
    IN_FLIGHT,
    PENDING,
    outbox_attempts,
    outbox_daemons,
    outbox_events,
)

e = outbox_events

# A kept connection idle longer than this (seconds) goes back to the pool, and the
# next statement takes one that the pool pings first: a server, a PgBouncer or a
# load balancer may close a connection left idle, and a lease renewal must not be
# the statement that finds out.
KEEP_IDLE = 1.0


@dataclass(frozen=True)
class ClaimedEvent:
    """A row this daemon holds: the stored fields (JSON still as text) and its lease."""

    id: int
    email: Any
    event: Any
    properties: str | None
    eventdata: str | None
    attempts: int
    created_at: dt.datetime | None  # None when unreadable
    lease_token: str
    unreadable: str | None = None  # why the row cannot be sent as it is (never sent)
    # The enqueuing span's W3C context, as stored (worker.tracecontext reads it).
    traceparent: Any = None
    tracestate: Any = None


@dataclass(frozen=True)
class Record:
    """An outcome to write for a claimed row, if the row is still ours."""

    event: ClaimedEvent
    outcome: Outcome
    transport: str | None = None  # the transport its attempt went by
    # Seconds from its answer to this write: the row's times (delivered, failed, the
    # attempt's) are the database's clock less this, when the answer came.
    waited: float = 0.0


@dataclass(frozen=True)
class DaemonReport:
    """What a daemon's heartbeat says of it: its state, and its figures since it started."""

    halted_reason: str | None = None
    delivered: int = 0
    paused_until: dt.datetime | None = None  # the end of a long pause in effect
    transport: str | None = None
    requests: int = 0  # HTTP requests answered (or failed on the network)
    events_sent: int = 0  # the events those requests carried
    largest_batch: int = 0  # the most events one request carried
    dead: int = 0  # events dead-lettered, one by one (those never sent too)


def _claim_statement(contact_order: bool) -> sa.Update:
    older = e.alias("older")
    # OFFSET 0 keeps PostgreSQL from turning this into an anti-join, which it
    # planned as a scan of every open row per candidate when its statistics
    # were stale (98 ms a claim); as a subplan it is one index probe per row.
    older_open = sa.exists(
        sa.select(older.c.id)
        .where(
            contact_key(older.c.email) == contact_key(e.c.email),
            older.c.id < e.c.id,
            older.c.status.in_([PENDING, IN_FLIGHT]),
        )
        .offset(sa.literal_column("0"))
    )
    conditions = [e.c.status == PENDING, e.c.next_attempt_at <= utcnow()]
    if contact_order:
        conditions.append(~older_open)
    due = (
        sa.select(e.c.id)
        .where(*conditions)
        .order_by(e.c.next_attempt_at, e.c.id)
        .limit(sa.bindparam("b_limit"))
        # PostgreSQL: claimers on other hosts skip each other's rows instead of
        # waiting. SQLite renders no lock clause: its writers are serialised.
        .with_for_update(skip_locked=True)
    )
    return (
        sa.update(e)
        .where(e.c.id.in_(due.scalar_subquery()))
        .values(
            status=IN_FLIGHT,
            lease_token=sa.bindparam("b_token"),
            lease_expires_at=seconds_from_now(sa.bindparam("b_lease", type_=sa.Float)),
        )
        .returning(
            e.c.id,
            e.c.email,
            e.c.event,
            sa.cast(e.c.properties, sa.Text).label("properties"),
            sa.cast(e.c.eventdata, sa.Text).label("eventdata"),
            e.c.attempts,
            # As stored: a plain-SQL row on SQLite may hold text that is no
            # timestamp, which must dead-letter that row, not fail the claim.
            sa.type_coerce(e.c.created_at, sa.Text).label("created_at"),
            e.c.traceparent,
            e.c.tracestate,
        )
    )


_CLAIM = {ordered: _claim_statement(ordered) for ordered in (True, False)}

_OUTCOME_COLUMNS = ("id", "token", "action", "code", "error", "delay", "waited")
_ATTEMPT_COLUMNS = ("id", "token", "attempt", "code", "error", "ms", "transport", "waited")
_TYPES: dict[str, sa.types.TypeEngine[Any]] = {
    "id": sa.BigInteger(),
    "token": sa.String(),
    "action": sa.String(),
    "code": sa.Integer(),
    "error": sa.Text(),
    "delay": sa.Float(),
    "attempt": sa.Integer(),
    "ms": sa.Integer(),
    "transport": sa.String(),
    "waited": sa.Float(),
}


def _outcome_statement(src: Any) -> sa.Update:
    """One UPDATE for a batch of outcomes of every kind, reading each row's action
    from `src` (bound parameters, or a table of arrays on PostgreSQL).

    An outcome only lands on a row still in_flight under the same claim: a late
    answer never overwrites a row that lease rescue gave to another daemon.
    """
    action = src.action
    answered = seconds_from_now(-src.waited)
    delivered = _one_of(action, lambda a: a.status == "delivered")
    released = _one_of(action, lambda a: a.released)
    return (
        sa.update(e)
        .where(e.c.id == src.id, e.c.status == IN_FLIGHT, e.c.lease_token == src.token)
        .values(
            status=sa.case({_constant(a.value): _constant(a.status) for a in Action}, value=action),
            attempts=e.c.attempts + sa.case((_one_of(action, lambda a: a.charged), 1), else_=0),
            next_attempt_at=sa.case(
                (_one_of(action, lambda a: a.status == "pending"), seconds_from_now(src.delay)),
                else_=e.c.next_attempt_at,
            ),
            delivered_at=sa.case((delivered, answered), else_=e.c.delivered_at),
            failed_at=sa.case(
                (_one_of(action, lambda a: a.status == "dead"), answered), else_=e.c.failed_at
            ),
            # A released row keeps the answer that stopped it, so operators see
            # why it waits; any other outcome says what its own attempt got.
            last_status_code=sa.case(
                (released, sa.func.coalesce(src.code, e.c.last_status_code)), else_=src.code
            ),
            last_error=sa.case(
                (delivered, sa.null()),
                (released, sa.func.coalesce(src.error, e.c.last_error)),
                else_=src.error,
            ),
            lease_token=None,
            lease_expires_at=None,
        )
    )


def _one_of(action: Any, which: Callable[[Action], bool]) -> Any:
    """Whether a row's action (a column of `src`) is one of those `which` picks."""
    return action.in_([_constant(a.value) for a in Action if which(a)])


def _constant(value: str) -> Any:
    # Spelled into the statement, not bound: a bound IN list is one "expanding"
    # parameter, which an executemany (a batch on SQLite) cannot bind.
    return sa.literal_column(f"'{value}'")


def _attempt_statement(src: Any, from_: Any = None) -> sa.Insert:
    """outbox_attempts rows for charged failures, only for rows still ours."""
    select = sa.select(
        e.c.id,
        src.attempt,
        seconds_from_now(-src.waited),
        src.code,
        src.error,
        src.ms,
        src.transport,
    )
    if from_ is not None:
        select = select.select_from(from_)
    return sa.insert(outbox_attempts).from_select(
        ["event_id", "attempt", "attempted_at", "status_code", "error", "duration_ms", "transport"],
        select.where(e.c.id == src.id, e.c.status == IN_FLIGHT, e.c.lease_token == src.token),
    )


# Each backend's outcome and attempt statements, reading a batch of rows in one go.
_WRITE = {
    b.name: (
        _outcome_statement(b.batch_source(_OUTCOME_COLUMNS, _TYPES)[0]),
        _attempt_statement(*b.batch_source(_ATTEMPT_COLUMNS, _TYPES)),
    )
    for b in all_backends()
}

# Due rows: how many, and the earliest due time (the due index): the daemon's backlog
# gauge, and the operator's stats.
BACKLOG = sa.select(sa.func.count(), sa.func.min(e.c.next_attempt_at)).where(
    e.c.status == PENDING, e.c.next_attempt_at <= utcnow()
)

_RENEW = (
    sa.update(e)
    .where(e.c.status == IN_FLIGHT, e.c.lease_token.in_(sa.bindparam("b_tokens", expanding=True)))
    .values(lease_expires_at=seconds_from_now(sa.bindparam("b_lease", type_=sa.Float)))
)

_RESCUE = (
    sa.update(e)
    .where(e.c.status == IN_FLIGHT, e.c.lease_expires_at < utcnow())
    .values(status=PENDING, next_attempt_at=utcnow(), lease_token=None, lease_expires_at=None)
    .returning(e.c.id)
)


class _OnTheDriver:
    """A statement compiled once and run on the driver's cursor of a SQLAlchemy
    connection, failing as SQLAlchemy's own execute would.

    For the delivery loop's hot statements: SQLAlchemy's execute costs more client
    CPU than psycopg itself (0.32 against 0.12 ms for a claim on the project's
    machine), and at a low rate each event is a claim of its own.
    """

    def __init__(self, statement: sa.Update, dialect: sa.Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self.bound = dict(compiled.params)  # what the statement binds itself (SET x = NULL)
        # Known here: asking the cursor (its description) builds a column object each.
        self.returns_rows = bool(compiled.effective_returning)
        self.dialect = dialect

    def run(self, conn: sa.Connection, params: dict[str, Any]) -> list[Any]:
        """The rows it returns (none for a statement returning none)."""
        params = {**self.bound, **params}
        driver = conn.connection.dbapi_connection
        assert driver is not None  # a connection in use has one
        error = self.dialect.loaded_dbapi.Error
        try:
            cursor = driver.cursor()
            try:
                cursor.execute(self.sql, params)
                return list(cursor.fetchall()) if self.returns_rows else []
            finally:
                cursor.close()
        except error as exc:
            broken = self.dialect.is_disconnect(exc, driver, None)
            raise sa.exc.DBAPIError.instance(
                self.sql, params, exc, error, connection_invalidated=broken, dialect=self.dialect
            ) from exc


class OutboxStore:
    """The outbox, as the daemon sees it."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.backend = backend_for(engine)
        # A single statement is atomic by itself: run alone it needs no BEGIN and
        # no COMMIT, two round trips fewer on PostgreSQL (claims and most records
        # at a low rate come one event at a time).
        self._single = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._kept = threading.local()  # each thread's kept connection (_connection)
        # A pool of one shared connection hands engine.begin() the kept one, still
        # autocommitting: nothing to save there, and a batch must stay one transaction.
        self._keeps = not isinstance(engine.pool, (sa.pool.SingletonThreadPool, sa.pool.StaticPool))
        self._on_driver: dict[sa.Update, _OnTheDriver] = {}
        if self.backend.hot_statements_on_the_driver:
            hot = [*_CLAIM.values(), _WRITE[self.backend.name][0]]
            self._on_driver = {s: _OnTheDriver(s, engine.dialect) for s in hot}

    # -- the delivery loop -------------------------------------------------

    def claim_due(
        self, limit: int, lease_seconds: float, token: str, contact_order: bool = True
    ) -> list[ClaimedEvent]:
        """Take up to `limit` due rows, oldest due first; with contact_order, never a
        row while an older row of its contact is pending or in flight."""
        params = {"b_limit": limit, "b_token": token, "b_lease": lease_seconds}
        with self._connection() as conn:
            rows = self._hot(conn, _CLAIM[contact_order], params)
        claimed = [_claimed(r, token) for r in rows]
        claimed.sort(key=lambda c: c.id)
        return claimed

    def renew_leases(self, tokens: Iterable[str], lease_seconds: float) -> None:
        """Extend every row still held under these claims, in one statement."""
        with self._connection() as conn:
            conn.execute(_RENEW, {"b_tokens": sorted(tokens), "b_lease": lease_seconds})

    def record(self, records: Sequence[Record]) -> None:
        """Write a batch of outcomes in one transaction: the attempt rows, then the outcomes."""
        if not records:
            return
        outcomes = [_outcome_row(r) for r in records]
        attempts = [_attempt_row(r) for r in records if r.outcome.action.writes_attempt]
        write_outcomes, write_attempts = _WRITE[self.backend.name]
        bind = self.backend.bind
        if not attempts and self.backend.batch_is_one_statement:  # deliveries and releases
            with self._connection() as conn:
                self._hot(conn, write_outcomes, bind(_OUTCOME_COLUMNS, outcomes))
            return
        with self.engine.begin() as conn:
            # Attempts first: their guard needs the rows still in_flight.
            if attempts:
                conn.execute(write_attempts, bind(_ATTEMPT_COLUMNS, attempts))
            conn.execute(write_outcomes, bind(_OUTCOME_COLUMNS, outcomes))

    def _hot(self, conn: sa.Connection, statement: sa.Update, params: Any) -> Sequence[Any]:
        """Run one of the loop's hot statements, on the driver where the backend allows."""
        on_driver = self._on_driver.get(statement)
        if on_driver is not None:
            return on_driver.run(conn, params)
        result = conn.execute(statement, params)
        return result.all() if result.returns_rows else []

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sa.Connection]:
        """This thread's autocommit connection, kept from one statement of the delivery
        loop to the next while they come within KEEP_IDLE of each other. A checkout
        from the pool costs a pre-ping round trip, and on PostgreSQL about as much
        client CPU as a small statement (0.68 ms against 0.29 ms for a SELECT 1 on
        the project's machine); at a low rate each event is its own claim and record.
        A statement that fails drops the connection; the next one takes a fresh one."""
        kept = self._kept
        conn = getattr(kept, "conn", None)
        if conn is not None and time.monotonic() - kept.used > KEEP_IDLE:
            self.close()
            conn = None
        if conn is None:
            conn = self._single.connect()
        kept.conn = None  # this call's until it ends well
        try:
            yield conn
        except BaseException as exc:
            with contextlib.suppress(Exception):
                if getattr(exc, "connection_invalidated", False):
                    # Broken: discarded now. Handed back, it would fail the pool's reset,
                    # which the pool logs with a traceback before discarding it.
                    conn.invalidate()
                conn.close()
            raise
        if self._keeps:
            kept.conn, kept.used = conn, time.monotonic()
        else:
            conn.close()

    def close(self) -> None:
        """Give this thread's kept connection back to the pool."""
        conn, self._kept.conn = getattr(self._kept, "conn", None), None
        if conn is not None:
            conn.close()

    def rescue_expired_leases(self) -> list[int]:
        """Put rows whose claim has expired (a daemon died) back in the queue."""
        with self.engine.begin() as conn:
            return sorted(conn.execute(_RESCUE).scalars())

    def backlog(self) -> tuple[int, float | None]:
        """Events due now and the age of the longest-waiting one (seconds), from the due index."""
        with self.engine.connect() as conn:
            due, oldest = conn.execute(BACKLOG).one()
            now = conn.execute(sa.select(utcnow())).scalar_one()
        return due, age_seconds(now, oldest)

    def heartbeat(self, name: str, report: DaemonReport) -> None:
        """Say that this daemon is alive, whether it has halted or paused delivery, and
        what it did since it started."""
        insert = self.backend.insert(outbox_daemons)
        state = asdict(report)
        halted_reason = report.halted_reason
        d = outbox_daemons.c
        # In the same statement, by the database's clock: a halt that goes on keeps
        # the time it began (COALESCE: a row from before 0007), a new one starts now.
        since: Any = None
        if halted_reason is not None:
            since = sa.case(
                (d.halted_reason.is_(None), utcnow()),
                else_=sa.func.coalesce(d.halted_since, utcnow()),
            )
        statement = insert.values(
            name=name, halted_since=None if halted_reason is None else utcnow(), **state
        ).on_conflict_do_update(
            index_elements=["name"], set_={"seen_at": utcnow(), "halted_since": since, **state}
        )
        with self.engine.begin() as conn:
            conn.execute(statement)
            # Daemons that vanished without a word (SIGKILL, a lost host).
            conn.execute(
                sa.delete(outbox_daemons).where(
                    outbox_daemons.c.seen_at < seconds_from_now(-86400.0)
                )
            )

    def forget_daemon(self, name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(outbox_daemons).where(outbox_daemons.c.name == name))

    @contextlib.contextmanager
    def maintenance_lock(self) -> Iterator[bool]:
        """Whether this process is the one to do maintenance now, held for the round.

        The lead is held by a transaction left open until the round ends (it takes
        no snapshot between statements, so it holds back no vacuum)."""
        with self.engine.begin() as conn:
            yield self.backend.take_maintenance_lead(conn)

    def prune(
        self,
        older_than: dt.timedelta | dt.datetime,
        include_dead: bool = False,
        batch_size: int = 1000,
        stop: Callable[[], bool] = lambda: False,
    ) -> int:
        """Delete delivered (and optionally dead) rows finished before `older_than` ago
        (or before that time, given a datetime).

        In small batches, each its own transaction, so a large prune never holds
        long locks or one huge transaction.
        """
        finished = finished_before(older_than, include_dead)
        batch = sa.select(e.c.id).where(finished).limit(batch_size).scalar_subquery()
        statement = sa.delete(e).where(e.c.id.in_(batch))
        total = 0
        while True:
            with self.engine.begin() as conn:
                deleted = conn.execute(statement).rowcount
            total += deleted
            if deleted < batch_size or stop():
                return total


def _claimed(row: Any, token: str) -> ClaimedEvent:
    """A claimed row as the daemon holds it; what cannot be read is said, not raised."""
    id_, email, event, properties, eventdata, attempts, stored_at, traceparent, tracestate = row
    problems = []
    created_at = _timestamp(stored_at)
    if created_at is None:
        problems.append(f"created_at {stored_at!r} is not a timestamp")
    if not isinstance(attempts, int):
        problems.append(f"attempts {attempts!r} is not a whole number")
        attempts = 0
    return ClaimedEvent(
        id_,
        email,
        event,
        properties,
        eventdata,
        attempts,
        created_at,
        token,
        "; ".join(problems) or None,
        traceparent,
        tracestate,
    )


def _timestamp(value: Any) -> dt.datetime | None:
    """A stored timestamp (naive means UTC), or None if it is not one."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, dt.datetime):
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def finished_before(older_than: dt.timedelta | dt.datetime, include_dead: bool) -> Any:
    """Delivered (and optionally dead) rows finished before a time, or that long ago."""
    if isinstance(older_than, dt.datetime):
        cutoff: Any = sa.literal(older_than, UTCDateTime())
    else:
        cutoff = seconds_from_now(-older_than.total_seconds())
    finished = sa.and_(e.c.status == DELIVERED, e.c.delivered_at < cutoff)
    if include_dead:
        finished = sa.or_(finished, sa.and_(e.c.status == DEAD, e.c.failed_at < cutoff))
    return finished


def _attempt_row(r: Record) -> tuple[Any, ...]:
    o = r.outcome
    return (
        r.event.id,
        r.event.lease_token,
        r.event.attempts + 1,
        o.status_code,
        o.error,
        o.duration_ms,
        r.transport,
        r.waited,
    )


def _outcome_row(r: Record) -> tuple[Any, ...]:
    o = r.outcome
    return (
        r.event.id,
        r.event.lease_token,
        o.action.value,
        o.status_code,
        o.error,
        o.retry_in,
        r.waited,
    )


def age_seconds(now: dt.datetime, then: dt.datetime | None) -> float | None:
    """Seconds from `then` to `now` (never negative), None without a `then`."""
    return None if then is None else max(0.0, (now - then).total_seconds())
