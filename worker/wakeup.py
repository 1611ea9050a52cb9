"""Wake-ups within milliseconds of a commit, polling always as the fallback.

PostgreSQL: a trigger on outbox_events notifies the channel after every
inserting statement; the Listener is its own connection on its own thread.
SQLite: the DataVersionWatcher reads `PRAGMA data_version` on its own
connection every few tens of milliseconds; the number moves when another
connection commits to the file, and a new newest id or due time says whether
there is something to claim. Either one, when it fails, says so once, the
daemon keeps polling every --poll-interval, and it starts again.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    import psycopg

# The channel the insert trigger (migration 0001, which spells it out: a migration
# must not change with the code), a requeue and a shared pause notify.
CHANNEL = "outbox_events"
# The payload a daemon sends on the channel when it pauses every daemon
# (worker.shared_limit): the listeners read the pause at once.
PAUSE_NOTICE = "rate-limit-pause"
_STOP_SLICE = 0.5  # seconds: how soon the listener sees stop()
# Seconds between two looks at the SQLite file: a wake-up within about half of it
# on average. A look is a stat of the WAL file, and PRAGMA data_version on the
# watcher's own connection when the file changed; the thread's wake-ups are most of
# the idle cost, about 0.5% of a core (bench/latency.py). The watcher opens none of
# SQLite's files itself: closing any descriptor of the -shm file drops every POSIX
# lock this process holds on it, and the next program to open the database then
# resets the file under the daemon (SIGBUS; SQLite's "How To Corrupt" page, 2.2).
WATCH_INTERVAL = 0.03
log = logging.getLogger("worker.wakeup")


class _WakeupThread:
    """One thread that wakes the daemon: the start / stop / join protocol of every component."""

    def __init__(self, name: str) -> None:
        self._stopping = threading.Event()
        self.listening = threading.Event()  # set while a commit would wake the daemon
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        raise NotImplementedError


class DataVersionWatcher(_WakeupThread):
    """Sets `wake` when another connection commits a new row to the SQLite file, or makes
    a row due now (a requeue): data_version moves at every commit of another connection,
    the daemon's own included, and then the newest id and the earliest due time say
    whether that commit gave the daemon something to claim."""

    def __init__(self, path: str, wake: threading.Event, interval: float = WATCH_INTERVAL) -> None:
        self._path = path
        self._wake = wake
        self._interval = interval
        super().__init__("outbox-watcher")

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                # Its own connection: data_version counts the commits of the others.
                with contextlib.closing(
                    sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
                ) as conn:
                    conn.execute("PRAGMA busy_timeout=1000")
                    (seen,) = conn.execute("PRAGMA data_version").fetchone()
                    mark = _watermark(conn)
                    if failures:
                        log.info("wake-ups restored: watching the SQLite file again")
                    failures = 0
                    # A commit may have come before the first read (or while we were away).
                    self._wake.set()
                    self.listening.set()
                    wal = _wal_stat(self._path)
                    for tick in itertools.count(1):
                        # A plain sleep: an Event's timed wait costs half as much CPU
                        # again, and stop() is seen within one interval all the same.
                        time.sleep(self._interval)
                        if self._stopping.is_set():
                            return
                        # The WAL file's size and time first (a stat, no descriptor
                        # opened); the statement when they moved, and every few ticks
                        # whatever they say (they are a hint: a time is coarse).
                        last, wal = wal, _wal_stat(self._path)
                        if wal is not None and wal == last and tick % _CHECK_EVERY:
                            continue
                        (version,) = conn.execute("PRAGMA data_version").fetchone()
                        if version == seen:
                            continue
                        # Something committed: a new row, or an earlier due time that
                        # has come (a requeue), wakes the daemon, as NOTIFY does on
                        # PostgreSQL; its own claims and records do not.
                        seen, before = version, mark
                        mark = _watermark(conn)
                        if mark[0] != before[0] or (mark[1] != before[1] and mark[2]):
                            self._wake.set()
            except sqlite3.Error as exc:
                self.listening.clear()
                failures += 1
                if failures == 1:
                    log.warning(
                        "wake-ups off (%s); polling until the watcher can read the file again",
                        str(exc).strip() or type(exc).__name__,
                    )
                self._stopping.wait(min(30.0, 0.5 * 2**failures))


# Ticks between two reads of data_version when the WAL file has not changed.
_CHECK_EVERY = 10


def _wal_stat(path: str) -> tuple[int, int] | None:
    """The WAL file's size and modification time (a commit appends to it); None
    without one (a rollback journal), and the statement decides at every tick."""
    try:
        found = os.stat(f"{path}-wal")
    except OSError:
        return None
    return found.st_size, found.st_mtime_ns


# The newest id (ids are never given twice) and the earliest due time of a pending
# row, with whether it has come: an index probe each (the key, the due index).
_WATERMARK = """
SELECT (SELECT max(id) FROM outbox_events), due, due <= strftime('%Y-%m-%d %H:%M:%f', 'now')
FROM (SELECT min(next_attempt_at) AS due FROM outbox_events WHERE status = 'pending')
"""


def _watermark(conn: sqlite3.Connection) -> tuple[object, object, object]:
    newest, due, due_now = conn.execute(_WATERMARK).fetchone()
    return newest, due, due_now


class Listener(_WakeupThread):
    """Sets `wake` whenever the outbox channel is notified."""

    def __init__(
        self,
        url: sa.URL,
        wake: threading.Event,
        check_interval: float = 5.0,
        on_pause: Callable[[], None] = lambda: None,
    ) -> None:
        # libpq takes the same URL without SQLAlchemy's driver suffix.
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._wake = wake
        self._on_pause = on_pause  # another daemon shared a pause
        self._check_interval = check_interval
        super().__init__("outbox-listener")

    def _hears_itself(self, conn: psycopg.Connection) -> bool:
        """Notify our channel from another connection, as an inserting client would:
        behind a transaction pooler the LISTEN is lost and nothing arrives."""
        import psycopg

        with psycopg.connect(
            self._conninfo, autocommit=True, connect_timeout=10, prepare_threshold=None
        ) as other:
            other.execute("SELECT pg_notify(%s, 'listener check')", (CHANNEL,))
        return any(True for _ in conn.notifies(timeout=2.0, stop_after=1))

    def _hear_pause(self) -> None:
        try:
            self._on_pause()
        except Exception as exc:  # the next grant brings the pause anyway
            log.warning("could not read the shared pause: %s", str(exc).strip()[:200])

    def _run(self) -> None:
        import psycopg  # only a PostgreSQL daemon loads the driver's notifications

        failures = 0
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self._conninfo, autocommit=True, connect_timeout=10, prepare_threshold=None
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if not self._hears_itself(conn):
                        log.warning(
                            "wake-ups off: LISTEN on this connection receives no notifications"
                            " (a transaction-pooling PgBouncer?); polling every poll interval"
                        )
                        return
                    if failures:
                        log.info("wake-ups restored: listening on %r again", CHANNEL)
                    failures = 0
                    self.listening.set()
                    # A notification may have been missed while we were away.
                    self._wake.set()
                    checked = time.monotonic()
                    while not self._stopping.is_set():
                        # Short slices, so that stop() is seen within one.
                        for notice in conn.notifies(timeout=_STOP_SLICE):
                            if notice.payload == PAUSE_NOTICE:
                                self._hear_pause()
                            else:
                                self._wake.set()
                        if time.monotonic() - checked >= self._check_interval:
                            # Prove the connection is alive, so that a silently dead
                            # listener is found within one check interval.
                            conn.execute("SELECT 1")
                            checked = time.monotonic()
            except psycopg.Error as exc:
                self.listening.clear()
                if self._stopping.is_set():
                    return
                failures += 1
                if failures == 1:
                    log.warning(
                        "wake-ups off (%s); polling until the listener reconnects",
                        str(exc).strip().splitlines()[0]
                        if str(exc).strip()
                        else type(exc).__name__,
                    )
                self._stopping.wait(min(30.0, 0.5 * 2**failures))
