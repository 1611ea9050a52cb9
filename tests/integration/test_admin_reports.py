"""The operator's stats against real databases (SQLite and PostgreSQL): counts,
backlog, ages, dead letters by status code, and the daemons as their heartbeats
left them (the bounded reading of the console's overview: tests/test_console.py).
The operator's modules read the store; the daemon never loads them.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from dataclasses import replace

import sqlalchemy as sa

from tests.conftest import REPO
from tests.integration.test_store import add, claim_one, make_dead, make_delivered, now, set_row
from worker.admin_reports import stats
from worker.output import print_stats
from worker.schema import outbox_daemons
from worker.store import DaemonReport


def test_stats_counts_rows_by_status(engine, store):
    ids = add(engine, *(f"c{n}@x.com" for n in range(6)))
    claim_one(store, ids[0])  # claims every row: distinct contacts
    set_row(engine, ids[1:3], status="pending", lease_token=None, lease_expires_at=None)
    make_delivered(engine, ids[3])
    make_dead(engine, ids[4:6])

    assert stats(engine).counts == {"pending": 2, "in_flight": 1, "delivered": 1, "dead": 2}


def test_stats_counts_due_rows(engine, store):
    _, _, later = add(engine, "a@x.com", "b@x.com", "c@x.com")
    set_row(engine, later, next_attempt_at=now() + dt.timedelta(hours=1))
    assert stats(engine).due == 2


def test_stats_gives_the_age_of_the_oldest_pending_row(engine, store):
    old, delivered_older = add(engine, "a@x.com", "b@x.com")
    set_row(engine, old, created_at=now() - dt.timedelta(hours=1))
    make_delivered(engine, delivered_older, created_at=now() - dt.timedelta(hours=5))

    age = stats(engine).oldest_pending_age_s
    assert age is not None
    assert 3590 <= age <= 3700


def test_stats_oldest_pending_age_is_none_without_pending_rows(engine, store):
    (event_id,) = add(engine, "a@x.com")
    make_delivered(engine, event_id)
    assert stats(engine).oldest_pending_age_s is None


def test_stats_counts_dead_rows_by_status_code(engine, store):
    ids = add(engine, *(f"c{n}@x.com" for n in range(4)))
    make_dead(engine, ids[:2], code=400)
    make_dead(engine, ids[2], code=422)
    make_dead(engine, ids[3], code=None)
    assert stats(engine).dead_by_status_code == {"400": 2, "422": 1, "none": 1}


def test_stats_say_since_when_a_daemon_halted_in_json_and_text(engine, store, capsys):
    store.heartbeat("host:1", DaemonReport("HTTP 401 unauthorized"))
    store.heartbeat("host:2", DaemonReport(None, 5))
    began = dt.datetime(2026, 12, 3, 9, 30, tzinfo=dt.timezone.utc)
    with engine.begin() as conn:
        conn.execute(
            sa.update(outbox_daemons)
            .where(outbox_daemons.c.name == "host:1")
            .values(halted_since=began)
        )
    reading = stats(engine)
    halted, delivering = reading.daemons
    assert halted.halted_since == began and delivering.halted_since is None
    assert (
        halted.halted_s_ago is not None
        and halted.halted_s_ago >= (now() - began).total_seconds() - 5
    )
    shown = json.loads(json.dumps(reading.as_dict()))["daemons"]
    assert [d["halted_since"] for d in shown] == ["2026-12-03T09:30:00+00:00", None]
    print_stats(reading)
    line = next(x for x in capsys.readouterr().out.splitlines() if "host:1" in x)
    assert "HALTED since 2026-12-03 09:30:00 UTC" in line and "HTTP 401 unauthorized" in line


def test_stats_sum_the_live_daemons_figures_per_transport(engine, store, capsys):
    batch = DaemonReport(transport="v3-batch")
    store.heartbeat(
        "host:1", replace(batch, delivered=390, requests=2, events_sent=400, largest_batch=200)
    )
    store.heartbeat(
        "host:2",
        replace(batch, delivered=99, requests=1, events_sent=100, largest_batch=100, dead=11),
    )
    store.heartbeat(
        "host:3",
        DaemonReport(
            delivered=3, dead=1, transport="tracker", requests=5, events_sent=5, largest_batch=1
        ),
    )
    store.heartbeat("host:4", DaemonReport(delivered=1))  # a daemon from before 0009: no transport
    store.heartbeat("host:5", DaemonReport(transport="v3", requests=1))
    with engine.begin() as conn:  # silent for longer than a live daemon may be
        conn.execute(
            sa.update(outbox_daemons)
            .where(outbox_daemons.c.name == "host:5")
            .values(seen_at=now() - dt.timedelta(hours=1))
        )
    reading = stats(engine)
    assert json.loads(json.dumps(reading.as_dict()))["transports"] == {
        "tracker": {"daemons": 1, "requests": 5, "events_sent": 5, "events_per_request": 1.0,
                    "largest_batch": 1, "delivered": 3, "dead": 1},
        "v3-batch": {"daemons": 2, "requests": 3, "events_sent": 500,
                     "events_per_request": 500 / 3, "largest_batch": 200, "delivered": 489,
                     "dead": 11},
    }  # fmt: skip
    print_stats(reading)
    out = capsys.readouterr().out.splitlines()
    at = out.index("by transport (live daemons, since each started):")
    assert out[at + 1].split() == [
        "transport", "daemons", "requests", "events", "sent", "per", "request",
        "max", "batch", "delivered", "dead",
    ]  # fmt: skip
    assert out[at + 2].split() == ["tracker", "1", "5", "5", "1.0", "1", "3", "1"]
    assert out[at + 3].split() == ["v3-batch", "2", "3", "500", "166.7", "200", "489", "11"]
    assert len({len(line) for line in out[at + 1 : at + 4]}) == 1  # aligned


def test_the_daemon_loads_none_of_the_operators_modules():
    loaded = "import sys, worker.daemon; print(sorted(m for m in sys.modules if 'admin' in m))"
    result = subprocess.run(
        [sys.executable, "-c", loaded], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
