"""Wake-ups: PostgreSQL's LISTEN/NOTIFY where there is one, polling always as the fallback.

A trigger on outbox_events notifies the channel after every inserting
statement. The listener is its own connection on its own thread; when it
dies, it says so once, the daemon keeps polling, and it listens again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg
import sqlalchemy as sa

CHANNEL = "outbox_events"
# The payload a daemon sends on the channel when it pauses every daemon
# (worker.shared_limit): the listeners read the pause at once.
PAUSE_NOTICE = "rate-limit-pause"
_STOP_SLICE = 0.5  # seconds: how soon the listener sees stop()
log = logging.getLogger("worker.wakeup")


class Listener:
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
        self._stopping = threading.Event()
        self.listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _hears_itself(self, conn: psycopg.Connection) -> bool:
        """Notify our channel from another connection, as an inserting client would:
        behind a transaction pooler the LISTEN is lost and nothing arrives."""
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
