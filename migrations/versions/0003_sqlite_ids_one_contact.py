"""Ids never given twice on SQLite; one ASCII-only rule for "the same contact" on both backends.

SQLite: outbox_events and outbox_attempts are rebuilt with AUTOINCREMENT,
keeping every row, index, the foreign key and the dead-letter view. Without
it SQLite hands out the highest id plus one, so pruning or purging the newest
rows gave their ids again. PostgreSQL's sequences never reuse an id.

PostgreSQL: ix_outbox_events_open_contact is rebuilt on lower(email COLLATE "C"),
which folds only ASCII letters whatever the database's locale, as SQLite's
lower() does.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from worker.backends.sql import contact_key, utcnow

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.Integer()
_JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
_TS = sa.DateTime(timezone=True)

_OPEN = "status IN ('pending', 'in_flight')"
_DEAD_LETTERS = (
    "CREATE VIEW outbox_dead_letters AS"
    " SELECT id, email, event, properties, eventdata, attempts,"
    " last_status_code, last_error, created_at, failed_at"
    " FROM outbox_events WHERE status = 'dead'"
)
_EVENT_COLUMNS = (
    "id, created_at, email, event, properties, eventdata, status, attempts,"
    " next_attempt_at, delivered_at, failed_at, last_status_code, last_error,"
    " idempotency_key, lease_token, lease_expires_at"
)
_ATTEMPT_COLUMNS = "id, event_id, attempt, attempted_at, status_code, error, duration_ms"


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite_tables(autoincrement=True, contact=contact_key(sa.column("email")))
    else:
        _rebuild_open_contact_index(contact_key(sa.column("email")))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite_tables(autoincrement=False, contact=sa.text("lower(email)"))
    else:
        _rebuild_open_contact_index(sa.text("lower(email)"))


def _rebuild_open_contact_index(contact: sa.ColumnElement[str] | sa.TextClause) -> None:
    op.drop_index("ix_outbox_events_open_contact", table_name="outbox_events")
    op.create_index(
        "ix_outbox_events_open_contact",
        "outbox_events",
        [contact, "id"],
        postgresql_where=sa.text(_OPEN),
    )


def _rebuild_sqlite_tables(
    autoincrement: bool, contact: sa.ColumnElement[str] | sa.TextClause
) -> None:
    # SQLite cannot add AUTOINCREMENT to a table: move the old tables aside,
    # create the new ones under the real names, copy, drop the old. The view
    # would follow the renamed table, so it is dropped first and made again.
    # Renaming rewrites the old attempts' foreign key to the old events table,
    # so no row of the new tables is touched when the old ones are dropped.
    op.execute("DROP VIEW outbox_dead_letters")
    op.execute("ALTER TABLE outbox_events RENAME TO outbox_events_old")
    op.execute("ALTER TABLE outbox_attempts RENAME TO outbox_attempts_old")
    _create_events(autoincrement)
    _create_attempts(autoincrement)
    # Copying the ids as they are leaves the AUTOINCREMENT sequence at the
    # highest one, so the next id is above every id the tables hold.
    op.execute(
        f"INSERT INTO outbox_events ({_EVENT_COLUMNS})"
        f" SELECT {_EVENT_COLUMNS} FROM outbox_events_old ORDER BY id"
    )
    op.execute(
        f"INSERT INTO outbox_attempts ({_ATTEMPT_COLUMNS})"
        f" SELECT {_ATTEMPT_COLUMNS} FROM outbox_attempts_old ORDER BY id"
    )
    op.execute("DROP TABLE outbox_attempts_old")
    op.execute("DROP TABLE outbox_events_old")
    _create_indexes(contact)
    op.execute(_DEAD_LETTERS)


def _create_events(autoincrement: bool) -> None:
    op.create_table(
        "outbox_events",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("created_at", _TS, nullable=False, server_default=utcnow()),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("properties", _JSON, nullable=True),
        sa.Column("eventdata", _JSON, nullable=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", _TS, nullable=False, server_default=utcnow()),
        sa.Column("delivered_at", _TS, nullable=True),
        sa.Column("failed_at", _TS, nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("lease_token", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", _TS, nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'in_flight', 'delivered', 'dead')",
            name="ck_outbox_events_status",
        ),
        sa.UniqueConstraint("idempotency_key", name="uq_outbox_events_idempotency_key"),
        sqlite_autoincrement=autoincrement,
    )


def _create_attempts(autoincrement: bool) -> None:
    op.create_table(
        "outbox_attempts",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column(
            "event_id",
            _ID,
            sa.ForeignKey(
                "outbox_events.id", ondelete="CASCADE", name="fk_outbox_attempts_event_id"
            ),
            nullable=False,
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("attempted_at", _TS, nullable=False, server_default=utcnow()),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sqlite_autoincrement=autoincrement,
    )


def _create_indexes(contact: sa.ColumnElement[str] | sa.TextClause) -> None:
    partial = {
        "ix_outbox_events_due": (["next_attempt_at", "id"], "status = 'pending'"),
        "ix_outbox_events_open_contact": ([contact, "id"], _OPEN),
        "ix_outbox_events_lease": (["lease_expires_at"], "status = 'in_flight'"),
        "ix_outbox_events_delivered": (["delivered_at"], "status = 'delivered'"),
        "ix_outbox_events_dead": (["id"], "status = 'dead'"),
    }
    for name, (columns, where) in partial.items():
        op.create_index(name, "outbox_events", columns, sqlite_where=sa.text(where))
    op.create_index("ix_outbox_attempts_event_id", "outbox_attempts", ["event_id"])
