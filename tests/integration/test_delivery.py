"""One HTTP attempt turned into an Answer, over real HTTP on 127.0.0.1 (INTERFACE 4 and 6).

`endpoint` (tests/endpoint.py) answers as scripted; a small server of our own
counts the client connections to check keep-alive. SendGate is checked with
real threads and a real clock, with generous bounds.
"""

from __future__ import annotations

import email.utils
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.conftest import KEY
from tests.endpoint import Endpoint, Reply
from worker.delivery import MAX_ERROR_CHARS, Deliverer
from worker.event import validate
from worker.gate import SendGate
from worker.policy import Answer


def _body(event: str = "cart_updated", **properties: Any) -> bytes:
    return validate("jane@example.com", event, properties or None).body()


@pytest.fixture
def deliverer(endpoint: Endpoint) -> Iterator[Deliverer]:
    d = Deliverer(endpoint.url, KEY, timeout=2.0, connect_timeout=2.0)
    yield d
    d.close()


def _answer_to(endpoint: Endpoint, deliverer: Deliverer, *replies: Reply) -> Answer:
    endpoint.script("cart_updated", *replies)
    return deliverer.post(_body())


# -- the request ---------------------------------------------------------------------


def test_post_reaches_the_configured_path(endpoint: Endpoint, deliverer: Deliverer) -> None:
    deliverer.post(_body())
    # The endpoint only records POSTs (anything else would get a 501).
    assert [r.path for r in endpoint.requests] == ["/api/v2/trackEvent"]


def test_post_sends_the_ma_key(endpoint: Endpoint, deliverer: Deliverer) -> None:
    deliverer.post(_body())
    assert endpoint.requests[0].headers["ma-key"] == KEY


def test_post_sends_json_content_type(endpoint: Endpoint, deliverer: Deliverer) -> None:
    deliverer.post(_body())
    assert endpoint.requests[0].headers["content-type"] == "application/json"


def test_post_accepts_json(endpoint: Endpoint, deliverer: Deliverer) -> None:
    deliverer.post(_body())
    assert endpoint.requests[0].headers["accept"] == "application/json"


def test_post_sends_the_exact_body_bytes(endpoint: Endpoint, deliverer: Deliverer) -> None:
    body = _body(NAME="Zoë Ångström", CITY="東京", NOTE="🎉")
    deliverer.post(body)
    assert endpoint.requests[0].raw == body


def test_post_sends_a_matching_content_length(endpoint: Endpoint, deliverer: Deliverer) -> None:
    body = _body(NAME="Zoë")
    deliverer.post(body)
    assert endpoint.requests[0].headers["content-length"] == str(len(body))


def test_concurrent_posts_each_send_their_own_body(
    endpoint: Endpoint, deliverer: Deliverer
) -> None:
    bodies = [_body(n=i) for i in range(40)]
    threads = [
        threading.Thread(target=lambda part=bodies[k::8]: [deliverer.post(b) for b in part])
        for k in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.raw for r in endpoint.requests) == sorted(bodies)


# -- answers -------------------------------------------------------------------------


def test_204_answer_has_code_204_and_no_error(endpoint: Endpoint, deliverer: Deliverer) -> None:
    answer = deliverer.post(_body())
    assert (answer.status_code, answer.error, answer.retry_after) == (204, None, None)


@pytest.mark.parametrize("code", [200, 201, 202])
def test_other_2xx_codes_are_passed_through(
    endpoint: Endpoint, deliverer: Deliverer, code: int
) -> None:
    answer = _answer_to(endpoint, deliverer, Reply(code, b'{"ok": true}'))
    assert (answer.status_code, answer.error) == (code, None)


def test_duration_is_measured(endpoint: Endpoint, deliverer: Deliverer) -> None:
    answer = _answer_to(endpoint, deliverer, Reply(204, delay=0.2))
    assert 200 <= answer.duration_ms < 2000


def test_400_body_code_and_message_are_kept(endpoint: Endpoint, deliverer: Deliverer) -> None:
    reply = json.dumps({"code": "invalid_parameter", "message": "email is not valid"})
    answer = _answer_to(endpoint, deliverer, Reply(400, reply.encode()))
    assert answer.status_code == 400
    assert answer.error is not None
    assert "invalid_parameter" in answer.error and "email is not valid" in answer.error


def test_400_error_names_the_status(endpoint: Endpoint, deliverer: Deliverer) -> None:
    reply = json.dumps({"code": "missing_parameter", "message": "event is missing"})
    answer = _answer_to(endpoint, deliverer, Reply(400, reply.encode()))
    assert answer.error is not None and "400" in answer.error


def test_400_with_other_json_keeps_the_text(endpoint: Endpoint, deliverer: Deliverer) -> None:
    answer = _answer_to(endpoint, deliverer, Reply(400, b'{"errors": ["bad email"]}'))
    assert answer.error is not None and "bad email" in answer.error


def test_400_with_plain_text_keeps_the_text(endpoint: Endpoint, deliverer: Deliverer) -> None:
    answer = _answer_to(endpoint, deliverer, Reply(400, b"email looks wrong"))
    assert answer.error is not None and "email looks wrong" in answer.error


def test_html_502_is_kept_as_text(endpoint: Endpoint, deliverer: Deliverer) -> None:
    html = b"<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
    answer = _answer_to(
        endpoint, deliverer, Reply(502, html, headers={"Content-Type": "text/html"})
    )
    assert answer.status_code == 502
    assert answer.error is not None and "Bad Gateway" in answer.error


def test_empty_503_still_says_what_happened(endpoint: Endpoint, deliverer: Deliverer) -> None:
    answer = _answer_to(endpoint, deliverer, Reply(503, b""))
    assert answer.status_code == 503
    assert answer.error is not None and "503" in answer.error and len(answer.error) > 4


def test_long_error_body_is_truncated(endpoint: Endpoint, deliverer: Deliverer) -> None:
    answer = _answer_to(endpoint, deliverer, Reply(502, b"x" * 50_000))
    assert answer.error is not None
    assert MAX_ERROR_CHARS <= len(answer.error) <= MAX_ERROR_CHARS + len("HTTP 502 ")


def test_long_json_message_is_truncated(endpoint: Endpoint, deliverer: Deliverer) -> None:
    reply = json.dumps({"code": "invalid_parameter", "message": "m" * 50_000}).encode()
    answer = _answer_to(endpoint, deliverer, Reply(400, reply))
    assert answer.error is not None
    assert "invalid_parameter" in answer.error
    assert len(answer.error) <= MAX_ERROR_CHARS + len("HTTP 400 ")


def test_error_body_that_is_not_utf8_does_not_crash(
    endpoint: Endpoint, deliverer: Deliverer
) -> None:
    answer = _answer_to(endpoint, deliverer, Reply(500, b"\xff\xfe broken \x80"))
    assert answer.status_code == 500 and answer.error


def test_redirect_is_not_followed(endpoint: Endpoint, deliverer: Deliverer) -> None:
    elsewhere = endpoint.url.replace("/api/v2/trackEvent", "/elsewhere")
    _answer_to(endpoint, deliverer, Reply(302, headers={"Location": elsewhere}))
    assert [r.path for r in endpoint.requests] == ["/api/v2/trackEvent"]


def test_redirect_answers_its_own_status(endpoint: Endpoint, deliverer: Deliverer) -> None:
    elsewhere = endpoint.url.replace("/api/v2/trackEvent", "/elsewhere")
    answer = _answer_to(endpoint, deliverer, Reply(302, headers={"Location": elsewhere}))
    assert answer.status_code == 302
    assert answer.error is not None and "/elsewhere" in answer.error


@pytest.mark.parametrize("code", [301, 307, 308])
def test_no_redirect_code_is_followed(endpoint: Endpoint, deliverer: Deliverer, code: int) -> None:
    elsewhere = endpoint.url.replace("/api/v2/trackEvent", "/elsewhere")
    answer = _answer_to(endpoint, deliverer, Reply(code, headers={"Location": elsewhere}))
    assert answer.status_code == code
    assert len(endpoint.requests) == 1


# -- no answer -----------------------------------------------------------------------


def test_slow_answer_is_a_timeout(endpoint: Endpoint) -> None:
    deliverer = Deliverer(endpoint.url, KEY, timeout=0.3, connect_timeout=2.0)
    endpoint.script("cart_updated", Reply(204, delay=1.5))
    started = time.monotonic()
    answer = deliverer.post(_body())
    deliverer.close()
    assert answer.status_code is None
    assert answer.error is not None and "timeout" in answer.error
    assert time.monotonic() - started < 1.4


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_has_no_status() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/api/v2/trackEvent"
    answer = Deliverer(url, KEY, timeout=2.0, connect_timeout=2.0).post(_body())
    assert answer.status_code is None


def test_refused_connection_error_says_connection() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/api/v2/trackEvent"
    answer = Deliverer(url, KEY, timeout=2.0, connect_timeout=2.0).post(_body())
    assert answer.error is not None and "connection" in answer.error.lower()


def test_network_errors_never_show_the_key(endpoint: Endpoint) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/api/v2/trackEvent"
    refused = Deliverer(url, KEY, timeout=2.0, connect_timeout=2.0).post(_body())
    slow = Deliverer(endpoint.url, KEY, timeout=0.2)
    endpoint.script("cart_updated", Reply(204, delay=1.0))
    timed_out = slow.post(_body())
    slow.close()
    assert KEY not in f"{refused.error} {timed_out.error}"


def test_server_that_closes_without_answering_is_a_connection_error() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def hang_up() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        answer = Deliverer(f"http://127.0.0.1:{port}/", KEY, timeout=2.0).post(_body())
    finally:
        listener.close()
    assert answer.status_code is None
    assert answer.error is not None and "connection" in answer.error.lower()


def test_garbage_instead_of_http_is_a_network_error_not_an_exception() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def babble() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"this is not HTTP at all\r\n\r\n")
        conn.close()

    threading.Thread(target=babble, daemon=True).start()
    try:
        answer = Deliverer(f"http://127.0.0.1:{port}/", KEY, timeout=2.0).post(_body())
    finally:
        listener.close()
    assert answer.status_code is None
    assert answer.error


# -- rate-limit headers ----------------------------------------------------------------


def test_retry_after_in_seconds_is_read(endpoint: Endpoint, deliverer: Deliverer) -> None:
    answer = _answer_to(endpoint, deliverer, Reply(429, headers={"Retry-After": "7"}))
    assert answer.retry_after == 7


def test_retry_after_as_an_http_date_is_read(endpoint: Endpoint, deliverer: Deliverer) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    answer = _answer_to(endpoint, deliverer, Reply(429, headers={"Retry-After": when}))
    assert answer.retry_after is not None and 27 <= answer.retry_after <= 31


def test_retry_after_date_in_the_past_is_zero(endpoint: Endpoint, deliverer: Deliverer) -> None:
    when = email.utils.formatdate(time.time() - 3600, usegmt=True)
    answer = _answer_to(endpoint, deliverer, Reply(429, headers={"Retry-After": when}))
    assert answer.retry_after == 0


def test_unreadable_retry_after_is_ignored(endpoint: Endpoint, deliverer: Deliverer) -> None:
    answer = _answer_to(endpoint, deliverer, Reply(429, headers={"Retry-After": "soon"}))
    assert (answer.status_code, answer.retry_after) == (429, None)


def test_ratelimit_reset_is_read_without_retry_after(
    endpoint: Endpoint, deliverer: Deliverer
) -> None:
    answer = _answer_to(endpoint, deliverer, Reply(429, headers={"x-sib-ratelimit-reset": "12"}))
    assert answer.retry_after == 12


def test_retry_after_wins_over_ratelimit_reset(endpoint: Endpoint, deliverer: Deliverer) -> None:
    headers = {"Retry-After": "3", "x-sib-ratelimit-reset": "40"}
    answer = _answer_to(endpoint, deliverer, Reply(429, headers=headers))
    assert answer.retry_after == 3


def test_remaining_zero_on_a_204_says_the_limit_is_exhausted(
    endpoint: Endpoint, deliverer: Deliverer
) -> None:
    headers = {"x-sib-ratelimit-remaining": "0", "x-sib-ratelimit-reset": "5"}
    answer = _answer_to(endpoint, deliverer, Reply(204, headers=headers))
    assert answer.status_code == 204
    assert answer.rate_limit_exhausted


def test_remaining_zero_on_a_204_carries_the_reset(
    endpoint: Endpoint, deliverer: Deliverer
) -> None:
    headers = {"x-sib-ratelimit-remaining": "0", "x-sib-ratelimit-reset": "5"}
    answer = _answer_to(endpoint, deliverer, Reply(204, headers=headers))
    assert answer.retry_after == 5


def test_remaining_above_zero_is_not_exhausted(endpoint: Endpoint, deliverer: Deliverer) -> None:
    headers = {"x-sib-ratelimit-remaining": "9", "x-sib-ratelimit-reset": "5"}
    answer = _answer_to(endpoint, deliverer, Reply(204, headers=headers))
    assert (answer.rate_limit_exhausted, answer.retry_after) == (False, None)


# -- keep-alive -------------------------------------------------------------------------


class _PortCounter:
    """A minimal HTTP/1.1 endpoint that answers one fixed reply and records each client port."""

    def __init__(self, status: int = 204, body: bytes = b"") -> None:
        self.ports: list[int] = []
        counter = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                counter.ports.append(self.client_address[1])
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v2/trackEvent"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def port_counter() -> Iterator[_PortCounter]:
    server = _PortCounter()
    yield server
    server.close()


def test_sequential_posts_reuse_one_connection(port_counter: _PortCounter) -> None:
    deliverer = Deliverer(port_counter.url, KEY, timeout=2.0)
    answers = [deliverer.post(_body(n=i)) for i in range(30)]
    deliverer.close()
    assert {a.status_code for a in answers} == {204}
    assert len(port_counter.ports) == 30
    assert len(set(port_counter.ports)) == 1


def test_concurrent_posts_use_no_more_connections_than_threads(
    port_counter: _PortCounter,
) -> None:
    deliverer = Deliverer(port_counter.url, KEY, timeout=2.0, pool_size=4)
    threads = [
        threading.Thread(target=lambda: [deliverer.post(_body(n=i)) for i in range(15)])
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deliverer.close()
    assert len(port_counter.ports) == 60
    assert len(set(port_counter.ports)) <= 4


def test_connection_is_reused_after_an_error_answer_with_a_body() -> None:
    server = _PortCounter(400, b'{"code": "invalid_parameter", "message": "bad"}')
    deliverer = Deliverer(server.url, KEY, timeout=2.0)
    answers = [deliverer.post(_body(n=i)) for i in range(5)]
    deliverer.close()
    server.close()
    assert {a.status_code for a in answers} == {400}
    assert len(set(server.ports)) == 1


# -- SendGate -----------------------------------------------------------------------------


def _pass_times(gate: SendGate, threads: int, per_thread: int) -> list[float]:
    times: list[float] = []
    lock = threading.Lock()

    def send() -> None:
        for _ in range(per_thread):
            gate.wait_turn()
            with lock:
                times.append(time.monotonic())

    workers = [threading.Thread(target=send) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=10)
    return sorted(times)


def test_rate_limit_spaces_sends_across_threads() -> None:
    rate, sends = 20.0, 12
    started = time.monotonic()
    times = _pass_times(SendGate(rate), threads=4, per_thread=sends // 4)
    assert len(times) == sends
    assert times[-1] - started >= (sends - 1) / rate * 0.95
    assert times[-1] - started < 5 * (sends - 1) / rate + 1


def test_rate_limit_never_lets_a_burst_through() -> None:
    rate = 20.0
    times = _pass_times(SendGate(rate), threads=6, per_thread=2)
    # The k-th send passes no sooner than k intervals after the first.
    assert all(t - times[0] >= k / rate * 0.9 for k, t in enumerate(times))


def test_no_rate_limit_lets_sends_through_at_once() -> None:
    started = time.monotonic()
    times = _pass_times(SendGate(0), threads=4, per_thread=25)
    assert len(times) == 100
    assert times[-1] - started < 0.5


def test_pause_holds_every_thread_until_it_ends() -> None:
    gate = SendGate(0)
    started = time.monotonic()
    gate.pause(0.4)
    times = _pass_times(gate, threads=5, per_thread=1)
    assert len(times) == 5
    assert min(times) - started >= 0.39
    assert max(times) - started < 3


def test_pause_holds_threads_already_waiting_for_their_slot() -> None:
    gate = SendGate(2.0)  # one send every 0.5 s
    gate.wait_turn()  # the first slot is taken: the next is 0.5 s away
    result: list[float] = []
    waiter = threading.Thread(target=lambda: (gate.wait_turn(), result.append(time.monotonic())))
    waiter.start()
    time.sleep(0.1)
    paused_at = time.monotonic()
    gate.pause(0.8)
    waiter.join(timeout=5)
    assert result and result[0] - paused_at >= 0.79


def test_sends_held_by_a_pause_are_still_spaced_when_it_ends() -> None:
    rate = 20.0
    gate = SendGate(rate)
    started = time.monotonic()
    gate.pause(0.2)
    times = _pass_times(gate, threads=6, per_thread=1)
    assert times[0] - started >= 0.19
    assert all(t - times[0] >= k / rate * 0.9 for k, t in enumerate(times))


def test_a_shorter_pause_does_not_cut_a_longer_one() -> None:
    gate = SendGate(0)
    started = time.monotonic()
    gate.pause(0.4)
    gate.pause(0.05)
    gate.wait_turn()
    assert time.monotonic() - started >= 0.39


def test_paused_for_reports_the_time_left() -> None:
    gate = SendGate(0)
    gate.pause(5)
    assert 4 < gate.paused_for() <= 5


def test_paused_for_is_zero_once_the_pause_is_over() -> None:
    gate = SendGate(0)
    gate.pause(0.05)
    time.sleep(0.1)
    assert gate.paused_for() == 0


def test_a_400_echoing_the_key_and_holding_nul_bytes_is_stored_without_either(
    endpoint: Endpoint, deliverer: Deliverer
) -> None:
    reply = json.dumps({"code": "invalid_parameter", "message": f"bad key {KEY}\u0000 here"})
    answer = _answer_to(endpoint, deliverer, Reply(400, reply.encode()))
    assert answer.error is not None
    assert KEY not in answer.error and "\x00" not in answer.error
    assert "bad key" in answer.error and "here" in answer.error


def test_without_a_key_the_error_text_is_left_as_the_endpoint_said_it(endpoint: Endpoint) -> None:
    # An empty key is in every string: replacing it would scatter [redacted] everywhere.
    keyless = Deliverer(endpoint.url, "", timeout=2.0)
    try:
        answer = _answer_to(endpoint, keyless, Reply(400, b'{"code":"x","message":"bad"}'))
    finally:
        keyless.close()
    assert answer.error == "HTTP 400 x: bad"
