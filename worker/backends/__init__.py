"""What differs between the two databases, in one place, behind one interface.

Everything else is SQLAlchemy Core shared by both. A backend owns what cannot
be shared: how a batch of rows is bound to one statement, the upsert insert,
the connection's setup, the maintenance and migration locks, NOTIFY and the
listener that hears it. The SQL functions whose spelling differs (the clock,
a contact's key) are compiled per dialect in worker.backends.sql. Code outside
this package asks `backend_for(...)` and never compares dialect names.
"""

from __future__ import annotations

import sqlalchemy as sa

from worker.backends.base import Backend, Wakeups
from worker.backends.postgresql import PostgreSQL
from worker.backends.sqlite import SQLite

__all__ = ["Backend", "Wakeups", "all_backends", "backend_for"]

_BACKENDS: dict[str, Backend] = {b.name: b for b in (PostgreSQL(), SQLite())}


def backend_for(what: sa.Engine | sa.Connection | sa.URL | str) -> Backend:
    """The backend of an engine, a connection, a URL or a dialect name."""
    if isinstance(what, (sa.Engine, sa.Connection)):
        name = what.dialect.name
    elif isinstance(what, sa.URL):
        name = what.get_backend_name()
    else:
        name = what
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"no outbox backend for the database {name!r}") from None


def all_backends() -> list[Backend]:
    return list(_BACKENDS.values())
