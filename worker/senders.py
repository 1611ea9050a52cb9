"""The sender pool: threads that only do HTTP, fed jobs by the daemon's main thread.

Each sender takes a job (one request of the transport), and for every HTTP
request it makes (a batch split in halves makes several) waits for its turn at
the send gate (the rate limit and any pause), posts it unless delivery is
halted, and hands the exchange back. `stop` makes every queued job come back
unsent; `join` waits for the threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from worker.gate import SendGate
from worker.policy import Action, Answer, classify
from worker.transport import Attempt, Exchange, Request, Transport

log = logging.getLogger("worker.daemon")


@dataclass(frozen=True)
class Job:
    request: Request
    probe: bool = False  # sent even while halted, to find out whether the endpoint is back


@dataclass(frozen=True)
class Done:
    job: Job
    exchange: Exchange  # an event's answer None: not sent (halted or stopping before its turn)
    at: float  # when it ended (time.monotonic())


_STOP = None  # one per thread, queued behind every job


class SenderPool:
    def __init__(
        self,
        size: int,
        transport: Transport,
        gate: SendGate,
        *,
        may_send: Callable[[bool], bool],
        hold_others: Callable[[Answer], None],
        wake: threading.Event,
    ) -> None:
        self.transport = transport
        self.gate = gate
        self.may_send = may_send  # (probe) -> whether to send it now
        self.hold_others = hold_others  # an answer that says "slow down" holds the gate at once
        self._wake = wake
        # Set by the daemon while it has nothing more to claim: then an answer that
        # only delivers needs no turn of its own, the loop's next turn collects it.
        self.quiet = False
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._done: queue.SimpleQueue[Done] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"outbox-sender-{n}", daemon=True)
            for n in range(size)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def queued(self) -> int:
        """Jobs waiting for a free sender."""
        return self._jobs.qsize()

    def answers(self) -> Iterator[Done]:
        """Every answer that came back since the last call."""
        while True:
            try:
                yield self._done.get_nowait()
            except queue.Empty:
                return

    def stop(self) -> None:
        """Send nothing more: queued jobs come back unsent, the threads end."""
        self._stopping.set()
        for _ in self._threads:
            self._jobs.put(_STOP)

    def cut_off(self) -> None:
        """Give up on every answer still awaited: the senders return at once."""
        self.transport.cut_off({t.ident for t in self._threads if t.ident is not None})

    def join(self, timeout: float) -> bool:
        """Wait (bounded) for every sender to end; whether they all did."""
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)
        return not any(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            attempt = self._attempt(job)
            try:
                exchange = self.transport.exchange(job.request, attempt)
            except Exception as exc:  # a sender thread must never die with a job
                log.exception(
                    "outbox id %d: unexpected error while sending", job.request.events[0].id
                )
                failed = Answer(None, f"unexpected error: {type(exc).__name__}: {exc}")
                exchange = Exchange([], [(event, failed) for event in job.request.events])
            self._done.put(Done(job, exchange, time.monotonic()))
            if not (self.quiet and _only_delivers(job, exchange)) or self._stopping.is_set():
                self._wake.set()

    def _attempt(self, job: Job) -> Attempt:
        def attempt(body: bytes) -> Answer | None:
            if self._stopping.is_set():
                return None
            turn = self.gate.wait_turn(self._stopping, self.transport.request_cost)
            if turn is None or self._stopping.is_set() or not self.may_send(job.probe):
                return None
            try:
                answer = self.transport.post(body)
            except Exception as exc:  # a sender thread must never die with a job
                log.exception(
                    "outbox id %d: unexpected error while sending", job.request.events[0].id
                )
                answer = Answer(None, f"unexpected error: {type(exc).__name__}: {exc}")
            self.gate.sent(turn, answer.sent_at)
            self.hold_others(answer)
            return answer

        return attempt


def _only_delivers(job: Job, exchange: Exchange) -> bool:
    """Every event sent and delivered, with nothing for the breaker or the gate to act on."""
    return (
        not job.probe
        and bool(exchange.answers)
        and not any(answer.rate_limit_exhausted for _, answer in exchange.answers)
        and all(
            answer is not None
            and classify(answer.status_code) is Action.DELIVERED
            and answer.action in (None, Action.DELIVERED)
            for _, answer in exchange.results
        )
    )
