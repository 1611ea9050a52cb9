"""Connecting to the outbox database and bringing its schema up to date."""

from __future__ import annotations

from importlib.resources import files
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


def normalize_url(url: str | sa.URL) -> sa.URL:
    """Parse a database URL; plain postgresql:// means the psycopg 3 driver we ship."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigurationError(f"the database URL {url!r} is not a SQLAlchemy URL") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise ConfigurationError(
            f"unsupported database {parsed.get_backend_name()!r}: use sqlite:/// or postgresql://"
        )
    return parsed


def is_transient(exc: BaseException) -> bool:
    """The database is away or the connection broke (wait and retry), rather than
    the statement being refused."""
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) or (
        isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated
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
    except sa.exc.NoSuchModuleError:
        raise ConfigurationError(f"no driver for {parsed.drivername!r}") from None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Text that is not UTF-8 (a plain-SQL insert of raw bytes) must reach
    # validation as a bad value, not fail the whole claim with a decode error.
    dbapi_connection.text_factory = _decode_leniently
    cursor = dbapi_connection.cursor()
    # WAL lets the application write while the daemon reads; the busy timeout
    # turns "database is locked" into a short wait.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _decode_leniently(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(files("worker.migrations")))
    return config


def migrate(engine: sa.Engine, revision: str = "head") -> None:
    """Bring the database to the given revision (the newest by default)."""
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def schema_revision(engine: sa.Engine) -> tuple[str | None, str]:
    """The database's current revision and the newest one this package knows."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision(), head or ""


class SchemaNotCurrent(RuntimeError):
    """The database is not at the schema this package needs."""


def require_current_schema(engine: sa.Engine) -> None:
    """Raise SchemaNotCurrent, saying what to run, unless the database is migrated."""
    current, head = schema_revision(engine)
    if current == head:
        return
    known = {
        rev.revision for rev in ScriptDirectory.from_config(_alembic_config()).walk_revisions()
    }
    if current is not None and current not in known:
        raise SchemaNotCurrent(
            f"the outbox database is at revision {current}, newer than this version knows"
            f" ({head}): upgrade outbox-worker on this host"
        )
    found = f"at revision {current}" if current else "not migrated"
    raise SchemaNotCurrent(
        f"the outbox database is {found}; this version needs {head}: run `outbox-worker migrate`"
    )
