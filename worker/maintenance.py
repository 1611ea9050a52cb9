"""Housekeeping beside the delivery loop: lease rescue, retention, backlog figures.

Runs on its own thread so that a long prune never delays a claim. With many
daemons on one PostgreSQL, one of them at a time does the work (an advisory
lock elects it for each round); the others skip the round.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

import sqlalchemy as sa

from worker.store import DaemonReport, OutboxStore
from worker.telemetry import Telemetry

log = logging.getLogger("worker.maintenance")
HEARTBEAT_INTERVAL = 5.0  # seconds between heartbeats and backlog figures


class Maintenance:
    def __init__(
        self,
        store: OutboxStore,
        telemetry: Telemetry,
        *,
        lease: float,
        retain_delivered: dt.timedelta | None,
        on_rescue: Callable[[], None],
        report: Callable[[], DaemonReport],
        name: str,
        interval: float | None = None,
    ) -> None:
        self.store = store
        self.telemetry = telemetry
        self.retain_delivered = retain_delivered
        self.on_rescue = on_rescue
        self.report = report  # what the heartbeat says of the daemon
        self.name = name
        # Often enough that a dead daemon's rows wait at most about 1.5 leases.
        self.interval = interval if interval is not None else min(lease / 2, 30.0)
        self._next_housekeeping = 0.0
        self._stopping = threading.Event()
        self._nudged = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._nudged.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def nudge(self) -> None:
        """Run a round now (e.g. to publish a halt at once) rather than at the next tick."""
        self._nudged.set()

    def rescue_expired_leases(self) -> int:
        rescued = self.store.rescue_expired_leases()
        if rescued:
            shown = ", ".join(map(str, rescued[:10])) + (" ..." if len(rescued) > 10 else "")
            log.warning(
                "took back %d rows whose claim expired (a daemon stopped mid-flight): ids %s",
                len(rescued),
                shown,
            )
            self.on_rescue()
        return len(rescued)

    def run_once(self) -> None:
        """Heartbeat and figures every tick; rescue and retention each interval, in the
        elected daemon only."""
        self.store.heartbeat(self.name, self.report())
        due, oldest = self.store.backlog()
        self.telemetry.backlog.set(due)
        self.telemetry.oldest_due_age.set(oldest or 0.0)
        if time.monotonic() < self._next_housekeeping:
            return
        self._next_housekeeping = time.monotonic() + self.interval
        with self.store.maintenance_lock() as elected:
            if not elected:
                return
            self.rescue_expired_leases()
            if self.retain_delivered is not None:
                pruned = self.store.prune(self.retain_delivered, stop=self._stopping.is_set)
                if pruned:
                    log.info("pruned %d delivered events older than the retention", pruned)

    def _run(self) -> None:
        while True:
            self._nudged.wait(min(self.interval, HEARTBEAT_INTERVAL))
            self._nudged.clear()
            if self._stopping.is_set():
                return
            try:
                self.run_once()
            except sa.exc.DBAPIError as exc:
                lines = str(exc.orig).strip().splitlines()
                log.warning("maintenance skipped a round: %s", lines[0] if lines else exc)
            except Exception:  # one bad round must not end rescue and heartbeats for good
                log.exception("maintenance skipped a round after an unexpected error")
