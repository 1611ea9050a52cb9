"""Wake-ups on SQLite: the daemon hears a commit through PRAGMA data_version (worker.wakeup).

A daemon polling every hour must still deliver a committed event: only the
watcher can wake it. How soon is a figure for bench/ (latency), not a test.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import run_cli
from tests.daemons import enqueue, status_counts, wait_until
from worker import db
from worker.backends import Wakeups, backend_for
from worker.wakeup import DataVersionWatcher, Listener

NEVER = "3600"  # --poll-interval: the longest allowed, an hour


def test_a_commit_by_another_connection_wakes_the_watcher(sqlite_url):
    path = sa.make_url(sqlite_url).database
    wake = threading.Event()
    watcher = DataVersionWatcher(path, wake, interval=0.01)
    watcher.start()
    try:
        assert wake.wait(10), "the watcher's first read wakes the daemon once"
        wake.clear()
        with sqlite3.connect(path) as other:
            other.execute("INSERT INTO outbox_events (email, event) VALUES ('a@example.com', 'e')")
        assert wake.wait(10), "a commit by another connection did not wake the watcher"
    finally:
        watcher.stop()
        watcher.join(5)


def test_with_a_rollback_journal_a_commit_still_wakes_the_watcher(sqlite_url):
    path = sa.make_url(sqlite_url).database
    with sqlite3.connect(path) as conn:  # a rollback journal: no WAL index
        assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    wake = threading.Event()
    watcher = DataVersionWatcher(path, wake, interval=0.01)
    watcher.start()
    try:
        assert wake.wait(10)
        wake.clear()
        assert not Path(f"{path}-shm").exists()
        with sqlite3.connect(path) as other:
            other.execute("INSERT INTO outbox_events (email, event) VALUES ('a@example.com', 'e')")
        assert wake.wait(10), "a commit did not wake the watcher"
    finally:
        watcher.stop()
        watcher.join(5)


@pytest.mark.slow  # a daemon subprocess
def test_a_daemon_polling_hourly_on_sqlite_delivers_a_commit(sqlite_url, endpoint, spawn):
    daemon = spawn(sqlite_url, endpoint.url, "--poll-interval", NEVER)
    engine = db.create_engine(sqlite_url)
    try:
        # Started and idle: its heartbeat is in, its first claim found nothing.
        wait_until(
            lambda: "delivering to" in daemon.log() and _heartbeats(engine), 30, "the daemon"
        )
        enqueue(engine, 3)
        wait_until(lambda: status_counts(engine).get("delivered") == 3, 30, "3 delivered")
        enqueue(engine, 2)  # and again, once idle
        wait_until(lambda: status_counts(engine).get("delivered") == 5, 30, "5 delivered")
    finally:
        assert daemon.stop() == 0
        engine.dispose()
    assert "wake-ups off" not in daemon.log()


@pytest.mark.slow  # a daemon subprocess
def test_a_daemon_polling_hourly_on_sqlite_delivers_a_requeued_event(sqlite_url, endpoint, spawn):
    engine = db.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_events (email, event, status, last_error)"
                " VALUES ('dead@example.com', 'e', 'dead', 'oops')"
            )
        )
    daemon = spawn(sqlite_url, endpoint.url, "--poll-interval", NEVER)
    try:
        wait_until(
            lambda: "delivering to" in daemon.log() and _heartbeats(engine), 30, "the daemon"
        )
        done = run_cli("dead-letters", "requeue", "--all", "--database-url", sqlite_url)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: status_counts(engine).get("delivered") == 1, 30, "the requeued event")
    finally:
        assert daemon.stop() == 0
        engine.dispose()


# The lock SQLite holds on a WAL database's -shm file for as long as a process has it
# open (its "DMS" byte, after the eight locks at 120: SQLite's os_unix.c).
_SHM_DMS_BYTE = 128


def _shm_lock_holder(path: str) -> int:
    """The pid holding a lock on the -shm file's DMS byte, as another process sees it; 0: none."""
    fd = os.open(f"{path}-shm", os.O_RDWR)
    try:
        asked = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, _SHM_DMS_BYTE, 1, 0)
        kind, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, asked))
        return 0 if kind == fcntl.F_UNLCK else pid
    finally:
        os.close(fd)


@pytest.mark.slow  # a daemon subprocess
def test_a_sqlite_daemon_keeps_sqlites_lock_on_the_wal_index_while_it_watches(
    sqlite_url, endpoint, spawn
):
    # The first process to open a WAL database while nobody holds that lock resets the
    # -shm file (truncates it) under every process that still maps it. Closing any
    # descriptor of the file outside SQLite drops all of a process's POSIX locks on it:
    # a watcher that opened the file to read its change counter lost the daemon's lock,
    # and the daemon died of SIGBUS when the next program opened the database.
    daemon = spawn(sqlite_url, endpoint.url, "--poll-interval", NEVER)
    path = sa.make_url(sqlite_url).database
    engine = db.create_engine(sqlite_url)
    try:
        wait_until(
            lambda: "delivering to" in daemon.log() and _heartbeats(engine), 30, "the daemon"
        )
        engine.dispose()  # only the daemon has the file open now
        time.sleep(0.3)  # ten looks of its watcher
        assert _shm_lock_holder(path) == daemon.proc.pid
        enqueue(engine, 2)
        engine.dispose()
        wait_until(lambda: status_counts(engine).get("delivered") == 2, 30, "2 delivered")
        assert _shm_lock_holder(path) == daemon.proc.pid
    finally:
        engine.dispose()
        assert daemon.stop() == 0


def wakeups_for(url: str, wake: threading.Event) -> Wakeups | None:
    parsed = sa.make_url(url)
    return backend_for(parsed).wakeups(parsed, wake)


def test_a_watcher_for_a_file_sqlite_url_a_listener_for_postgresql(tmp_path: Path):
    wake = threading.Event()
    assert isinstance(wakeups_for(f"sqlite:///{tmp_path}/x.db", wake), DataVersionWatcher)
    assert isinstance(wakeups_for("postgresql+psycopg://u@h/db", wake), Listener)
    assert wakeups_for("sqlite:///:memory:", wake) is None
    assert wakeups_for("sqlite://", wake) is None


def _heartbeats(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM outbox_daemons")).scalar_one()
