"""A programmable track-event endpoint for the tests: real HTTP on 127.0.0.1.

Answers 204 by default; `script(event_name, *answers)` queues the answers
that the next requests for that event get, in order (a v3 batch request takes
the script of the first of its events that has one); `respond`, when set,
decides any request first (a soak's mix of slow answers and 429s), after
`limit_per_second`, which answers 429 above N requests in any sliding second. Every
request is kept, with the status it was answered. It takes every transport's
bodies: the tracker's, a v3 event, a v3 batch (either shape).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 204
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    raw: bytes
    at: float
    status: int = 0  # what it was answered

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def events(self) -> list[Any]:
        return events_in(self.json)


def events_in(body: Any) -> list[Any]:
    """The events a body carries: itself, or a batch's list (either shape)."""
    if isinstance(body, list):
        return body
    if isinstance(body, dict) and isinstance(body.get("events"), list):
        return body["events"]
    return [body]


def name_of(event: Any) -> Any:
    """The event's name in either API's spelling."""
    return event.get("event", event.get("event_name")) if isinstance(event, dict) else None


def data_of(event: Any) -> Any:
    """The tracker's eventdata, which v3 sends as event_properties."""
    return event.get("eventdata", event.get("event_properties"))


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops the SYNs of a burst of new connections
    # (a daemon opening up to its concurrency), which then come a second late.
    request_queue_size = 128
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A daemon killed mid-request hangs up on its answer: no test's business.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class Endpoint:
    def __init__(self, limit_per_second: int | None = None) -> None:
        self.requests: list[Received] = []
        self.default = Reply()
        self.respond: Callable[[Received], Reply | None] | None = None
        # Like an account's limit: a request above N in the sliding second that ends
        # with it is answered 429 (every request counts, refused or not).
        self.limit_per_second = limit_per_second
        self.refused: list[Received] = []  # answered 429 by that limit
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        # A short poll interval: close() waits for the loop, once per test.
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/v2/trackEvent"

    @property
    def v3_url(self) -> str:
        """The v3 events API's URL (v3-batch posts to its /batch)."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/v3/events"

    def url_for(self, transport: str) -> str:
        return self.url if transport == "tracker" else self.v3_url

    def script(self, event: str, *replies: Reply) -> None:
        with self._lock:
            self._scripts[event].extend(replies)

    def events(self) -> list[Any]:
        """Every event received, in order (a batch's one by one)."""
        with self._lock:
            return [event for r in self.requests for event in r.events]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _reply_for(self, received: Received) -> Reply:
        with self._lock:
            self.requests.append(received)
            reply = self._choose(received)
            received.status = reply.status
            return reply

    def _choose(self, received: Received) -> Reply:
        if self.limit_per_second is not None and self._over_limit(received.at):
            self.refused.append(received)
            return Reply(429, b'{"code":"too_many_requests"}', {"Retry-After": "1"})
        if self.respond is not None:
            reply = self.respond(received)
            if reply is not None:
                return reply
        try:
            names = [name_of(event) for event in received.events]
        except ValueError:
            names = []
        for name in names:
            queue = self._scripts.get(name)
            if queue:
                return queue.popleft()
        return self.default

    def _over_limit(self, at: float) -> bool:
        seen = 0
        for earlier in reversed(self.requests):
            if earlier.at <= at - 1.0:
                break
            seen += 1
        return seen > (self.limit_per_second or 0)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received = Received(
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    raw,
                    time.monotonic(),
                )
                reply = endpoint._reply_for(received)
                if reply.delay:
                    time.sleep(reply.delay)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
