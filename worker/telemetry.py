"""What the daemon tells the outside: Prometheus metrics, liveness and readiness.

`run --metrics-port P` serves /metrics, /livez (the loop is turning) and
/readyz (the database answers and delivery is not halted) on one port.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest


@dataclass(frozen=True)
class Carried:
    """What the daemon's requests carried since it started: its heartbeat writes it."""

    requests: int = 0
    events: int = 0
    largest: int = 0  # the most events one request carried


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 150, 200, 500, 1000)


class Telemetry:
    """The daemon's figures. Every method is cheap enough for the hot path."""

    def __init__(self, live_after: float = 60.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.delivered = Counter(
            "outbox_events_delivered", "Events the endpoint accepted (2xx).", registry=r
        )
        self.dead = Counter(
            "outbox_events_dead",
            "Events dead-lettered, by the last status code ('none': network or invalid).",
            ["status_code"],
            registry=r,
        )
        self.retried = Counter(
            "outbox_events_retried",
            "Failed attempts scheduled for a retry, by status code ('none': network).",
            ["status_code"],
            registry=r,
        )
        self.released = Counter(
            "outbox_events_released",
            "Claimed events put back uncharged, by why (halt, throttle, unsent: at shutdown or"
            " while halted).",
            ["reason"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "outbox_request_duration_seconds",
            "Time from sending a request to its answer.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "outbox_requests",
            "HTTP requests answered, by transport and status code ('none': network).",
            ["transport", "status_code"],
            registry=r,
        )
        self.request_events = Histogram(
            "outbox_request_events",
            "Events carried per request (the batch size), by transport.",
            ["transport"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "outbox_events_rejected",
            "Events dead-lettered before any request: rows the transport cannot carry.",
            ["transport"],
            registry=r,
        )
        self.claim_seconds = Histogram(
            "outbox_claim_duration_seconds",
            "Time to claim one batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.record_seconds = Histogram(
            "outbox_record_duration_seconds",
            "Time to record one batch of outcomes.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.backlog = Gauge(
            "outbox_backlog", "Events due now (pending and past next_attempt_at).", registry=r
        )
        self.oldest_due_age = Gauge(
            "outbox_oldest_due_age_seconds", "Age of the longest-waiting due event.", registry=r
        )
        self.halted = Gauge(
            "outbox_delivery_halted",
            "1 while delivery is halted (the endpoint refuses the key or the URL), by reason.",
            ["reason"],
            registry=r,
        )
        self.paused_until = Gauge(
            "outbox_paused_until_seconds",
            "Unix time at which the last long pause (429 or a used-up rate limit, this"
            " daemon's or shared by another daemon) ends: sending is paused while it is in"
            " the future.",
            registry=r,
        )
        self.shared_paused_until = Gauge(
            "outbox_rate_limit_shared_pause_until_seconds",
            "Unix time at which the pause shared by every daemon on the database ends (a 429"
            " or a used-up x-sib-ratelimit, answered to any of them).",
            registry=r,
        )
        self.tokens_granted = Counter(
            "outbox_rate_limit_tokens_granted",
            "Send slots this daemon was granted under --rate-limit (shared by every daemon on"
            " PostgreSQL).",
            registry=r,
        )
        self.tokens_waited = Counter(
            "outbox_rate_limit_tokens_waited",
            "Requests that waited for their slot (the rate limit or a pause held them).",
            registry=r,
        )
        self.token_wait_seconds = Counter(
            "outbox_rate_limit_wait_seconds",
            "Time sender threads spent waiting for their slot.",
            registry=r,
        )
        self.tokens_unused = Counter(
            "outbox_rate_limit_tokens_unused",
            "Slots granted and never used (no request was ready, or a pause voided them).",
            registry=r,
        )
        self.rate_limit_slack = Gauge(
            "outbox_rate_limit_slack_seconds",
            "How late a send may reach the wire after its slot, which the limit's spacing"
            " allows for: widened while the limit's table answers slowly or sends go late.",
            registry=r,
        )
        self.token_grants = Counter(
            "outbox_rate_limit_grants",
            "Chunks of slots granted: one database statement each on PostgreSQL.",
            registry=r,
        )
        self.throttled = Counter(
            "outbox_responses_429",
            "Answers 429 (too many requests) this daemon received.",
            registry=r,
        )
        self.in_flight = Gauge(
            "outbox_in_flight", "Events claimed by this daemon and not yet recorded.", registry=r
        )
        self.carried = Carried()
        self._live_after = live_after
        self._last_turn = time.monotonic()
        self._db_ok = False
        self._halted_reason: str | None = None
        self._paused_until: dt.datetime | None = None

    # -- fed by the daemon --------------------------------------------------------

    def loop_turned(self) -> None:
        self._last_turn = time.monotonic()

    def answered(self, transport: str, carried: int, answer: Any) -> None:
        """One HTTP answer (a worker.policy.Answer) to a request carrying `carried` events."""
        self.request_seconds.observe(answer.duration_ms / 1000)
        self.requests.labels(transport, status_label(answer.status_code)).inc()
        self.request_events.labels(transport).observe(carried)
        # One new value, never changed in place: the heartbeat's thread reads a whole one.
        c = self.carried
        self.carried = Carried(c.requests + 1, c.events + carried, max(c.largest, carried))

    def database_answered(self, ok: bool) -> None:
        self._db_ok = ok

    def set_halted(self, reason: str | None) -> None:
        if self._halted_reason is not None:
            self.halted.labels(self._halted_reason).set(0)
        if reason is not None:
            self.halted.labels(reason).set(1)
        self._halted_reason = reason

    def set_paused_until(self, until: dt.datetime) -> None:
        self._paused_until = until
        self.paused_until.set(until.timestamp())

    # -- read by probes -------------------------------------------------------------

    def liveness(self) -> tuple[bool, str]:
        idle = time.monotonic() - self._last_turn
        if idle > self._live_after:
            return False, f"the delivery loop has not turned for {idle:.0f}s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        if not self._db_ok:
            return False, "the database does not answer"
        if self._halted_reason is not None:
            return False, f"delivery halted: {self._halted_reason}"
        if self._paused_until and self._paused_until > dt.datetime.now(dt.timezone.utc):
            return (
                False,
                f"paused by the endpoint's rate limit until {self._paused_until.isoformat()}",
            )
        return True, "ok"


def status_label(code: int | None) -> str:
    return "none" if code is None else str(code)


class TelemetryServer:
    """/metrics, /livez and /readyz over HTTP, from a background thread."""

    def __init__(self, telemetry: Telemetry, port: int, host: str = "0.0.0.0") -> None:
        self.telemetry = telemetry
        self.server = ThreadingHTTPServer((host, port), _handler(telemetry))
        self.server.daemon_threads = True

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> TelemetryServer:
        threading.Thread(
            target=self.server.serve_forever, name="outbox-telemetry", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(telemetry: Telemetry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(telemetry.registry), CONTENT_TYPE_LATEST)
            elif path in ("/livez", "/readyz"):
                ok, why = telemetry.liveness() if path == "/livez" else telemetry.readiness()
                self._send(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
            else:
                self._send(404, b"try /metrics, /livez or /readyz\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler
