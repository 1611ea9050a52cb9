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

from worker.backends import backend_for

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
    problem = backend_for(backend).url_problem(parsed)
    if problem:
        raise ConfigurationError(problem)
    return parsed


def is_transient(exc: BaseException) -> bool:
    """The database is away or the connection broke (wait and retry), rather than
    the statement being refused."""
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) or (
        isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated
    )


def _bad_url(what: str) -> ConfigurationError:
    return ConfigurationError(f"the database URL {what}: fix --database-url or OUTBOX_DATABASE_URL")


def redact(url: str | sa.URL) -> str:
    """The URL as it may be shown: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<malformed URL>"


def create_engine(url: str | sa.URL, **kwargs: Any) -> sa.Engine:
    """An engine tuned for the outbox (its backend's connection setup)."""
    parsed = normalize_url(url)
    try:
        return backend_for(parsed).create_engine(parsed, **kwargs)
    except ImportError as exc:
        raise ConfigurationError(
            f"the database driver is missing ({exc.name} cannot be imported): reinstall"
            " outbox-worker, which brings psycopg 3"
        ) from None


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
        # Replicas that each run `migrate` at start take turns: the first migrates,
        # the others wait and find the schema current.
        backend_for(connection).lock_migrations(connection)
        before = _revision(connection)
        _refuse_newer(before)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        return before, _revision(connection)


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
