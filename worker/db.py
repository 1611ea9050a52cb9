"""Connecting to the outbox database and bringing its schema up to date."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

# Our own version table, so that an application's Alembic history and ours
# never collide in one database.
VERSION_TABLE = "outbox_alembic_version"


class ConfigurationError(ValueError):
    """A setting that cannot work (a malformed URL, an unknown driver)."""


# The drivers outbox-worker runs on: psycopg 3 (its LISTEN/NOTIFY wake-ups need
# it, and it is installed with outbox-worker) and Python's own sqlite3.
_DRIVERS = {"postgresql": "postgresql+psycopg", "sqlite": "sqlite+pysqlite"}


def normalize_url(url: str | sa.URL) -> sa.URL:
    """Parse and check a database URL; plain postgresql:// means the psycopg 3 driver we ship.

    Raises ConfigurationError saying what is wrong, never showing the password.
    """
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        raise _bad_url(
            "is not a SQLAlchemy URL such as postgresql://user:password@host:5432/db"
            " or sqlite:///path/to/outbox.db"
        ) from None
    except ValueError:  # int() of the port
        raise _bad_url("has a port that is not a number") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in _DRIVERS:
        raise ConfigurationError(
            f"unsupported database {backend!r}: use sqlite:/// or postgresql://"
        )
    if "+" in parsed.drivername and parsed.drivername != _DRIVERS[backend]:
        raise _bad_url(
            f"names the driver {parsed.get_driver_name()!r}, which outbox-worker does not run on:"
            f" write {backend}:// and it uses its own"
        )
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise _bad_url(f"has the port {parsed.port}, not one from 1 to 65535")
    if backend == "sqlite":
        _check_sqlite_folder(parsed)
    return parsed


def is_transient(exc: BaseException) -> bool:
    """The database is away or the connection broke (wait and retry), rather than
    the statement being refused."""
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) or (
        isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated
    )


def _bad_url(what: str) -> ConfigurationError:
    return ConfigurationError(f"the database URL {what}: fix --database-url or OUTBOX_DATABASE_URL")


def _check_sqlite_folder(url: sa.URL) -> None:
    # sqlite3 says only "unable to open database file"; the missing folder is the usual cause.
    if not url.database or url.database == ":memory:" or url.query.get("uri"):
        return
    folder = Path(url.database).parent
    if not folder.is_dir():
        raise ConfigurationError(
            f"the SQLite database's folder {folder} does not exist: create it,"
            " or fix --database-url or OUTBOX_DATABASE_URL"
        )


def redact(url: str | sa.URL) -> str:
    """The URL as it may be shown: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<malformed URL>"


def create_engine(url: str | sa.URL, **kwargs: Any) -> sa.Engine:
    """An engine tuned for the outbox: WAL and a busy timeout on SQLite."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, **kwargs)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    # No server-side prepared statements: they break behind a transaction-pooling
    # PgBouncer, and the outbox runs few statements per second for them to save.
    kwargs.setdefault("connect_args", {}).setdefault("prepare_threshold", None)
    try:
        return sa.create_engine(parsed, **kwargs)
    except ImportError as exc:
        raise ConfigurationError(
            f"the PostgreSQL driver is missing ({exc.name} cannot be imported): reinstall"
            " outbox-worker, which brings psycopg 3"
        ) from None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
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


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(files("worker.migrations")))
    return config


def migrate(engine: sa.Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the database to the given revision (the newest by default).

    Returns the revision it was at (None: never migrated) and the one it is at now.
    """
    config = _alembic_config()
    with engine.begin() as connection:
        lock_migrations(connection)
        before = _revision(connection)
        _refuse_newer(before)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        return before, _revision(connection)


# The advisory lock `migrate` holds (unlike the maintenance leader's key in store.py).
MIGRATION_LOCK_KEY = 0x6F75_7462_6F78_6D67  # "outboxmg"


def lock_migrations(connection: sa.Connection) -> None:
    """Hold the database's migration lock until this transaction ends; call it first.

    Replicas that each run `migrate` at start then take turns: the first
    migrates, the others wait and find the schema current. PostgreSQL's lock is
    transaction-scoped (a pooler cannot hand it to another client); SQLite's is
    the write lock, taken at once by BEGIN IMMEDIATE.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
        )
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def schema_revision(engine: sa.Engine) -> tuple[str | None, str]:
    """The database's current revision and the newest one this package knows."""
    with engine.connect() as connection:
        return _revision(connection), _scripts().get_current_head() or ""


def _revision(connection: sa.Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_alembic_config())


class SchemaNotCurrent(RuntimeError):
    """The database is not at the schema this package needs."""


class SchemaNewer(ConfigurationError):
    """The database was migrated by a newer outbox-worker than this one."""


def _refuse_newer(current: str | None) -> None:
    scripts = _scripts()
    if current is not None and current not in {rev.revision for rev in scripts.walk_revisions()}:
        raise SchemaNewer(
            f"the database is at revision {current}, newer than this outbox-worker (which knows"
            f" up to {scripts.get_current_head()}): upgrade outbox-worker"
        )


def require_current_schema(engine: sa.Engine) -> None:
    """Raise SchemaNotCurrent (or SchemaNewer), saying what to do, unless the database is migrated."""
    current, head = schema_revision(engine)
    if current == head:
        return
    _refuse_newer(current)
    found = f"at revision {current}" if current else "not migrated"
    raise SchemaNotCurrent(
        f"the outbox database is {found}; this version needs {head}: run `outbox-worker migrate`"
    )
