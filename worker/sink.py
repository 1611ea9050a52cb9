"""A local endpoint that behaves like the track-event API, or the v3 events API, for
development, the demo and tests.

Tracker (`/api/v2/trackEvent`, header `ma-key`): the body checked by the same
rules as `track_event`, 400 with {"code", "message"}, else 204. v3
(`/v3/events` and `/v3/events/batch`, header `api-key`): each event checked by
the v3 rules; a single event 204 or 400; a batch 202 when every event is good,
207 naming the bad ones by `eventIndex` when some are, 400 when all are (or the
batch is too big). Both: 401 with Brevo's body for a wrong key, 404 for
another path, and with a rate limit 429 with the x-sib-ratelimit-* headers.
"""

from __future__ import annotations

import hmac
import json
import math
import threading
import time
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any, cast
from urllib.parse import urlsplit

from worker import v3event
from worker.event import InvalidEvent, from_json_object

TRACK_EVENT_PATH = "/api/v2/trackEvent"
V3_PATH = "/v3/events"
V3_BATCH_PATH = "/v3/events/batch"
BATCH_MAX_EVENTS = 200
BATCH_MAX_BYTES = 512_000

Answer = tuple[int, dict[str, Any] | None, dict[str, str]]  # status, JSON body, headers


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops the SYNs of a daemon opening its connections
    # at once; each dropped one is retried a second later.
    request_queue_size = 128
    daemon_threads = True


class Sink:
    """The endpoint and what it received, served from a background thread."""

    def __init__(
        self,
        key: str,
        host: str = "127.0.0.1",
        port: int = 0,
        refuse_events: Iterable[str] = (),
        record_to: IO[str] | None = None,
        *,
        transport: str = "tracker",
        rate_limit: int = 0,  # requests a second; past it, 429
    ) -> None:
        self.key = key
        self.transport = transport
        self.refuse_events = frozenset(refuse_events)
        self.rate_limit = rate_limit
        self.received: list[dict[str, Any]] = []  # every accepted event, as sent
        self.counts: dict[int, int] = {}
        self.requests = 0
        self._record_to = record_to
        self._lock = threading.Lock()
        self._window = (0, 0)  # (second, requests in it)
        self.server = _Server((host, port), _handler_for(self))
        self._thread: threading.Thread | None = None

    @property
    def ma_key(self) -> str:
        return self.key

    @property
    def url(self) -> str:
        """What the daemon's --endpoint-url is (v3-batch adds /batch itself)."""
        # An AF_INET server: its address is (str, int).
        host, port = cast(tuple[str, int], self.server.server_address[:2])
        return f"http://{host}:{port}{TRACK_EVENT_PATH if self.transport == 'tracker' else V3_PATH}"

    def start(self) -> Sink:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer(self, path: str, headers: Any, body: bytes) -> Answer:
        """Decide the answer for one request: (status, JSON body or None, headers)."""
        path = urlsplit(path).path
        tracker = self.transport == "tracker"
        if path not in ((TRACK_EVENT_PATH,) if tracker else (V3_PATH, V3_BATCH_PATH)):
            return 404, {"code": "not_found", "message": "Invalid URL"}, {}
        key = headers.get("ma-key" if tracker else "api-key")
        if key is None or not hmac.compare_digest(key.encode(), self.key.encode()):
            return 401, {"code": "unauthorized", "message": "Key not found"}, {}
        limited = self._rate_limited()
        if limited is not None:
            return limited
        try:
            payload = json.loads(body)
        except ValueError:
            return 400, {"code": "invalid_parameter", "message": "body is not valid JSON"}, {}
        if tracker:
            return self._tracker(payload)
        if path == V3_BATCH_PATH:
            return self._batch(payload, len(body))
        problem = self._v3_problem(payload, "v3")
        if problem:
            return 400, {"code": "invalid_parameter", "message": problem}, {}
        self._accept([payload])
        return 204, None, {}

    def _tracker(self, payload: Any) -> Answer:
        if isinstance(payload, dict):
            missing = [f for f in ("email", "event") if f not in payload]
            if missing:
                return 400, {"code": "missing_parameter", "message": f"{missing[0]} is missing"}, {}
        try:
            from_json_object(payload)
        except InvalidEvent as exc:
            return 400, {"code": "invalid_parameter", "message": str(exc)}, {}
        if payload["event"] in self.refuse_events:
            message = f"event {payload['event']!r} is refused"
            return 400, {"code": "out_of_range", "message": message}, {}
        self._accept([payload])
        return 204, None, {}

    def _batch(self, payload: Any, size: int) -> Answer:
        events = payload.get("events") if isinstance(payload, dict) else payload
        if not isinstance(events, list) or not events:
            return 400, {"code": "invalid_parameter", "message": "events must be a list"}, {}
        if len(events) > BATCH_MAX_EVENTS or size > BATCH_MAX_BYTES:
            message = f"a batch holds at most {BATCH_MAX_EVENTS} events and {BATCH_MAX_BYTES} bytes"
            return 400, {"code": "invalid_parameter", "message": message}, {}
        problems = [self._v3_problem(event, "v3-batch") for event in events]
        errors = [{"eventIndex": [i], "message": p} for i, p in enumerate(problems) if p]
        good = [event for event, p in zip(events, problems, strict=True) if not p]
        self._accept(good)
        if not errors:
            return (
                202,
                {"message": "Batch accepted. Events are being processed.", "count": len(good)},
                {},
            )
        body = {
            "status": "partial_success" if good else "failed",
            "total_events": len(events),
            "successful_events": len(good),
            "failed_events": len(errors),
            "errors": errors,
        }
        return (207 if good else 400), body, {}

    def _v3_problem(self, event: Any, transport: str) -> str | None:
        """Why the v3 API refuses this event, or None."""
        if not isinstance(event, dict):
            return "each event must be an object"
        for field in ("event_name", "identifiers"):
            if field not in event:
                return f"{field} is missing"
        identifiers = event["identifiers"]
        if not isinstance(identifiers, dict) or not identifiers.get("email_id"):
            return "identifiers.email_id is missing"
        row = {
            "email": identifiers["email_id"],
            "event": event["event_name"],
            "properties": event.get("contact_properties"),
            "eventdata": event.get("event_properties"),
        }
        try:
            v3event.check(
                from_json_object({k: v for k, v in row.items() if v is not None}), transport
            )
        except InvalidEvent as exc:
            return str(exc)
        if row["event"] in self.refuse_events:
            return f"event {row['event']!r} is refused"
        return None

    def _rate_limited(self) -> Answer | None:
        if not self.rate_limit:
            return None
        now = time.time()
        with self._lock:
            second, used = self._window
            if int(now) != second:
                second, used = int(now), 0
            used += 1
            self._window = (second, used)
        reset = str(max(1, math.ceil(second + 1 - now)))
        headers = {
            "x-sib-ratelimit-limit": str(self.rate_limit),
            "x-sib-ratelimit-remaining": str(max(0, self.rate_limit - used)),
            "x-sib-ratelimit-reset": reset,
        }
        if used > self.rate_limit:
            return 429, {"code": "too_many_requests", "message": "rate limit exceeded"}, headers
        return None

    def _accept(self, events: list[Any]) -> None:
        with self._lock:
            self.received.extend(events)
            if self._record_to is not None:
                for event in events:
                    self._record_to.write(json.dumps(event, ensure_ascii=False) + "\n")
                self._record_to.flush()

    def _count(self, status: int) -> None:
        with self._lock:
            self.counts[status] = self.counts.get(status, 0) + 1
            self.requests += 1


def _handler_for(sink: Sink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real endpoint

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            status, payload, headers = sink.answer(self.path, self.headers, body)
            sink._count(status)
            data = json.dumps(payload).encode() if payload is not None else b""
            self.send_response(status, HTTPStatus(status).phrase)
            for name, value in headers.items():
                self.send_header(name, value)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            # The API takes POSTs only: say so in its own JSON, not http.server's HTML 501.
            data = json.dumps(
                {"code": "method_not_allowed", "message": "use POST with a JSON body"}
            ).encode()
            self.send_response(405, HTTPStatus(405).phrase)
            self.send_header("Allow", "POST")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the daemon's own log

    return Handler
