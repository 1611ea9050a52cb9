"""A programmable track-event endpoint for the tests: real HTTP on 127.0.0.1.

Answers 204 by default; `script(event_name, *answers)` queues the answers
that the next requests for that event get, in order. Every request is kept.
"""

from __future__ import annotations

import json
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

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops the SYNs of a burst of new connections
    # (a daemon opening up to its concurrency), which then come a second late.
    request_queue_size = 128
    daemon_threads = True


class Endpoint:
    def __init__(self, limit_per_second: int | None = None) -> None:
        self.requests: list[Received] = []
        self.default = Reply()
        # Like an account's limit: a request above N in the sliding second that ends
        # with it is answered 429 (every request counts, refused or not).
        self.limit_per_second = limit_per_second
        self.refused: list[Received] = []  # answered 429 by that limit
        # A reply chosen per request (e.g. one daemon's), tried before the scripts.
        self.rule: Callable[[Received], Reply | None] = lambda received: None
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

    def script(self, event: str, *replies: Reply) -> None:
        with self._lock:
            self._scripts[event].extend(replies)

    def events(self) -> list[Any]:
        with self._lock:
            return [r.json for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _reply_for(self, received: Received) -> Reply:
        with self._lock:
            self.requests.append(received)
            if self.limit_per_second is not None and self._over_limit(received.at):
                self.refused.append(received)
                return Reply(429, b'{"code":"too_many_requests"}', {"Retry-After": "1"})
            ruled = self.rule(received)
            if ruled is not None:
                return ruled
            try:
                name = json.loads(received.raw).get("event")
            except ValueError:
                name = None
            queue = self._scripts.get(name)
            return queue.popleft() if queue else self.default

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
