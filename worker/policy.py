"""What an answer means: the status-code table, the retry schedule and its budget.

Pure decisions, no SQL and no HTTP sessions: an `Answer` (what came back) and
the row's history go in, an `Outcome` (what to write) comes out.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
from dataclasses import dataclass, field

import tenacity

from worker.when import duration_text


class Action(enum.Enum):
    """What happens to a claimed row: the decision, written by the store as it is."""

    DELIVERED = "delivered"  # 2xx: done
    RETRY = "retry"  # may succeed later: charged to the retry budget
    DEAD = "dead"  # will never succeed: dead at once
    REJECTED = "rejected"  # the row breaks a rule: dead before any send, uncharged
    # The release reasons: back to pending, uncharged.
    HALT = "halt"  # our setup is wrong (key, URL): stop everyone
    THROTTLE = "throttle"  # 429: slow the whole daemon
    UNSENT = "unsent"  # never sent (shutdown, or halted before its turn)

    @property
    def status(self) -> str:
        """The row's status after it (one of worker.schema's states)."""
        if self is Action.DELIVERED:
            return "delivered"
        return "dead" if self in (Action.DEAD, Action.REJECTED) else "pending"

    @property
    def charged(self) -> bool:
        """Whether it spends one of the row's attempts."""
        return self in (Action.DELIVERED, Action.RETRY, Action.DEAD)

    @property
    def released(self) -> bool:
        """Back to pending uncharged: the row keeps the answer that stopped it."""
        return self in (Action.HALT, Action.THROTTLE, Action.UNSENT)

    @property
    def writes_attempt(self) -> bool:
        """A charged failure: one outbox_attempts row."""
        return self in (Action.RETRY, Action.DEAD)


@dataclass(frozen=True)
class Answer:
    """What one HTTP attempt gave: a status code, or an error and no code."""

    status_code: int | None
    error: str | None = None  # the endpoint's code and message, or the network error
    duration_ms: int = 0
    retry_after: float | None = None  # seconds, from Retry-After or x-sib-ratelimit-reset
    rate_limit_exhausted: bool = False  # x-sib-ratelimit-remaining said 0
    # One event's share of a batch answer, where the status code alone does not say
    # it: a 207 or 400 that names this event's index (dead) or not (delivered).
    action: Action | None = None
    content: bytes = field(default=b"", repr=False)  # the body, kept for a batch's errors
    sent_at: float | None = None  # time.monotonic() once the request was on the wire


def classify(status_code: int | None) -> Action:
    """The classification table of the contract (section 4 and 6)."""
    if status_code is None:  # timeout, refused, reset, TLS failure
        return Action.RETRY
    if 200 <= status_code < 300:
        return Action.DELIVERED
    if status_code in (401, 403, 404) or 300 <= status_code < 400:
        return Action.HALT
    if status_code == 429:
        return Action.THROTTLE
    if status_code == 408 or status_code >= 500:
        return Action.RETRY
    return Action.DEAD  # 400, 413, 422 and every other 4xx


@dataclass(frozen=True)
class RetryBudget:
    """How long and how often a failing event is retried before it is dead."""

    max_attempts: int = 20
    max_age: dt.timedelta = dt.timedelta(days=3)
    backoff_base: float = 2.0  # seconds before the first retry (about)
    backoff_max: float = 3600.0  # no wait longer than this

    def __post_init__(self) -> None:
        # Equal jitter from tenacity's strategies: half the exponential step is
        # fixed, half random, so retries spread out but never come at once.
        half_base, half_max = self.backoff_base / 2, self.backoff_max / 2
        wait = tenacity.wait_exponential(multiplier=half_base, max=half_max)
        jitter = tenacity.wait_random_exponential(multiplier=half_base, max=half_max)
        object.__setattr__(self, "_wait", wait + jitter)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after the given failed attempt (1 for the first)."""
        # The wait strategies read only attempt_number: no Retrying object exists here.
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempt
        # _wait is set in __post_init__ through object.__setattr__ (a frozen dataclass).
        return float(self._wait(state))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Outcome:
    """What to write for one claimed row."""

    action: Action
    status_code: int | None = None
    error: str | None = None
    retry_in: float = 0.0  # seconds until next_attempt_at
    duration_ms: int = 0


def decide(
    answer: Answer,
    attempts_before: int,
    age: dt.timedelta,
    budget: RetryBudget,
    paused_for: float = 0.0,
) -> Outcome:
    """Turn one answer into the row's next state; a throttled row is due again when
    the pause in effect (`paused_for` seconds) ends."""
    action = answer.action or classify(answer.status_code)
    code, error, ms = answer.status_code, answer.error, answer.duration_ms
    if action is Action.DELIVERED:
        return Outcome(action, code, None, duration_ms=ms)
    if action is Action.THROTTLE:
        return Outcome(action, code, error, retry_in=paused_for, duration_ms=ms)
    if action is not Action.RETRY:  # a halt, or dead at once: the budget has no say
        return Outcome(action, code, error, duration_ms=ms)
    attempt = attempts_before + 1
    wait = budget.backoff(attempt)
    if attempt >= budget.max_attempts:
        reason = f"{error} (gave up after {attempt} attempts)"
        return Outcome(Action.DEAD, code, reason, duration_ms=ms)
    if age + dt.timedelta(seconds=wait) > budget.max_age:
        reason = f"{error} (gave up: older than {duration_text(budget.max_age)})"
        return Outcome(Action.DEAD, code, reason, duration_ms=ms)
    return Outcome(Action.RETRY, code, error, retry_in=wait, duration_ms=ms)


# Every pause of the whole daemon lies between these (seconds): a Retry-After of 0
# or in the past must not make a hot loop, and no header may stop sending for years.
MIN_PAUSE = 1.0
MAX_PAUSE = 3600.0


def pause_for(answer: Answer, budget: RetryBudget, streak: int) -> float | None:
    """How long every sender waits after this answer, or None: after a 429 the
    server's word (else backoff by the streak of 429s); after any other answer
    saying the rate limit is used up (x-sib-ratelimit-remaining: 0), until its reset."""
    if answer.status_code == 429:
        wanted = answer.retry_after if answer.retry_after is not None else budget.backoff(streak)
    elif answer.rate_limit_exhausted:
        wanted = answer.retry_after if answer.retry_after is not None else MIN_PAUSE
    else:
        return None
    return bounded_pause(wanted)


def bounded_pause(seconds: float) -> float:
    if math.isnan(seconds):
        return MIN_PAUSE
    return min(max(seconds, MIN_PAUSE), MAX_PAUSE)
