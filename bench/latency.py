"""Commit-to-delivery latency, and what the waiting costs: the worker's CPU per event
at a low rate against full throughput, and idle.

Each figure comes from a real `outbox-worker run` left waiting, while one
producer commits one event per transaction at a steady rate. Latency is each
row's `delivered_at` (the database's clock) minus the moment its commit
returned. CPU is read from /proc for the daemon process (all its threads),
from just before the first commit to the last delivery. The baseline is the
same daemon with its SQLite watcher replaced by nothing (polling every
`--poll-interval`, as before the watcher), measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker import db, track_event
from worker.schema import outbox_events

# The daemon as before the SQLite watcher: only polling wakes it there.
_POLLING_ONLY = (
    "import sys, worker.backends.sqlite as s; s.SQLite.wakeups = lambda self, url, wake, **_: None;"
    " from worker.cli import main; sys.exit(main(sys.argv[1:]))"
)


@dataclass(frozen=True)
class Mode:
    backend: str
    wakeup: str  # what wakes the daemon
    polling_only: bool = False


MODES = [
    Mode("sqlite", "polling every 1 s (before)", polling_only=True),
    Mode("sqlite", "data_version every 30 ms"),
    Mode("postgresql", "LISTEN/NOTIFY"),
]
RATES = {"sqlite": (50, 200), "postgresql": (200, 1000)}


class WaitingDaemon:
    """`outbox-worker run` (defaults) as a subprocess, with its CPU time readable."""

    def __init__(self, url: str, endpoint: str, key: str, polling_only: bool) -> None:
        program = ["-c", _POLLING_ONLY] if polling_only else ["-m", "worker"]
        self.proc = subprocess.Popen(
            [sys.executable, *program, "run", "--log-level", "WARNING",
             "--database-url", url, "--endpoint-url", endpoint],
            env={**os.environ, "OUTBOX_MA_KEY": key},
        )  # fmt: skip
        time.sleep(2.0)  # started, first claim done, idle and waiting

    def cpu_seconds(self) -> float:
        # Fields 14 and 15 of /proc/PID/stat (user and system time, every thread),
        # counted after the command name, which may hold spaces.
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def produce(url: str, rate: int, seconds: float) -> list[tuple[int, float]]:
    """Commit one event at a time at `rate`/s; (id, wall-clock commit time) for each."""
    engine = db.create_engine(url)
    committed: list[tuple[int, float]] = []
    interval = 1.0 / rate
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        with Session(engine) as session, session.begin():
            outbox_id = track_event(session, email=f"p{i}@example.com", event="page_viewed")
        committed.append((outbox_id, time.time()))
    engine.dispose()
    return committed


def delivered_at(url: str, expected: int, timeout: float = 60.0) -> dict[int, float]:
    """Each delivered row's delivery time, once `expected` are delivered (or the timeout)."""
    engine = db.create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as conn:
                found = conn.execute(
                    sa.select(outbox_events.c.id, outbox_events.c.delivered_at).where(
                        outbox_events.c.status == "delivered"
                    )
                ).all()
            if len(found) >= expected or time.monotonic() > deadline:
                return {i: at.timestamp() for i, at in found}
            time.sleep(0.05)
    finally:
        engine.dispose()


def _states(url: str, committed: list[tuple[int, float]], delivered: dict[int, float]) -> str:
    """What the rows not delivered in time are doing, to say why."""
    missing = [i for i, _ in committed if i not in delivered]
    engine = db.create_engine(url)
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(
                outbox_events.c.id, outbox_events.c.status, outbox_events.c.attempts,
                outbox_events.c.last_error,
            ).where(outbox_events.c.id.in_(missing[:5]))
        ).all()  # fmt: skip
    engine.dispose()
    return "; ".join(f"id {r.id} {r.status}, {r.attempts} attempts, {r.last_error}" for r in found)


def _percentile(values: list[float], share: float) -> float:
    return values[max(0, int(len(values) * share) - 1)]


def latency(
    args: argparse.Namespace,
    new_url: Callable[[str], str],
    fill: Callable[[str, int], None],
    endpoint: str,
    key: str,
) -> None:
    """Print the latency table and the CPU table (worker CPU per event, idle CPU)."""
    print("\n## 3. Commit-to-delivery latency with an idle daemon waiting (ms)\n")
    print("| backend | wake-up | offered events/s | p50 | p99 | max | worker CPU ms/event |")
    print("|---|---|---:|---:|---:|---:|---:|")
    cpu_rows = []
    for mode in MODES:
        for rate in RATES[mode.backend]:
            url = new_url(mode.backend)
            daemon = WaitingDaemon(url, endpoint, key, mode.polling_only)
            before = daemon.cpu_seconds()
            # At least 400 events, so that the p99 is not the maximum.
            committed = produce(url, rate, max(args.latency_seconds, 400 / rate))
            delivered = delivered_at(url, len(committed))
            cpu_ms = (daemon.cpu_seconds() - before) * 1000 / len(committed)
            daemon.stop()
            lat = sorted((delivered[i] - t) * 1000 for i, t in committed if i in delivered)
            missing = len(committed) - len(lat)
            note = (
                f" ({missing} undelivered: {_states(url, committed, delivered)})" if missing else ""
            )
            print(
                f"| {mode.backend} | {mode.wakeup} | {rate} | {_percentile(lat, 0.5):.1f}"
                f" | {_percentile(lat, 0.99):.1f} | {lat[-1]:.1f}{note} | {cpu_ms:.2f} |",
                flush=True,
            )
            if rate == 200:
                cpu_rows.append((mode, cpu_ms))
    print(
        "\n| backend | wake-up | idle CPU, % of a core | CPU ms/event: full throughput | at 200/s | ratio |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for mode, at_200 in cpu_rows:
        idle, full = _idle_and_full(args, mode, new_url(mode.backend), fill, endpoint, key)
        print(
            f"| {mode.backend} | {mode.wakeup} | {idle:.2f} | {full:.2f} | {at_200:.2f}"
            f" | {at_200 / full:.2f}x |",
            flush=True,
        )


def _idle_and_full(
    args: argparse.Namespace,
    mode: Mode,
    url: str,
    fill: Callable[[str, int], None],
    endpoint: str,
    key: str,
) -> tuple[float, float]:
    """The waiting daemon's idle CPU (% of a core), then its CPU per event delivering a
    backlog committed at once (full throughput), measured the same way."""
    daemon = WaitingDaemon(url, endpoint, key, mode.polling_only)
    start, before = time.monotonic(), daemon.cpu_seconds()
    time.sleep(args.idle_seconds)
    idle = (daemon.cpu_seconds() - before) / (time.monotonic() - start) * 100
    n = args.full_events
    before = daemon.cpu_seconds()
    fill(url, n)
    delivered_at(url, n)
    full = (daemon.cpu_seconds() - before) * 1000 / n
    daemon.stop()
    return idle, full
