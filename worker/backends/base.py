"""The interface every backend implements (see worker.backends)."""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import sqlalchemy as sa

if TYPE_CHECKING:
    from worker.gate import SlotSource


class Wakeups(Protocol):
    """A thread that sets the daemon's wake event when rows may be due."""

    listening: threading.Event  # set while a commit would wake the daemon

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def join(self, timeout: float) -> None: ...


class Backend(abc.ABC):
    name: ClassVar[str]
    # Daemons on many hosts share the database (their maintenance takes turns).
    many_daemons: ClassVar[bool]
    # A batch bound by `bind` runs as one statement (so it needs no transaction
    # around it), rather than one per row.
    batch_is_one_statement: ClassVar[bool]
    # ALTER TABLE is done by copying the table (Alembic's batch mode).
    alters_tables_by_copy: ClassVar[bool]
    # The delivery loop's hot statements may run on the driver's own cursor, compiled
    # once (worker.store): the driver takes named parameters, and no value needs
    # SQLAlchemy's processing on the way in or out.
    hot_statements_on_the_driver: ClassVar[bool] = False

    @abc.abstractmethod
    def create_engine(self, url: sa.URL, **kwargs: Any) -> sa.Engine:
        """An engine with this database's connection setup."""

    def url_problem(self, url: sa.URL) -> str | None:
        """What makes this URL unusable before connecting, said for the operator."""
        return None

    def sql_shell(self, url: sa.URL) -> str | None:
        """The command line that runs one SQL statement (given next) on this database,
        if its client is installed; the password never in it."""
        return None

    @abc.abstractmethod
    def insert(self, table: sa.Table) -> Any:
        """INSERT with ON CONFLICT for this dialect."""

    @abc.abstractmethod
    def batch_source(
        self, columns: Sequence[str], types: dict[str, sa.types.TypeEngine[Any]]
    ) -> tuple[Any, Any]:
        """The columns a one-statement batch reads its rows from (`src.<name>`), and
        the FROM clause they need (None when they are bound parameters)."""

    @abc.abstractmethod
    def bind(self, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> Any:
        """Rows as the parameters of a statement built on `batch_source(columns)`."""

    @abc.abstractmethod
    def take_maintenance_lead(self, conn: sa.Connection) -> bool:
        """Whether this transaction leads the maintenance round (until it ends)."""

    @abc.abstractmethod
    def lock_migrations(self, conn: sa.Connection) -> None:
        """Hold the migration lock until this transaction ends; call it first."""

    @abc.abstractmethod
    def notify(self, conn: sa.Connection) -> None:
        """Wake the daemons once this transaction commits (rows became due)."""

    @abc.abstractmethod
    def wakeups(
        self, url: sa.URL, wake: threading.Event, on_pause: Callable[[], None] | None = None
    ) -> Wakeups | None:
        """What wakes a daemon sooner than its poll, if this database can tell; and
        calls `on_pause` when another daemon shared a pause, where it can hear that."""

    def shared_slots(self, engine: sa.Engine, name: str) -> SlotSource | None:
        """The account's rate limit shared by every daemon on the database, or None
        where one daemon keeps it in process."""
        return None
