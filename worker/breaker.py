"""When the daemon may send: halts and their probes, slow start, and pauses.

Pure state with an injected clock: the daemon feeds it every answer and asks
it how many requests may be out; sender threads ask whether to send at all.

- Halt: the endpoint refuses our setup (key, URL). Nothing is sent but one
  probe per probe interval, until a probe gets an answer that is not a halt.
- Slow start: after start and after a halt, one request goes alone; the
  daemon opens up to its concurrency once an answer that is not a halt is
  back. A wrong key costs one request, not a round of concurrency.
- Pause: a 429, or any answer saying the rate limit is used up, holds every
  sender (through the send gate) for a time between MIN_PAUSE and MAX_PAUSE.
  A long pause is logged once with its end and shown in stats and metrics.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable

from worker.gate import LONG_PAUSE, SendGate
from worker.policy import Action, Answer, RetryBudget, pause_for
from worker.telemetry import Telemetry, status_label

log = logging.getLogger("worker.daemon")


_HINTS = {
    401: "the key was refused: check {key}",
    403: "the key is not allowed: check {key} and the account",
    404: "the endpoint URL is wrong: check OUTBOX_ENDPOINT_URL",
}
_REDIRECT_HINT = "the endpoint redirects: set OUTBOX_ENDPOINT_URL to the final URL"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Breaker:
    def __init__(
        self,
        concurrency: int,
        gate: SendGate,
        budget: RetryBudget,
        *,
        probe_interval: float,
        telemetry: Telemetry | None = None,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = _utcnow,
        key_variable: str = "OUTBOX_MA_KEY",  # the transport's key, named in halt hints
    ) -> None:
        self.key_variable = key_variable
        self.concurrency = concurrency
        self.gate = gate
        self.budget = budget
        self.probe_interval = probe_interval
        self.telemetry = telemetry or Telemetry()
        self.on_change = on_change  # halted or resumed: publish it at once
        self._clock, self._wall = clock, wall
        self.halted: str | None = None  # why, while delivery is halted
        self._opened = False  # slow start: one request alone until an answer is back
        self._next_probe = 0.0
        self._throttle_streak = 0
        self._announced_until = 0.0  # the end of the last long pause logged (clock)
        self._paused_until_wall: dt.datetime | None = None

    # -- asked by the daemon and its senders -----------------------------------------

    def window(self) -> int:
        """How many requests may be out (claimed and not yet answered) now."""
        if self.halted:
            return 1 if self._clock() >= self._next_probe else 0
        return self.concurrency if self._opened else 1

    def probing(self) -> bool:
        return self.halted is not None

    def probe_sent(self) -> None:
        self._next_probe = self._clock() + self.probe_interval

    def may_send(self, probe: bool) -> bool:
        return probe or self.halted is None

    def paused_for(self) -> float:
        return self.gate.paused_for()

    def paused_until(self) -> dt.datetime | None:
        """The end of the pause in effect, if it is a long one (for stats)."""
        if self._paused_until_wall is None or self.paused_for() <= 0:
            return self.gate.shared_long_pause_until()
        return self._paused_until_wall

    def next_change_in(self) -> float:
        """Seconds until the window may open again by itself (the next probe, a pause's end)."""
        probe_in = self._next_probe - self._clock() if self.halted else 0.0
        return min((w for w in (self.paused_for(), probe_in) if w > 0), default=0.0)

    # -- fed every answer ------------------------------------------------------------

    def answered(self, answer: Answer, action: Action, probe: bool, event_id: int) -> float:
        """Take in one answer; return the pause it started (0 if none)."""
        if action is Action.HALT:
            self._halt(answer, event_id)
        else:
            if self.halted and probe:
                log.warning(
                    "delivery resumed: the endpoint answered %s",
                    answer.status_code or answer.error,
                )
                self.halted = None
                self.telemetry.set_halted(None)
                self.on_change()
            if not self.halted:
                self._opened = True
        if answer.status_code == 429:
            self.telemetry.throttled.inc()
        self._throttle_streak = self._throttle_streak + 1 if action is Action.THROTTLE else 0
        pause = pause_for(answer, self.budget, max(1, self._throttle_streak))
        if pause is None:
            return 0.0
        self._pause(pause, answer, event_id)
        return pause

    def _halt(self, answer: Answer, event_id: int) -> None:
        hint = _HINTS.get(answer.status_code or 0, _REDIRECT_HINT).format(key=self.key_variable)
        reason = f"{answer.error} ({hint})"
        if self.halted != reason:
            log.error(
                "DELIVERY HALTED for every event: outbox id %d got %s. No attempts are spent;"
                " probing every %.0fs until it is fixed.",
                event_id,
                reason,
                self.probe_interval,
            )
        self.halted = reason
        self._opened = False
        self.telemetry.set_halted(status_label(answer.status_code))
        self._next_probe = self._clock() + self.probe_interval
        self.on_change()

    def _pause(self, seconds: float, answer: Answer, event_id: int) -> None:
        why = "429" if answer.status_code == 429 else "rate limit used up"
        self.gate.pause(seconds, pause_reason(answer, event_id))
        now = self._clock()
        until = now + self.paused_for()
        if seconds < LONG_PAUSE:
            if answer.status_code == 429:
                end = self._wall() + dt.timedelta(seconds=seconds)
                log.warning(
                    "endpoint says 429 (outbox id %d): pausing all sends for %.1fs (until %s)",
                    event_id,
                    seconds,
                    end.isoformat(timespec="milliseconds"),
                )
            return
        if until <= self._announced_until + 1.0:
            return  # this pause is already announced
        # Whole seconds, so the time logged is the time stats and metrics show.
        end = self._wall() + dt.timedelta(seconds=math.ceil(until - now))
        self._paused_until_wall = end.replace(microsecond=0)
        self._announced_until = until
        self.telemetry.set_paused_until(self._paused_until_wall)
        log.warning(
            "pausing all sends until %s (%s, outbox id %d; the endpoint asked for %s)",
            self._paused_until_wall.isoformat(),
            why,
            event_id,
            f"{answer.retry_after:g}s" if answer.retry_after is not None else "a backoff",
        )


def pause_reason(answer: Answer, event_id: int | None = None) -> str:
    """Why every sender pauses, as stats shows it: '429 asking for 2s, to outbox id 7'."""
    why = "429" if answer.status_code == 429 else f"{answer.status_code}, rate limit used up"
    if answer.retry_after is not None:
        why += f" asking for {answer.retry_after:g}s"
    return why if event_id is None else f"{why}, to outbox id {event_id}"
