"""Prove that nothing is lost: each fault injected for real, every committed event delivered.

The daemon runs as a real subprocess (`python -m worker run`) against a real
PostgreSQL (or a SQLite file) and a real HTTP endpoint on 127.0.0.1; faults are
real signals (SIGKILL, SIGTERM, SIGINT), a PostgreSQL server stopped and started
again, backends terminated with pg_terminate_backend, and an application writing
to the same SQLite file. No mocks.

Every event carries a unique marker (its `eventdata.id`), so what reached the
endpoint is read from the bodies it received, not from the daemon's own word.

By default the scenarios are CI-quick; with OUTBOX_SOAK=1 they run many more
rounds and events. Each scenario prints a `[reliability]` line with its figures
(run with `-s` to see them); docs/reliability.md holds those of the soak.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import KEY, new_pg_database
from tests.daemons import (
    DaemonProcess,
    all_delivered,
    complete_bodies,
    delivered,
    duplicates,
    enqueue,
    ids_with_status,
    received,
    status_counts,
    truncated,
    wait_until,
    warning_lines,
)
from tests.endpoint import Endpoint, Reply
from tests.pgserver import PostgresServer
from worker import db
from worker.store import OutboxStore

pytestmark = pytest.mark.slow  # a fault module: real crashes, outages, proxies or daemon fleets

SOAK = os.environ.get("OUTBOX_SOAK") == "1"
SEED = int(os.environ.get("OUTBOX_SOAK_SEED") or time.time_ns() % 1_000_000)


# -- helpers -----------------------------------------------------------------------


def report(scenario: str, **figures: Any) -> None:
    """One line of figures per scenario, to be copied into docs/reliability.md."""
    shown = " ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[reliability] {scenario}: {shown} (soak={int(SOAK)}, seed={SEED})", flush=True)


def engine_for(url: str) -> sa.Engine:
    return db.create_engine(url)


def backends(engine: sa.Engine, where: str) -> list[Any]:
    """The other backends of this database that match `where` (pg_stat_activity)."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT pid, state, query FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                f" AND backend_type = 'client backend' AND ({where})"
            )
        ).all()


def terminate_mid_statement(engine: sa.Engine, patience: float = 5.0) -> tuple[int, bool]:
    """Hold the outbox table locked until one of the daemon's statements waits on it,
    then terminate every daemon connection. Return (how many, whether one was mid
    statement): a waiting one makes the daemon meet the error, not just a dead idle
    connection that the pool's pre-ping replaces without a word. (Sampling
    pg_stat_activity for a busy backend raced the daemon's millisecond statements.)"""
    deadline = time.monotonic() + patience
    with engine.connect() as conn, conn.begin():
        conn.execute(sa.text("LOCK TABLE outbox_events IN ACCESS EXCLUSIVE MODE"))
        waiting = sa.text(
            "SELECT count(*) FROM pg_locks"
            " WHERE NOT granted AND relation = 'outbox_events'::regclass"
        )
        while not (busy := bool(conn.execute(waiting).scalar())):
            if time.monotonic() > deadline:
                break
            time.sleep(0.002)
        pids = conn.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'"
            )
        ).scalars()
        return terminate(conn, list(pids)), busy


def terminate(conn: sa.Connection, pids: list[int]) -> int:
    """Terminate these backends; return how many were."""
    done = [
        conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": p}).scalar() for p in pids
    ]
    return sum(bool(d) for d in done)


def run_until_drained(
    url: str, endpoint: Endpoint, *flags: str
) -> subprocess.CompletedProcess[str]:
    """`run --exit-when-drained` as a subprocess, to its end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(OUTBOX_MA_KEY=KEY, OUTBOX_ENDPOINT_URL=endpoint.url, OUTBOX_DATABASE_URL=url)
    return subprocess.run(
        [sys.executable, "-m", "worker", "run", "--exit-when-drained", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# The listener's connection, while its last statement is still the LISTEN (for a few
# seconds after it connects: then it proves itself alive with a SELECT 1).
LISTENER = "query = 'LISTEN outbox_events'"


# -- 1. SIGKILL at random moments ------------------------------------------------------

LEASE = 2.0
KILL_FLAGS = ("--lease", str(LEASE), "--timeout", "1", "--poll-interval", "0.1")
KILL_FLAGS += ("--concurrency", "8")
KILL_FLAGS += ("--batch-size", "16")
CLAIMABLE = 8 + 16  # the most rows one daemon holds in flight: concurrency + batch size


@dataclass
class KillRun:
    markers: dict[str, int]
    counts: collections.Counter[str]
    bodies: list[Any]
    in_flight_at_kills: list[set[int]]
    statuses: dict[str, int]
    drain: subprocess.CompletedProcess[str]
    logs: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def sigkill_run(
    pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KillRun]:
    """Rounds of: commit events, start a daemon, SIGKILL it after a random delay.
    Then, once the last leases have expired, one run with --exit-when-drained."""
    rounds, per_round = (40, 500) if SOAK else (3, 500)
    rng = random.Random(SEED)
    url = new_pg_database(pg_server)
    engine = engine_for(url)
    endpoint = Endpoint()
    endpoint.default = Reply(delay=0.02)  # requests are on the wire when the kill comes
    logs = tmp_path_factory.mktemp("sigkill")
    markers: dict[str, int] = {}
    in_flight_at_kills: list[set[int]] = []
    daemons: list[DaemonProcess] = []
    try:
        for n in range(rounds):
            markers.update(enqueue(engine, per_round, contacts=64))
            daemon = DaemonProcess(url, endpoint.url, logs / f"round-{n}.log", *KILL_FLAGS)
            daemons.append(daemon)
            time.sleep(rng.uniform(0.3, 2.5))
            daemon.kill()
            in_flight_at_kills.append(ids_with_status(engine, "in_flight"))
        time.sleep(LEASE + 0.5)  # a dead daemon's claims are not due before their lease ends
        before_drain = len(endpoint.requests)
        drain = run_until_drained(url, endpoint, *KILL_FLAGS)
        run = KillRun(
            markers=markers,
            counts=received(endpoint),
            bodies=complete_bodies(endpoint),
            in_flight_at_kills=in_flight_at_kills,
            statuses=status_counts(engine),
            drain=drain,
            logs=[d.log() for d in daemons] + [drain.stderr],
        )
        report(
            "SIGKILL",
            rounds=rounds,
            kills=rounds,
            events=len(markers),
            sent_before_drain=before_drain,
            in_flight_at_kills=sum(map(len, in_flight_at_kills)),
            lost=len(set(markers) - set(run.counts)),
            duplicates=duplicates(run.counts),
            truncated_requests=truncated(endpoint),
            drain_exit=drain.returncode,
        )
        yield run
    finally:
        for daemon in daemons:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
        endpoint.close()
        engine.dispose()


def test_sigkill_at_random_moments_loses_no_committed_event(sigkill_run):
    run = sigkill_run
    assert run.drain.returncode == 0, run.drain.stderr
    lost = sorted(run.markers[m] for m in set(run.markers) - set(run.counts))
    assert lost == [], f"{len(lost)} outbox ids never reached the endpoint: {lost[:20]}"
    assert run.statuses == {"delivered": len(run.markers)}  # none pending, none in_flight


def test_sigkill_resends_only_rows_that_were_in_flight_at_a_kill(sigkill_run):
    run = sigkill_run
    by_id = {i: m for m, i in run.markers.items()}
    resent = {run.markers[m] for m, n in run.counts.items() if n > 1}
    in_flight = set().union(*run.in_flight_at_kills)
    assert resent <= in_flight, sorted(by_id[i] for i in resent - in_flight)[:20]
    # Each row is resent at most once per kill it was in flight at.
    for marker, n in run.counts.items():
        kills_in_flight = sum(run.markers[marker] in ids for ids in run.in_flight_at_kills)
        assert n - 1 <= kills_in_flight, (marker, n, kills_in_flight)
    assert duplicates(run.counts) <= sum(map(len, run.in_flight_at_kills))
    assert duplicates(run.counts) <= CLAIMABLE * len(run.in_flight_at_kills)


def test_sigkill_rounds_keep_each_contacts_events_in_id_order(sigkill_run):
    run = sigkill_run
    sent: dict[str, list[int]] = collections.defaultdict(list)
    for body in run.bodies:
        sent[body["email"]].append(run.markers[body["eventdata"]["id"]])
    # Resends repeat an id, but an id never arrives after a newer one of its contact.
    out_of_order = {c: ids for c, ids in sent.items() if ids != sorted(ids)}
    assert out_of_order == {}, next(iter(out_of_order.items()), None)


def test_sigkilled_daemons_and_the_drain_log_no_traceback(sigkill_run):
    for log in sigkill_run.logs:
        assert "Traceback" not in log, log


def test_expired_leases_are_taken_back_by_another_daemon_without_an_operator(
    pg_url, endpoint, spawn
):
    engine = engine_for(pg_url)
    lease = 3.0
    flags = ("--lease", str(lease), "--timeout", "1", "--poll-interval", "0.1")
    endpoint.default = Reply(delay=30)  # the first daemon's requests do not come back
    endpoint.script("crash_test", Reply())  # but the first: slow start opens up after it
    warm_up = enqueue(engine, 1)
    markers = enqueue(engine, 4)
    first = spawn(pg_url, endpoint.url, *flags)
    wait_until(lambda: len(endpoint.requests) >= 5, 20, "the first daemon's requests")
    # The warm-up's outcome is written within RECORD_WITHIN of its answer; a daemon
    # killed before that would leave it to lease rescue too.
    wait_until(
        lambda: ids_with_status(engine, "delivered") == set(warm_up.values()),
        5,
        "the warm-up's outcome written",
    )
    first.kill()
    with engine.connect() as conn:
        held = conn.execute(
            sa.text(
                "SELECT id, lease_token, lease_expires_at FROM outbox_events"
                " WHERE status = 'in_flight' ORDER BY id"
            )
        ).all()
    assert {r.id for r in held} == set(markers.values())
    assert all(r.lease_token.split(":")[1] == str(first.pid) for r in held)
    endpoint.default = Reply()
    second = spawn(pg_url, endpoint.url, *flags)
    wait_until(all_delivered(engine, 5), 4 * lease + 10, "the second daemon to deliver")
    assert second.stop() == 0
    with engine.connect() as conn:
        delivered = dict(conn.execute(sa.text("SELECT id, delivered_at FROM outbox_events")).all())
    expired = {r.id: r.lease_expires_at for r in held}
    early = {i: (delivered[i], expired[i]) for i in expired if delivered[i] < expired[i]}
    assert early == {}, "a row was taken back before its lease expired"
    assert received(endpoint) == {**dict.fromkeys(warm_up, 1), **dict.fromkeys(markers, 2)}
    assert "took back 4 rows whose claim expired" in second.log()
    report("lease takeover", events=4, lease_s=lease, lost=0, duplicates=4)
    engine.dispose()


# -- 2. PostgreSQL goes away ------------------------------------------------------------


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test alone: it is stopped and started mid-test."""
    server = PostgresServer().start()
    yield server
    server.destroy()


def migrated_database(server: PostgresServer) -> str:
    admin = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text("CREATE DATABASE outbox_fault"))
    admin.dispose()
    url = server.url("outbox_fault")
    engine = db.create_engine(url)
    db.migrate(engine)
    engine.dispose()
    return url


OUTAGE_FLAGS = ("--lease", "30", "--poll-interval", "0.1", "--concurrency", "4")
OUTAGE_FLAGS += ("--batch-size", "8")


def test_postgresql_stopped_mid_run_daemon_waits_reconnects_and_delivers_all(
    own_pg, endpoint, spawn
):
    outage = 10.0 if SOAK else 3.0
    url = migrated_database(own_pg)
    engine = engine_for(url)
    endpoint.default = Reply(delay=0.01)
    markers = enqueue(engine, 600)
    daemon = spawn(url, endpoint.url, *OUTAGE_FLAGS)
    wait_until(lambda: len(endpoint.requests) >= 100, 30, "delivery to be under way")
    own_pg.stop("fast")
    stopped = time.monotonic()
    sent_at_stop = len(endpoint.requests)
    time.sleep(outage)
    own_pg.start()
    down = time.monotonic() - stopped
    engine.dispose()
    markers.update(enqueue(engine, 600))  # written after the restart
    wait_until(all_delivered(engine, len(markers)), 90, "every event to be delivered")
    assert daemon.proc.poll() is None, "the daemon exited instead of waiting"
    assert daemon.stop() == 0
    log = daemon.log()
    counts = received(endpoint)
    warnings = warning_lines(log)
    report(
        "PostgreSQL stopped",
        outage_s=round(down, 1),
        events=len(markers),
        sent_before_stop=sent_at_stop,
        lost=len(set(markers) - set(counts)),
        duplicates=duplicates(counts),
        warning_lines=len(warnings),
    )
    assert set(counts) == set(markers)
    assert status_counts(engine) == {"delivered": len(markers)}
    assert "database unavailable" in log
    assert "Traceback" not in log, log
    # One line per retry, backing off: no storm (exponential waits, a maintenance
    # line per round, the listener once).
    assert len(warnings) <= 8 + int(down), "\n".join(warnings)
    # Only rows held at the stop may go out twice.
    assert duplicates(counts) <= 4 + 8
    engine.dispose()


def test_terminating_every_daemon_connection_mid_run_loses_nothing(pg_url, endpoint, spawn):
    kills = 12 if SOAK else 3
    per_kill = 400
    engine = engine_for(pg_url)
    endpoint.default = Reply(delay=0.01)
    markers = enqueue(engine, per_kill * (kills + 1))
    daemon = spawn(pg_url, endpoint.url, *OUTAGE_FLAGS)
    terminated = mid_statement = 0
    for k in range(1, kills + 1):
        wait_until(
            lambda k=k: len(endpoint.requests) >= k * per_kill,
            60,
            f"delivery to go on after termination {k - 1}",
        )
        count, busy = terminate_mid_statement(engine)
        terminated += count
        mid_statement += busy
    wait_until(all_delivered(engine, len(markers)), 90, "every event to be delivered")
    assert daemon.proc.poll() is None, "the daemon exited instead of reconnecting"
    assert daemon.stop() == 0
    log = daemon.log()
    counts = received(endpoint)
    warnings = warning_lines(log)
    report(
        "pg_terminate_backend (all daemon connections)",
        terminations=kills,
        backends_terminated=terminated,
        mid_statement=mid_statement,
        events=len(markers),
        lost=len(set(markers) - set(counts)),
        duplicates=duplicates(counts),
        warning_lines=len(warnings),
    )
    assert terminated >= kills  # each round really killed something
    assert mid_statement >= 1
    # The daemon met the error (its loop or its maintenance), not only a dead idle
    # connection replaced by the pool's pre-ping.
    assert "database unavailable" in log or "maintenance skipped a round" in log, log
    assert set(counts) == set(markers)
    assert status_counts(engine) == {"delivered": len(markers)}
    assert "Traceback" not in log, log
    assert len(warnings) <= 6 * kills, "\n".join(warnings)
    assert duplicates(counts) <= (4 + 8) * kills
    engine.dispose()


def test_killed_listen_connection_comes_back_and_wakes_the_daemon_promptly(pg_url, endpoint, spawn):
    engine = engine_for(pg_url)
    # Polling every 30 s: a delivery within seconds can only come from a wake-up.
    daemon = spawn(pg_url, endpoint.url, "--poll-interval", "30")
    old = wait_until(lambda: backends(engine, LISTENER), 20, "the LISTEN backend")
    assert len(old) == 1, old
    with engine.connect() as conn:
        assert terminate(conn, [old[0].pid]) == 1
    new = wait_until(
        lambda: [b for b in backends(engine, LISTENER) if b.pid != old[0].pid],
        15,
        "a new LISTEN backend",
    )
    assert len(new) == 1, new
    time.sleep(0.5)  # the daemon is idle again, in its 30 s wait
    committed = time.monotonic()
    markers = enqueue(engine, 1)
    wait_until(lambda: endpoint.requests, 5, "the event, woken by NOTIFY")
    latency = endpoint.requests[0].at - committed
    wait_until(all_delivered(engine, 1), 5, "the row to be marked delivered")
    assert daemon.stop() == 0
    log = daemon.log()
    report("LISTEN connection terminated", events=1, wake_latency_s=round(latency, 2), lost=0)
    assert set(received(endpoint)) == set(markers)
    assert latency < 3.0
    assert "wake-ups off" in log
    assert "wake-ups restored" in log
    assert "Traceback" not in log, log
    engine.dispose()


# -- 3. SQLite: the application writes while the daemon delivers ------------------------


def test_sqlite_busy_application_and_daemon_both_progress_and_lose_nothing(
    sqlite_url, endpoint, spawn
):
    threads, transactions = (4, 1500) if SOAK else (4, 150)
    endpoint.default = Reply(delay=0.002)
    daemon = spawn(sqlite_url, endpoint.url, "--poll-interval", "0.05", "--concurrency", "4")
    engine = engine_for(sqlite_url)
    markers: dict[str, int] = {}
    errors: list[BaseException] = []
    commit_seconds: list[float] = []
    lock = threading.Lock()
    wait_until(lambda: "delivering to" in daemon.log(), 20, "the daemon to start")

    def application(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(transactions):
                began = time.monotonic()
                written = enqueue(engine, rng.randint(1, 3))
                with lock:
                    commit_seconds.append(time.monotonic() - began)
                    markers.update(written)
                time.sleep(rng.uniform(0, 0.004))
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=application, args=(SEED + n,)) for n in range(threads)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    writers_done = time.monotonic()
    sent_while_writing = sum(r.at < writers_done for r in endpoint.requests)
    wait_until(all_delivered(engine, len(markers)), 60, "every event to be delivered")
    assert daemon.stop() == 0
    log = daemon.log()
    counts = received(endpoint)
    report(
        "SQLite busy",
        writer_threads=threads,
        transactions=threads * transactions,
        events=len(markers),
        delivered_while_writing=sent_while_writing,
        slowest_commit_s=round(max(commit_seconds), 3),
        lost=len(set(markers) - set(counts)),
        duplicates=duplicates(counts),
    )
    assert errors == []  # no "database is locked" in the application
    assert sent_while_writing > 0  # the daemon progressed while the application wrote
    assert set(counts) == set(markers)
    assert duplicates(counts) == 0
    assert status_counts(engine) == {"delivered": len(markers)}
    assert "database is locked" not in log
    assert "Traceback" not in log, log
    engine.dispose()


# -- 6. Four daemons on one database ---------------------------------------------------


@dataclass
class SharedRun:
    markers: dict[str, int]
    counts: collections.Counter[str]
    per_daemon: dict[int, int]
    exits: list[int]
    statuses: dict[str, int]
    logs: list[str]


@pytest.fixture(scope="module")
def four_daemons(
    pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedRun]:
    """Four daemons started together on one backlog, each until drained."""
    total = 10_000 if SOAK else 1_200
    url = new_pg_database(pg_server)
    engine = engine_for(url)
    endpoint = Endpoint()
    endpoint.default = Reply(delay=0.01)
    logs = tmp_path_factory.mktemp("four")
    markers = enqueue(engine, total)
    flags = ("--exit-when-drained", "--poll-interval", "0.1", "--concurrency", "4")
    daemons = [DaemonProcess(url, endpoint.url, logs / f"daemon-{n}.log", *flags) for n in range(4)]
    try:
        exits = [d.wait(300) for d in daemons]
        texts = [d.log() for d in daemons]
        per_daemon = {}
        for d, text in zip(daemons, texts, strict=True):
            match = re.search(r"drained: nothing is due; (\d+) delivered by this run", text)
            per_daemon[d.pid] = int(match.group(1)) if match else -1
        counts = received(endpoint)
        run = SharedRun(markers, counts, per_daemon, exits, status_counts(engine), texts)
        report(
            "4 daemons, no fault",
            events=total,
            delivered_per_daemon=sorted(per_daemon.values()),
            lost=len(set(markers) - set(counts)),
            duplicates=duplicates(counts),
        )
        yield run
    finally:
        for d in daemons:
            if d.proc.poll() is None:
                d.proc.kill()
        endpoint.close()
        engine.dispose()


def test_four_daemons_deliver_every_event_exactly_once(four_daemons):
    run = four_daemons
    assert run.exits == [0, 0, 0, 0], run.logs
    assert set(run.counts) == set(run.markers)
    assert {m: n for m, n in run.counts.items() if n > 1} == {}
    assert run.statuses == {"delivered": len(run.markers)}


def test_four_daemons_share_the_work(four_daemons):
    run = four_daemons
    assert -1 not in run.per_daemon.values(), run.logs  # each said how many it delivered
    assert sum(run.per_daemon.values()) == len(run.markers)
    assert sum(n > 0 for n in run.per_daemon.values()) >= 2, run.per_daemon


def test_maintenance_lock_is_held_by_one_daemon_at_a_time(pg_url):
    stores = [OutboxStore(engine_for(pg_url)) for _ in range(4)]
    try:
        with contextlib.ExitStack() as stack:
            elected = [stack.enter_context(s.maintenance_lock()) for s in stores]
            assert elected == [True, False, False, False]
        # Released at the end of the round: the next one to ask gets it.
        with stores[3].maintenance_lock() as elected_now:
            assert elected_now is True
            with stores[0].maintenance_lock() as other:
                assert other is False
    finally:
        for s in stores:
            s.engine.dispose()


# -- 7. SIGTERM and SIGINT with slow requests in flight ---------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_with_slow_requests_in_flight_exits_0_and_leaves_nothing_in_flight(
    pg_url, endpoint, spawn, signum
):
    engine = engine_for(pg_url)
    endpoint.default = Reply(delay=2.0)
    flags = ("--poll-interval", "0.1", "--concurrency", "4", "--shutdown-timeout", "1")
    endpoint.script("crash_test", Reply())  # slow start opens up after the first answer
    enqueue(engine, 1)
    daemon = spawn(pg_url, endpoint.url, *flags)
    wait_until(lambda: status_counts(engine) == {"delivered": 1}, 20, "the first answer")
    answered = enqueue(engine, 2)  # sent next: answered within the shutdown timeout
    wait_until(lambda: len(endpoint.requests) >= 3, 20, "the next two requests")
    first_sent = max(r.at for r in endpoint.requests)
    time.sleep(max(0.0, first_sent + 1.4 - time.monotonic()))
    later = enqueue(engine, 6)  # two go on the wire, four wait for a sender
    wait_until(lambda: len(endpoint.requests) >= 5, 5, "two more requests")
    daemon.proc.send_signal(signum)
    signalled = time.monotonic()
    # The setup's timing: the first two answer before the 1 s shutdown timeout ends,
    # the next two after it.
    second_sent = min(r.at for r in endpoint.requests[3:])
    assert first_sent + 2.0 < signalled + 1.0 - 0.2
    assert second_sent + 2.0 > signalled + 1.0 + 0.2, "the machine was too slow for this test"
    code = daemon.wait(15)
    elapsed = time.monotonic() - signalled
    log = daemon.log()
    with engine.connect() as conn:
        rows = {
            r.id: r for r in conn.execute(sa.text("SELECT id, status, attempts FROM outbox_events"))
        }
        attempt_rows = conn.execute(sa.text("SELECT count(*) FROM outbox_attempts")).scalar()
    on_wire = {m for m in received(endpoint) if m in later}
    report(
        f"{signal.Signals(signum).name} with slow requests",
        events=8,
        answered=len(answered),
        unanswered_on_wire=len(on_wire),
        never_sent=6 - len(on_wire),
        exit=code,
        exit_s=round(elapsed, 2),
        lost=0,
    )
    assert code == 0, log
    assert elapsed < 1.0 + 2.0
    assert "Traceback" not in log, log
    assert len(on_wire) == 2
    assert {rows[i].status for i in answered.values()} == {"delivered"}
    assert {(rows[i].status, rows[i].attempts) for i in later.values()} == {("pending", 0)}
    assert attempt_rows == 0
    engine.dispose()


# -- 8. Everything at once: the endpoint's limits and SIGKILLs ---------------------------

# A lease far shorter than the slowest answers and the 429 pauses: only its renewal
# keeps a live daemon's claims; the rate limit makes rows wait their turn too.
STORM_FLAGS = ("--lease", "2", "--timeout", "5", "--poll-interval", "0.1")
STORM_FLAGS += ("--concurrency", "8", "--batch-size", "16", "--rate-limit", "25")
# The rounds run in the first test's time: at 25 requests/s the soak's take minutes.
storm_timeout = pytest.mark.timeout(900 if SOAK else 180)


@dataclass
class StormRun:
    markers: dict[str, int]
    delivered_copies: collections.Counter[str]  # answered 2xx, whole
    in_flight_at_kills: list[set[int]]
    rounds_without_kill: int
    statuses: dict[str, int]
    drain: subprocess.CompletedProcess[str]
    logs: list[str]


@pytest.fixture(scope="module")
def storm_run(
    pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StormRun]:
    """Rounds against an endpoint that answers slowly at times and 429s with
    Retry-After, under --rate-limit: every other round ends in a SIGKILL at a random
    moment, the others run until everything so far is delivered and stop with
    SIGTERM. Then one run with --exit-when-drained."""
    rounds, per_round = (12, 300) if SOAK else (4, 120)
    rng = random.Random(SEED)

    def choose() -> Reply:
        roll = rng.random()
        if roll < 0.03:
            return Reply(429, headers={"Retry-After": "1"})
        if roll < 0.08:
            return Reply(delay=rng.uniform(1.0, 2.5))  # past the lease, within --timeout
        return Reply(delay=rng.uniform(0.0, 0.05))

    url = new_pg_database(pg_server)
    engine = engine_for(url)
    endpoint = Endpoint()
    endpoint.respond = lambda _request: choose()
    logs = tmp_path_factory.mktemp("storm")
    markers: dict[str, int] = {}
    in_flight_at_kills: list[set[int]] = []
    daemons: list[DaemonProcess] = []
    try:
        for n in range(rounds):
            markers.update(enqueue(engine, per_round, contacts=48))
            daemon = DaemonProcess(url, endpoint.url, logs / f"round-{n}.log", *STORM_FLAGS)
            daemons.append(daemon)
            if n % 2 == 0:
                time.sleep(rng.uniform(0.5, 3.0))
                daemon.kill()
                in_flight_at_kills.append(ids_with_status(engine, "in_flight"))
            else:
                wait_until(all_delivered(engine, len(markers)), 300, f"round {n} to deliver")
                assert daemon.stop() == 0, daemon.log()
        time.sleep(2.5)  # the last kill's claims are not due before their lease ends
        drain = run_until_drained(url, endpoint, *STORM_FLAGS)
        copies = delivered(endpoint)
        run = StormRun(
            markers=markers,
            delivered_copies=copies,
            in_flight_at_kills=in_flight_at_kills,
            rounds_without_kill=rounds - len(in_flight_at_kills),
            statuses=status_counts(engine),
            drain=drain,
            logs=[d.log() for d in daemons] + [drain.stderr],
        )
        report(
            "storm (slow answers, 429 pauses, rate limit, SIGKILLs)",
            rounds=rounds,
            kills=len(in_flight_at_kills),
            events=len(markers),
            requests=len(endpoint.requests),
            answered_429=sum(r.status == 429 for r in endpoint.requests),
            in_flight_at_kills=sum(map(len, in_flight_at_kills)),
            lost=len(set(markers) - set(copies)),
            duplicates=duplicates(copies),
            drain_exit=drain.returncode,
        )
        yield run
    finally:
        for daemon in daemons:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
        endpoint.close()
        engine.dispose()


@storm_timeout
def test_storm_loses_no_committed_event(storm_run):
    run = storm_run
    assert run.drain.returncode == 0, run.drain.stderr
    assert set(run.markers) - set(run.delivered_copies) == set()
    assert run.statuses == {"delivered": len(run.markers)}


@storm_timeout
def test_storm_sends_twice_only_rows_that_were_in_flight_at_a_kill(storm_run):
    run = storm_run
    ids = run.markers
    twice = {m: n for m, n in run.delivered_copies.items() if n > 1}
    for marker, copies in twice.items():
        held_at = sum(ids[marker] in held for held in run.in_flight_at_kills)
        assert copies <= 1 + held_at, f"{marker} (id {ids[marker]}) delivered {copies} times"


@storm_timeout
def test_storm_logs_no_traceback(storm_run):
    for log in storm_run.logs:
        assert "Traceback" not in log, log
