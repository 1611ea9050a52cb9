"""The delivery daemon end to end: the real daemon in this process, a real database
(SQLite and PostgreSQL) and a real HTTP endpoint whose answers each test scripts.
"""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import json
import logging
import time
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import KEY, SAMPLE_EVENTS, deliver, fast_settings, rows
from tests.daemons import running, wait_until
from tests.endpoint import Endpoint, Reply
from tests.pgserver import free_port
from worker import track_event, track_events
from worker.daemon import DatabaseGaveUp, build_daemon
from worker.policy import RetryBudget
from worker.schema import outbox_events

e = outbox_events
REFUSAL_400 = b'{"code":"invalid_parameter","message":"email is not a valid address"}'
UNAUTHORIZED = b'{"code":"unauthorized","message":"Key not found"}'


# -- helpers ---------------------------------------------------------------------


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def add(engine: sa.Engine, *events: dict[str, Any]) -> list[int]:
    with engine.begin() as conn:
        return track_events(conn, list(events))


def ev(email: str, event: str = "signed_up", **fields: Any) -> dict[str, Any]:
    return {"email": email, "event": event, **fields}


def set_row(engine: sa.Engine, ids: int | list[int], **values: Any) -> None:
    """Plain SQL (Core) update, behind the daemon's back."""
    ids = [ids] if isinstance(ids, int) else ids
    with engine.begin() as conn:
        conn.execute(sa.update(e).where(e.c.id.in_(ids)).values(**values))


def insert_sql(
    engine: sa.Engine,
    email: str,
    event: str,
    properties: str | None = None,
    eventdata: str | None = None,
) -> int:
    """A row written by another program with plain SQL: JSON columns as text literals."""
    with engine.begin() as conn:
        return conn.execute(
            sa.text(
                "INSERT INTO outbox_events (email, event, properties, eventdata)"
                " VALUES (:email, :event, :properties, :eventdata) RETURNING id"
            ),
            {"email": email, "event": event, "properties": properties, "eventdata": eventdata},
        ).scalar_one()


def attempt_rows(engine: sa.Engine) -> list[Any]:
    return rows(
        engine, "SELECT event_id, attempt, status_code, error FROM outbox_attempts ORDER BY id"
    )


def statuses(engine: sa.Engine) -> list[str]:
    return [r.status for r in rows(engine)]


def names(endpoint: Endpoint) -> list[str]:
    return [body["event"] for body in endpoint.events()]


def deliver_all(
    engine: sa.Engine, endpoint_url: str, within: float = 15.0, **overrides: Any
) -> list[int]:
    """Drained runs one after another until no row is pending or in flight.

    A row waiting out a backoff is not due, so each run exits while it waits;
    the next run sends it. Returns every run's exit code.
    """
    codes = []

    def drained() -> bool:
        codes.append(deliver(engine, endpoint_url, **overrides))
        return not {"pending", "in_flight"} & set(statuses(engine))

    wait_until(drained, within, "no row pending or in flight")
    return codes


# -- outcomes, one class at a time ---------------------------------------------------


@pytest.mark.parametrize("code", [204, 200, 202])
def test_2xx_is_delivered_after_one_attempt(engine, endpoint, code):
    endpoint.default = Reply(code, b"" if code == 204 else b"{}")
    add(engine, ev("a@x.com"))

    assert deliver(engine, endpoint.url) == 0

    (r,) = rows(engine)
    assert (r.status, r.attempts, r.last_status_code) == ("delivered", 1, code)
    assert r.delivered_at is not None
    assert attempt_rows(engine) == []
    assert len(endpoint.requests) == 1


def test_requests_carry_the_ma_key_and_json_headers(engine, endpoint):
    add(engine, ev("a@x.com"))
    deliver(engine, endpoint.url)
    (request,) = endpoint.requests
    assert request.path == "/api/v2/trackEvent"
    assert request.headers["ma-key"] == KEY
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "application/json"


def test_400_is_dead_lettered_after_one_attempt(engine, endpoint):
    endpoint.script("signed_up", Reply(400, REFUSAL_400, {"Content-Type": "application/json"}))
    (event_id,) = add(engine, ev("a@x.com"))

    assert deliver(engine, endpoint.url) == 0

    (r,) = rows(engine)
    assert (r.status, r.attempts, r.last_status_code) == ("dead", 1, 400)
    assert "invalid_parameter" in r.last_error
    assert "email is not a valid address" in r.last_error
    assert r.failed_at is not None
    assert [(a.event_id, a.attempt, a.status_code) for a in attempt_rows(engine)] == [
        (event_id, 1, 400)
    ]
    assert len(endpoint.requests) == 1


def test_400_with_a_text_body_keeps_the_text(engine, endpoint):
    endpoint.script(
        "signed_up", Reply(400, b"Bad Request: email missing", {"Content-Type": "text/plain"})
    )
    add(engine, ev("a@x.com"))
    deliver(engine, endpoint.url)
    (r,) = rows(engine)
    assert r.status == "dead"
    assert "Bad Request: email missing" in r.last_error


@pytest.mark.parametrize("code", [413, 422])
def test_other_permanent_4xx_is_dead_at_once(engine, endpoint, code):
    endpoint.script("signed_up", Reply(code, b'{"code":"refused","message":"cannot take it"}'))
    add(engine, ev("a@x.com"))

    assert deliver(engine, endpoint.url) == 0

    (r,) = rows(engine)
    assert (r.status, r.attempts, r.last_status_code) == ("dead", 1, code)
    assert "cannot take it" in r.last_error
    assert len(attempt_rows(engine)) == 1
    assert len(endpoint.requests) == 1


@pytest.mark.parametrize(
    "reply",
    [
        Reply(
            500,
            b"<html><body><h1>Internal Server Error</h1></body></html>",
            {"Content-Type": "text/html"},
        ),
        Reply(502, b""),
        Reply(503, b"<html><body>Service Unavailable</body></html>", {"Content-Type": "text/html"}),
        Reply(408, b""),
    ],
    ids=lambda r: str(r.status),
)
def test_transient_failure_is_retried_then_delivered(engine, endpoint, reply):
    endpoint.script("signed_up", reply, reply)
    (event_id,) = add(engine, ev("a@x.com"))

    assert set(deliver_all(engine, endpoint.url)) == {0}

    (r,) = rows(engine)
    assert (r.status, r.attempts, r.last_status_code) == ("delivered", 3, 204)
    attempts = attempt_rows(engine)
    assert [(a.event_id, a.attempt, a.status_code) for a in attempts] == [
        (event_id, 1, reply.status),
        (event_id, 2, reply.status),
    ]
    assert all(a.error.startswith(f"HTTP {reply.status}") for a in attempts)
    assert len(endpoint.requests) == 3


def test_timeout_is_retried_then_delivered(engine, endpoint):
    endpoint.script("signed_up", Reply(204, delay=0.8))
    (event_id,) = add(engine, ev("a@x.com"))

    assert set(deliver_all(engine, endpoint.url, timeout=0.3, lease=1.0)) == {0}

    (r,) = rows(engine)
    assert (r.status, r.attempts) == ("delivered", 2)
    (a,) = attempt_rows(engine)
    assert (a.event_id, a.attempt, a.status_code) == (event_id, 1, None)
    assert "timeout" in a.error


def test_connection_error_is_retried_until_dead(engine):
    nobody = f"http://127.0.0.1:{free_port()}/api/v2/trackEvent"
    add(engine, ev("a@x.com"))

    budget = RetryBudget(max_attempts=2, backoff_base=0.05, backoff_max=0.1)
    assert set(deliver_all(engine, nobody, budget=budget)) == {0}

    (r,) = rows(engine)
    assert (r.status, r.attempts, r.last_status_code) == ("dead", 2, None)
    assert "connection" in r.last_error
    assert [(a.attempt, a.status_code) for a in attempt_rows(engine)] == [(1, None), (2, None)]


def test_retries_run_out_at_max_attempts(engine, endpoint):
    endpoint.default = Reply(503, b"down for maintenance")
    add(engine, ev("a@x.com"))

    budget = RetryBudget(max_attempts=3, backoff_base=0.05, backoff_max=0.1)
    assert set(deliver_all(engine, endpoint.url, budget=budget)) == {0}

    (r,) = rows(engine)
    assert (r.status, r.attempts, r.last_status_code) == ("dead", 3, 503)
    assert "down for maintenance" in r.last_error
    assert "3 attempts" in r.last_error
    assert [a.attempt for a in attempt_rows(engine)] == [1, 2, 3]
    assert len(endpoint.requests) == 3


def test_retries_stop_once_the_event_is_older_than_max_age(engine, endpoint):
    endpoint.default = Reply(503)
    (event_id,) = add(engine, ev("a@x.com"))
    set_row(engine, event_id, created_at=now() - dt.timedelta(hours=2))

    budget = RetryBudget(max_age=dt.timedelta(hours=1), backoff_base=0.05, backoff_max=0.1)
    assert deliver(engine, endpoint.url, budget=budget) == 0

    (r,) = rows(engine)
    assert (r.status, r.attempts) == ("dead", 1)
    assert "older than" in r.last_error


# -- halts: the setup is wrong, not the event -----------------------------------------


@pytest.mark.parametrize("code", [401, 403, 404])
def test_bad_key_or_url_halts_delivery_without_spending_attempts(engine, endpoint, code):
    endpoint.default = Reply(code, UNAUTHORIZED, {"Content-Type": "application/json"})
    add(engine, *(ev(f"c{n}@x.com") for n in range(6)))

    assert deliver(engine, endpoint.url) == 1

    assert statuses(engine) == ["pending"] * 6
    assert [r.attempts for r in rows(engine)] == [0] * 6
    assert attempt_rows(engine) == []


def test_halt_is_logged_as_an_error(engine, endpoint, caplog):
    endpoint.default = Reply(401, UNAUTHORIZED)
    add(engine, ev("a@x.com"))
    with caplog.at_level(logging.WARNING):
        deliver(engine, endpoint.url)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("401" in message for message in errors), errors


def test_a_redirect_is_not_followed_and_halts(engine, endpoint):
    elsewhere = Endpoint()
    try:
        endpoint.default = Reply(302, b"", {"Location": elsewhere.url})
        add(engine, *(ev(f"c{n}@x.com") for n in range(3)))

        assert deliver(engine, endpoint.url) == 1

        assert elsewhere.requests == []
        assert statuses(engine) == ["pending"] * 3
        assert [r.attempts for r in rows(engine)] == [0] * 3
        assert attempt_rows(engine) == []
    finally:
        elsewhere.close()


def test_halted_delivery_resumes_by_itself_when_the_endpoint_recovers(engine, endpoint):
    endpoint.default = Reply(401, UNAUTHORIZED)
    add(engine, *(ev(f"c{n}@x.com") for n in range(5)))

    with running(engine, endpoint.url) as daemon:
        # Still refused after a probe interval: the daemon is halted and probing.
        wait_until(
            lambda: (
                len(endpoint.requests) >= 2
                and endpoint.requests[-1].at - endpoint.requests[0].at > 0.3
            ),
            20,
            "probes while halted",
        )
        assert "delivered" not in statuses(engine)
        assert [r.attempts for r in rows(engine)] == [0] * 5

        endpoint.default = Reply(204)
        wait_until(lambda: statuses(engine) == ["delivered"] * 5, 20, "every row delivered")
        assert daemon.stop() == 0

    assert [r.attempts for r in rows(engine)] == [1] * 5
    assert attempt_rows(engine) == []


# -- 429: slow down, charge nothing ----------------------------------------------------

# Quick retries, but room for the announced waits below.
ROOMY = RetryBudget(backoff_base=0.05, backoff_max=5.0)


@pytest.mark.parametrize("header", ["Retry-After", "x-sib-ratelimit-reset"])
def test_429_charges_nothing_and_waits_the_announced_time(engine, endpoint, header):
    endpoint.script("throttled", Reply(429, b'{"code":"too_many_requests"}', {header: "1"}))
    add(engine, ev("a@x.com", "throttled"))

    assert set(deliver_all(engine, endpoint.url, budget=ROOMY)) == {0}

    (r,) = rows(engine)
    assert (r.status, r.attempts) == ("delivered", 1)
    assert attempt_rows(engine) == []
    first, retry = endpoint.requests
    assert retry.at - first.at >= 0.95


def test_429_pauses_sends_for_every_contact(engine, endpoint):
    # The 429 comes late enough that the other contact's event is claimed and
    # waiting for the sender by then: it must still wait out the pause.
    endpoint.script("throttled", Reply(429, b"", {"Retry-After": "1"}, delay=0.2))
    add(engine, ev("a@x.com", "throttled"), ev("b@x.com", "other_contact"))

    assert set(deliver_all(engine, endpoint.url, concurrency=1, batch_size=1, budget=ROOMY)) == {0}

    assert statuses(engine) == ["delivered", "delivered"]
    first, *later = endpoint.requests
    assert first.json["event"] == "throttled"
    assert sorted(r.json["event"] for r in later) == ["other_contact", "throttled"]
    assert all(r.at - first.at >= 0.95 for r in later), [
        (r.json["event"], round(r.at - first.at, 3)) for r in later
    ]


def test_429_retry_after_is_honoured_even_above_backoff_max(engine, endpoint):
    endpoint.script("throttled", Reply(429, b"", {"Retry-After": "1"}))
    add(engine, ev("a@x.com", "throttled"))

    fast = RetryBudget(backoff_base=0.05, backoff_max=0.2)
    assert set(deliver_all(engine, endpoint.url, budget=fast)) == {0}

    first, retry = endpoint.requests
    assert retry.at - first.at >= 0.95


# -- per-contact order -------------------------------------------------------------------


def test_events_of_one_contact_reach_the_endpoint_in_id_order(engine, endpoint):
    endpoint.default = Reply(204, delay=0.03)
    contacts = ["ann", "bob", "cy"]
    specs = []
    for n in range(6):
        for c in contacts:
            email = f"{c.upper()}@x.com" if n % 2 else f"{c}@x.com"
            specs.append(ev(email, f"{c}_{n}"))
    add(engine, *specs)

    assert deliver(engine, endpoint.url, concurrency=8) == 0

    assert statuses(engine) == ["delivered"] * 18
    for c in contacts:
        received = [r for r in endpoint.requests if r.json["event"].startswith(f"{c}_")]
        assert [r.json["event"] for r in received] == [f"{c}_{n}" for n in range(6)]
        # Each waited for the answer to the one before: never two in flight at once.
        gaps = [b.at - a.at for a, b in itertools.pairwise(received)]
        assert min(gaps) >= 0.025, gaps


# Polling hourly: what is delivered in these tests, only a wake-up or an outcome of the
# daemon's own made due (an answer alone does not make it claim).
HOURLY = 3600.0


def test_a_contacts_events_committed_together_go_one_after_another_without_a_poll(engine, endpoint):
    with running(engine, endpoint.url, poll_interval=HOURLY) as daemon:
        wait_until(lambda: daemon.daemon.completer.held() == 0, 10, "the first claim")
        add(engine, *[ev("one@x.com", f"step_{n}") for n in range(4)])
        wait_until(lambda: statuses(engine) == ["delivered"] * 4, 20, "all four delivered")
    assert [r.json["event"] for r in endpoint.requests] == [f"step_{n}" for n in range(4)]


def _count_calls(store: Any, calls: collections.Counter[str]) -> None:
    """Count the store's claims and writes from now on; each still runs as it is."""
    for name in ("claim_due", "record"):
        method = getattr(store, name)

        def counted(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _method(*args, **kwargs)

        setattr(store, name, counted)


def test_waiting_for_commits_a_daemon_claims_once_a_commit_and_writes_outcomes_together(
    engine, endpoint
):
    """At a low rate each commit is a claim of its own, but a 2xx answer is no turn of
    the loop (no claim after it), and the outcomes of RECORD_WITHIN share one write."""
    calls: collections.Counter[str] = collections.Counter()
    with running(engine, endpoint.url, poll_interval=HOURLY) as daemon:
        wait_until(lambda: daemon.daemon.completer.held() == 0, 10, "the first claim")
        _count_calls(daemon.daemon.store, calls)
        for n in range(30):  # 200 commits a second at most
            add(engine, ev(f"c{n}@x.com"))
            time.sleep(0.005)
        wait_until(lambda: statuses(engine) == ["delivered"] * 30, 20, "all delivered")
    assert len(endpoint.requests) == 30
    # Before: a claim on each commit and on each answer, an outcome written a turn
    # (about 54 claims and 29 writes on PostgreSQL, 26 and 20 on SQLite).
    assert calls["record"] <= 15, calls
    assert calls["claim_due"] <= 45, calls


def test_waiting_for_a_slow_answer_a_daemon_does_not_claim_every_time_it_looks(engine, endpoint):
    """While a request is out the loop looks every RECORD_WITHIN for its answer, to write
    it in time; a look that finds nothing new is no reason to claim."""
    endpoint.script("slow", Reply(204, delay=1.0))
    calls: collections.Counter[str] = collections.Counter()
    with running(engine, endpoint.url, poll_interval=HOURLY) as daemon:
        # Past the slow start (one request at a time, claiming nothing more).
        add(engine, *[ev(f"warm{n}@x.com") for n in range(8)])
        wait_until(lambda: statuses(engine) == ["delivered"] * 8, 10, "the warm-up")
        assert daemon.daemon.breaker.window() == 4
        _count_calls(daemon.daemon.store, calls)
        add(engine, ev("slow@x.com", "slow"))
        wait_until(lambda: statuses(engine) == ["delivered"] * 9, 10, "the slow answer written")
    # The commit's claim, and one after the outcome is written (it may free a
    # contact's next event); 40 or so when each look claimed.
    assert calls["claim_due"] <= 4, calls


def test_while_the_loop_looks_for_a_slow_answer_it_still_polls_every_poll_interval(
    engine, endpoint
):
    # A row that comes due by the clock (deliver_after) wakes nothing: only the poll
    # claims it, and looking for answers every RECORD_WITHIN must not put the poll off.
    endpoint.script("slow", Reply(204, delay=1.5))
    with running(engine, endpoint.url, poll_interval=0.2) as daemon:
        add(engine, *[ev(f"warm{n}@x.com") for n in range(8)])
        wait_until(lambda: statuses(engine) == ["delivered"] * 8, 10, "the warm-up")
        assert daemon.daemon.breaker.window() == 4
        add(engine, ev("slow@x.com", "slow"))
        wait_until(lambda: len(endpoint.requests) == 9, 5, "the slow request out")
        with engine.begin() as conn:
            track_event(
                conn, email="soon@x.com", event="soon", deliver_after=dt.timedelta(seconds=0.1)
            )
        wait_until(lambda: "soon" in names(endpoint), 1.2, "the scheduled row sent")
        assert statuses(engine)[8] == "in_flight"  # the slow answer still awaited


def test_a_retry_goes_out_when_due_without_a_poll(engine, endpoint):
    endpoint.script("flaky", Reply(503, b""))
    with running(engine, endpoint.url, poll_interval=HOURLY):
        add(engine, ev("flaky@x.com", "flaky"))
        wait_until(lambda: statuses(engine) == ["delivered"], 20, "the retry delivered")
    assert [r.status for r in endpoint.requests] == [503, 204]


STUCK = "Stuck@x.com"


def _block_one_contact(engine: sa.Engine, endpoint: Endpoint) -> Reply:
    """stuck_1 fails with 503 until the returned reply is changed; 200 others wait behind it."""
    failing = Reply(503, b"")
    endpoint.script("stuck_1", *([failing] * 10_000))
    add(engine, ev(STUCK, "stuck_1"), ev(STUCK.lower(), "stuck_2"), ev(STUCK.upper(), "stuck_3"))
    add(engine, *(ev(f"other{n % 100}@x.com", f"other_{n}") for n in range(200)))
    return failing


def _delivered_others(engine: sa.Engine) -> int:
    return rows(engine, "SELECT COUNT(*) AS n FROM outbox_events WHERE status = 'delivered'")[0].n


def _attempts(engine: sa.Engine, event: str) -> int:
    return rows(engine, f"SELECT attempts FROM outbox_events WHERE event = '{event}'")[0].attempts


def test_a_failing_event_blocks_only_its_own_contact(engine, endpoint):
    _block_one_contact(engine, endpoint)
    budget = RetryBudget(max_attempts=10_000, backoff_base=0.05, backoff_max=0.2)

    with running(engine, endpoint.url, budget=budget, concurrency=8):
        wait_until(
            lambda: _delivered_others(engine) == 200 and _attempts(engine, "stuck_1") >= 2,
            20,
            "the 200 other events, and stuck_1 failing",
        )
        stuck = {r.event: r for r in rows(engine) if r.email.lower() == STUCK.lower()}

    assert stuck["stuck_1"].attempts >= 1
    assert stuck["stuck_1"].status in ("pending", "in_flight")
    assert (stuck["stuck_2"].status, stuck["stuck_2"].attempts) == ("pending", 0)
    assert (stuck["stuck_3"].status, stuck["stuck_3"].attempts) == ("pending", 0)
    assert "stuck_2" not in names(endpoint)
    assert "stuck_3" not in names(endpoint)


def test_a_blocked_contact_is_delivered_in_order_once_it_recovers(engine, endpoint):
    failing = _block_one_contact(engine, endpoint)
    budget = RetryBudget(max_attempts=10_000, backoff_base=0.05, backoff_max=0.2)

    with running(engine, endpoint.url, budget=budget, concurrency=8):
        wait_until(
            lambda: _delivered_others(engine) == 200 and _attempts(engine, "stuck_1") >= 2,
            20,
            "the 200 other events, and stuck_1 failing",
        )
        failing.body, failing.status = b"", 204
        wait_until(lambda: _delivered_others(engine) == 203, 20, "the stuck contact")

    stuck_names = [n for n in names(endpoint) if n.startswith("stuck_")]
    assert stuck_names[-2:] == ["stuck_2", "stuck_3"]
    assert set(stuck_names[:-2]) == {"stuck_1"}
    assert len(stuck_names) >= 5  # two failures at least, then the three deliveries


# -- rows written by other programs ----------------------------------------------------


INVALID_ROWS = [
    pytest.param({"properties": "[1,2]"}, ("properties", "object"), id="properties-not-object"),
    pytest.param({"email": "nope"}, ("email", "address"), id="email-not-address"),
    pytest.param({"email": "two words@x.com"}, ("email", "address"), id="email-whitespace"),
    pytest.param({"event": ""}, ("event", "empty"), id="event-empty"),
    pytest.param({"event": "   "}, ("event", "empty"), id="event-blank"),
    pytest.param(
        {"properties": '{"email": "x@y.com"}'}, ("properties", "reserved"), id="reserved-email"
    ),
    pytest.param({"properties": '{"event": "x"}'}, ("properties", "reserved"), id="reserved-event"),
    pytest.param({"eventdata": '{"id": 5}'}, ("eventdata", "string"), id="eventdata-id-number"),
    pytest.param({"eventdata": '{"data": [1]}'}, ("eventdata", "object"), id="eventdata-data-list"),
    pytest.param({"properties": "not json"}, ("properties", "JSON"), id="properties-not-json"),
]


@pytest.mark.parametrize(("columns", "rule"), INVALID_ROWS)
def test_an_invalid_plain_sql_row_is_dead_without_being_sent(engine, endpoint, columns, rule):
    if columns.get("properties") == "not json" and engine.dialect.name == "postgresql":
        pytest.skip("PostgreSQL's jsonb refuses malformed JSON at insert")
    insert_sql(engine, "before@x.com", "neighbour_before")
    bad = {"email": "bad@x.com", "event": "bad_row", **columns}
    bad_id = insert_sql(engine, **bad)
    insert_sql(engine, "after@x.com", "neighbour_after")

    assert deliver(engine, endpoint.url) == 0

    by_id = {r.id: r for r in rows(engine)}
    r = by_id.pop(bad_id)
    assert (r.status, r.attempts, r.last_status_code) == ("dead", 0, None)
    for word in rule:
        assert word in r.last_error
    assert attempt_rows(engine) == []
    assert sorted(names(endpoint)) == ["neighbour_after", "neighbour_before"]
    assert [n.status for n in by_id.values()] == ["delivered", "delivered"]


def test_an_invalid_row_does_not_hold_back_its_contacts_newer_events(engine, endpoint):
    bad_id = insert_sql(engine, "jane@x.com", "bad_row", properties="[1,2]")
    good_id = insert_sql(engine, "jane@x.com", "good_row")
    assert deliver(engine, endpoint.url) == 0
    by_id = {r.id: r for r in rows(engine)}
    assert (by_id[bad_id].status, by_id[good_id].status) == ("dead", "delivered")
    assert names(endpoint) == ["good_row"]


def test_a_plain_sql_row_with_only_the_event_columns_is_delivered(engine, endpoint):
    insert_sql(
        engine,
        "jane@x.com",
        "cart_updated",
        '{"plan": "pro"}',
        '{"id": "cart:1", "data": {"n": 1}}',
    )
    assert deliver(engine, endpoint.url) == 0
    assert statuses(engine) == ["delivered"]
    assert endpoint.events() == [
        {
            "email": "jane@x.com",
            "event": "cart_updated",
            "properties": {"plan": "pro"},
            "eventdata": {"id": "cart:1", "data": {"n": 1}},
        }
    ]


# -- the body ---------------------------------------------------------------------------


def test_every_sample_event_is_sent_exactly_as_given(engine, endpoint):
    samples = [json.loads(line) for line in SAMPLE_EVENTS.read_text().splitlines() if line.strip()]
    add(engine, *samples)

    assert deliver(engine, endpoint.url) == 0

    received = endpoint.events()
    assert len(received) == len(samples)
    by_key = {(body["email"], body["event"]): body for body in received}
    for sample in samples:
        assert by_key[(sample["email"], sample["event"])] == sample


# -- what is due ------------------------------------------------------------------------


def test_rows_of_a_crashed_daemon_are_taken_back_and_delivered(engine, endpoint):
    ids = add(engine, *(ev(f"c{n}@x.com") for n in range(3)))
    set_row(
        engine,
        ids,
        status="in_flight",
        lease_token="crashed:1:1",
        lease_expires_at=now() - dt.timedelta(minutes=1),
    )

    assert deliver(engine, endpoint.url) == 0

    assert statuses(engine) == ["delivered"] * 3
    assert [r.attempts for r in rows(engine)] == [1] * 3
    assert len(endpoint.requests) == 3


def test_rows_claimed_by_a_live_daemon_are_left_alone(engine, endpoint):
    claimed, _ = add(engine, ev("a@x.com", "claimed"), ev("b@x.com", "free"))
    set_row(
        engine,
        claimed,
        status="in_flight",
        lease_token="alive:1:1",
        lease_expires_at=now() + dt.timedelta(hours=1),
    )

    assert deliver(engine, endpoint.url) == 0

    assert statuses(engine) == ["in_flight", "delivered"]
    assert names(endpoint) == ["free"]


def test_rows_waiting_out_a_backoff_are_not_due(engine, endpoint):
    waiting, _ = add(engine, ev("a@x.com", "waiting"), ev("b@x.com", "due"))
    set_row(
        engine,
        waiting,
        attempts=1,
        last_status_code=503,
        next_attempt_at=now() + dt.timedelta(hours=1),
    )

    started = time.monotonic()
    assert deliver(engine, endpoint.url) == 0
    assert time.monotonic() - started < 10

    assert statuses(engine) == ["pending", "delivered"]
    assert rows(engine)[0].attempts == 1
    assert names(endpoint) == ["due"]


def test_events_behind_their_contacts_waiting_event_are_not_due(engine, endpoint):
    waiting, _behind = add(engine, ev("a@x.com", "waiting"), ev("A@x.com", "behind"))
    set_row(engine, waiting, attempts=1, next_attempt_at=now() + dt.timedelta(hours=1))

    assert deliver(engine, endpoint.url) == 0

    assert statuses(engine) == ["pending", "pending"]
    assert endpoint.requests == []


def test_rows_scheduled_with_deliver_after_in_the_future_are_not_due(engine, endpoint):
    with engine.begin() as conn:
        track_event(conn, email="a@x.com", event="later", deliver_after=dt.timedelta(hours=1))
        track_event(conn, email="b@x.com", event="now")

    assert deliver(engine, endpoint.url) == 0

    assert statuses(engine) == ["pending", "delivered"]
    assert names(endpoint) == ["now"]


# -- send rate ---------------------------------------------------------------------------


def test_rate_limit_spaces_requests(engine, endpoint):
    add(engine, *(ev(f"c{n}@x.com") for n in range(10)))

    assert deliver(engine, endpoint.url, rate_limit=20.0, concurrency=4) == 0

    times = sorted(r.at for r in endpoint.requests)
    assert len(times) == 10
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[-1] - times[0] >= 0.35  # 9 intervals of 0.05s, with slack
    assert min(gaps) >= 0.01, gaps


def _cpu_seconds_while_running(engine: sa.Engine, endpoint: Endpoint, seconds: float) -> float:
    """CPU this process spends while a daemon (not draining) sits for `seconds`."""
    with running(engine, endpoint.url, halt_probe_interval=30.0, poll_interval=1.0):
        time.sleep(0.5)  # the first answer has come back by now
        started = time.process_time()
        time.sleep(seconds)
        return time.process_time() - started


@pytest.mark.slow  # 2.5 s of waiting, by design
@pytest.mark.parametrize(
    "reply",
    [
        Reply(401, b'{"code":"unauthorized","message":"Key not found"}'),
        Reply(429, headers={"Retry-After": "30"}),
    ],
    ids=["halted", "paused-by-429"],
)
def test_a_halted_or_paused_daemon_waits_instead_of_spinning(engine, endpoint, reply):
    endpoint.default = reply
    with engine.begin() as conn:
        track_event(conn, email="a@example.com", event="x")
    used = _cpu_seconds_while_running(engine, endpoint, 2.0)
    # A loop that spins burns a whole core (about 2 s here); waiting costs next to nothing.
    assert used < 0.5, f"{used:.2f} s of CPU in 2 s of waiting"
    assert len(endpoint.requests) == 1


def test_a_stopped_daemon_has_given_back_every_connection(engine, endpoint):
    add(engine, ev("a@x.com"), ev("b@x.com"))
    assert deliver(engine, endpoint.url) == 0
    assert statuses(engine) == ["delivered", "delivered"]
    assert engine.pool.checkedout() == 0


def test_database_wait_counts_the_time_the_first_failed_call_took(engine, endpoint):
    # A first call that hangs (a black-holed host) and then fails is part of the wait.
    settings = fast_settings(
        engine.url.render_as_string(hide_password=False), endpoint.url, database_wait=0.2
    )
    daemon = build_daemon(settings, engine=engine)
    calls = []

    def hangs_then_fails() -> None:
        calls.append(time.monotonic())
        time.sleep(0.3)
        raise sa.exc.OperationalError("SELECT", {}, Exception("timeout expired"))

    with pytest.raises(DatabaseGaveUp):
        daemon._db(hangs_then_fails)
    assert len(calls) == 1
