"""A local endpoint that behaves like the track-event API, for development, the demo and tests.

It checks the `ma-key` (401 with Brevo's body when wrong), the path (404),
and the body by the same rules as `track_event` (400 with {"code", "message"}),
and answers 204 otherwise.
"""

from __future__ import annotations

import hmac
import json
import threading
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any, cast
from urllib.parse import urlsplit

from worker.event import InvalidEvent, from_json_object

TRACK_EVENT_PATH = "/api/v2/trackEvent"


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops the SYNs of a daemon opening its connections
    # at once; each dropped one is retried a second later.
    request_queue_size = 128
    daemon_threads = True


class Sink:
    """The endpoint and what it received, served from a background thread."""

    def __init__(
        self,
        ma_key: str,
        host: str = "127.0.0.1",
        port: int = 0,
        refuse_events: Iterable[str] = (),
        record_to: IO[str] | None = None,
    ) -> None:
        self.ma_key = ma_key
        self.refuse_events = frozenset(refuse_events)
        self.received: list[dict[str, Any]] = []
        self.counts: dict[int, int] = {}
        self._record_to = record_to
        self._lock = threading.Lock()
        self.server = _Server((host, port), _handler_for(self))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        # An AF_INET server: its address is (str, int).
        host, port = cast(tuple[str, int], self.server.server_address[:2])
        return f"http://{host}:{port}{TRACK_EVENT_PATH}"

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

    def answer(self, path: str, key: str | None, body: bytes) -> tuple[int, dict[str, str] | None]:
        """Decide the answer for one request: (status, JSON body or None)."""
        if urlsplit(path).path != TRACK_EVENT_PATH:
            return 404, {"code": "not_found", "message": "Invalid URL"}
        if key is None or not hmac.compare_digest(key.encode(), self.ma_key.encode()):
            return 401, {"code": "unauthorized", "message": "Key not found"}
        try:
            payload = json.loads(body)
        except ValueError:
            return 400, {"code": "invalid_parameter", "message": "body is not valid JSON"}
        if isinstance(payload, dict):
            missing = [f for f in ("email", "event") if f not in payload]
            if missing:
                return 400, {"code": "missing_parameter", "message": f"{missing[0]} is missing"}
        try:
            from_json_object(payload)
        except InvalidEvent as exc:
            return 400, {"code": "invalid_parameter", "message": str(exc)}
        if payload["event"] in self.refuse_events:
            return 400, {
                "code": "out_of_range",
                "message": f"event {payload['event']!r} is refused",
            }
        with self._lock:
            self.received.append(payload)
            if self._record_to is not None:
                self._record_to.write(json.dumps(payload, ensure_ascii=False) + "\n")
                self._record_to.flush()
        return 204, None

    def _count(self, status: int) -> None:
        with self._lock:
            self.counts[status] = self.counts.get(status, 0) + 1


def _handler_for(sink: Sink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real endpoint

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            status, payload = sink.answer(self.path, self.headers.get("ma-key"), body)
            sink._count(status)
            data = json.dumps(payload).encode() if payload is not None else b""
            self.send_response(status, HTTPStatus(status).phrase)
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
