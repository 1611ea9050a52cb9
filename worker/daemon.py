"""The delivery loop: wake, claim what can go out soon, record, shut down cleanly.

One main thread owns the outbox rows; the sender pool's threads do HTTP, and
on PostgreSQL take their send slots from the shared rate limit (one
autocommitted statement per chunk, worker.shared_limit). No database
transaction is ever open while a request is on the wire. The daemon wires
three components and runs the loop:

- the sender pool (worker.senders): threads, the job queue, the send gate
  (worker.gate: the rate limit, and pauses shared by every daemon);
- the breaker (worker.breaker): halts and probes, slow start, pauses;
- the completer (worker.completer): the rows held, keyed by claim, their
  lease renewal, and the outcome buffer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
import tenacity

from worker.backends import Wakeups
from worker.batch import V3BatchTransport
from worker.breaker import Breaker, pause_reason
from worker.completer import RECORD_WITHIN, Completer
from worker.config import BOUNDS, Settings
from worker.db import create_engine, is_transient, require_current_schema
from worker.delivery import Deliverer
from worker.gate import SendGate, SlotSource
from worker.maintenance import Maintenance
from worker.output import first_line
from worker.policy import Action, Answer, Outcome, classify, decide, pause_for
from worker.senders import Job, SenderPool
from worker.shared_limit import SharedSlots
from worker.store import ClaimedEvent, DaemonReport, OutboxStore
from worker.telemetry import Telemetry
from worker.tracing import DeliveryTracing, log_fields
from worker.transport import Rejected, Transport, V3Transport

log = logging.getLogger("worker.daemon")
T = TypeVar("T")

EXIT_OK = 0
EXIT_HALTED = 1
EXIT_NO_DATABASE = 1
MAX_CLAIM_ROWS = int(BOUNDS["--batch-size"][1])


class DatabaseGaveUp(Exception):
    """The database stayed away longer than --database-wait."""


def build_daemon(
    settings: Settings,
    *,
    engine: sa.Engine | None = None,
    deliverer: Deliverer | None = None,
    telemetry: Telemetry | None = None,
) -> Daemon:
    """The one composition root: a ready daemon from checked settings.

    The CLI, the demo and the tests all build their daemon here. Each part left
    out is made from the settings: the engine from the database URL, the
    transport's Deliverer from the endpoint, key and timeouts (a test passes its
    own to post through a proxy), a fresh Telemetry.
    """
    engine = engine if engine is not None else create_engine(settings.database_url)
    return Daemon(
        settings,
        OutboxStore(engine),
        build_transport(settings, deliverer),
        telemetry if telemetry is not None else Telemetry(),
    )


def build_transport(settings: Settings, deliverer: Deliverer | None = None) -> Transport:
    """The settings' transport, on its own Deliverer unless one is given (tests, tools)."""
    name = settings.transport
    if deliverer is None:
        v3 = name != "tracker"
        url = settings.endpoint_url
        if name == "v3-batch":
            url = url.rstrip("/") + "/batch"
        deliverer = Deliverer(
            url,
            settings.api_key if v3 else settings.ma_key,
            timeout=settings.timeout,
            pool_size=settings.concurrency,
            key_header="api-key" if v3 else "ma-key",
            keep_content=name == "v3-batch",
        )
    if name == "v3-batch":
        return V3BatchTransport(
            deliverer,
            max_body_bytes=settings.max_body_bytes,
            max_events=settings.batch_max_events,
            max_bytes=settings.batch_max_bytes,
            shape=settings.batch_shape,
            request_cost=settings.batch_request_cost,
        )
    if name == "v3":
        return V3Transport(deliverer, max_body_bytes=settings.max_body_bytes)
    return Transport(deliverer, max_body_bytes=settings.max_body_bytes)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        store: OutboxStore,
        transport: Transport,
        telemetry: Telemetry,
    ) -> None:
        self.settings = s = settings
        self.store = store
        self.transport = transport
        self.telemetry = telemetry
        self.tracing = DeliveryTracing()
        self._identity = f"{socket.gethostname()}:{os.getpid()}"
        self.gate = SendGate(s.rate_limit, self._slot_source(store), telemetry=self.telemetry)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._claims = itertools.count(1)
        self._listener: Wakeups | None = None
        self._maintenance: Maintenance | None = None
        self.breaker = Breaker(
            s.concurrency,
            self.gate,
            s.budget,
            probe_interval=s.halt_probe_interval,
            telemetry=self.telemetry,
            on_change=self._publish,
            key_variable=transport.key_variable,
        )
        self.completer = Completer(store, self.telemetry, lease=s.lease, transport=transport.name)
        self.senders = SenderPool(
            s.concurrency,
            transport,
            self.gate,
            may_send=self.breaker.may_send,
            hold_others=self._hold_others,
            wake=self._wake,
        )
        self.gate.backlog = self.senders.queued
        # Beyond a request per sender, the requests that may wait for their turn:
        # about a second's worth under a rate limit, else one claim's rows. Held rows'
        # leases are renewed, so waiting longer costs nothing but holding them from others.
        self._per_request = per = transport.events_per_request
        # A claim costs about as much for 1,000 rows as for 200 (PostgreSQL: 65 ms and
        # 30 ms under load): a batch transport claims several requests' rows at once.
        self._claim_rows = (
            max(s.batch_size, min(MAX_CLAIM_ROWS, per * 5)) if per > 1 else s.batch_size
        )
        self._lookahead = (
            min(s.batch_size, max(1, math.ceil(s.rate_limit.per_second)))
            if s.rate_limit
            else max(1, s.batch_size // per)
        )
        self._patience = self._patience_policy()
        self._waited_before = 0.0  # seconds the failed first call took (_db)
        self._more_due = False  # the last claim got all it asked for: more may be due
        self._poll_at = 0.0  # when the loop claims next even if nothing wakes it

    @property
    def delivered(self) -> int:
        return self.completer.delivered

    # -- control -------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming, finish what is in flight (bounded), exit. Safe from a signal handler."""
        self._stopping.set()
        self._wake.set()

    def run(self) -> int:
        """Deliver until stopped (or drained, with exit_when_drained); return the exit code."""
        try:
            return self._run()
        except DatabaseGaveUp as exc:
            log.error("%s", exc)
            return EXIT_NO_DATABASE
        except sa.exc.DBAPIError as exc:
            if not (is_transient(exc) and self._stopping.is_set()):
                raise
            log.info("stopped while the database was unreachable (%s)", first_line(exc.orig))
            return EXIT_OK

    def _run(self) -> int:
        s = self.settings
        self._db(lambda: require_current_schema(self.store.engine))
        maintenance = Maintenance(
            self.store,
            self.telemetry,
            lease=s.lease,
            retain_delivered=s.retain_delivered,
            on_rescue=self._wake.set,
            report=self._report,
            name=self._identity,
        )
        # Rows of a daemon that died before we started are due before our first claim.
        self._db(maintenance.rescue_expired_leases)
        maintenance.start()
        self._maintenance = maintenance
        self.senders.start()
        self._listener = self.store.backend.wakeups(
            self.store.engine.url, self._wake, on_pause=self._hear_shared_pause
        )
        if self._listener:
            self._listener.start()
        try:
            return self._loop()
        finally:
            maintenance.stop()
            if self._listener:
                self._listener.stop()
            self._shutdown()
            maintenance.join(timeout=10.0)  # so no late heartbeat re-inserts the row forgotten next
            if self._listener:
                self._listener.join(timeout=5.0)
            with contextlib.suppress(sa.exc.DBAPIError):
                self.store.forget_daemon(self._identity)

    def _report(self) -> DaemonReport:
        """What the heartbeat writes: the state, and the figures since the start."""
        carried = self.telemetry.carried
        return DaemonReport(
            self.breaker.halted,
            self.completer.delivered,
            self.breaker.paused_until(),
            self.transport.name,
            carried.requests,
            carried.events,
            carried.largest,
            self.completer.dead,
        )

    def _slot_source(self, store: OutboxStore) -> SlotSource | None:
        """On PostgreSQL every daemon on the database shares the limit; SQLite has one daemon."""
        if not self.settings.rate_limit:
            return None
        return store.backend.shared_slots(store.engine, self._identity)

    def _hear_shared_pause(self) -> None:
        if isinstance(self.gate.source, SharedSlots):
            self.gate.heard_of_pause(self.gate.source.read_pause())

    # -- the loop --------------------------------------------------------------

    def _loop(self) -> int:
        s, held = self.settings, self.completer.held
        claimed: int | None = None
        looked = False  # the last wait was only to look for answers, and nothing woke us
        while not self._stopping.is_set():
            self._wake.clear()
            self.telemetry.loop_turned()
            self._collect()
            wrote = self._db(self.completer.write_due)
            self._db(self.completer.renew_if_due)
            if self._stopping.is_set():
                break
            # A look that found answers to collect is no reason to claim: nothing new
            # came (a commit or a non-quiet answer would have woken us). Writing is:
            # it may free a contact's next event.
            if not looked or wrote:
                claimed = self._claim()
                self._poll_at = time.monotonic() + s.poll_interval
            self.telemetry.in_flight.set(held())
            if self.breaker.halted and s.exit_when_drained and not held():
                log.error("delivery halted: %s; exiting (--exit-when-drained)", self.breaker.halted)
                return EXIT_HALTED
            if s.exit_when_drained and claimed == 0 and not held():
                log.info("drained: nothing is due; %d delivered by this run", self.delivered)
                return EXIT_OK
            # Nothing due, fewer due than asked for (a commit since then wakes us),
            # or not asking (full, paused, halted): wait. Having asked and got all
            # there was, an answer that only delivers needs no turn of its own: its
            # outcome waits to be written anyway (RECORD_WITHIN).
            looked = False
            if not claimed or not self._more_due:
                self.senders.quiet = claimed is not None
                wait, only_to_look = self._idle_wait()
                looked = not self._wake.wait(wait) and only_to_look
                self.senders.quiet = False
        return EXIT_OK

    def _claim(self) -> int | None:
        """Claim what can go on the wire soon and return how many; None when it did not
        ask (enough held, paused, halted until the next probe, slow start)."""
        # Rows whose answer came take no sender: only those awaiting one count here.
        s, held, per = self.settings, self.completer.awaiting(), self._per_request
        window = self.breaker.window()
        if window == 0 or self.breaker.paused_for() > 0:
            return None
        probe = self.breaker.probing()
        if probe or window < s.concurrency:  # one request alone: a probe, or slow start
            if held:
                return None
            limit = 1 if probe else per
        else:
            # Requests become rows: a batch transport fills each request it may send.
            limit = min(self._claim_rows, (window + self._lookahead) * per - held)
            # Claim in sizeable batches when busy, but keep the senders fed.
            if held and limit < max(1, min(s.batch_size, s.concurrency * per) // 2):
                return None
        token = f"{self._identity}:{next(self._claims)}"
        with self.telemetry.claim_seconds.time():
            claimed = self._db(lambda: self.store.claim_due(limit, s.lease, token, s.contact_order))
        self._more_due = len(claimed) == limit
        self.completer.hold(claimed)
        if probe and claimed:
            self.breaker.probe_sent()
            log.info(
                "delivery halted; probing the endpoint with outbox id %d",
                claimed[0].id,
                extra=log_fields(claimed[0]),
            )
        requests, rejected = self.transport.prepare(claimed)
        for never in rejected:
            self._reject(never)
        for request in requests:
            self.senders.submit(Job(request, probe))
        return len(claimed)

    def _reject(self, never: Rejected) -> None:
        """A row the transport can never carry (plain SQL breaking its rules): dead, uncharged."""
        log.warning(
            "outbox id %d is never sent, dead-lettered: %s",
            never.event.id,
            never.reason,
            extra=log_fields(never.event),
        )
        self.telemetry.rejected.labels(self.transport.name).inc()
        self.completer.finish(never.event, Outcome(Action.REJECTED, None, never.reason))

    def _idle_wait(self) -> tuple[float, bool]:
        """How long to wait, and whether that is only to look for answers that quiet
        senders did not wake us for (a turn with no claim, unless it writes)."""
        waits = [
            self._poll_at - time.monotonic(),  # a claim at least every --poll-interval
            self.completer.renewal_in(),
            self.completer.retry_in(),
            self.completer.write_in(),
        ]
        awaiting, quiet = self.completer.awaiting(), self.senders.quiet
        if awaiting and not quiet:
            waits.append(0.5)
        change = self.breaker.next_change_in()
        if change > 0:
            waits.append(change)
        wait = min(waits)
        if awaiting and quiet and wait > RECORD_WITHIN:
            # Collect an answer in time to write it within RECORD_WITHIN.
            return RECORD_WITHIN, True
        return max(0.001, wait), False

    # -- outcomes --------------------------------------------------------------

    def _hold_others(self, answer: Answer) -> None:
        """From a sender thread: an answer that says "slow down" holds every sender at
        once, before the next queued request goes out (the breaker sets the full pause)."""
        pause = pause_for(answer, self.settings.budget, 1)
        if pause is not None:
            self.gate.pause(pause, pause_reason(answer))

    def _collect(self) -> None:
        """Turn every answer that came back into an outcome to write."""
        for done in self.senders.answers():
            first = done.job.request.events[0].id
            for carried, answer in done.exchange.answers:  # each HTTP answer once
                self.telemetry.answered(self.transport.name, carried, answer)
                action = classify(answer.status_code)
                self.breaker.answered(answer, action, done.job.probe, first)
                if carried > 1 and action is Action.RETRY:
                    # One line for the request, not one per event it carried.
                    log.warning(
                        "a request of %d events (outbox ids from %d) failed (%s): each is"
                        " retried after its backoff",
                        carried,
                        first,
                        answer.error,
                    )
            for event, share in done.exchange.results:
                if not self.completer.holds(event):
                    continue  # released at shutdown before the answer came
                if share is None:
                    self.completer.finish(event, Outcome(Action.UNSENT), done.at)
                else:
                    self._outcome(event, share, done.at, quiet=len(done.job.request.events) > 1)

    def _outcome(self, event: ClaimedEvent, answer: Answer, at: float, quiet: bool = False) -> None:
        """One event's answer (the breaker has had the request's) into the row's outcome."""
        assert event.created_at is not None  # an unreadable row is never sent
        age = dt.datetime.now(dt.timezone.utc) - event.created_at
        # The breaker has started the pause a 429 asks for: a throttled row waits it out.
        paused = self.gate.paused_for()
        outcome = decide(answer, event.attempts, age, self.settings.budget, paused)
        if outcome.action is Action.RETRY:
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "outbox id %d attempt %d failed (%s): retry in %.1fs",
                event.id,
                event.attempts + 1,
                outcome.error,
                outcome.retry_in,
                extra=log_fields(event),
            )
        elif outcome.action is Action.DEAD:
            log.warning(
                "outbox id %d dead after attempt %d: %s",
                event.id,
                event.attempts + 1,
                outcome.error,
                extra=log_fields(event),
            )
        self.tracing.attempt(event, answer, outcome)
        self.completer.finish(event, outcome, at)

    def _publish(self) -> None:
        """A halt began or ended: the heartbeat tells operators now, not at its next tick."""
        if self._maintenance:
            self._maintenance.nudge()

    # -- shutdown --------------------------------------------------------------

    def _shutdown(self) -> None:
        """Release what was never sent; give requests on the wire a bounded time to answer."""
        self._stopping.set()
        self.senders.stop()
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while self.completer.held() and time.monotonic() < deadline:
            self._collect()
            if self.completer.pending_records() == self.completer.held():
                break  # everything held has its outcome: write them once, below
            self._wake.clear()
            self._wake.wait(min(0.2, max(0.0, deadline - time.monotonic())))
        self._collect()
        released = self.completer.release_all_unanswered()
        if released:
            log.info("shutting down: %d unanswered rows go back to pending", released)
        try:
            self.completer.flush()
        except sa.exc.DBAPIError as exc:
            log.warning(
                "could not record %d outcomes at shutdown (%s); their leases will expire",
                self.completer.pending_records(),
                first_line(exc.orig),
            )
        # Requests still on the wire are given up (their rows are released above).
        try:
            self.senders.cut_off()
            if not self.senders.join(5.0):
                log.warning("a sender thread did not end in time")
            self.completer.forget()
        finally:
            self.store.close()
            self.transport.close()

    # -- the database, with patience ---------------------------------------------

    def _db(self, call: Callable[[], T]) -> T:
        """Run a store call; while the database is unreachable, log, back off and retry.

        The call is made directly, and only a transient failure enters the retry
        loop, as its first attempt: the loop makes three store calls a turn, most of
        them with nothing to write, and tenacity's bookkeeping costs about 20 µs each.
        """
        started = time.monotonic()
        try:
            result = call()
        except sa.exc.DBAPIError as exc:
            if not is_transient(exc):
                raise
            failed: list[BaseException] = [exc]
        else:
            self.telemetry.database_answered(True)
            return result

        def again() -> T:
            if failed:  # the failure above is the loop's first attempt: logged, waited out
                raise failed.pop()
            return call()

        # --database-wait counts from the first call, however long it took to fail.
        self._waited_before = time.monotonic() - started
        result = self._patience(again)
        self.telemetry.database_answered(True)
        return result

    def _patience_policy(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            wait=tenacity.wait_exponential(multiplier=0.5, max=30.0) + tenacity.wait_random(0, 0.5),
            stop=self._stop_waiting,
            before_sleep=self._log_db_retry,
            reraise=True,
        )

    def _stop_waiting(self, state: tenacity.RetryCallState) -> bool:
        limit = self.settings.database_patience()
        waited = self._waited_before + (state.seconds_since_start or 0.0)
        if limit is not None and waited >= limit:
            exc = state.outcome.exception() if state.outcome else None
            raise DatabaseGaveUp(
                f"gave up: the database did not answer for {limit:g}s"
                f" ({first_line(getattr(exc, 'orig', exc))}); --database-wait {limit:g}s"
            )
        return self._stopping.is_set()

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
