"""The migrated schema: what operators query (INTERFACE sections 3 and 6).

Tests that take `engine` run on a SQLite file and on a PostgreSQL database,
both brought to the newest revision by `db.migrate` (see conftest.py).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tests.conftest import REPO, rows, run_cli
from worker import db
from worker.schema import metadata, outbox_events

DEAD_LETTER_COLUMNS = {
    "id",
    "email",
    "event",
    "properties",
    "eventdata",
    "attempts",
    "last_status_code",
    "last_error",
    "created_at",
    "failed_at",
}


def plain_insert(conn: sa.Connection, **columns: str) -> None:
    """INSERT with SQL literals as given (JSON as text literals, valid on both backends)."""
    names = ", ".join(columns)
    values = ", ".join(columns.values())
    conn.execute(sa.text(f"INSERT INTO outbox_events ({names}) VALUES ({values})"))


def index_sql(engine: sa.Engine, name: str) -> str:
    """The index's definition as the database itself reports it."""
    if engine.dialect.name == "postgresql":
        sql = f"SELECT indexdef FROM pg_indexes WHERE indexname = '{name}'"
    else:
        sql = f"SELECT sql FROM sqlite_master WHERE type = 'index' AND name = '{name}'"
    found = rows(engine, sql)
    assert found, f"no index {name}"
    return found[0][0]


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = db.create_engine(pg_url)
    yield engine
    engine.dispose()


# -- the migrations match the metadata -------------------------------------------


# SQLite cannot reflect expression indexes, so autogenerate skips
# ix_outbox_events_open_contact there and warns; the index is checked directly
# by test_open_contact_index_is_on_the_ascii_lowercased_email below. Nothing else is ignored.
@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
@pytest.mark.filterwarnings(
    "ignore:autogenerate skipping metadata-specified expression-based index"
)
def test_migrated_schema_equals_the_metadata(engine):
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                # Naming our version table tells autogenerate it is Alembic's own,
                # not a table missing from the metadata.
                "version_table": db.VERSION_TABLE,
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        diff = compare_metadata(context, metadata)
    assert diff == []


def test_migrated_database_is_at_the_newest_revision(engine):
    current, head = db.schema_revision(engine)
    assert head and current == head


# -- the dead-letter view --------------------------------------------------------


def test_dead_letter_view_has_exactly_the_documented_columns(engine):
    names = [c["name"] for c in sa.inspect(engine).get_columns("outbox_dead_letters")]
    assert sorted(names) == sorted(DEAD_LETTER_COLUMNS)


def test_dead_letter_view_shows_only_dead_rows_with_their_failure(engine):
    with engine.begin() as conn:
        for status in ("pending", "in_flight", "delivered"):
            plain_insert(conn, email=f"'{status}@example.com'", event="'e'", status=f"'{status}'")
        plain_insert(
            conn,
            email="'dead@example.com'",
            event="'e'",
            status="'dead'",
            attempts="3",
            last_status_code="400",
            last_error="'invalid_parameter: bad email'",
            failed_at="CURRENT_TIMESTAMP",
        )
    found = rows(
        engine,
        "SELECT email, attempts, last_status_code, last_error, failed_at IS NOT NULL"
        " FROM outbox_dead_letters",
    )
    assert [tuple(r) for r in found] == [
        ("dead@example.com", 3, 400, "invalid_parameter: bad email", True)
    ]


# -- defaults and constraints ----------------------------------------------------


def test_plain_sql_insert_gets_a_deliverable_row(engine):
    with engine.begin() as conn:
        plain_insert(
            conn,
            email="'jane@example.com'",
            event="'signed_up'",
            properties="""'{"plan": "pro"}'""",
            eventdata="""'{"id": "cart:1", "data": {}}'""",
        )
    (row,) = rows(
        engine,
        "SELECT id, status, attempts, created_at IS NOT NULL AS has_created,"
        " next_attempt_at IS NOT NULL AS has_next, delivered_at, last_status_code,"
        " last_error, idempotency_key FROM outbox_events",
    )
    assert (row.status, row.attempts) == ("pending", 0)
    assert bool(row.has_created) and bool(row.has_next)
    assert (row.delivered_at, row.last_status_code, row.last_error) == (None, None, None)
    assert row.idempotency_key is None


def test_plain_sql_insert_is_due_at_once(engine):
    with engine.begin() as conn:
        plain_insert(conn, email="'jane@example.com'", event="'signed_up'")
    with engine.connect() as conn:
        (row,) = conn.execute(
            sa.select(outbox_events.c.created_at, outbox_events.c.next_attempt_at)
        ).all()
    # The database runs on this host: its clock and ours agree to well within a minute.
    now = dt.datetime.now(dt.timezone.utc)
    assert abs((row.created_at - now).total_seconds()) < 60
    assert row.next_attempt_at <= now


def test_json_columns_are_jsonb_on_postgresql(pg_engine):
    found = rows(
        pg_engine,
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_name = 'outbox_events' AND column_name IN ('properties', 'eventdata')"
        " ORDER BY column_name",
    )
    assert [tuple(r) for r in found] == [("eventdata", "jsonb"), ("properties", "jsonb")]


def test_insert_notifies_channel_outbox_events_on_postgresql(pg_engine, pg_url):
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as listener:
        listener.execute("LISTEN outbox_events")
        with pg_engine.begin() as conn:
            plain_insert(conn, email="'jane@example.com'", event="'signed_up'")
        notes = list(listener.notifies(timeout=2, stop_after=1))
    assert [n.channel for n in notes] == ["outbox_events"]


def test_status_check_constraint_rejects_an_unknown_status(engine):
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        plain_insert(conn, email="'jane@example.com'", event="'e'", status="'sent'")
    assert rows(engine) == []


@pytest.mark.parametrize("status", ["pending", "in_flight", "delivered", "dead"])
def test_status_check_constraint_accepts_each_documented_status(engine, status):
    with engine.begin() as conn:
        plain_insert(conn, email="'jane@example.com'", event="'e'", status=f"'{status}'")
    assert [r.status for r in rows(engine)] == [status]


def test_idempotency_key_is_unique(engine):
    with engine.begin() as conn:
        plain_insert(conn, email="'a@example.com'", event="'e'", idempotency_key="'k'")
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        plain_insert(conn, email="'b@example.com'", event="'e'", idempotency_key="'k'")
    assert len(rows(engine)) == 1


def test_idempotency_key_null_can_repeat(engine):
    with engine.begin() as conn:
        for n in range(3):
            plain_insert(conn, email=f"'u{n}@example.com'", event="'e'", idempotency_key="NULL")
    assert len(rows(engine)) == 3


def test_ids_increase_in_insertion_order(engine):
    with engine.begin() as conn:
        for n in range(5):
            plain_insert(conn, email=f"'u{n}@example.com'", event=f"'e{n}'")
    found = rows(engine, "SELECT id, event FROM outbox_events ORDER BY id")
    assert [r.event for r in found] == [f"e{n}" for n in range(5)]


def test_attempts_rows_go_with_their_event(engine):
    with engine.begin() as conn:
        plain_insert(conn, email="'a@example.com'", event="'e'")
        event_id = conn.execute(sa.text("SELECT id FROM outbox_events")).scalar()
        conn.execute(
            sa.text(
                "INSERT INTO outbox_attempts (event_id, attempt, status_code, error, duration_ms)"
                " VALUES (:id, 1, 500, 'oops', 12)"
            ),
            {"id": event_id},
        )
    (attempt,) = rows(engine, "SELECT * FROM outbox_attempts")
    assert (attempt.event_id, attempt.attempt, attempt.status_code) == (event_id, 1, 500)
    assert attempt.attempted_at is not None
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM outbox_events"))
    assert rows(engine, "SELECT * FROM outbox_attempts") == []


# -- indexes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "open_statuses", "other_statuses"),
    [
        ("ix_outbox_events_due", {"pending"}, {"in_flight", "delivered", "dead"}),
        ("ix_outbox_events_open_contact", {"pending", "in_flight"}, {"delivered", "dead"}),
        ("ix_outbox_events_lease", {"in_flight"}, {"pending", "delivered", "dead"}),
    ],
)
def test_queue_indexes_are_partial(engine, name, open_statuses, other_statuses):
    # Autogenerate does not compare an index's WHERE clause: this checks it.
    definition = index_sql(engine, name)
    where = definition[definition.upper().index(" WHERE ") :]
    assert all(status in where for status in open_statuses), definition
    assert not any(status in where for status in other_statuses), definition


def test_open_contact_index_is_on_the_ascii_lowercased_email(engine):
    definition = index_sql(engine, "ix_outbox_events_open_contact").lower()
    # SQLite's lower() folds only ASCII; PostgreSQL's does under the C collation.
    expected = (
        'lower((email collate "c"))' if engine.dialect.name == "postgresql" else "lower(email)"
    )
    assert expected in definition, definition


def test_claim_query_uses_the_due_index_on_postgresql(pg_engine):
    with pg_engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_events (email, event, status, delivered_at)"
                " SELECT 'u' || n || '@example.com', 'e', 'delivered', now()"
                " FROM generate_series(1, 20000) AS n"
            )
        )
        for n in range(20):
            plain_insert(conn, email=f"'p{n}@example.com'", event="'e'")
    with pg_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE outbox_events"))
        plan = "\n".join(
            conn.execute(
                sa.text(
                    "EXPLAIN SELECT id FROM outbox_events"
                    " WHERE status = 'pending' AND next_attempt_at <= now()"
                    " ORDER BY next_attempt_at, id LIMIT 10"
                )
            ).scalars()
        )
    assert "ix_outbox_events_due" in plan, plan


# -- migrating -------------------------------------------------------------------


def test_migrate_twice_keeps_schema_and_rows(empty_url):
    engine = db.create_engine(empty_url)
    try:
        db.migrate(engine)
        with engine.begin() as conn:
            plain_insert(conn, email="'jane@example.com'", event="'signed_up'")
        db.migrate(engine)
        current, head = db.schema_revision(engine)
        assert current == head
        assert [r.email for r in rows(engine)] == ["jane@example.com"]
        assert rows(engine, f"SELECT count(*) FROM {db.VERSION_TABLE}")[0][0] == 1
    finally:
        engine.dispose()


def test_cli_migrate_twice_exits_0_both_times(empty_url):
    first = run_cli("migrate", "--database-url", empty_url)
    second = run_cli("migrate", "--database-url", empty_url)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    engine = db.create_engine(empty_url)
    try:
        current, head = db.schema_revision(engine)
        assert current == head
    finally:
        engine.dispose()


def _copy_project(target: Path) -> Path:
    """The project's sources, so the build leaves no build/ or egg-info in the repository."""
    shutil.copytree(
        REPO,
        target,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".ruff_cache",
            ".hypothesis",
            "bench",
            "*.db",
            "*.db-*",
        ),
    )
    return target


# Slow: builds and installs a wheel, a few seconds.
@pytest.mark.slow  # builds and installs a wheel
def test_migrations_travel_with_the_installed_wheel(tmp_path):
    source = _copy_project(tmp_path / "src")
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as built:
        assert "worker/py.typed" in built.namelist()  # users' type checkers read the hints
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PYTHON"))}
    env["PYTHONPATH"] = str(site)

    def python(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=60
        )

    where = python(
        "-c", "import worker, worker.migrations as m; print(worker.__file__, m.__file__)"
    )
    assert where.returncode == 0, where.stderr
    assert all(Path(p).is_relative_to(site) for p in where.stdout.split()), where.stdout

    migrated = python("-m", "worker", "migrate", "--database-url", "sqlite:///x.db")
    assert migrated.returncode == 0, migrated.stderr
    with sqlite3.connect(work / "x.db") as conn:
        tables = {
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        version = conn.execute(f"SELECT version_num FROM {db.VERSION_TABLE}").fetchall()
    assert {"outbox_events", "outbox_attempts"} <= tables
    assert len(version) == 1
