"""What operators rely on: metrics and probes over HTTP, the daemons table, retention, logs."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tests.conftest import KEY, rows, run_cli
from tests.daemons import RunningDaemon, wait_until
from tests.endpoint import Endpoint, Reply
from worker import track_event
from worker.admin_reports import stats
from worker.maintenance import Maintenance
from worker.output import LogFormatter
from worker.store import DaemonReport, OutboxStore
from worker.telemetry import Telemetry


def _enqueue(engine: sa.Engine, *events: tuple[str, str]) -> None:
    with Session(engine) as session, session.begin():
        for email, name in events:
            track_event(session, email=email, event=name)


@pytest.fixture
def running(engine: sa.Engine, endpoint: Endpoint) -> Iterator[Any]:
    """Start daemons with their telemetry served; whatever still runs at the end is stopped."""
    started: list[RunningDaemon] = []

    def start(**overrides: Any) -> RunningDaemon:
        started.append(RunningDaemon(engine, endpoint.url, serve_telemetry=True, **overrides))
        return started[-1]

    yield start
    for daemon in started:
        daemon.stop()


def test_metrics_count_outcomes_by_status_code(engine, endpoint, running):
    endpoint.script("refused", Reply(400, b'{"code":"invalid_parameter","message":"no"}'))
    endpoint.script("flaky", Reply(503))
    _enqueue(
        engine, ("a@example.com", "fine"), ("b@example.com", "refused"), ("c@example.com", "flaky")
    )
    daemon = running()
    wait_until(
        lambda: [r.status for r in rows(engine)] == ["delivered", "dead", "delivered"],
        10,
        "the three outcomes",
    )
    wait_until(
        lambda: daemon.metric("outbox_events_delivered_total") == 2, 10, "two deliveries counted"
    )
    assert daemon.metric("outbox_events_dead_total", 'status_code="400"') == 1
    assert daemon.metric("outbox_events_retried_total", 'status_code="503"') == 1
    assert daemon.metric("outbox_request_duration_seconds_count") == 4
    assert daemon.metric("outbox_claim_duration_seconds_count") >= 1


def test_probes_say_live_and_ready_while_delivering(engine, endpoint, running):
    daemon = running()
    wait_until(lambda: daemon.get("/readyz").status_code == 200, 10, "ready")
    assert daemon.get("/livez").status_code == 200
    assert daemon.get("/nothing").status_code == 404


def test_a_halt_shows_in_metrics_readiness_and_stats_then_clears(engine, endpoint, running):
    endpoint.default = Reply(401, b'{"code":"unauthorized","message":"Key not found"}')
    _enqueue(engine, ("a@example.com", "signed_up"))
    daemon = running()
    wait_until(lambda: "halted" in daemon.get("/readyz").text, 10, "halted in /readyz")
    assert daemon.get("/readyz").status_code == 503
    assert daemon.metric("outbox_delivery_halted", 'reason="401"') == 1
    wait_until(lambda: stats(engine).halted, 10, "the halt in stats")
    assert "401" in stats(engine).halted[0].halted_reason

    endpoint.default = Reply(204)  # the key is fixed: the probe finds out by itself
    wait_until(lambda: [r.status for r in rows(engine)] == ["delivered"], 10, "the row delivered")
    wait_until(lambda: daemon.get("/readyz").status_code == 200, 10, "ready")
    assert daemon.metric("outbox_delivery_halted", 'reason="401"') == 0
    wait_until(lambda: not stats(engine).halted, 10, "the halt cleared from stats")


def test_a_running_daemon_is_listed_in_stats_and_forgotten_when_it_stops(engine, endpoint, running):
    daemon = running()
    wait_until(lambda: len(stats(engine).daemons) == 1, 10, "the daemon in stats")
    daemon.stop()
    assert stats(engine).daemons == []


def _backdate_delivered(engine: sa.Engine, days: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE outbox_events SET delivered_at = :at WHERE status = 'delivered'"),
            {
                "at": (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days)).replace(
                    tzinfo=None
                )
            }
            if engine.dialect.name == "sqlite"
            else {"at": dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days)},
        )


def test_maintenance_prunes_delivered_rows_past_retention_and_keeps_the_rest(engine, endpoint):
    _enqueue(engine, ("old@example.com", "a"), ("old2@example.com", "b"))
    store = OutboxStore(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE outbox_events SET status = 'delivered', attempts = 1"))
    _backdate_delivered(engine, days=8)
    _enqueue(engine, ("new@example.com", "c"))
    maintenance = Maintenance(
        store,
        Telemetry(),
        lease=10,
        retain_delivered=dt.timedelta(days=7),
        on_rescue=lambda: None,
        report=DaemonReport,
        name="test:1",
    )
    maintenance.run_once()
    assert [(r.email, r.status) for r in rows(engine)] == [("new@example.com", "pending")]


def test_the_daemon_prunes_by_itself(engine, endpoint, running):
    _enqueue(engine, ("a@example.com", "x"), ("b@example.com", "y"))
    daemon = running(lease=2.0, timeout=1.0)
    wait_until(
        lambda: len([r for r in rows(engine) if r.status == "delivered"]) == 2,
        10,
        "both rows delivered",
    )
    _backdate_delivered(engine, days=8)
    wait_until(lambda: rows(engine) == [], 15, "the delivered rows pruned")
    assert daemon.thread.is_alive()


def test_json_log_lines_parse_and_name_ids_not_emails(sqlite_url, endpoint):
    endpoint.script("refused", Reply(400, b'{"code":"invalid_parameter","message":"bad"}'))
    run_cli("enqueue", "--database-url", sqlite_url, "--email", "secret.person@example.com",
            "--event", "refused")  # fmt: skip
    result = run_cli(
        "run", "--exit-when-drained", "--log-format", "json", "--database-url", sqlite_url,
        "--endpoint-url", endpoint.url, "--poll-interval", "0.1",
        env={"OUTBOX_MA_KEY": KEY},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    dead = [r for r in records if "dead" in r["message"]]
    assert dead and "outbox id 1" in dead[0]["message"]
    assert "secret.person@example.com" not in result.stderr


def test_the_log_formatter_redacts_the_key_from_messages_and_tracebacks():
    formatter = LogFormatter(secrets=[KEY])
    try:
        raise ValueError(f"header value {KEY!r} is invalid")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "worker", logging.ERROR, __file__, 1, "sending with %s", (KEY,), sys.exc_info()
        )
    for as_json in (False, True):
        formatter = LogFormatter(as_json=as_json, secrets=[KEY])
        text = formatter.format(record)
        assert KEY not in text
        assert "[redacted]" in text and "ValueError" in text


def test_stats_watch_refreshes_until_interrupted(sqlite_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    watch = subprocess.Popen(
        [sys.executable, "-m", "worker", "stats", "--watch", "--interval", "0.2",
         "--database-url", sqlite_url],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # Interrupt after the third screen has been read, however slowly the machine starts it.
    assert watch.stdout is not None
    screens, seen = 0, []
    while screens < 3:
        line = watch.stdout.readline()
        assert line, "stats --watch ended before its third refresh"
        seen.append(line)
        screens += "daemons running" in line  # the last line of a screen
    watch.send_signal(signal.SIGINT)
    rest, err = watch.communicate(timeout=10)
    out = "".join(seen) + rest
    assert watch.returncode == 0, err
    assert out.count("outbox stats at") >= 3  # one screen per refresh
    assert out.count("daemons running") == out.count("outbox stats at")
    assert "Traceback" not in err
