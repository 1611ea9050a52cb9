"""The v3 batch transport: many events a request, and each event's outcome from one answer.

Packing: at most --batch-max-events events and --batch-max-bytes bytes a
request, and at most one event per contact in a request (Brevo does not say it
keeps order within a batch), so per-contact order holds exactly as with one
event a request.

Answers: a 2xx delivers every event; a 207 or 400 naming failing indexes
(`errors: [{eventIndex: [..], message}]`) dead-letters those with their
message and delivers the rest; a 400 (or 413, 422: any refusal) naming none
is split in halves, each sent again at once (a turn of the gate each), until
the bad events are alone, so one bad event never dead-letters its 199
neighbours; every other answer (429, 5xx, network, 401) is every event's
answer, as for a single request, and ends a split (its other halves go back
unsent). A split counts as one attempt of each event: only its last answer is
recorded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from worker.delivery import MAX_ERROR_CHARS, Deliverer
from worker.event import InvalidEvent
from worker.policy import Action, Answer, classify
from worker.store import ClaimedEvent
from worker.transport import Attempt, Exchange, Rejected, Request, Transport

_OPEN = {"object": b'{"events":[', "array": b"["}
_CLOSE = {"object": b"]}", "array": b"]"}


class V3BatchTransport(Transport):
    name = "v3-batch"
    key_variable = "OUTBOX_API_KEY"

    def __init__(
        self,
        deliverer: Deliverer,
        *,
        max_body_bytes: int,
        max_events: int = 200,
        max_bytes: int = 512_000,
        shape: str = "object",
        request_cost: int = 1,
    ) -> None:
        super().__init__(deliverer, max_body_bytes=max_body_bytes)
        self.events_per_request = max_events
        self.request_cost = request_cost
        self.max_bytes = max_bytes
        self.shape = shape
        self._frame = len(_OPEN[shape]) + len(_CLOSE[shape])

    def prepare(self, events: Sequence[ClaimedEvent]) -> tuple[list[Request], list[Rejected]]:
        parts: list[tuple[ClaimedEvent, bytes]] = []
        rejected = []
        for event in events:
            try:
                part = self.encode(event, self.valid(event))
                if len(part) + self._frame > self.max_bytes:
                    raise InvalidEvent(
                        "body",
                        f"size {len(part) + self._frame} bytes is over --batch-max-bytes"
                        f" {self.max_bytes}",
                    )
            except InvalidEvent as exc:
                rejected.append(Rejected(event, self._reason(event, exc)))
            else:
                parts.append((event, part))
        return [self._request(batch) for batch in self._pack(parts)], rejected

    def _pack(
        self, parts: list[tuple[ClaimedEvent, bytes]]
    ) -> list[list[tuple[ClaimedEvent, bytes]]]:
        """Batches in id order; an event goes in the first batch with room after the
        last one holding its contact (only --unordered claims two of one contact)."""
        batches: list[list[tuple[ClaimedEvent, bytes]]] = []
        sizes: list[int] = []
        last_of: dict[str, int] = {}  # contact -> index of the last batch holding it
        first_open = 0  # batches before this one are full
        for event, part in parts:
            contact = str(event.email).casefold()
            start = max(first_open, last_of.get(contact, -1) + 1)
            index = start
            while index < len(batches) and not self._fits(batches[index], sizes[index], part):
                index += 1
            if index == len(batches):
                batches.append([])
                sizes.append(self._frame)
            batches[index].append((event, part))
            sizes[index] += len(part) + 1  # and a comma
            last_of[contact] = index
            while first_open < len(batches) and len(batches[first_open]) >= self.events_per_request:
                first_open += 1
        return batches

    def _fits(self, batch: list[Any], size: int, part: bytes) -> bool:
        return len(batch) < self.events_per_request and size + len(part) + 1 <= self.max_bytes

    def _request(self, batch: list[tuple[ClaimedEvent, bytes]]) -> Request:
        parts = tuple(part for _, part in batch)
        return Request(tuple(e for e, _ in batch), self._body(parts), parts)

    def _body(self, parts: Sequence[bytes]) -> bytes:
        return _OPEN[self.shape] + b",".join(parts) + _CLOSE[self.shape]

    def exchange(self, request: Request, attempt: Attempt) -> Exchange:
        exchange = Exchange()
        todo = [list(zip(request.events, request.parts, strict=True))]
        body = request.body
        while todo:
            items = todo.pop(0)
            answer = attempt(body or self._body([part for _, part in items]))
            body = b""  # the halves' bodies are built as they go
            if answer is None:  # not sent: neither these nor the halves still waiting
                for rest in [items, *todo]:
                    exchange.results += [(event, None) for event, _ in rest]
                return exchange
            exchange.answers.append((len(items), answer))
            events = [event for event, _ in items]
            code, action = answer.status_code, classify(answer.status_code)
            if code == 207 or action is Action.DEAD:
                named = self._named(answer, len(events))
                if named or code == 207:
                    exchange.results += self._shares(events, answer, named)
                    continue
                if len(events) > 1:  # a refusal of the request (400, 413, 422...): halve it
                    half = len(items) // 2
                    todo[:0] = [items[:half], items[half:]]
                    continue
            exchange.results += [(event, answer) for event in events]
            if todo and action in (Action.HALT, Action.THROTTLE):
                # Halves still waiting are not sent into a halt or a 429: back uncharged.
                exchange.results += [(event, None) for rest in todo for event, _ in rest]
                return exchange
        return exchange

    def _named(self, answer: Answer, count: int) -> dict[int, str]:
        """The failing events' indexes (in this request) and their messages."""
        named = {}
        for index, message in failed_indexes(answer.content):
            if 0 <= index < count:
                named[index] = self.deliverer.redact(message)[:MAX_ERROR_CHARS]
        return named

    def _shares(
        self, events: list[ClaimedEvent], answer: Answer, named: dict[int, str]
    ) -> list[tuple[ClaimedEvent, Answer | None]]:
        """Each event's share: dead with its own message if named, else delivered."""
        shares: list[tuple[ClaimedEvent, Answer | None]] = []
        for index, event in enumerate(events):
            if index in named:
                error = f"HTTP {answer.status_code} {named[index]} (eventIndex {index} of a batch of {len(events)})"
                share = dataclasses.replace(answer, error=error, action=Action.DEAD)
            else:
                share = dataclasses.replace(answer, error=None, action=Action.DELIVERED)
            shares.append((event, share))
        return shares


def failed_indexes(content: bytes) -> list[tuple[int, str]]:
    """(index, message) for every event a batch answer names as failed; [] if none or
    the body says nothing readable. Takes `errors: [{eventIndex: [..] or N, message}]`,
    at the top level or as the body itself."""
    try:
        parsed = json.loads(content)
    except (ValueError, RecursionError):
        return []
    errors = parsed.get("errors") if isinstance(parsed, dict) else parsed
    if not isinstance(errors, list):
        return []
    found = []
    for error in errors:
        if not isinstance(error, dict):
            continue
        indexes = error.get("eventIndex", error.get("event_index", error.get("index")))
        if isinstance(indexes, int) and not isinstance(indexes, bool):
            indexes = [indexes]
        if not isinstance(indexes, list):
            continue
        message = error.get("message") or error.get("code") or "refused"
        for index in indexes:
            if isinstance(index, int) and not isinstance(index, bool):
                found.append((index, str(message)))
    return found
