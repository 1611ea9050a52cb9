"""Daemons as real subprocesses or on a thread of the test, waiting, and what the
test endpoint saw of them.

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
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

from tests.conftest import KEY, fast_settings
from tests.endpoint import Endpoint, Received, data_of, events_in
from worker import track_events
from worker.daemon import build_daemon
from worker.telemetry import Telemetry, TelemetryServer

_markers = itertools.count(1)


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition` until it is true; return its value, or fail naming `what`."""
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


class RunningDaemon:
    """The real daemon (build_daemon) on a daemon thread of this process.

    It keeps running when drained unless told otherwise (exit_when_drained=True);
    stop() asks it to stop, joins it and returns its exit code, and fails if it
    did not stop or crashed. With serve_telemetry, its telemetry is served on a
    free port: get(path), metric(name).
    """

    def __init__(
        self,
        engine: sa.Engine,
        endpoint_url: str,
        *,
        serve_telemetry: bool = False,
        **overrides: Any,
    ) -> None:
        overrides.setdefault("exit_when_drained", False)
        url = engine.url.render_as_string(hide_password=False)
        settings = fast_settings(url, endpoint_url, **overrides)
        self.telemetry = Telemetry()
        self.server = (
            TelemetryServer(self.telemetry, 0, "127.0.0.1").start() if serve_telemetry else None
        )
        self.daemon = build_daemon(settings, engine=engine, telemetry=self.telemetry)
        self.exit_code: int | None = None
        self.crash: str | None = None
        self.thread = threading.Thread(target=self._run, name="daemon-under-test", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.exit_code = self.daemon.run()
        except BaseException:
            self.crash = traceback.format_exc()

    def get(self, path: str) -> requests.Response:
        assert self.server is not None, "started without serve_telemetry"
        return requests.get(f"http://127.0.0.1:{self.server.port}{path}", timeout=5)

    def metric(self, name: str, labels: str = "") -> float:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(f"{name}{labels} ") or line.startswith(f"{name}{{{labels}}} "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop (again, harmlessly) and join; the exit code."""
        self.daemon.stop()
        self.thread.join(timeout)
        if self.server is not None:
            self.server.stop()
            self.server = None
        assert not self.thread.is_alive(), "the daemon did not stop"
        assert self.crash is None, f"the daemon crashed:\n{self.crash}"
        return self.exit_code


@contextlib.contextmanager
def running(engine: sa.Engine, endpoint_url: str, **overrides: Any) -> Iterator[RunningDaemon]:
    """A RunningDaemon for the block, stopped at its end."""
    daemon = RunningDaemon(engine, endpoint_url, **overrides)
    try:
        yield daemon
    finally:
        daemon.stop()
