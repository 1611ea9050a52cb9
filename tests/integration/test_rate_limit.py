"""--rate-limit: its syntax and presets, the send gate's slots, and the slots shared
through PostgreSQL (two gates on one database stand for two daemons here; the
daemons themselves are in tests/faults/test_shared_rate_limit.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import KEY, fast_settings, run_cli
from tests.endpoint import Endpoint, Reply
from tests.integration.test_cli import assert_one_line_error
from worker import db, track_events
from worker.config import Settings, SettingsError
from worker.daemon import build_daemon
from worker.delivery import Deliverer
from worker.gate import Grant, LocalSlots, SendGate
from worker.ratelimit import (
    CHUNK_SECONDS,
    SEND_SLACK,
    InvalidRateLimit,
    parse_rate_limit,
)
from worker.shared_limit import SharedSlots
from worker.telemetry import Telemetry

# -- the syntax ------------------------------------------------------------------------------


def test_a_bare_number_is_requests_per_second():
    limit = parse_rate_limit("10")
    assert [(w.requests, w.seconds) for w in limit.windows] == [(10, 1.0)]


def test_windows_joined_by_commas_all_hold():
    limit = parse_rate_limit("10/s, 600/min,36000/h")
    assert [(w.requests, w.seconds) for w in limit.windows] == [(10, 1), (600, 60), (36000, 3600)]
    assert limit.describe() == "10/s,600/min,36000/h"


def test_sends_are_spaced_for_the_strictest_window():
    # 100/min is stricter than 10/s: 0.6 s apart (and the slack), not 0.1 s.
    assert parse_rate_limit("10/s,100/min").interval == pytest.approx((60 + SEND_SLACK) / 100)


@pytest.mark.parametrize(
    ("preset", "windows"),
    [
        ("brevo-general", [(10, 1), (36000, 3600)]),
        ("brevo-advanced", [(20, 1), (72000, 3600)]),
        ("brevo-extended", [(60, 1)]),
    ],
)
def test_presets_are_brevos_published_limits_for_the_events_api(preset, windows):
    limit = parse_rate_limit(preset)
    assert [(w.requests, w.seconds) for w in limit.windows] == windows
    assert limit.describe().startswith(preset)


def test_none_and_zero_are_no_limit():
    assert not parse_rate_limit("0") and not parse_rate_limit("none")


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "1e9", "10/d", "ten/s", "10/s,5/s", "0/h"])
def test_a_rate_limit_that_cannot_be_read_is_refused_saying_what_to_write(text):
    with pytest.raises(InvalidRateLimit, match=r"N/s|out of range|twice"):
        parse_rate_limit(text)


def test_settings_refuse_a_bad_rate_limit_naming_the_flag_and_the_variable():
    with pytest.raises(SettingsError, match=r"--rate-limit \(env OUTBOX_RATE_LIMIT\)"):
        Settings(rate_limit="10/week")


def test_a_chunk_lasts_about_half_a_second():
    for text in ("2/s", "10/s", "100/s"):
        limit = parse_rate_limit(text)
        assert limit.chunk == 1 or limit.chunk * limit.interval <= CHUNK_SECONDS


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["10/d", "fast", "10/s,20/s", "0/min"])
def test_run_with_a_bad_rate_limit_exits_2_naming_it(sqlite_url, value):
    result = run_cli("run", "--database-url", sqlite_url, "--rate-limit", value,
                     env={"OUTBOX_MA_KEY": KEY})  # fmt: skip
    line = assert_one_line_error(result, 2)
    assert "--rate-limit" in line and repr(value) in line


def test_a_bad_outbox_rate_limit_exits_2_naming_the_variable(sqlite_url):
    result = run_cli("run", "--database-url", sqlite_url,
                     env={"OUTBOX_MA_KEY": KEY, "OUTBOX_RATE_LIMIT": "lots"})  # fmt: skip
    assert "OUTBOX_RATE_LIMIT" in assert_one_line_error(result, 2)


def test_run_says_which_limit_it_keeps_and_with_whom(db_url, endpoint):
    result = run_cli("run", "--exit-when-drained", "--database-url", db_url,
                     "--endpoint-url", endpoint.url, "--rate-limit", "brevo-general",
                     env={"OUTBOX_MA_KEY": KEY})  # fmt: skip
    assert result.returncode == 0, result.stderr
    who = "shared by every daemon" if db_url.startswith("postgresql") else "this daemon"
    assert f"rate limit brevo-general (10/s,36000/h), {who}" in result.stderr


# -- the gate --------------------------------------------------------------------------------


def pass_times(gates: list[SendGate], threads: int, turns: int) -> list[float]:
    """Each gate gets `threads` threads; `turns` turns in all; the times they passed."""
    times: list[float] = []
    lock = threading.Lock()
    left = iter(range(turns))

    def send(gate: SendGate) -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            assert gate.wait_turn()
            with lock:
                times.append(time.monotonic())

    # Daemon threads: a gate that never grants (a failing test) must not hang the run.
    workers = [
        threading.Thread(target=send, args=(g,), daemon=True) for g in gates for _ in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    return sorted(times)


def most_in(times: list[float], seconds: float) -> int:
    return max(sum(1 for t in times if start <= t < start + seconds) for start in times)


def test_no_window_ever_holds_more_than_its_limit():
    times = pass_times([SendGate("10/s")], threads=4, turns=25)
    assert len(times) == 25
    assert most_in(times, 1.0) <= 10


class CountingSlots(LocalSlots):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []

    def grant(self, count: int, interval: float, limit: str = "") -> Grant:
        self.asked.append(count)
        return super().grant(count, interval, limit)


def test_a_gate_with_one_request_to_send_asks_for_one_slot():
    # An idle daemon holds nothing, and one with little to send takes little.
    source = CountingSlots()
    gate = SendGate("100/s", source)
    assert gate.wait_turn()
    assert source.asked == [1]


def test_a_gate_asks_for_what_its_threads_wait_for():
    source = CountingSlots()
    gate = SendGate("100/s", source)
    pass_times([gate], threads=8, turns=40)
    assert max(source.asked) == 8
    assert len(source.asked) < 40 / 2


def test_a_gate_with_a_backlog_takes_a_chunk_at_a_time():
    source = CountingSlots()
    gate = SendGate("100/s", source)
    gate.backlog = lambda: 1000  # jobs queued for the senders
    pass_times([gate], threads=2, turns=60)
    assert max(source.asked) == gate.limit.chunk


def test_a_request_costing_three_tokens_takes_three_slots():
    gate = SendGate("20/s")
    started = time.monotonic()
    gate.wait_turn(tokens=3)
    gate.wait_turn()
    assert time.monotonic() - started >= 3 * gate.limit.interval * 0.95


def test_slots_inside_a_pause_are_void():
    gate = SendGate("10/s")
    gate.wait_turn()
    gate.pause(0.5)
    started = time.monotonic()
    gate.wait_turn()
    assert time.monotonic() - started >= 0.45


# -- shared through PostgreSQL ------------------------------------------------------------


@pytest.fixture
def pg_engine(pg_url):
    engine = db.create_engine(pg_url)
    yield engine
    engine.dispose()


def test_two_gates_on_one_database_keep_one_limit_between_them(pg_engine):
    gates = [SendGate("20/s", SharedSlots(pg_engine, f"host:{n}")) for n in range(2)]
    times = pass_times(gates, threads=3, turns=40)
    assert len(times) == 40
    assert most_in(times, 1.0) <= 20
    with pg_engine.connect() as conn:
        granted, grants = conn.execute(
            sa.text("SELECT granted, grants FROM outbox_rate_limit")
        ).one()
    assert granted >= 40
    assert grants <= granted / 2  # far below a statement per request


def test_a_pause_one_gate_shares_holds_the_other(pg_engine, caplog):
    first = SendGate("20/s", SharedSlots(pg_engine, "host:1"))
    second = SendGate("20/s", SharedSlots(pg_engine, "host:2"))
    first.pause(1.0, "429 asking for 1s, to outbox id 7")
    started = time.monotonic()
    with caplog.at_level(logging.INFO, "worker.daemon"):
        assert second.wait_turn()
    assert time.monotonic() - started >= 0.9
    heard = [r.getMessage() for r in caplog.records if "shared pause" in r.getMessage()]
    assert len(heard) == 1 and "host:1" in heard[0] and "outbox id 7" in heard[0]


def test_a_shared_pause_from_the_database_is_bounded_by_the_ceiling(pg_engine):
    with pg_engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO outbox_rate_limit (name, next_slot_at, paused_until)"
            " VALUES ('account', now(), now() + interval '30 years')"
        ))  # fmt: skip
    grant = SharedSlots(pg_engine, "host:1").grant(1, 0.1)
    assert grant.paused_for == 3600


def test_without_the_database_no_slot_is_granted_and_nothing_raises(caplog):
    engine = db.create_engine("postgresql://postgres@127.0.0.1:1/nowhere")
    gate = SendGate("10/s", SharedSlots(engine, "host:1"))
    cancel = threading.Event()
    threading.Timer(1.5, cancel.set).start()
    with caplog.at_level(logging.WARNING, "worker.daemon"):
        assert gate.wait_turn(cancel) is None
    assert len([r for r in caplog.records if "no send slots" in r.getMessage()]) == 1


def test_stats_show_the_shared_limit_and_a_pause_for_every_daemon(pg_url, pg_engine):
    SharedSlots(pg_engine, "host:1").grant(4, 0.105, "brevo-general (10/s,36000/h)")
    SharedSlots(pg_engine, "host:1").publish_pause(30, "429 asking for 30s, to outbox id 7")

    text = run_cli("stats", "--database-url", pg_url)
    shown = json.loads(run_cli("stats", "--json", "--database-url", pg_url).stdout)

    assert "PAUSED for every daemon until" in text.stdout
    assert "429 asking for 30s, to outbox id 7, answered to host:1" in text.stdout
    assert shown["rate_limit"]["paused_by"] == "host:1"
    assert shown["rate_limit"]["granted"] == 4 and shown["rate_limit"]["grants"] == 1


def test_the_daemon_counts_429s_slots_and_shows_the_shared_pause_in_metrics(pg_url, endpoint):
    engine = db.create_engine(pg_url)
    with engine.begin() as conn:
        track_events(conn, [{"email": f"c{i}@example.com", "event": "e"} for i in range(6)])
    endpoint.script("e", Reply(429, headers={"Retry-After": "1"}))
    telemetry = Telemetry()
    settings = fast_settings(pg_url, endpoint.url, rate_limit="20/s")
    assert build_daemon(settings, engine=engine, telemetry=telemetry).run() == 0

    def value(name: str) -> float:
        return telemetry.registry.get_sample_value(name) or 0.0

    assert value("outbox_responses_429_total") == 1
    assert value("outbox_rate_limit_tokens_granted_total") >= 7
    assert value("outbox_rate_limit_grants_total") >= 1
    assert value("outbox_rate_limit_shared_pause_until_seconds") > time.time() - 60
    engine.dispose()


class SlowSlots(LocalSlots):
    """A source that answers 80 ms after reading its clock: more than the slack."""

    def grant(self, count: int, interval: float, limit: str = "") -> Grant:
        granted = super().grant(count, interval, limit)
        time.sleep(0.08)
        return dataclasses.replace(granted, start_in=granted.start_in - 0.08)


def test_a_source_slower_than_the_slack_widens_the_spacing_rather_than_crowd_a_window(caplog):
    gate = SendGate("20/s", SlowSlots())
    with caplog.at_level(logging.WARNING, "worker.daemon"):
        times = pass_times([gate], threads=4, turns=20)
    assert len(times) == 20  # still sends
    assert most_in(times, 1.0) <= 20
    assert len([r for r in caplog.records if "answered in" in r.getMessage()]) == 1


class LateOnTheWire(Deliverer):
    """A sender held up between its turn and the wire, as on a loaded machine: one
    request in four goes out 150 ms after its slot."""

    def __init__(self, url: str) -> None:
        super().__init__(url, KEY, timeout=2.0)
        self._late = random.Random(7)
        self._lock = threading.Lock()

    def post(self, body: bytes) -> Any:
        with self._lock:
            late = self._late.random() < 0.25
        if late:
            time.sleep(0.15)
        return super().post(body)


def test_sends_late_on_the_wire_widen_the_spacing_rather_than_crowd_a_window(sqlite_url, caplog):
    # A send later than the slack after its slot, followed a window later by one on
    # time, puts N+1 requests in one window: the endpoint's limit answers 429.
    endpoint = Endpoint(limit_per_second=20)
    engine = db.create_engine(sqlite_url)
    with engine.begin() as conn:
        track_events(conn, [{"email": f"c{i}@example.com", "event": "e"} for i in range(80)])
    settings = fast_settings(sqlite_url, endpoint.url, rate_limit="20/s", concurrency=4)
    with caplog.at_level(logging.WARNING, "worker.daemon"):
        daemon = build_daemon(settings, engine=engine, deliverer=LateOnTheWire(endpoint.url))
        assert daemon.run() == 0
    endpoint.close()
    engine.dispose()
    assert len(endpoint.requests) >= 80
    assert endpoint.refused == []
    assert len([r for r in caplog.records if "on the wire" in r.getMessage()]) == 1


def test_the_slack_in_use_is_a_metric_and_comes_back_down_once_sends_are_on_time():
    telemetry = Telemetry()
    gate = SendGate("20/s", telemetry=telemetry)

    def slack() -> float:
        return telemetry.registry.get_sample_value("outbox_rate_limit_slack_seconds") or 0.0

    assert slack() == SEND_SLACK
    turn = gate.wait_turn()
    assert turn is not None
    gate.sent(turn, turn.slot_at + 0.2)
    assert slack() == pytest.approx(0.3)
    for _ in range(60):
        turn = gate.wait_turn()
        assert turn is not None
        gate.sent(turn, turn.slot_at + 0.001)
    assert slack() == SEND_SLACK


def test_requests_costing_several_slots_each_take_consecutive_ones():
    # Four threads, each request counted as 4: interleaved slots would send all four
    # at once, a window later four more, 32 counted in under a second.
    gate = SendGate("20/s")
    times: list[float] = []

    def send() -> None:
        for _ in range(2):
            assert gate.wait_turn(tokens=4)
            times.append(time.monotonic())

    threads = [threading.Thread(target=send, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(times) == 8
    assert most_in(sorted(times), 1.0) * 4 <= 20


def test_a_batch_request_takes_batch_request_cost_slots(sqlite_url):
    endpoint = Endpoint()
    engine = db.create_engine(sqlite_url)
    with engine.begin() as conn:
        track_events(conn, [{"email": f"c{i}@example.com", "event": "e"} for i in range(20)])
    settings = fast_settings(sqlite_url, endpoint.v3_url, transport="v3-batch",
                             batch_max_events=5, rate_limit="20/s", batch_request_cost=4)  # fmt: skip
    assert build_daemon(settings, engine=engine).run() == 0
    endpoint.close()
    engine.dispose()
    times = [r.at for r in endpoint.requests]
    assert len(times) == 4 and len(endpoint.events()) == 20
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 4 * settings.rate_limit.interval * 0.9
