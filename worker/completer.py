"""The rows a daemon holds, from claim to recorded outcome.

Keyed by the claim (outbox id and lease token), never by the id alone: a row
taken back and claimed again is another claim, and the answer to one never
settles the other. While rows are held their leases are renewed, all in one
statement per round and fenced by the claim, so a live daemon's rows never
expire however long they wait (for a sender, the rate limit, a pause or a
slow answer). Outcomes are buffered and written in one transaction per batch:
at a low rate too, where each answer comes alone, those within RECORD_WITHIN of
the first share one write, and each row keeps the time its answer came. One
the database refuses is written alone, and never costs the others theirs.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Iterable

import sqlalchemy as sa

from worker.db import is_transient
from worker.output import first_line
from worker.policy import Action, Outcome
from worker.store import ClaimedEvent, OutboxStore, Record
from worker.telemetry import Telemetry, status_label

log = logging.getLogger("worker.daemon")

Claim = tuple[int, str]  # (outbox id, lease token)

# Seconds an outcome may wait to be written, for others to share its write. A row
# stays in_flight that much longer (a contact's next event waits for it), and a
# daemon killed in that time leaves its rows to lease rescue, which sends them again.
RECORD_WITHIN = 0.025


def claim_of(event: ClaimedEvent) -> Claim:
    return event.id, event.lease_token


class Completer:
    def __init__(
        self,
        store: OutboxStore,
        telemetry: Telemetry,
        *,
        lease: float,
        transport: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        write_every: int = 100,
    ) -> None:
        self.store = store
        self.telemetry = telemetry
        self.lease = lease
        self.transport = transport  # written with each attempt
        # Renewed three times a lease: two renewals may fail before a claim expires.
        self.renew_every = lease / 3
        self._clock = clock
        self._held: dict[Claim, ClaimedEvent] = {}
        # Outcomes not yet written, each with when its answer came (on the clock).
        self._outcomes: list[tuple[ClaimedEvent, Outcome, float]] = []
        self._oldest = math.inf  # the earliest answer among them
        self._write_every = write_every  # a buffer this full is written at once
        self._next_renewal = clock() + self.renew_every
        self._retries_due: list[float] = []  # a heap: when the retries written come due
        # Since the daemon started, for its heartbeat.
        self.delivered = 0
        self.dead = 0

    # -- what is held ----------------------------------------------------------------

    def hold(self, events: Iterable[ClaimedEvent]) -> None:
        for event in events:
            self._held[claim_of(event)] = event

    def holds(self, event: ClaimedEvent) -> bool:
        return claim_of(event) in self._held

    def held(self) -> int:
        """Rows claimed and not yet recorded (answered or not)."""
        return len(self._held)

    def awaiting(self) -> int:
        """Rows held whose answer has not come."""
        return len(self._held) - len(self._outcomes)

    def unanswered(self) -> list[ClaimedEvent]:
        answered = {claim_of(event) for event, _, _ in self._outcomes}
        return [e for c, e in self._held.items() if c not in answered]

    # -- leases ----------------------------------------------------------------------

    def renewal_in(self) -> float:
        return max(0.0, self._next_renewal - self._clock()) if self._held else float("inf")

    def renew_if_due(self) -> None:
        """Extend the lease of every held row, in one statement, when a renewal is due."""
        if self._clock() < self._next_renewal:
            return
        tokens = {token for _, token in self._held}
        if tokens:
            self.store.renew_leases(tokens, self.lease)
        # Only once written: a renewal that failed is due again when the call is retried.
        self._next_renewal = self._clock() + self.renew_every

    # -- retries -----------------------------------------------------------------------

    def retry_in(self) -> float:
        """Seconds until the next retry written comes due (inf: none to come), so that
        the daemon claims it then rather than at its next poll."""
        now = self._clock()
        while self._retries_due and self._retries_due[0] <= now:
            heapq.heappop(self._retries_due)  # due: the claim after this wait takes it
        return self._retries_due[0] - now if self._retries_due else float("inf")

    # -- outcomes --------------------------------------------------------------------

    def finish(self, event: ClaimedEvent, outcome: Outcome, at: float | None = None) -> None:
        """A held row's outcome, to write; `at`: when its answer came (default now)."""
        at = self._clock() if at is None else at
        self._outcomes.append((event, outcome, at))
        self._oldest = min(self._oldest, at)
        t, code = self.telemetry, status_label(outcome.status_code)
        if outcome.action is Action.DELIVERED:
            self.delivered += 1
            t.delivered.inc()
        elif outcome.action is Action.RETRY:
            t.retried.labels(code).inc()
        elif outcome.action in (Action.DEAD, Action.REJECTED):
            self.dead += 1
            t.dead.labels(code).inc()
        else:
            t.released.labels(outcome.action.value).inc()

    def pending_records(self) -> int:
        return len(self._outcomes)

    def write_in(self) -> float:
        """Seconds until the buffered outcomes are due to be written (inf: none)."""
        return max(0.0, self._oldest + RECORD_WITHIN - self._clock())

    def write_due(self) -> bool:
        """Write the buffered outcomes if the first has waited RECORD_WITHIN, or if
        there are write_every of them; whether it wrote."""
        if len(self._outcomes) >= self._write_every or self.write_in() == 0:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Write every buffered outcome now. A database that is away raises (the caller
        waits it out and calls again, nothing is lost); an outcome the database
        refuses is logged and let go: its claim expires and it is sent again."""
        if not self._outcomes:
            return
        now = self._clock()
        records = [
            Record(event, outcome, self.transport, max(0.0, now - at))
            for event, outcome, at in self._outcomes
        ]
        with self.telemetry.record_seconds.time():
            try:
                self.store.record(records)
            except sa.exc.DBAPIError as exc:
                if is_transient(exc):
                    raise
                self._record_one_by_one(records)
        self._outcomes, self._oldest = [], math.inf
        # Written now: the database's due time is at or before this one.
        now = self._clock()
        for due in {now + r.outcome.retry_in for r in records if r.outcome.action is Action.RETRY}:
            heapq.heappush(self._retries_due, due)
        for r in records:
            self._held.pop(claim_of(r.event), None)

    def _record_one_by_one(self, records: list[Record]) -> None:
        for r in records:
            try:
                self.store.record([r])
            except sa.exc.DBAPIError as exc:
                if is_transient(exc):
                    raise
                log.error(
                    "outbox id %d: the database refused its outcome (%s, %s); its claim"
                    " will expire and it will be sent again",
                    r.event.id,
                    r.outcome.action.value,
                    first_line(exc.orig),
                )

    def release_all_unanswered(self) -> int:
        """At shutdown: every held row without an answer goes back to pending, uncharged."""
        unanswered = self.unanswered()
        for event in unanswered:
            self.finish(event, Outcome(Action.UNSENT))
        return len(unanswered)

    def forget(self) -> None:
        self._held.clear()
        self._outcomes, self._oldest = [], math.inf
