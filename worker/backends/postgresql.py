"""PostgreSQL: many daemons on many hosts, batches as arrays, advisory locks, LISTEN/NOTIFY."""

from __future__ import annotations

import shlex
import shutil
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from worker.backends.base import Backend, Wakeups
from worker.wakeup import CHANNEL, Listener

if TYPE_CHECKING:
    from worker.gate import SlotSource

# Held by the transaction that leads a maintenance round ("outbox" in ASCII).
MAINTENANCE_LOCK_KEY = 0x6F7574626F78
# Held by the transaction that migrates ("outboxmg").
MIGRATION_LOCK_KEY = 0x6F75_7462_6F78_6D67


class PostgreSQL(Backend):
    name = "postgresql"
    many_daemons = True
    batch_is_one_statement = True  # arrays, unnested
    alters_tables_by_copy = False
    hot_statements_on_the_driver = True  # psycopg, "%(name)s" parameters

    def create_engine(self, url: sa.URL, **kwargs: Any) -> sa.Engine:
        kwargs.setdefault("pool_pre_ping", True)
        # No server-side prepared statements: they break behind a transaction-pooling
        # PgBouncer, and the outbox runs few statements per second for them to save.
        kwargs.setdefault("connect_args", {}).setdefault("prepare_threshold", None)
        return sa.create_engine(url, **kwargs)

    def sql_shell(self, url: sa.URL) -> str | None:
        if not shutil.which("psql"):
            return None
        # libpq's URL, without SQLAlchemy's driver suffix or the password (psql asks).
        plain = url.set(drivername="postgresql", password=None).render_as_string(
            hide_password=False
        )
        return f"psql {shlex.quote(plain)} -c"

    def insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table)

    def batch_source(
        self, columns: Sequence[str], types: dict[str, sa.types.TypeEngine[Any]]
    ) -> tuple[Any, Any]:
        # One array per column, unnested into rows: one statement, one round trip.
        arrays = (
            sa.bindparam(f"b_{name}", type_=postgresql.ARRAY(types[name])) for name in columns
        )
        rows = sa.func.unnest(*arrays).table_valued(*columns).render_derived(name="v")
        return rows.c, rows

    def bind(self, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> Any:
        return {
            f"b_{name}": list(values)
            for name, values in zip(columns, zip(*rows, strict=True), strict=True)
        }

    def take_maintenance_lead(self, conn: sa.Connection) -> bool:
        # Transaction-scoped: a transaction-pooling PgBouncer hands each transaction
        # to any server connection, so a session lock would be "already held" by the
        # next client on that connection, and its unlock could miss it for good.
        taken = conn.execute(
            sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": MAINTENANCE_LOCK_KEY}
        ).scalar()
        return bool(taken)

    def lock_migrations(self, conn: sa.Connection) -> None:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})

    def notify(self, conn: sa.Connection) -> None:
        conn.execute(sa.select(sa.func.pg_notify(CHANNEL, "")))

    def wakeups(
        self, url: sa.URL, wake: threading.Event, on_pause: Callable[[], None] | None = None
    ) -> Wakeups | None:
        return Listener(url, wake, on_pause=on_pause or (lambda: None))

    def shared_slots(self, engine: sa.Engine, name: str) -> SlotSource | None:
        from worker.shared_limit import SharedSlots  # it reads the gate's types

        return SharedSlots(engine, name)
