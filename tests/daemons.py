"""Daemons as real subprocesses, and what the test endpoint saw of them.

Every event `enqueue` commits carries a unique marker (its `eventdata.id`), so
what reached the endpoint is read from the bodies it received, not from the
daemon's own word.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.conftest import KEY
from tests.endpoint import Endpoint, Received, data_of, events_in
from worker import track_events

_markers = itertools.count(1)


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def enqueue(engine: sa.Engine, count: int, contacts: int = 1_000_000) -> dict[str, int]:
    """Commit `count` events in one transaction; return {marker: outbox id}."""
    markers = [f"m:{next(_markers)}" for _ in range(count)]
    specs = [
        {
            "email": f"c{int(m[2:]) % contacts}@example.com",
            "event": "crash_test",
            "eventdata": {"id": m},
        }
        for m in markers
    ]
    with engine.begin() as conn:
        ids = track_events(conn, specs)
    return dict(zip(markers, ids, strict=True))


def whole_requests(endpoint: Endpoint) -> list[tuple[Received, Any]]:
    """The requests that reached the endpoint whole, with their bodies. A daemon
    killed while writing a request leaves a truncated one: that is no delivery
    (its row is sent again)."""
    whole = []
    for request in list(endpoint.requests):
        if len(request.raw) != int(request.headers.get("content-length") or -1):
            continue
        with contextlib.suppress(ValueError):
            whole.append((request, json.loads(request.raw)))
    return whole


def complete_bodies(endpoint: Endpoint) -> list[Any]:
    return [body for _, body in whole_requests(endpoint)]


def truncated(endpoint: Endpoint) -> int:
    return len(endpoint.requests) - len(complete_bodies(endpoint))


def received(endpoint: Endpoint) -> collections.Counter[str]:
    """How many times each marker reached the endpoint (in a whole request)."""
    return collections.Counter(
        data_of(event)["id"] for body in complete_bodies(endpoint) for event in events_in(body)
    )


def delivered(endpoint: Endpoint) -> collections.Counter[str]:
    """How many times each marker was answered 2xx (in a whole request)."""
    return collections.Counter(
        data_of(event)["id"]
        for request, body in whole_requests(endpoint)
        if 200 <= request.status < 300
        for event in events_in(body)
    )


def duplicates(counts: collections.Counter[str]) -> int:
    return sum(n - 1 for n in counts.values())


def status_counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(
            conn.execute(
                sa.text("SELECT status, count(*) FROM outbox_events GROUP BY status")
            ).all()
        )


def ids_with_status(engine: sa.Engine, status: str) -> set[int]:
    with engine.connect() as conn:
        return set(
            conn.execute(
                sa.text("SELECT id FROM outbox_events WHERE status = :s"), {"s": status}
            ).scalars()
        )


def all_delivered(engine: sa.Engine, total: int) -> Callable[[], bool]:
    return lambda: status_counts(engine).get("delivered", 0) == total


def warning_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]


class DaemonProcess:
    """`python -m worker run` as a subprocess, its stderr in a file."""

    def __init__(self, url: str, endpoint_url: str, log_path: Path, *flags: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        env.update(OUTBOX_MA_KEY=KEY, OUTBOX_ENDPOINT_URL=endpoint_url, OUTBOX_DATABASE_URL=url)
        env.update(OUTBOX_API_KEY=KEY)  # the v3 transports' key (--transport v3, v3-batch)
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker", "run", *flags],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL; it must still have been running."""
        assert self.proc.poll() is None, f"exited before the kill:\n{self.log()}"
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)
