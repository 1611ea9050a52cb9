"""One contact rule on both backends: ASCII letters folded, nothing else.

PostgreSQL's lower() follows the database's locale; the fixtures' server is
initdb'd without one, so the Unicode case is checked on a database made with
a Unicode-aware collation (C.UTF-8), where plain lower() folds É.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import new_pg_database
from tests.pgserver import PostgresServer
from worker import db, track_events
from worker.store import OutboxStore


def unicode_database(server: PostgresServer) -> str:
    """An empty database whose default collation folds letters beyond ASCII."""
    name = f"{new_pg_database(server, template=None).rsplit('/', 1)[1]}_unicode"
    admin = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE 'C.UTF-8'"))
    admin.dispose()
    return server.url(name)


@pytest.fixture(params=["sqlite", "postgresql-unicode"])
def contact_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'contacts.db'}"
    else:
        url = unicode_database(request.getfixturevalue("pg_server"))
    engine = db.create_engine(url)
    db.migrate(engine)
    yield engine
    engine.dispose()


def claimed_emails(engine: sa.Engine, *emails: str) -> list[str]:
    with engine.begin() as conn:
        track_events(conn, [{"email": email, "event": "e"} for email in emails])
    return sorted(c.email for c in OutboxStore(engine).claim_due(100, 30.0, "host:1:1"))


def test_the_unicode_database_would_fold_accented_letters(pg_server):
    # Guards the test below: without this, a C database would pass it vacuously.
    engine = db.create_engine(unicode_database(pg_server))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT lower('ÉMILE')")).scalar() == "émile"
        assert conn.execute(sa.text("""SELECT lower('ÉMILE' COLLATE "C")""")).scalar() == "Émile"
    engine.dispose()


def test_emails_differing_in_ascii_case_are_one_contact(contact_engine):
    assert claimed_emails(contact_engine, "JANE@x.com", "jane@x.com") == ["JANE@x.com"]


def test_emails_differing_in_accented_case_are_two_contacts(contact_engine):
    claimed = claimed_emails(contact_engine, "ÉMILE@x.com", "émile@x.com")
    assert claimed == ["ÉMILE@x.com", "émile@x.com"]
