"""What the console's statements read, on SQLite and PostgreSQL: the plans.

Its pages must cost the same on ten million rows of history as on a thousand,
so each statement a page runs is explained, against a table shaped like a
working outbox and analysed, and must be served by an index: no page reads
outbox_events or outbox_attempts whole. (bench/console.py times the pages.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from worker import admin_reports
from worker.backends.sql import seconds_from_now
from worker.console.app import create_app
from worker.console.context import ConsoleOptions
from worker.console.pages import OVERVIEW_COUNT_LIMIT
from worker.schema import outbox_attempts, outbox_events

ROWS = 20_000
CONTACTS = 1_000  # 20 events each
RARE_EVENT = "order_refunded"  # one event in 1,000

e = outbox_events


@pytest.fixture
def history(engine: sa.Engine) -> sa.Engine:
    """ROWS events over two days: 92% delivered, 4% dead, 4% pending (half retrying),
    a failed attempt for each dead or retrying one."""
    series = sa.select(sa.literal(1, sa.Integer).label("n")).cte("series", recursive=True)
    series = series.union_all(sa.select(series.c.n + 1).where(series.c.n < ROWS))
    n = series.c.n
    shape = n % 100
    at = seconds_from_now(-(ROWS - n) * (172_800.0 / ROWS))
    rows = sa.select(
        sa.literal("c") + sa.cast(n % CONTACTS, sa.Text) + sa.literal("@example.com"),
        sa.case((n % 1000 == 7, RARE_EVENT), else_="cart_updated"),
        sa.case((shape < 4, "dead"), (shape < 8, "pending"), else_="delivered"),
        sa.case((shape < 6, 1), else_=0),
        at,
        sa.case((shape.in_([4, 5]), seconds_from_now(300.0)), else_=at),
        sa.case((shape >= 8, at)),
        sa.case((shape < 4, at)),
        sa.case((shape < 4, 400), (shape < 6, 503), else_=204),
    )
    columns = [
        "email",
        "event",
        "status",
        "attempts",
        "created_at",
        "next_attempt_at",
        "delivered_at",
        "failed_at",
        "last_status_code",
    ]
    failed = sa.select(e.c.id, sa.literal(1), e.c.created_at, e.c.last_status_code).where(
        sa.or_(e.c.attempts > 0, e.c.status == "dead")
    )
    with engine.begin() as conn:
        conn.execute(sa.insert(e).from_select(columns, rows))
        conn.execute(
            sa.insert(outbox_attempts).from_select(
                ["event_id", "attempt", "attempted_at", "status_code"], failed
            )
        )
    # As autovacuum keeps a live PostgreSQL (VACUUM, for the visibility map), and ANALYZE.
    analyse = "VACUUM ANALYZE" if engine.dialect.name == "postgresql" else "ANALYZE"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(analyse))
    return engine


def plans_of(engine: sa.Engine, action: Callable[[], Any]) -> Iterator[tuple[str, str]]:
    """Each SELECT that `action` runs, with its plan as the database explains it."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, params))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    explain = "EXPLAIN" if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN"
    with engine.connect() as conn:
        for statement, params in seen:
            rows = conn.exec_driver_sql(f"{explain} {statement}", params).all()
            yield statement, "\n".join(str(r[-1]) for r in rows)


def history_reads(plan: str) -> list[str]:
    """What in a plan reads history: a table scanned whole, or walked by id until
    enough rows match (a scan of a status's partial index is neither)."""
    reads = re.findall(r"Seq Scan on outbox_\w+", plan)  # PostgreSQL
    reads += re.findall(r"Index Cond: \(id [<>]", plan)
    reads += re.findall(r"\bSCAN outbox_\w+\b(?! USING)", plan)  # SQLite
    reads += re.findall(r"INTEGER PRIMARY KEY \(rowid[<>]", plan)
    return reads


def client_for(engine: sa.Engine) -> TestClient:
    return TestClient(create_app(engine, ConsoleOptions()), base_url="http://127.0.0.1")


def assert_no_history_read(engine: sa.Engine, path: str) -> None:
    client = client_for(engine)
    for statement, plan in plans_of(engine, lambda: client.get(path).raise_for_status()):
        assert not history_reads(plan), f"{statement}\n{plan}"


@pytest.mark.parametrize(
    "path",
    [
        "/events?email=C123@Example.com",
        f"/events?event={RARE_EVENT}",
        "/dead-letters?email=c123@example.com",
        f"/dead-letters?event={RARE_EVENT}",
        f"/events?event={RARE_EVENT}&before_id={ROWS // 2}",
    ],
)
def test_searching_events_by_email_or_event_name_reads_an_index_not_history(history, path):
    assert_no_history_read(history, path)


def test_one_event_finds_its_contacts_events_through_an_index(history):
    with history.connect() as conn:
        some = conn.execute(sa.select(sa.func.max(e.c.id)).where(e.c.email == "c7@example.com"))
        event_id = some.scalar_one()
    assert_no_history_read(history, f"/events/{event_id}")


def test_the_last_hours_figures_read_only_the_last_hour(history):
    for statement, plan in plans_of(history, lambda: admin_reports.throughput(history)):
        assert not history_reads(plan), f"{statement}\n{plan}"


STATUS_INDEXES = {
    "pending": "ix_outbox_events_due",
    "in_flight": "ix_outbox_events_lease",
    "delivered": "ix_outbox_events_delivered",
    "dead": "ix_outbox_events_dead",
}


def test_the_overviews_counts_read_each_statuss_partial_index(history):
    """SQLite scanned the table for the status most rows have: twice the time."""
    counted = {}
    overview = lambda: admin_reports.stats(history, OVERVIEW_COUNT_LIMIT)  # noqa: E731
    for statement, plan in plans_of(history, overview):
        capped_count = re.search(r"count\(\*\).*status = '(\w+)'.*LIMIT", statement, re.S)
        if capped_count:
            counted[capped_count.group(1)] = plan
    assert counted.keys() == STATUS_INDEXES.keys()
    for status, plan in counted.items():
        assert STATUS_INDEXES[status] in plan, f"{status}: {plan}"
