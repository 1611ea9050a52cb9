"""The delivery loop: wake, claim, deliver concurrently, record, shut down cleanly.

One main thread owns the database; `concurrency` sender threads only do HTTP.
No database transaction is ever open while a request is on the wire.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import sqlalchemy as sa
import tenacity

from worker.config import Settings
from worker.db import require_current_schema
from worker.delivery import Deliverer, SendGate
from worker.event import InvalidEvent, from_stored
from worker.maintenance import Maintenance
from worker.policy import Action, Answer, Outcome, Verdict, decide, throttle_pause
from worker.store import ClaimedEvent, OutboxStore, Record
from worker.telemetry import Telemetry, status_label
from worker.wakeup import Listener

log = logging.getLogger("worker.daemon")
T = TypeVar("T")

EXIT_OK = 0
EXIT_HALTED = 1


@dataclass(frozen=True)
class _Job:
    event: ClaimedEvent
    body: bytes
    probe: bool = False  # sent even while halted, to find out whether the endpoint is back


@dataclass(frozen=True)
class _Done:
    job: _Job
    answer: Answer | None  # None: not sent (halted before its turn)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        store: OutboxStore,
        deliverer: Deliverer,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.deliverer = deliverer
        self.telemetry = telemetry or Telemetry()
        self.gate = SendGate(settings.rate_limit)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._done: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        self._outstanding: dict[int, ClaimedEvent] = {}
        self._records: list[Record] = []
        self._halted: str | None = None  # why, while delivery is halted
        self._next_probe = 0.0
        self._throttle_streak = 0
        self._identity = f"{socket.gethostname()}:{os.getpid()}"
        self._claims = itertools.count(1)
        self._listener: Listener | None = None
        self._maintenance: Maintenance | None = None
        self._patience = self._patience_policy()
        self.delivered = 0

    # -- control -------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming, finish what is in flight (bounded), exit. Safe from a signal handler."""
        self._stopping.set()
        self._wake.set()

    def run(self) -> int:
        """Deliver until stopped (or drained, with exit_when_drained); return the exit code."""
        s = self.settings
        self._db(lambda: require_current_schema(self.store.engine))
        maintenance = Maintenance(
            self.store,
            self.telemetry,
            lease=s.lease,
            retain_delivered=s.retain_delivered,
            on_rescue=self._wake.set,
            status=lambda: (self._halted, self.delivered),
            name=self._identity,
        )
        # Rows of a daemon that died before we started are due before our first claim.
        self._db(maintenance.rescue_expired_leases)
        maintenance.start()
        self._maintenance = maintenance
        for n in range(s.concurrency):
            threading.Thread(target=self._send_loop, name=f"outbox-sender-{n}", daemon=True).start()
        if self.store.dialect == "postgresql":
            self._listener = Listener(self.store.engine.url, self._wake)
            self._listener.start()
        try:
            return self._loop()
        finally:
            maintenance.stop()
            if self._listener:
                self._listener.stop()
            self._shutdown()
            maintenance.join(timeout=10.0)  # so no late heartbeat re-inserts the row forgotten next
            with contextlib.suppress(sa.exc.DBAPIError):
                self.store.forget_daemon(self._identity)

    # -- the loop --------------------------------------------------------------

    def _loop(self) -> int:
        s = self.settings
        while not self._stopping.is_set():
            self._wake.clear()
            self.telemetry.loop_turned()
            self._collect()
            self._write_records()
            if self._stopping.is_set():
                break
            claimed = self._claim()
            self.telemetry.in_flight.set(len(self._outstanding))
            if self._halted and s.exit_when_drained and not self._outstanding:
                log.error("delivery halted: %s; exiting (--exit-when-drained)", self._halted)
                return EXIT_HALTED
            if s.exit_when_drained and claimed == 0 and not self._outstanding:
                log.info("drained: nothing is due; %d delivered by this run", self.delivered)
                return EXIT_OK
            if not claimed:  # nothing due, or not asking (full, paused, halted): wait
                self._wake.wait(self._idle_wait())
        return EXIT_OK

    def _capacity(self) -> int:
        s = self.settings
        return s.concurrency + s.batch_size - len(self._outstanding)

    def _claim_threshold(self) -> int:
        # Claim in sizeable batches when busy, but keep the senders fed.
        return max(1, min(self.settings.batch_size, self.settings.concurrency) // 2)

    def _claim(self) -> int | None:
        """Claim what fits and return how many; None when it did not ask (full,
        paused by a 429, or halted until the next probe)."""
        s = self.settings
        probe = False
        if self._halted:
            if time.monotonic() < self._next_probe or self._outstanding:
                return None
            probe, limit = True, 1
        elif self.gate.paused_for() > 0:
            return None
        else:
            limit = min(s.batch_size, self._capacity())
            if limit < self._claim_threshold():
                return None
        token = f"{self._identity}:{next(self._claims)}"
        with self.telemetry.claim_seconds.time():
            claimed = self._db(lambda: self.store.claim_due(limit, s.lease, token, s.contact_order))
        if probe and claimed:
            self._next_probe = time.monotonic() + s.halt_probe_interval
            log.info("delivery halted; probing the endpoint with outbox id %d", claimed[0].id)
        for event in claimed:
            self._outstanding[event.id] = event
            try:
                body = from_stored(
                    event.email,
                    event.event,
                    event.properties,
                    event.eventdata,
                    max_body_bytes=s.max_body_bytes,
                ).body()
            except InvalidEvent as exc:
                # A row written with plain SQL that breaks the rules: never sent.
                log.warning("outbox id %d is invalid, dead-lettered: %s", event.id, exc)
                self._finish(
                    event, Outcome(Action.DEAD, None, f"invalid event: {exc}", charged=False)
                )
                continue
            self._jobs.put(_Job(event, body, probe))
        return len(claimed)

    def _idle_wait(self) -> float:
        s = self.settings
        waits = [s.poll_interval]
        if self._outstanding:
            waits.append(0.5)
        if self._halted:
            waits.append(max(0.01, self._next_probe - time.monotonic()))
        paused = self.gate.paused_for()
        if paused:
            waits.append(paused)
        return max(0.001, min(waits))

    # -- sending (sender threads) ----------------------------------------------

    def _send_loop(self) -> None:
        while True:
            job = self._jobs.get()
            self.gate.wait_turn()
            answer: Answer | None = None
            if not self._stopping.is_set() and (job.probe or not self._halted):
                try:
                    answer = self.deliverer.post(job.body)
                except Exception as exc:  # a sender thread must never die with a job
                    log.exception("outbox id %d: unexpected error while sending", job.event.id)
                    answer = Answer(None, f"unexpected error: {type(exc).__name__}: {exc}")
                self._pause_if_told(answer)
            self._done.put(_Done(job, answer))
            self._wake.set()

    def _pause_if_told(self, answer: Answer) -> None:
        """Hold every sender at once when the endpoint says to slow down, before the
        next queued request goes out (the main thread may extend the pause)."""
        if answer.status_code == 429:
            self.gate.pause(throttle_pause(answer, self.settings.budget, 1))
        elif answer.rate_limit_exhausted and answer.retry_after:
            self.gate.pause(answer.retry_after)

    # -- outcomes --------------------------------------------------------------

    def _collect(self) -> None:
        """Turn every answer that came back into a record to write."""
        while True:
            try:
                done = self._done.get_nowait()
            except queue.Empty:
                return
            event = done.job.event
            if event.id not in self._outstanding:
                continue  # released at shutdown before the answer came
            if done.answer is None:
                self._finish(event, Outcome(Action.RELEASE, charged=False))
                continue
            self._outcome(done.job, done.answer)

    def _outcome(self, job: _Job, answer: Answer) -> None:
        event = job.event
        age = dt.datetime.now(dt.timezone.utc) - event.created_at
        verdict, outcome = decide(answer, event.attempts, age, self.settings.budget)
        self.telemetry.request_seconds.observe(answer.duration_ms / 1000)
        if verdict is Verdict.HALT:
            self._halt(answer, event.id)
        elif self._halted and job.probe:
            log.warning(
                "delivery resumed: the endpoint answered %s", answer.status_code or answer.error
            )
            self._halted = None
            self.telemetry.set_halted(None)
            if self._maintenance:
                self._maintenance.nudge()
        if verdict is Verdict.THROTTLE:
            self._throttle_streak += 1
            pause = throttle_pause(answer, self.settings.budget, self._throttle_streak)
            self.gate.pause(pause)
            outcome = Outcome(
                Action.RELEASE, answer.status_code, answer.error, pause, charged=False
            )
            log.warning(
                "endpoint says 429 (outbox id %d): pausing all sends for %.1fs", event.id, pause
            )
        elif verdict is not Verdict.HALT:
            self._throttle_streak = 0
        if outcome.action is Action.DELIVERED:
            self.delivered += 1
        elif outcome.action is Action.RETRY:
            log.warning(
                "outbox id %d attempt %d failed (%s): retry in %.1fs",
                event.id,
                event.attempts + 1,
                outcome.error,
                outcome.retry_in,
            )
        elif outcome.action is Action.DEAD:
            log.warning(
                "outbox id %d dead after attempt %d: %s",
                event.id,
                event.attempts + 1,
                outcome.error,
            )
        self._finish(event, outcome)

    def _halt(self, answer: Answer, event_id: int) -> None:
        hint = {
            401: "the ma-key was refused: check OUTBOX_MA_KEY",
            403: "the ma-key is not allowed: check OUTBOX_MA_KEY and the account",
            404: "the endpoint URL is wrong: check OUTBOX_ENDPOINT_URL",
        }.get(
            answer.status_code or 0,
            "the endpoint redirects: set OUTBOX_ENDPOINT_URL to the final URL",
        )
        reason = f"{answer.error} ({hint})"
        if self._halted != reason:
            log.error(
                "DELIVERY HALTED for every event: outbox id %d got %s. No attempts are spent;"
                " probing every %.0fs until it is fixed.",
                event_id,
                reason,
                self.settings.halt_probe_interval,
            )
        self._halted = reason
        self.telemetry.set_halted(status_label(answer.status_code))
        if self._maintenance:
            self._maintenance.nudge()
        self._next_probe = time.monotonic() + self.settings.halt_probe_interval

    def _finish(self, event: ClaimedEvent, outcome: Outcome) -> None:
        self._records.append(Record(event, outcome))
        t, code = self.telemetry, status_label(outcome.status_code)
        if outcome.action is Action.DELIVERED:
            t.delivered.inc()
        elif outcome.action is Action.RETRY:
            t.retried.labels(code).inc()
        elif outcome.action is Action.DEAD:
            t.dead.labels(code).inc()
        else:
            reason = {"429": "throttle", "none": "unsent"}.get(code, "halt")
            t.released.labels(reason).inc()

    def _write_records(self) -> None:
        if not self._records:
            return
        records, self._records = self._records, []
        with self.telemetry.record_seconds.time():
            self._db(lambda: self.store.record(records))
        for r in records:
            self._outstanding.pop(r.event.id, None)

    # -- shutdown --------------------------------------------------------------

    def _shutdown(self) -> None:
        """Release what was never sent; give requests on the wire a bounded time to answer."""
        self._stopping.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            self._finish(job.event, Outcome(Action.RELEASE, charged=False))
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while self._outstanding and time.monotonic() < deadline:
            self._collect()
            self._write_records()
            if self._outstanding:
                self._wake.clear()
                self._wake.wait(min(0.2, max(0.0, deadline - time.monotonic())))
        self._collect()
        answered = {r.event.id for r in self._records}
        for event in self._outstanding.values():
            if event.id not in answered:
                self._finish(event, Outcome(Action.RELEASE, charged=False))
        if self._records:
            log.info("shutting down: %d unanswered rows go back to pending", len(self._records))
            try:
                self.store.record(self._records)
            except sa.exc.DBAPIError as exc:
                log.warning(
                    "could not release rows at shutdown (%s); their leases will expire", exc.orig
                )
        self._records.clear()
        self._outstanding.clear()
        self.deliverer.close()

    # -- the database, with patience ---------------------------------------------

    def _db(self, call: Callable[[], T]) -> T:
        """Run a store call; while the database is unreachable, log, back off and retry."""
        result = self._patience(call)
        self.telemetry.database_answered(True)
        return result

    def _patience_policy(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_transient),
            wait=tenacity.wait_exponential(multiplier=0.5, max=30.0) + tenacity.wait_random(0, 0.5),
            stop=lambda _state: self._stopping.is_set(),
            before_sleep=self._log_db_retry,
            reraise=True,
        )

    def _log_db_retry(self, state: tenacity.RetryCallState) -> None:
        # Waiting out an outage is alive (not ready): a liveness probe must not restart us.
        self.telemetry.loop_turned()
        self.telemetry.database_answered(False)
        exc = state.outcome.exception() if state.outcome else None
        detail = str(getattr(exc, "orig", exc)).strip().splitlines()
        wait = state.next_action.sleep if state.next_action else 0
        log.warning(
            "database unavailable (%s); retry %d in %.1fs",
            detail[0] if detail else type(exc).__name__,
            state.attempt_number,
            wait,
        )


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) or (
        isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated
    )
