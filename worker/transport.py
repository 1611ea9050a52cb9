"""The transport seam: claimed events become HTTP requests, answers become each event's answer.

The daemon and its senders know only this interface. A transport owns its
endpoint (URL, key header) through a Deliverer, decides which rows it can carry
(a row it cannot is rejected with the rule, never sent), how many events go in
one request, and what an answer means for each event in it. Three transports:

- `tracker`: one event a request to the tracker's trackEvent (the default);
- `v3`: one event a request to Brevo's v3 events API;
- `v3-batch`: up to --batch-max-events a request to its /batch (worker.batch).

Every request takes one turn of the send gate: `Attempt` is the senders'
"wait for a turn, then post", so a batch of 200 is one request to the rate limit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from worker import v3event
from worker.delivery import Deliverer
from worker.event import Event, InvalidEvent, from_stored
from worker.policy import Answer
from worker.store import ClaimedEvent

# Wait for a turn at the send gate, post a body, say what came back; None: not sent
# (stopping, or delivery halted while it waited).
Attempt = Callable[[bytes], Answer | None]


@dataclass(frozen=True)
class Request:
    """One HTTP request's worth of events, and its body."""

    events: tuple[ClaimedEvent, ...]
    body: bytes
    parts: tuple[bytes, ...] = ()  # each event's own JSON, for a batch split in halves


@dataclass(frozen=True)
class Rejected:
    """A claimed row this transport can never carry: dead-lettered with the reason."""

    event: ClaimedEvent
    reason: str


@dataclass
class Exchange:
    """What one request (and any it was split into) gave."""

    # Every HTTP answer in order, with how many events its request carried: the
    # breaker, the rate-limit pause and the metrics take each answer once.
    answers: list[tuple[int, Answer]] = field(default_factory=list)
    # Each event's own answer; None: it was never sent (its row goes back uncharged).
    results: list[tuple[ClaimedEvent, Answer | None]] = field(default_factory=list)


class Transport:
    """One event a request; subclasses say how an event is written."""

    name = "tracker"
    key_variable = "OUTBOX_MA_KEY"
    events_per_request = 1
    request_cost = 1  # the rate limit's slots a request takes

    def __init__(self, deliverer: Deliverer, *, max_body_bytes: int) -> None:
        self.deliverer = deliverer
        self.max_body_bytes = max_body_bytes

    def prepare(self, events: Sequence[ClaimedEvent]) -> tuple[list[Request], list[Rejected]]:
        """The requests that carry these events, and the events no request can carry."""
        requests, rejected = [], []
        for event in events:
            try:
                body = self.encode(event, self.valid(event))
            except InvalidEvent as exc:
                rejected.append(Rejected(event, self._reason(event, exc)))
            else:
                requests.append(Request((event,), body))
        return requests, rejected

    def valid(self, event: ClaimedEvent) -> Event:
        """The row as an event this transport carries, or InvalidEvent naming the rule."""
        if event.unreadable:
            raise _Unreadable("row", event.unreadable)
        checked = from_stored(
            event.email,
            event.event,
            event.properties,
            event.eventdata,
            max_body_bytes=self.max_body_bytes,
        )
        try:
            v3event.check(checked, self.name)
        except InvalidEvent as exc:
            raise _TransportRule(exc.field, exc.rule) from None
        return checked

    def encode(self, event: ClaimedEvent, checked: Event) -> bytes:
        return v3event.encoded(checked, self.name, event.created_at)

    def exchange(self, request: Request, attempt: Attempt) -> Exchange:
        answer = attempt(request.body)
        exchange = Exchange([(len(request.events), answer)] if answer else [])
        exchange.results = [(event, answer) for event in request.events]
        return exchange

    def post(self, body: bytes) -> Answer:
        return self.deliverer.post(body)

    def cut_off(self, threads: set[int]) -> None:
        self.deliverer.cut_off(threads)

    def close(self) -> None:
        self.deliverer.close()

    def _reason(self, event: ClaimedEvent, exc: InvalidEvent) -> str:
        if isinstance(exc, _Unreadable):
            return f"unreadable row: {exc.rule}"
        if isinstance(exc, _TransportRule):
            return f"invalid event for --transport {self.name}: {exc}"
        return f"invalid event: {exc}"


class _Unreadable(InvalidEvent):
    pass


class _TransportRule(InvalidEvent):
    pass


class V3Transport(Transport):
    """One event a request to Brevo's v3 events API."""

    name = "v3"
    key_variable = "OUTBOX_API_KEY"
