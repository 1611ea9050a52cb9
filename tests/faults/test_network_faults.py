"""The network to the endpoint fails in every way it can, and no event is lost.

Faults are real: a TCP proxy (tests/faultproxy.py) on 127.0.0.1 between the
daemon and the test endpoint refuses, resets, swallows, trickles or garbles
the traffic, and is switched back to `pass` at run time. The daemon runs for
real against real databases (SQLite, and PostgreSQL where the database matters).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import KEY, deliver, rows
from tests.daemons import running, wait_until
from tests.endpoint import Endpoint, Reply
from tests.faultproxy import FaultProxy, Mode
from worker import db, track_events
from worker.delivery import MAX_ERROR_CHARS, Deliverer
from worker.policy import RetryBudget
from worker.schema import outbox_attempts, outbox_events

pytestmark = pytest.mark.slow  # a fault module: real crashes, outages, proxies or daemon fleets

TIMEOUT = 0.5  # the request timeout the daemon gets here: blackhole and trickle cost this
# A first retry 0.5 to 1 s after a failure: long enough that a drained run
# never retries, short enough to wait out.
SLOW_BUDGET = RetryBudget(backoff_base=1.0, backoff_max=1.0)
# Where a test counts attempts: no retry within the run however slow the machine.
ONE_TRY_BUDGET = RetryBudget(backoff_base=120.0, backoff_max=120.0)

# Each fault, and what the stored error must say about it.
FAULTS: dict[Mode, str] = {
    "refuse": "connection refused",
    "reset": "connection reset",
    "blackhole": "timeout",
    "trickle": "timeout",
    "garbage": "bad response",
}
BACKEND_URLS = {"sqlite": "sqlite_url", "postgresql": "pg_url"}  # the conftest fixtures
HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


# -- fixtures and helpers ------------------------------------------------------------


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[sa.Engine]:
    engine = db.create_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture
def proxy(endpoint: Endpoint) -> Iterator[FaultProxy]:
    with FaultProxy(endpoint.server.server_address[1]) as p:
        yield p


def _events(n: int, contact: str | None = None) -> list[dict[str, Any]]:
    """n events: one contact each, or all for `contact`; every body a little different."""
    return [
        {
            "email": contact or f"buyer{i}@example.com",
            "event": "cart_updated",
            "properties": {"N": i, "NOTE": "Zoë, 東京 🎉"},
            "eventdata": {"id": f"cart:{i}", "data": {"price": f"{i}.50"}},
        }
        for i in range(n)
    ]


def _enqueue(engine: sa.Engine, events: list[dict[str, Any]]) -> list[int]:
    with engine.begin() as conn:
        return track_events(conn, events)


def _attempts(engine: sa.Engine) -> list[Any]:
    return rows(
        engine,
        "SELECT event_id, attempt, status_code, error, duration_ms"
        " FROM outbox_attempts ORDER BY id",
    )


def _statuses(engine: sa.Engine) -> list[str]:
    return [r.status for r in rows(engine)]


def _deliver_all(engine: sa.Engine, url: str, timeout: float = 15.0, **overrides: Any) -> None:
    """Drained runs of the daemon, again and again, until every row is delivered."""

    def delivered() -> bool:
        deliver(engine, url, **overrides)
        return set(_statuses(engine)) == {"delivered"}

    wait_until(delivered, timeout, "every row delivered")


def _failed_events(engine: sa.Engine) -> int:
    return len({a.event_id for a in _attempts(engine)})


def _canonical(bodies: list[Any]) -> list[str]:
    return sorted(json.dumps(b, sort_keys=True) for b in bodies)


# -- each fault: recorded, retried later, and nothing lost -----------------------------------


@pytest.mark.parametrize("mode", FAULTS)
def test_fault_leaves_an_attempt_row_naming_it(
    sqlite_engine: sa.Engine, proxy: FaultProxy, endpoint: Endpoint, mode: Mode
) -> None:
    ids = _enqueue(sqlite_engine, _events(3))
    proxy.mode = mode
    assert (
        deliver(sqlite_engine, proxy.url(endpoint.url), timeout=TIMEOUT, budget=ONE_TRY_BUDGET) == 0
    )
    attempts = _attempts(sqlite_engine)
    assert sorted(a.event_id for a in attempts) == ids
    assert all(a.status_code is None for a in attempts)
    assert all(FAULTS[mode] in a.error.lower() for a in attempts), attempts


@pytest.mark.parametrize("mode", FAULTS)
def test_fault_leaves_the_row_pending_behind_a_backoff(
    sqlite_engine: sa.Engine, proxy: FaultProxy, endpoint: Endpoint, mode: Mode
) -> None:
    [event_id] = _enqueue(sqlite_engine, _events(1))
    proxy.mode = mode
    deliver(sqlite_engine, proxy.url(endpoint.url), timeout=TIMEOUT, budget=ONE_TRY_BUDGET)
    with sqlite_engine.connect() as conn:
        row = conn.execute(sa.select(outbox_events).where(outbox_events.c.id == event_id)).one()
        attempt = conn.execute(sa.select(outbox_attempts)).one()
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 1, None)
    assert row.last_error == attempt.error
    assert row.next_attempt_at > attempt.attempted_at


@pytest.mark.parametrize("mode", FAULTS)
def test_events_sent_during_a_fault_are_all_delivered_once_it_clears(
    sqlite_engine: sa.Engine, proxy: FaultProxy, endpoint: Endpoint, mode: Mode
) -> None:
    events = _events(6)
    _enqueue(sqlite_engine, events)
    proxy.mode = mode
    with running(sqlite_engine, proxy.url(endpoint.url), timeout=TIMEOUT):
        wait_until(
            lambda: _failed_events(sqlite_engine) == len(events),
            15,
            "an attempt failed for every event",
        )
        proxy.mode = "pass"
        wait_until(
            lambda: set(_statuses(sqlite_engine)) == {"delivered"}, 15, "every row delivered"
        )
    received = _canonical(endpoint.events())
    if mode == "trickle":  # the endpoint answered the trickled attempts too: duplicates
        received = sorted(set(received))
    assert received == _canonical(events)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_no_event_is_lost_to_connection_resets(
    request: pytest.FixtureRequest, proxy: FaultProxy, endpoint: Endpoint, backend: str
) -> None:
    engine = db.create_engine(request.getfixturevalue(BACKEND_URLS[backend]))
    try:
        events = _events(8)
        _enqueue(engine, events)
        proxy.mode = "reset"
        with running(engine, proxy.url(endpoint.url), timeout=TIMEOUT):
            wait_until(
                lambda: _failed_events(engine) == len(events),
                15,
                "an attempt failed for every event",
            )
            proxy.mode = "pass"
            wait_until(lambda: set(_statuses(engine)) == {"delivered"}, 15, "every row delivered")
        assert _canonical(endpoint.events()) == _canonical(events)
    finally:
        engine.dispose()


def test_contact_order_survives_a_fault(
    sqlite_engine: sa.Engine, proxy: FaultProxy, endpoint: Endpoint
) -> None:
    events = _events(4, contact="jane@example.com")
    _enqueue(sqlite_engine, events)
    proxy.mode = "reset"
    with running(sqlite_engine, proxy.url(endpoint.url), timeout=TIMEOUT):
        wait_until(lambda: len(_attempts(sqlite_engine)) >= 2, 15, "two failed attempts")
        proxy.mode = "pass"
        wait_until(
            lambda: set(_statuses(sqlite_engine)) == {"delivered"}, 15, "every row delivered"
        )
    assert [e["properties"]["N"] for e in endpoint.events()] == [0, 1, 2, 3]


def test_failed_row_is_not_retried_before_its_backoff(
    sqlite_engine: sa.Engine, proxy: FaultProxy, endpoint: Endpoint
) -> None:
    _enqueue(sqlite_engine, _events(1))
    proxy.mode = "reset"
    deliver(sqlite_engine, proxy.url(endpoint.url), budget=SLOW_BUDGET)
    proxy.mode = "pass"
    deliver(sqlite_engine, proxy.url(endpoint.url), budget=SLOW_BUDGET)
    assert (endpoint.requests, _statuses(sqlite_engine)) == ([], ["pending"])


def test_failed_row_is_retried_after_its_backoff(
    sqlite_engine: sa.Engine, proxy: FaultProxy, endpoint: Endpoint
) -> None:
    _enqueue(sqlite_engine, _events(1))
    proxy.mode = "reset"
    deliver(sqlite_engine, proxy.url(endpoint.url), budget=SLOW_BUDGET)
    proxy.mode = "pass"
    time.sleep(1.1)  # the longest first backoff of SLOW_BUDGET
    deliver(sqlite_engine, proxy.url(endpoint.url), budget=SLOW_BUDGET)
    assert (len(endpoint.requests), _statuses(sqlite_engine)) == (1, ["delivered"])


# -- a trickle cannot hold a request ---------------------------------------------------


def test_trickled_answer_does_not_hold_a_daemon_request_beyond_the_timeout(
    sqlite_engine: sa.Engine, proxy: FaultProxy, endpoint: Endpoint
) -> None:
    _enqueue(sqlite_engine, _events(4))
    proxy.mode = "trickle"  # a 204 answer at 20 bytes/s: about 6 s in full
    deliver(sqlite_engine, proxy.url(endpoint.url), timeout=TIMEOUT, budget=ONE_TRY_BUDGET)
    durations = [a.duration_ms for a in _attempts(sqlite_engine)]
    assert len(durations) == 4
    assert all(TIMEOUT * 1000 - 50 <= ms < TIMEOUT * 1000 + 700 for ms in durations), durations


def test_trickled_answer_is_cut_off_at_the_timeout(proxy: FaultProxy, endpoint: Endpoint) -> None:
    proxy.mode = "trickle"
    deliverer = Deliverer(proxy.url(endpoint.url), KEY, timeout=TIMEOUT, connect_timeout=2.0)
    started = time.monotonic()
    deliverer.post(b'{"email":"a@example.com","event":"x"}')
    deliverer.close()
    assert time.monotonic() - started < TIMEOUT + 0.7


def test_trickled_answer_is_a_network_error_saying_timeout(
    proxy: FaultProxy, endpoint: Endpoint
) -> None:
    proxy.mode = "trickle"
    deliverer = Deliverer(proxy.url(endpoint.url), KEY, timeout=TIMEOUT, connect_timeout=2.0)
    answer = deliverer.post(b'{"email":"a@example.com","event":"x"}')
    deliverer.close()
    assert answer.status_code is None
    assert answer.error is not None and "timeout" in answer.error and "0.5s" in answer.error


class _RawServer:
    """One-connection-at-a-time HTTP server on 127.0.0.1 that answers with `reply(conn)`
    after reading a request; for answers the endpoint cannot make (a slow body, a huge one)."""

    def __init__(self, reply: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/api/v2/trackEvent"
        self.connections = 0
        self._reply = reply
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            with conn:
                conn.settimeout(5)
                try:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536) or b"\r\n\r\n"
                    self._reply(conn)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self.listener.close()


@contextlib.contextmanager
def _raw_server(reply: Callable[[socket.socket], None]) -> Iterator[_RawServer]:
    server = _RawServer(reply)
    try:
        yield server
    finally:
        server.close()


def _prompt_status_then_trickled_body(code: int) -> Callable[[socket.socket], None]:
    def reply(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 {code} Whatever\r\nContent-Length: 40\r\n\r\n".encode())
        for _ in range(40):  # 4 s in full
            conn.sendall(b"x")
            time.sleep(0.1)

    return reply


@pytest.mark.parametrize("code", [200, 503])
def test_body_trickled_after_a_prompt_status_is_cut_off_at_the_timeout(code: int) -> None:
    with _raw_server(_prompt_status_then_trickled_body(code)) as server:
        deliverer = Deliverer(server.url, KEY, timeout=TIMEOUT, connect_timeout=2.0)
        started = time.monotonic()
        answer = deliverer.post(b'{"email":"a@example.com","event":"x"}')
        elapsed = time.monotonic() - started
        deliverer.close()
    assert (answer.status_code, elapsed < TIMEOUT + 0.7) == (None, True), answer


def test_huge_error_body_is_not_read_in_full() -> None:
    sent = [0]
    size = 64 * 1024 * 1024

    def flood(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 502 Bad Gateway\r\nContent-Length: {size}\r\n\r\n".encode())
        chunk = b"x" * 65536
        while sent[0] < size:
            conn.sendall(chunk)
            sent[0] += len(chunk)

    with _raw_server(flood) as server:
        deliverer = Deliverer(server.url, KEY, timeout=5.0, connect_timeout=2.0)
        answer = deliverer.post(b'{"email":"a@example.com","event":"x"}')
        deliverer.close()
    assert answer.error == "HTTP 502 " + "x" * MAX_ERROR_CHARS
    assert sent[0] < size // 2


def test_answer_that_came_in_time_keeps_its_connection(
    proxy: FaultProxy, endpoint: Endpoint
) -> None:
    deliverer = Deliverer(proxy.url(endpoint.url), KEY, timeout=0.2, connect_timeout=2.0)
    body = b'{"email":"a@example.com","event":"x"}'
    first = deliverer.post(body)
    time.sleep(0.4)  # past the first answer's deadline: nothing may cut its connection now
    second = deliverer.post(body)
    deliverer.close()
    assert (first.status_code, second.status_code, proxy.accepted) == (204, 204, 1)


def test_waiting_answers_start_no_thread_each(proxy: FaultProxy, endpoint: Endpoint) -> None:
    proxy.mode = "blackhole"
    deliverer = Deliverer(proxy.url(endpoint.url), KEY, timeout=1.0, connect_timeout=2.0)
    before = set(threading.enumerate())
    posters = [
        threading.Thread(target=deliverer.post, args=(b'{"email":"a@b.co","event":"x"}',))
        for _ in range(6)
    ]
    for t in posters:
        t.start()
    time.sleep(0.3)  # all six are waiting for an answer now
    during = [
        t
        for t in threading.enumerate()
        if t not in before and t not in posters and not t.name.startswith("faultproxy")
    ]
    for t in posters:
        t.join(timeout=5)
    deliverer.close()
    assert len(during) <= 1, during  # at most the one watcher, started once per process


# -- error answers from the endpoint -------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [Reply(502, HTML_502, {"Content-Type": "text/html"}), Reply(503, b"")],
    ids=["html-502", "empty-503"],
)
def test_5xx_answer_is_retried_until_delivered(
    sqlite_engine: sa.Engine, endpoint: Endpoint, reply: Reply
) -> None:
    endpoint.script("cart_updated", reply)
    _enqueue(sqlite_engine, _events(1))
    _deliver_all(sqlite_engine, endpoint.url)
    assert [r.status_code for r in _attempts(sqlite_engine)] == [reply.status]
    assert len(endpoint.requests) == 2


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(502, HTML_502, {"Content-Type": "text/html"}), "HTTP 502 502 Bad Gateway"),
        (Reply(503, b""), "HTTP 503 Service Unavailable"),
    ],
    ids=["html-502", "empty-503"],
)
def test_5xx_answer_is_stored_as_a_readable_line(
    sqlite_engine: sa.Engine, endpoint: Endpoint, reply: Reply, expected: str
) -> None:
    endpoint.script("cart_updated", reply)
    _enqueue(sqlite_engine, _events(1))
    deliver(sqlite_engine, endpoint.url, budget=SLOW_BUDGET)
    [attempt] = _attempts(sqlite_engine)
    assert attempt.error.startswith(expected)
    assert "<" not in attempt.error and "\n" not in attempt.error


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_long_error_body_is_stored_truncated(
    request: pytest.FixtureRequest, endpoint: Endpoint, backend: str
) -> None:
    engine = db.create_engine(request.getfixturevalue(BACKEND_URLS[backend]))
    try:
        endpoint.script("cart_updated", Reply(502, b"x" * 50_000))
        _enqueue(engine, _events(1))
        deliver(engine, endpoint.url, budget=SLOW_BUDGET)
        [attempt] = _attempts(engine)
        [row] = rows(engine)
    finally:
        engine.dispose()
    assert attempt.error == row.last_error == "HTTP 502 " + "x" * MAX_ERROR_CHARS


def test_long_garbage_answer_is_stored_truncated(
    sqlite_engine: sa.Engine, proxy: FaultProxy, endpoint: Endpoint
) -> None:
    proxy.garbage = b"NOT-HTTP " + b"y" * 20_000 + b"\r\n\r\n"
    proxy.mode = "garbage"
    _enqueue(sqlite_engine, _events(1))
    deliver(sqlite_engine, proxy.url(endpoint.url), budget=SLOW_BUDGET)
    [attempt] = _attempts(sqlite_engine)
    assert attempt.error.startswith("bad response")
    assert len(attempt.error) <= MAX_ERROR_CHARS


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that nobody trusts, and its key (openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a certificate with")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.fixture
def tls_endpoint(endpoint: Endpoint, self_signed: tuple[Path, Path]) -> Iterator[str]:
    """The endpoint behind TLS with the self-signed certificate: its https URL."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed)
    with FaultProxy(endpoint.server.server_address[1], tls=context) as tls:
        yield tls.url(endpoint.url, "https")


def test_tls_to_a_plain_http_server_is_a_retried_tls_error(
    sqlite_engine: sa.Engine, proxy: FaultProxy, endpoint: Endpoint
) -> None:
    _enqueue(sqlite_engine, _events(1))
    deliver(sqlite_engine, proxy.url(endpoint.url, "https"), budget=SLOW_BUDGET)
    [attempt] = _attempts(sqlite_engine)
    assert (attempt.status_code, _statuses(sqlite_engine)) == (None, ["pending"])
    assert "TLS" in attempt.error and "SSL" in attempt.error


def test_untrusted_certificate_is_a_retried_tls_error(
    sqlite_engine: sa.Engine, tls_endpoint: str
) -> None:
    _enqueue(sqlite_engine, _events(1))
    deliver(sqlite_engine, tls_endpoint, budget=SLOW_BUDGET)
    [attempt] = _attempts(sqlite_engine)
    assert (attempt.status_code, _statuses(sqlite_engine)) == (None, ["pending"])
    assert "TLS" in attempt.error and "certificate verify failed" in attempt.error


def test_trusted_certificate_delivers_over_tls(
    sqlite_engine: sa.Engine,
    tls_endpoint: str,
    endpoint: Endpoint,
    self_signed: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(self_signed[0]))
    events = _events(3)
    _enqueue(sqlite_engine, events)
    deliver(sqlite_engine, tls_endpoint)
    assert _canonical(endpoint.events()) == _canonical(events)
