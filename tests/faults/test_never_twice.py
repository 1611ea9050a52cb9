"""A live daemon never sends an event twice, whatever the endpoint makes it wait for.

Each scenario runs the real daemon as a subprocess against the test endpoint
over real HTTP, on SQLite and PostgreSQL, with the endpoint's real limits
played out: slow answers, a rate limit, 429 pauses of any length, rate-limit
headers on a 2xx, a refused key. What reached the endpoint is read from the
bodies it received (each event carries a unique marker), not from the
daemon's word.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import signal
import socket
import threading
import time

import pytest
import requests
import sqlalchemy as sa

from tests.conftest import KEY, deliver, run_cli
from tests.daemons import (
    duplicates,
    enqueue,
    received,
    status_counts,
    wait_until,
)
from tests.endpoint import Endpoint, Reply
from worker.db import create_engine as engine_for

pytestmark = pytest.mark.slow  # a fault module: real crashes, outages, proxies or daemon fleets

# Leases far shorter than the waits below: a claim that is not kept alive expires.
SHORT_LEASE = ("--lease", "2", "--timeout", "1", "--poll-interval", "0.1")


def drain(url: str, endpoint: Endpoint, *flags: str, timeout: float = 120) -> str:
    """`run --exit-when-drained`: it must exit 0; return its log."""
    done = run_cli(
        "run",
        "--exit-when-drained",
        *flags,
        env={
            "OUTBOX_MA_KEY": KEY,
            "OUTBOX_ENDPOINT_URL": endpoint.url,
            "OUTBOX_DATABASE_URL": url,
        },
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def assert_each_sent_once(markers: dict[str, int], endpoint: Endpoint) -> None:
    counts = received(endpoint)
    assert set(counts) == set(markers), "an event never reached the endpoint"
    twice = {m: n for m, n in counts.items() if n > 1}
    assert twice == {}, f"{len(twice)} events sent more than once ({duplicates(counts)} copies)"


@pytest.fixture
def url(db_url: str) -> str:
    return db_url


def test_slow_answers_never_let_a_live_claim_expire(url, endpoint):
    # Each answer takes 0.6 s, one at a time: the tenth row waits 5.4 s for its
    # turn, far past a 2 s lease.
    endpoint.default = Reply(delay=0.6)
    engine = engine_for(url)
    markers = enqueue(engine, 10)
    drain(url, endpoint, *SHORT_LEASE, "--concurrency", "1", "--batch-size", "10")
    assert_each_sent_once(markers, endpoint)
    assert len(endpoint.requests) == 10
    assert status_counts(engine) == {"delivered": 10}
    engine.dispose()


def test_rows_waiting_for_the_rate_limit_are_never_sent_twice(url, endpoint):
    engine = engine_for(url)
    markers = enqueue(engine, 16)
    drain(url, endpoint, *SHORT_LEASE, "--rate-limit", "4")
    assert_each_sent_once(markers, endpoint)
    assert status_counts(engine) == {"delivered": 16}
    engine.dispose()


def test_rows_held_through_a_429_pause_longer_than_the_lease_are_sent_once(url, endpoint):
    endpoint.script("crash_test", Reply(429, headers={"Retry-After": "3"}))
    engine = engine_for(url)
    markers = enqueue(engine, 6)
    started = time.monotonic()
    drain(url, endpoint, *SHORT_LEASE, "--concurrency", "1")
    assert time.monotonic() - started >= 3  # the pause was honoured
    counts = received(endpoint)
    assert set(counts) == set(markers)
    assert sorted(counts.values()) == [1, 1, 1, 1, 1, 2]  # the 429'd one, once more
    assert len(endpoint.requests) == 7
    assert status_counts(engine) == {"delivered": 6}
    engine.dispose()


def test_two_daemons_on_postgresql_with_slow_answers_send_each_event_once(pg_url, endpoint, spawn):
    endpoint.default = Reply(delay=0.5)
    engine = engine_for(pg_url)
    markers = enqueue(engine, 24, contacts=24)
    flags = (*SHORT_LEASE, "--concurrency", "2", "--batch-size", "12")
    daemons = [spawn(pg_url, endpoint.url, *flags) for _ in range(2)]
    wait_until(lambda: status_counts(engine) == {"delivered": 24}, 60, "every event delivered")
    assert [d.stop() for d in daemons] == [0, 0]
    assert_each_sent_once(markers, endpoint)
    engine.dispose()


def test_exit_when_drained_exits_only_once_every_claimed_row_is_recorded(url, endpoint):
    # Slow answers, a rate limit and a pause together: exit 0 must mean that
    # nothing is left in flight or pending.
    endpoint.default = Reply(delay=0.3)
    endpoint.script("crash_test", Reply(429, headers={"Retry-After": "2"}))
    engine = engine_for(url)
    markers = enqueue(engine, 20, contacts=5)
    log = drain(url, endpoint, *SHORT_LEASE, "--concurrency", "4", "--rate-limit", "8")
    assert status_counts(engine) == {"delivered": 20}
    assert "drained: nothing is due; 20 delivered by this run" in log
    counts = received(endpoint)
    assert set(counts) == set(markers)
    assert sorted(counts.values()) == [1] * 19 + [2]  # the 429'd one, once more
    engine.dispose()


# -- slow start ------------------------------------------------------------------------


def test_a_refused_key_costs_one_request_not_a_burst(url, endpoint, spawn):
    endpoint.default = Reply(401, b'{"code":"unauthorized","message":"Key not found"}')
    engine = engine_for(url)
    enqueue(engine, 40, contacts=40)
    daemon = spawn(url, endpoint.url, "--poll-interval", "0.1", "--concurrency", "16")
    wait_until(lambda: "DELIVERY HALTED" in daemon.log(), 20, "the halt")
    time.sleep(2)  # anything else on its way would have arrived
    assert len(endpoint.requests) == 1
    assert daemon.stop() == 0
    assert status_counts(engine) == {"pending": 40}
    engine.dispose()


def test_after_the_first_answer_the_daemon_opens_up_to_its_concurrency(url, endpoint):
    endpoint.default = Reply(delay=0.5)
    engine = engine_for(url)
    enqueue(engine, 9, contacts=9)
    drain(url, endpoint, "--poll-interval", "0.1", "--concurrency", "8")
    starts = sorted(r.at for r in endpoint.requests)
    # The first goes alone; the next eight together once it is answered.
    assert starts[1] - starts[0] >= 0.45, [round(t - starts[0], 3) for t in starts]
    assert starts[-1] - starts[1] < 1.0, [round(t - starts[0], 3) for t in starts]  # not one by one
    engine.dispose()


# -- pauses have a floor and a ceiling -------------------------------------------------


@pytest.mark.parametrize("retry_after", ["0", "past-date"])
def test_a_429_asking_for_no_wait_does_not_make_a_hot_loop(
    sqlite_url, endpoint, spawn, retry_after
):
    if retry_after == "past-date":
        retry_after = email.utils.formatdate(time.time() - 3600, usegmt=True)
    endpoint.default = Reply(429, headers={"Retry-After": retry_after})
    engine = engine_for(sqlite_url)
    enqueue(engine, 1)
    daemon = spawn(sqlite_url, endpoint.url, "--poll-interval", "0.1")
    time.sleep(4)
    assert daemon.stop() == 0
    assert 1 <= len(endpoint.requests) <= 5  # at most one a second
    assert daemon.log().count("WARNING") <= 5
    engine.dispose()


def test_rate_limit_headers_on_a_2xx_pause_within_the_ceiling_and_show_it(
    sqlite_url, endpoint, spawn
):
    far_future = "999999999"  # seconds: 31 years
    endpoint.default = Reply(
        204, headers={"x-sib-ratelimit-remaining": "0", "x-sib-ratelimit-reset": far_future}
    )
    engine = engine_for(sqlite_url)
    enqueue(engine, 3)
    with socket.socket() as probe:  # a free port for the metrics
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = spawn(
        sqlite_url, endpoint.url, "--poll-interval", "0.1", "--metrics-port", str(port),
        "--metrics-host", "127.0.0.1",
    )  # fmt: skip
    wait_until(lambda: "pausing all sends until" in daemon.log(), 20, "the pause, logged")
    time.sleep(1)
    assert len(endpoint.requests) == 1
    line = next(x for x in daemon.log().splitlines() if "pausing all sends until" in x)
    until = dt.datetime.fromisoformat(line.split("pausing all sends until ")[1].split()[0])
    assert until - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(hours=1, seconds=5)
    assert daemon.log().count("pausing all sends until") == 1  # logged once

    def paused_in_stats() -> str | None:
        shown = json.loads(run_cli("stats", "--json", "--database-url", sqlite_url).stdout)
        return shown["daemons"][0]["paused_until"] if shown["daemons"] else None

    shown = wait_until(paused_in_stats, 15, "the pause in stats")
    assert dt.datetime.fromisoformat(shown) == until
    human = run_cli("stats", "--database-url", sqlite_url).stdout
    assert f"PAUSED by the endpoint's rate limit until {until.isoformat()}" in human
    ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    assert ready.status_code == 503 and "paused" in ready.text
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert "outbox_paused_until_seconds" in metrics
    assert daemon.stop() == 0
    engine.dispose()


# -- nothing in a row or an answer stops the daemon ---------------------------------------


def test_a_row_with_an_unreadable_timestamp_is_dead_lettered_and_the_rest_delivered(
    sqlite_url, endpoint
):
    engine = engine_for(sqlite_url)
    markers = enqueue(engine, 3)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_events (email, event, created_at)"
                " VALUES ('bad@example.com', 'crash_test', 'yesterday')"
            )
        )
    drain(sqlite_url, endpoint, "--poll-interval", "0.1")
    assert_each_sent_once(markers, endpoint)
    with engine.connect() as conn:
        bad = conn.execute(
            sa.text("SELECT status, last_error FROM outbox_events WHERE email = 'bad@example.com'")
        ).one()
    assert bad.status == "dead"
    assert "created_at" in bad.last_error and "yesterday" in bad.last_error
    engine.dispose()


def test_an_outcome_the_database_refuses_loses_no_other_outcome(pg_url, endpoint, spawn):
    engine = engine_for(pg_url)
    markers = enqueue(engine, 24, contacts=24)
    refused = min(markers.values())
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"""
                CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                  IF NEW.id = {refused} AND NEW.status = 'delivered' THEN
                    RAISE EXCEPTION 'refused by the test';
                  END IF;
                  RETURN NEW;
                END $$;
                CREATE TRIGGER refuse_one BEFORE UPDATE ON outbox_events
                  FOR EACH ROW EXECUTE FUNCTION refuse_one();
                """
            )
        )
    daemon = spawn(pg_url, endpoint.url, "--poll-interval", "0.1")
    wait_until(lambda: status_counts(engine).get("delivered") == 23, 30, "the other 23")
    time.sleep(1)
    counts = received(endpoint)
    others = {m for m, i in markers.items() if i != refused}
    assert {m: n for m, n in counts.items() if m in others} == dict.fromkeys(others, 1)
    assert daemon.proc.poll() is None, daemon.log()  # still running
    assert f"outbox id {refused}" in daemon.log()
    assert daemon.stop() == 0
    engine.dispose()


# -- the database away -------------------------------------------------------------------


def test_exit_when_drained_gives_up_on_a_database_that_stays_away(endpoint):
    url = "postgresql://outbox:secret@127.0.0.1:1/outbox"  # nothing listens on port 1
    started = time.monotonic()
    done = run_cli(
        "run", "--exit-when-drained", "--database-wait", "2",
        env={"OUTBOX_MA_KEY": KEY, "OUTBOX_ENDPOINT_URL": endpoint.url,
             "OUTBOX_DATABASE_URL": url},
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 20
    last = done.stderr.strip().splitlines()[-1]
    assert "database" in last and "2s" in last and "--database-wait" in last
    assert "secret" not in done.stderr


def test_sigterm_while_the_database_is_away_exits_0(endpoint, spawn):
    url = "postgresql://outbox:secret@127.0.0.1:1/outbox"
    daemon = spawn(url, endpoint.url, "--poll-interval", "0.1")
    wait_until(lambda: "database unavailable" in daemon.log(), 20, "the daemon waiting")
    assert daemon.stop(signal.SIGTERM, timeout=10) == 0, daemon.log()
    assert "Traceback" not in daemon.log()


# -- threads -------------------------------------------------------------------------------


def test_every_thread_the_daemon_starts_is_joined_before_it_returns(engine, endpoint):
    before = set(threading.enumerate())
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO outbox_events (email, event) VALUES ('a@example.com', 'x')")
        )
    deliver(engine, endpoint.url, concurrency=8)
    new = set(threading.enumerate()) - before
    # The one deadline watcher serves every request of the process, for its lifetime.
    left = [t.name for t in new if t.name.startswith("outbox-") and t.name != "outbox-deadlines"]
    assert left == []
