"""SQLite: the embedded default, one daemon, batches as executemany, the write lock."""

from __future__ import annotations

import shlex
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from worker.backends.base import Backend, Wakeups


class SQLite(Backend):
    name = "sqlite"
    many_daemons = False
    batch_is_one_statement = False  # executemany: a statement per row
    alters_tables_by_copy = True

    def create_engine(self, url: sa.URL, **kwargs: Any) -> sa.Engine:
        engine = sa.create_engine(url, **kwargs)
        sa.event.listen(engine, "connect", _pragmas)
        return engine

    def url_problem(self, url: sa.URL) -> str | None:
        # sqlite3 says only "unable to open database file"; the missing folder is the usual cause.
        if not _is_file(url):
            return None
        folder = Path(url.database or "").parent
        if folder.is_dir():
            return None
        return (
            f"the SQLite database's folder {folder} does not exist: create it,"
            " or fix --database-url or OUTBOX_DATABASE_URL"
        )

    def sql_shell(self, url: sa.URL) -> str | None:
        if not shutil.which("sqlite3"):
            return None
        return f"sqlite3 {shlex.quote(url.database or '')}"

    def insert(self, table: sa.Table) -> Any:
        return sqlite.insert(table)

    def batch_source(
        self, columns: Sequence[str], types: dict[str, sa.types.TypeEngine[Any]]
    ) -> tuple[Any, Any]:
        # Each column a bound parameter: executemany, one row per parameter set.
        params = {name: sa.bindparam(f"b_{name}", type_=types[name]) for name in columns}
        return SimpleNamespace(**params), None

    def bind(self, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> Any:
        return [
            {f"b_{name}": value for name, value in zip(columns, row, strict=True)} for row in rows
        ]

    def take_maintenance_lead(self, conn: sa.Connection) -> bool:
        return True  # one daemon per file

    def lock_migrations(self, conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, taken at once

    def notify(self, conn: sa.Connection) -> None:
        pass  # the daemon polls

    def wakeups(
        self, url: sa.URL, wake: threading.Event, on_pause: Callable[[], None] | None = None
    ) -> Wakeups | None:
        if not _is_file(url):
            return None  # an in-memory database: only this process writes it
        from worker.wakeup import DataVersionWatcher

        return DataVersionWatcher(url.database or "", wake)


def _is_file(url: sa.URL) -> bool:
    return bool(url.database) and url.database != ":memory:" and not url.query.get("uri")


def _pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Text that is not UTF-8 (a plain-SQL insert of raw bytes) must reach
    # validation as a bad value, not fail the whole claim with a decode error.
    dbapi_connection.text_factory = _decode_leniently
    cursor = dbapi_connection.cursor()
    # The busy timeout turns "database is locked" into a short wait, so it comes
    # first: switching a new file to WAL waits for another process's migration.
    # WAL lets the application write while the daemon reads.
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _decode_leniently(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")
