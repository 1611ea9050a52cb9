"""The SQL whose spelling differs between the backends, compiled per dialect side by side:
UTC timestamps, the database's clock, and which contact an email belongs to."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """Timestamps are UTC everywhere: timestamptz on PostgreSQL, naive UTC text on SQLite.

    A naive datetime given by the caller is taken as UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


class utcnow(FunctionElement[dt.datetime]):
    """The database's clock in UTC, so every daemon on every host agrees on "now"."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(utcnow, "postgresql")
def _utcnow_pg(element: utcnow, compiler: Any, **kw: Any) -> str:
    return "now()"


@compiles(utcnow, "sqlite")
def _utcnow_sqlite(element: utcnow, compiler: Any, **kw: Any) -> str:
    # Millisecond text in the same layout SQLAlchemy writes, so values compare as text.
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"


class seconds_from_now(FunctionElement[dt.datetime]):
    """The database's clock plus a number of seconds (a bound value or column)."""

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, seconds: Any) -> None:
        super().__init__(seconds)


@compiles(seconds_from_now, "postgresql")
def _later_pg(element: seconds_from_now, compiler: Any, **kw: Any) -> str:
    (seconds,) = element.clauses
    return f"now() + make_interval(secs => {compiler.process(seconds, **kw)})"


@compiles(seconds_from_now, "sqlite")
def _later_sqlite(element: seconds_from_now, compiler: Any, **kw: Any) -> str:
    (seconds,) = element.clauses
    arg = compiler.process(seconds, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.3f seconds', {arg}))"


class contact_key(FunctionElement[str]):
    """Which contact an email belongs to: the email with ASCII letters lowercased, nothing else.

    One rule on both backends: SQLite's lower() folds only ASCII, and so does
    PostgreSQL's under the "C" collation, whatever the database's own locale.
    """

    type = sa.Text()
    inherit_cache = True

    def __init__(self, email: Any) -> None:
        super().__init__(email)


@compiles(contact_key, "postgresql")
def _contact_key_pg(element: contact_key, compiler: Any, **kw: Any) -> str:
    (email,) = element.clauses
    return f'lower({compiler.process(email, **kw)} COLLATE "C")'


@compiles(contact_key, "sqlite")
def _contact_key_sqlite(element: contact_key, compiler: Any, **kw: Any) -> str:
    (email,) = element.clauses
    return f"lower({compiler.process(email, **kw)})"


class minute_of(FunctionElement[str]):
    """A timestamp's UTC minute as text, 'YYYY-MM-DD HH:MM', to count events per minute."""

    type = sa.Text()
    inherit_cache = True

    def __init__(self, when: Any) -> None:
        super().__init__(when)


@compiles(minute_of, "postgresql")
def _minute_of_pg(element: minute_of, compiler: Any, **kw: Any) -> str:
    (when,) = element.clauses
    return f"to_char({compiler.process(when, **kw)} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')"


@compiles(minute_of, "sqlite")
def _minute_of_sqlite(element: minute_of, compiler: Any, **kw: Any) -> str:
    # Timestamps are stored as 'YYYY-MM-DD HH:MM:SS.fff' text (UTCDateTime, utcnow), so the
    # minute is their first 16 characters: a third of strftime's cost per row.
    (when,) = element.clauses
    return f"substr({compiler.process(when, **kw)}, 1, 16)"
