"""Migrating: ids never given twice, rows kept across 0003, and `migrate` itself.

Tests that take `engine` run on a migrated SQLite file and PostgreSQL
database; `empty_url` gives one never migrated, to walk the history.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic import command

from tests.conftest import rows
from worker import db


def insert_events(conn: sa.Connection, *emails: str) -> list[int]:
    return [
        conn.execute(
            sa.text("INSERT INTO outbox_events (email, event) VALUES (:e, 'e') RETURNING id"),
            {"e": email},
        ).scalar_one()
        for email in emails
    ]


def insert_attempt(conn: sa.Connection, event_id: int) -> int:
    return conn.execute(
        sa.text(
            "INSERT INTO outbox_attempts (event_id, attempt, status_code, error)"
            " VALUES (:id, 1, 500, 'oops') RETURNING id"
        ),
        {"id": event_id},
    ).scalar_one()


@pytest.fixture
def empty_engine(empty_url: str) -> Iterator[sa.Engine]:
    engine = db.create_engine(empty_url)
    yield engine
    engine.dispose()


def snapshot(engine: sa.Engine) -> dict[str, list[dict]]:
    """Every row an operator can read, in id order."""
    return {
        name: [dict(r._mapping) for r in rows(engine, f"SELECT * FROM {name} ORDER BY id")]
        for name in ("outbox_events", "outbox_attempts", "outbox_dead_letters")
    }


def same_rows(a: dict[str, list[dict]], b: dict[str, list[dict]]) -> bool:
    """The same rows with the same values in every column both have: a later
    revision may add (nullable) columns."""

    def shared(table: list[dict], other: list[dict]) -> list[dict]:
        names = set(other[0]) if other else set()
        return [{k: v for k, v in row.items() if k in names} for row in table]

    return a.keys() == b.keys() and all(
        shared(a[name], b[name]) == shared(b[name], a[name]) for name in a
    )


_TABLES_AT_0002 = "('outbox_events', 'outbox_attempts', 'outbox_dead_letters', 'outbox_daemons')"
# What 0008 adds to them: every other revision keeps their indexes as they are.
CONSOLE_INDEXES = {
    "ix_outbox_events_contact",
    "ix_outbox_events_event",
    "ix_outbox_attempts_attempted_at",
}


def index_names(engine: sa.Engine) -> set[str]:
    """The indexes of the tables 0002 already has (later revisions add tables of their own)."""
    # From the catalogue: SQLAlchemy cannot reflect SQLite's expression index.
    if engine.dialect.name == "postgresql":
        sql = "SELECT indexname FROM pg_indexes WHERE tablename IN " + _TABLES_AT_0002
    else:
        sql = (
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name IN " + _TABLES_AT_0002
        )
    return {name for (name,) in rows(engine, sql)}


# -- ids are never given twice ---------------------------------------------------


def test_an_event_id_is_not_given_again_after_the_newest_row_is_deleted(engine):
    with engine.begin() as conn:
        first, newest = insert_events(conn, "a@example.com", "b@example.com")
        conn.execute(sa.text("DELETE FROM outbox_events WHERE id = :id"), {"id": newest})
    with engine.begin() as conn:
        (again,) = insert_events(conn, "c@example.com")
    assert again > newest > first


def test_an_attempt_id_is_not_given_again_after_the_newest_row_is_deleted(engine):
    with engine.begin() as conn:
        (event,) = insert_events(conn, "a@example.com")
        newest = insert_attempt(conn, event)
        conn.execute(sa.text("DELETE FROM outbox_attempts"))
    with engine.begin() as conn:
        again = insert_attempt(conn, event)
    assert again > newest


def test_an_event_id_is_not_given_again_after_every_row_is_purged(engine):
    with engine.begin() as conn:
        ids = insert_events(conn, "a@example.com", "b@example.com", "c@example.com")
        conn.execute(sa.text("DELETE FROM outbox_events"))
    with engine.begin() as conn:
        (again,) = insert_events(conn, "d@example.com")
    assert again > max(ids)


# -- 0003 keeps what 0002 held -----------------------------------------------------


def downgrade(engine: sa.Engine, revision: str) -> None:
    config = db._alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def fill_at_0002(engine: sa.Engine) -> None:
    """Rows of every kind: pending, dead with attempts, delivered; the newest then deleted."""
    with engine.begin() as conn:
        _pending, dead, delivered, newest = insert_events(
            conn, "jane@example.com", "JANE@example.com", "bob@example.com", "zed@example.com"
        )
        insert_attempt(conn, dead)
        insert_attempt(conn, dead)
        conn.execute(
            sa.text(
                "UPDATE outbox_events SET status = 'dead', attempts = 2, last_status_code = 500,"
                " last_error = 'oops', idempotency_key = 'k-dead' WHERE id = :id"
            ),
            {"id": dead},
        )
        conn.execute(
            sa.text(
                "UPDATE outbox_events SET status = 'delivered', delivered_at = CURRENT_TIMESTAMP"
                " WHERE id = :id"
            ),
            {"id": delivered},
        )
        conn.execute(sa.text("DELETE FROM outbox_events WHERE id = :id"), {"id": newest})


def test_migrating_0002_to_head_keeps_every_row_and_index(empty_engine):
    db.migrate(empty_engine, "0002")
    fill_at_0002(empty_engine)
    before, indexes = snapshot(empty_engine), index_names(empty_engine)
    db.migrate(empty_engine)
    assert same_rows(snapshot(empty_engine), before)
    assert index_names(empty_engine) == indexes | CONSOLE_INDEXES
    assert len(before["outbox_attempts"]) == 2 and len(before["outbox_dead_letters"]) == 1


def test_after_migrating_0002_new_ids_are_above_every_id_kept(empty_engine):
    db.migrate(empty_engine, "0002")
    fill_at_0002(empty_engine)
    db.migrate(empty_engine)
    highest = rows(empty_engine, "SELECT max(id) FROM outbox_events")[0][0]
    with empty_engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM outbox_events WHERE id = :id"), {"id": highest})
        (new,) = insert_events(conn, "new@example.com")
    assert new > highest


def test_after_migrating_0002_attempts_still_go_with_their_event(empty_engine):
    db.migrate(empty_engine, "0002")
    fill_at_0002(empty_engine)
    db.migrate(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM outbox_events WHERE status = 'dead'"))
    assert rows(empty_engine, "SELECT * FROM outbox_attempts") == []


def test_after_migrating_0002_an_attempt_of_no_event_is_refused(empty_engine):
    db.migrate(empty_engine, "0002")
    db.migrate(empty_engine)
    with pytest.raises(sa.exc.IntegrityError), empty_engine.begin() as conn:
        insert_attempt(conn, 12345)


def test_downgrading_0003_keeps_every_row(empty_engine):
    db.migrate(empty_engine, "0002")
    fill_at_0002(empty_engine)
    db.migrate(empty_engine)
    before, indexes = snapshot(empty_engine), index_names(empty_engine)
    downgrade(empty_engine, "0002")
    assert db.schema_revision(empty_engine)[0] == "0002"
    assert same_rows(snapshot(empty_engine), before)
    assert index_names(empty_engine) == indexes - CONSOLE_INDEXES


# -- 0006: the trace context ---------------------------------------------------------

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_migrating_to_0006_keeps_every_row_with_no_trace_context(empty_engine):
    db.migrate(empty_engine, "0004")
    fill_at_0002(empty_engine)
    before = snapshot(empty_engine)
    db.migrate(empty_engine, "0006")
    after = snapshot(empty_engine)
    assert same_rows(after, before)
    assert {(r["traceparent"], r["tracestate"]) for r in after["outbox_events"]} == {(None, None)}


def test_downgrading_0006_keeps_every_row_and_index(empty_engine):
    db.migrate(empty_engine)
    fill_at_0002(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(sa.text("UPDATE outbox_events SET traceparent = :t"), {"t": TRACEPARENT})
    before, indexes = snapshot(empty_engine), index_names(empty_engine)
    downgrade(empty_engine, "0004")
    after = snapshot(empty_engine)
    assert "traceparent" not in after["outbox_events"][0]
    assert same_rows(after, before)
    assert index_names(empty_engine) == indexes - CONSOLE_INDEXES


# -- 0007: since when a daemon has halted delivery ---------------------------------


def daemon_rows(engine: sa.Engine) -> list[dict]:
    return [dict(r._mapping) for r in rows(engine, "SELECT * FROM outbox_daemons ORDER BY name")]


def test_migrating_to_0007_keeps_every_daemon_with_no_halted_since(empty_engine):
    db.migrate(empty_engine, "0006")
    with empty_engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_daemons (name, halted_reason, delivered)"
                " VALUES ('host:1', 'HTTP 401', 3)"
            )
        )
    db.migrate(empty_engine, "0007")
    (daemon,) = daemon_rows(empty_engine)
    assert (daemon["halted_reason"], daemon["delivered"], daemon["halted_since"]) == (
        "HTTP 401",
        3,
        None,
    )


def test_downgrading_0007_keeps_every_daemon_and_event(empty_engine):
    db.migrate(empty_engine)
    fill_at_0002(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_daemons (name, halted_reason, delivered, halted_since)"
                " VALUES ('host:1', 'HTTP 401', 3, '2026-12-03 09:30:00')"
            )
        )
    before, indexes = snapshot(empty_engine), index_names(empty_engine)
    downgrade(empty_engine, "0006")
    (daemon,) = daemon_rows(empty_engine)
    assert "halted_since" not in daemon and daemon["halted_reason"] == "HTTP 401"
    assert same_rows(snapshot(empty_engine), before)
    assert index_names(empty_engine) == indexes - CONSOLE_INDEXES


# -- 0008: the console's indexes ---------------------------------------------------


def test_migrating_to_0008_keeps_every_row_and_adds_the_console_indexes(empty_engine):
    db.migrate(empty_engine, "0007")
    fill_at_0002(empty_engine)
    before, indexes = snapshot(empty_engine), index_names(empty_engine)
    db.migrate(empty_engine, "0008")
    assert same_rows(snapshot(empty_engine), before)
    assert index_names(empty_engine) == indexes | CONSOLE_INDEXES


def test_0008_keeps_a_console_index_the_operator_built_beforehand(empty_engine):
    """As the runbook says: built first without blocking writes, then skipped by 0008."""
    db.migrate(empty_engine, "0007")
    with empty_engine.begin() as conn:
        conn.execute(sa.text("CREATE INDEX ix_outbox_events_event ON outbox_events (event, id)"))
    db.migrate(empty_engine, "0008")
    assert index_names(empty_engine) >= CONSOLE_INDEXES


def test_downgrading_0008_drops_only_the_console_indexes(empty_engine):
    db.migrate(empty_engine, "0008")
    fill_at_0002(empty_engine)
    before, indexes = snapshot(empty_engine), index_names(empty_engine)
    downgrade(empty_engine, "0007")
    assert same_rows(snapshot(empty_engine), before)
    assert index_names(empty_engine) == indexes - CONSOLE_INDEXES


# -- 0009: figures per transport ---------------------------------------------------

TRANSPORT_FIGURES = ("transport", "requests", "events_sent", "largest_batch", "dead")


def test_migrating_to_0009_keeps_every_row_with_no_transport_and_zero_figures(empty_engine):
    db.migrate(empty_engine, "0008")
    fill_at_0002(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO outbox_daemons (name, delivered) VALUES ('host:1', 3)"))
    before = snapshot(empty_engine)
    db.migrate(empty_engine, "0009")
    after = snapshot(empty_engine)
    assert same_rows(after, before)
    assert {r["transport"] for r in after["outbox_attempts"]} == {None}
    (daemon,) = daemon_rows(empty_engine)
    assert daemon["delivered"] == 3
    assert tuple(daemon[c] for c in TRANSPORT_FIGURES) == (None, 0, 0, 0, 0)


def test_downgrading_0009_keeps_every_row_and_index(empty_engine):
    db.migrate(empty_engine, "0009")
    fill_at_0002(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(sa.text("UPDATE outbox_attempts SET transport = 'v3-batch'"))
        conn.execute(
            sa.text(
                "INSERT INTO outbox_daemons (name, delivered, transport, requests, events_sent,"
                " largest_batch, dead) VALUES ('host:1', 3, 'v3-batch', 2, 5, 4, 1)"
            )
        )
    before, indexes = snapshot(empty_engine), index_names(empty_engine)
    downgrade(empty_engine, "0008")
    after = snapshot(empty_engine)
    assert "transport" not in after["outbox_attempts"][0]
    assert same_rows(after, before)
    assert index_names(empty_engine) == indexes
    (daemon,) = daemon_rows(empty_engine)
    assert daemon["delivered"] == 3 and not set(TRANSPORT_FIGURES) & set(daemon)
