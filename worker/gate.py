"""The send gate: every sender thread waits here for its turn, under the rate limit and any pause.

Turns are slots in time, `limit.interval` apart, granted in chunks by a slot
source: in process (SQLite, one daemon) or through PostgreSQL (worker.shared_limit),
where every daemon on the database takes its chunks from one shared timeline, so
their sends together stay within the limit. A thread takes a slot only once its
time has come, and a slot not taken within SEND_SLACK of its time is dropped:
a late send must never crowd the next daemon's slot.

`wait_turn(cancel)` and `sent(turn, at)` are the whole interface a sender needs
(a batch request takes one turn, or `tokens` turns): a send that reached the
wire late widens the spacing, as a slow database does. `pause(seconds)` holds
every thread, and on PostgreSQL every daemon.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

from worker.policy import MAX_PAUSE
from worker.ratelimit import MAX_SLACK, NO_LIMIT, SEND_SLACK, RateLimit, as_rate_limit
from worker.telemetry import Telemetry

log = logging.getLogger("worker.daemon")
# A pause at least this long (seconds) is announced once and shown to operators;
# shorter ones are the ordinary give-and-take of a rate limit.
LONG_PAUSE = 5.0
_CANCEL_SLICE = 0.1  # seconds: how soon a waiting thread sees `cancel`
_FETCH_RETRY = 1.0
_A_SECOND = dt.timedelta(seconds=1)  # seconds before asking again when the database did not answer
_SHRINK = 0.95  # the slack's step back down, per reading well within it
_WARN_EVERY = 600.0  # seconds: a slow spell's warning, at most this often for each cause
# Each cause of slack: what was slow, and until when the spacing stays wide.
_CAUSES = {
    "table": ("the rate limit's table answered in %.0f ms", "it answers faster"),
    "wire": ("a send went on the wire %.0f ms after its slot", "sends are on time"),
}


@dataclasses.dataclass(frozen=True)
class Turn:
    """A thread's turn to send: its slot began at `slot_at` (the gate's clock)."""

    slot_at: float


@dataclasses.dataclass(frozen=True)
class Grant:
    """Slots from a source: `count` of them, the first `start_in` seconds from now."""

    start_in: float
    count: int
    paused_for: float = 0.0  # a shared pause still lasts this long (0: none)
    paused_by: str | None = None  # the daemon that set it, and why
    pause_reason: str | None = None


class SlotSource(Protocol):
    shared: bool  # every daemon on the database draws from it

    def grant(self, count: int, interval: float, limit: str) -> Grant: ...

    def publish_pause(self, seconds: float, reason: str) -> None: ...


class LocalSlots:
    """The timeline kept in this process: for a single daemon (SQLite)."""

    shared = False

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._next = -math.inf
        self._lock = threading.Lock()

    def grant(self, count: int, interval: float, limit: str = "") -> Grant:
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + count * interval
            return Grant(start - now, count)

    def publish_pause(self, seconds: float, reason: str) -> None:
        pass  # the gate holds this process's threads itself


class SendGate:
    """Holds sender threads until their slot, and all of them during a pause."""

    def __init__(
        self,
        limit: RateLimit | float | str = NO_LIMIT,
        source: SlotSource | None = None,
        *,
        telemetry: Telemetry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = as_rate_limit(limit)
        # The slack the spacing allows for, grown by what each cause needs (_adapt_slack).
        self._needs = dict.fromkeys(_CAUSES, SEND_SLACK)
        self._warn_after = dict.fromkeys(_CAUSES, -math.inf)
        self._slack = SEND_SLACK
        self._interval = self.limit.interval
        self._clock = clock
        self.source: SlotSource = source or LocalSlots(clock)
        self.telemetry = telemetry or Telemetry()
        if self.limit:
            self.telemetry.rate_limit_slack.set(self._slack)
        # Unused slots: (from, by, at): clock times between which each may be used,
        # and its time on the timeline (by the earliest reading of the source's clock).
        self._slots: collections.deque[tuple[float, float, float]] = collections.deque()
        self._fetching = False
        self._fetch_after = -math.inf  # after a database error
        self._paused_until = -math.inf
        self._paused_until_wall: dt.datetime | None = None
        self._announced: dt.datetime | None = None  # the last shared pause logged
        self._shared_long_until: dt.datetime | None = None  # another daemon's long pause
        self._cond = threading.Condition()
        self._turnstile = threading.Lock()  # held by the one thread taking slots
        self._waiting = 0  # threads in wait_turn without a slot yet
        # Requests queued for a sender and not yet waiting here (the sender pool
        # sets it): with the threads waiting, what a chunk is sized to, so that a
        # daemon with little to send takes few slots from the others.
        self.backlog: Callable[[], int] = lambda: 0

    # -- pauses ----------------------------------------------------------------------

    def pause(self, seconds: float, reason: str = "paused") -> None:
        """Hold every sender for `seconds`; on a shared source, every daemon too."""
        if self._hold(seconds) and self.source.shared:
            self._show_shared()
            try:
                self.source.publish_pause(seconds, reason)
            except Exception as exc:  # the pause holds here whatever the database says
                log.warning("could not share the pause with other daemons: %s", _first(exc))

    def paused_for(self) -> float:
        return max(0.0, self._paused_until - self._clock())

    def shared_long_pause_until(self) -> dt.datetime | None:
        """The end of a long pause another daemon shared, while it lasts (for stats)."""
        if self._shared_long_until is None or self.paused_for() <= 0:
            return None
        return self._shared_long_until

    def _hold(self, seconds: float) -> bool:
        """Pause locally; whether that extended the pause (so it is news to share)."""
        seconds = min(max(0.0, seconds), MAX_PAUSE)
        with self._cond:
            now = self._clock()
            until = now + seconds
            if until <= self._paused_until + 0.05:
                return False
            self._paused_until = until
            self._paused_until_wall = _utcnow() + dt.timedelta(seconds=seconds)
            # Slots inside the pause are void: nobody may send then.
            dropped = 0
            while self._slots and self._slots[0][0] < until:
                self._slots.popleft()
                dropped += 1
            self.telemetry.tokens_unused.inc(dropped)
            self._cond.notify_all()
            return True

    def heard_of_pause(self, grant: Grant) -> None:
        """A pause another daemon shared (in a grant, or read after its notification)."""
        if grant.paused_for <= 0:
            return
        if self._hold(grant.paused_for) and self._paused_until_wall is not None:
            end = self._show_shared()
            if grant.paused_for >= LONG_PAUSE:
                self._shared_long_until = end
                self.telemetry.set_paused_until(end)
            mine = grant.paused_by == getattr(self.source, "name", None)  # logged when set
            if not mine and (self._announced is None or end > self._announced + _A_SECOND):
                self._announced = end
                log.info(
                    "honouring the shared pause until %s (set by %s: %s)",
                    end.isoformat(timespec="milliseconds"),
                    grant.paused_by or "another daemon",
                    grant.pause_reason or "rate limit",
                )

    def _show_shared(self) -> dt.datetime:
        assert self._paused_until_wall is not None
        self.telemetry.shared_paused_until.set(self._paused_until_wall.timestamp())
        return self._paused_until_wall

    # -- turns -------------------------------------------------------------------------

    def wait_turn(self, cancel: threading.Event | None = None, tokens: int = 1) -> Turn | None:
        """Block until this thread may send: after any pause, at its slot. None if
        `cancel` was set while it waited. A request costing `tokens` (a batch counted
        as several) takes that many consecutive slots and goes at the last. Say when
        it went on the wire: `sent`."""
        cancel = cancel or threading.Event()
        started = self._clock()
        with self._cond:
            self._waiting += 1
        try:
            # One thread at a time takes slots: interleaved, several requests of
            # several slots each would all come due at once.
            while not self._turnstile.acquire(timeout=_CANCEL_SLICE):
                if cancel.is_set():
                    return None
            try:
                turn = None
                for _ in range(max(1, tokens)):
                    with self._cond:
                        turn = self._wait_for_slot(cancel)
                    if turn is None:
                        return None
            finally:
                self._turnstile.release()
        finally:
            with self._cond:
                self._waiting -= 1
        waited = self._clock() - started
        if waited > 0.001:
            self.telemetry.tokens_waited.inc(max(1, tokens))
            self.telemetry.token_wait_seconds.inc(waited)
        return turn

    def _wait_for_slot(self, cancel: threading.Event) -> Turn | None:
        while not cancel.is_set():
            now = self._clock()
            if now < self._paused_until:
                self._cond.wait(min(self._paused_until - now, _CANCEL_SLICE))
                continue
            if not self.limit:
                return Turn(now)
            self._drop_stale(now)
            if self._slots:
                wait = self._slots[0][0] - now
                if wait <= 0:
                    return Turn(self._slots.popleft()[2])
                self._cond.wait(min(wait, _CANCEL_SLICE))
            elif self._fetching or now < self._fetch_after:
                self._cond.wait(min(max(self._fetch_after - now, 0.001), _CANCEL_SLICE))
            else:
                self._fetch()
        return None

    def sent(self, turn: Turn, at: float | None) -> None:
        """The request of `turn` went on the wire at `at` (this gate's clock; None: it
        never did). One later than the slack after its slot, with the next window's
        sends on time, would put one request too many in a window: the slots held at
        the old spacing are void, and the spacing widens for sends that late."""
        if at is None or not self.limit:
            return
        late = at - turn.slot_at
        with self._cond:
            if late > self._slack:
                self.telemetry.tokens_unused.inc(len(self._slots))
                self._slots.clear()
            self._adapt_slack("wire", late)

    def _adapt_slack(self, cause: str, delay: float) -> None:
        """Space the slots for the delays seen (less throughput, the limit still held),
        and come back down as they shrink again. Two causes: the source answering
        slower than the slack would void every chunk ("table"), and sends reaching
        the wire after their slot would crowd a window ("wire")."""
        need = self._needs[cause]
        if delay > need * 0.75:
            grown = min(MAX_SLACK, 1.5 * delay)
            if grown <= need:
                return
            now = self._clock()
            if now >= self._warn_after[cause]:  # not at every reading of a slow spell
                self._warn_after[cause] = now + _WARN_EVERY
                slow, until = _CAUSES[cause]
                log.warning(
                    slow + ": spacing sends for %.0f ms of slack (at most %.1f requests/s)"
                    " until %s",
                    delay * 1000,
                    grown * 1000,
                    1 / self.limit.interval_with(max(grown, *self._needs.values())),
                    until,
                )
            self._needs[cause] = grown
        elif delay < need / 3 and need > SEND_SLACK:
            self._needs[cause] = max(SEND_SLACK, need * _SHRINK)
        else:
            return
        self._slack = max(self._needs.values())
        self._interval = self.limit.interval_with(self._slack)
        self.telemetry.rate_limit_slack.set(self._slack)

    def _drop_stale(self, now: float) -> None:
        dropped = 0
        while self._slots and self._slots[0][1] < now:
            self._slots.popleft()
            dropped += 1
        if dropped:
            self.telemetry.tokens_unused.inc(dropped)

    def _fetch(self) -> None:
        """Ask the source for a chunk, without holding the lock (it may be a database)."""
        self._fetching = True
        interval = self._interval  # what the source spaces this chunk by
        self._cond.release()
        asked = self._clock()
        try:
            wanted = max(1, min(self.limit.chunk, self._waiting + self.backlog()))
            grant: Grant | None = self.source.grant(wanted, interval, self.limit.describe())
            failure = None
        except Exception as exc:  # the database is away: no slots, so nothing is sent
            grant, failure = None, exc
        finally:
            received = self._clock()
            self._cond.acquire()
            self._fetching = False
            self._cond.notify_all()
        if grant is None:
            if self._fetch_after < received - _FETCH_RETRY:  # once per outage, not per retry
                log.warning(
                    "no send slots: the rate limit's table did not answer (%s)", _first(failure)
                )
            self._fetch_after = received + _FETCH_RETRY
            return
        self.telemetry.token_grants.inc()
        self.telemetry.tokens_granted.inc(grant.count)
        # The source read its clock somewhere between asking and receiving: a slot is
        # used no sooner than the latest reading allows and no later than the slack
        # after the earliest, so a slow answer costs slots, never the spacing.
        slack = self._slack
        for i in range(grant.count):
            at = grant.start_in + i * interval
            if received + at < asked + at + slack:
                self._slots.append((received + at, asked + at + slack, asked + at))
            else:
                self.telemetry.tokens_unused.inc()
        self._adapt_slack("table", received - asked)
        if grant.paused_for > 0:
            self._cond.release()
            try:
                self.heard_of_pause(grant)
            finally:
                self._cond.acquire()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _first(exc: BaseException | None) -> str:
    text = str(getattr(exc, "orig", None) or exc or "").strip().splitlines()
    return text[0] if text else type(exc).__name__
