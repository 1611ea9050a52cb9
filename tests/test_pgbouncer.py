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
from tests.pgserver import PostgresServer, free_port
from worker import db, track_events

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
