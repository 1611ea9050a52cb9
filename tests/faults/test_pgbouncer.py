"""Through PgBouncer in transaction pooling mode, where LISTEN cannot work.

The daemon must still deliver everything (by polling), and say once that
wake-ups are off. PgBouncer is the Debian package; .ci/test installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from tests.conftest import KEY, rows
from tests.daemons import all_delivered, enqueue, ids_with_status, received, wait_until
from tests.endpoint import Reply
from tests.pgserver import PostgresServer, free_port
from worker import db, track_events
from worker.store import OutboxStore

pytestmark = pytest.mark.slow  # a fault module: real crashes, outages, proxies or daemon fleets

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@pytest.fixture
def bouncer(pg_server: PostgresServer, pg_url: str) -> Iterator[str]:
    """A transaction-pooling PgBouncer in front of this test's database; its URL."""
    if not Path(PGBOUNCER).exists():
        pytest.fail("pgbouncer is not installed: run .ci/test (it installs the package)")
    workdir = Path(tempfile.mkdtemp(prefix="outbox-pgbouncer-"))
    port = free_port()
    database = pg_url.rsplit("/", 1)[1]
    (workdir / "pgbouncer.ini").write_text(
        f"""[databases]
{database} = host=127.0.0.1 port={pg_server.port} dbname={database} user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = 10
logfile = {workdir}/pgbouncer.log
pidfile = {workdir}/pgbouncer.pid
"""
    )
    command = [PGBOUNCER, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        shutil.chown(workdir, "postgres", "postgres")
        command = ["runuser", "-u", "postgres", "--", *command]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not (workdir / "pgbouncer.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    process.terminate()
    process.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


def test_through_a_transaction_pooler_wakeups_are_off_and_polling_delivers(bouncer, endpoint):
    engine = db.create_engine(bouncer)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["OUTBOX_MA_KEY"] = KEY
    daemon = subprocess.Popen(
        [sys.executable, "-m", "worker", "run", "--database-url", bouncer,
         "--endpoint-url", endpoint.url, "--poll-interval", "0.3"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(daemon.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20  # the listener checks itself within seconds
        while not any("wake-ups off" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        with Session(engine) as session, session.begin():
            track_events(session, [{"email": f"c{i}@example.com", "event": "x"} for i in range(50)])
        deadline = time.monotonic() + 20
        while {r.status for r in rows(engine)} != {"delivered"} and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        daemon.terminate()
        daemon.wait(20)
        reader.join(5)
    log = "".join(lines)
    assert daemon.returncode == 0, log
    assert {r.status for r in rows(engine)} == {"delivered"}
    assert len(endpoint.requests) == 50
    assert log.count("wake-ups off") == 1
    assert "Traceback" not in log
    engine.dispose()


def test_through_a_transaction_pooler_one_store_at_a_time_is_the_maintenance_leader(bouncer):
    # The pooler hands each transaction to any server connection: a session-level
    # lock taken in one transaction is seen as "already mine" by the next client
    # that lands on that server connection, and an unlock may miss it for good.
    stores = [OutboxStore(db.create_engine(bouncer)) for _ in range(2)]
    try:
        for _ in range(3):
            with stores[0].maintenance_lock() as first, stores[1].maintenance_lock() as second:
                assert (first, second) == (True, False)
            with stores[1].maintenance_lock() as later:
                assert later is True
    finally:
        for store in stores:
            store.engine.dispose()


def test_through_a_transaction_pooler_a_killed_daemons_rows_are_taken_back_by_the_other(
    bouncer, endpoint, spawn
):
    engine = db.create_engine(bouncer)
    lease = 3.0
    # Answers take longer than the lease: only its renewal keeps the rows in flight.
    flags = ("--lease", str(lease), "--timeout", "60", "--poll-interval", "0.1")
    endpoint.default = Reply(delay=30)  # the first daemon's requests do not come back
    endpoint.script("crash_test", Reply())  # but the first: slow start opens up after it
    warm_up = enqueue(engine, 1)
    markers = enqueue(engine, 4)
    first = spawn(bouncer, endpoint.url, *flags)
    wait_until(lambda: len(endpoint.requests) >= 5, 20, "the first daemon's requests")
    second = spawn(bouncer, endpoint.url, *flags)
    # Both lead maintenance rounds while the first renews its leases: nothing is taken back.
    wait_until(lambda: "wake-ups off" in second.log(), 20, "the second daemon's polling")
    time.sleep(2 * lease)
    assert ids_with_status(engine, "in_flight") == set(markers.values())
    first.kill()
    endpoint.default = Reply()
    wait_until(
        all_delivered(engine, 5), 4 * lease + 10, "the second daemon to take back and deliver"
    )
    assert second.stop() == 0
    assert received(endpoint) == {**dict.fromkeys(warm_up, 1), **dict.fromkeys(markers, 2)}
    assert "took back 4 rows whose claim expired" in second.log()
    assert "maintenance skipped" not in first.log() + second.log()
    engine.dispose()
