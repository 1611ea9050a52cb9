"""Shared fixtures: a real PostgreSQL server, SQLite files, a real HTTP endpoint.

`db_url` runs a test on both backends. Every test gets its own database:
a copy of a migrated template on PostgreSQL, a fresh migrated file on SQLite.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.endpoint import Endpoint
from tests.pgserver import PostgresServer
from worker import db
from worker.config import Settings
from worker.daemon import build_daemon
from worker.policy import RetryBudget
from worker.store import OutboxStore

KEY = "test-ma-key-5f0c2a9e7d"  # the secret the tests look for in every output
REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "tests" / "samples"
SAMPLE_EVENTS = REPO / "worker" / "demo_events.jsonl"
_db_numbers = itertools.count()


class OutsideRepository(OSError):
    """A test opened a file beside the repository, which a user's clone does not have."""


def _refuse_files_beside_the_repository(event: str, args: tuple[Any, ...]) -> None:
    # Only paths in a visible folder next to the repository: Python itself, its
    # packages and the temporary directory may live there too, and stay allowed.
    if event != "open" or not isinstance(args[0], (str, os.PathLike)):
        return
    path = os.path.abspath(os.fspath(args[0]))
    if (
        path.startswith(_BESIDE)
        and not path.startswith(_ALLOWED)
        and not path[len(_BESIDE) :].startswith(".")
    ):
        raise OutsideRepository(
            f"{path} is outside the repository: a clone has nothing beside it;"
            " copy what the test needs under tests/"
        )


_BESIDE = os.path.join(str(REPO.parent), "")
if os.path.join(os.path.abspath(tempfile.gettempdir()), "") == _BESIDE:
    # A clone straight in the temporary directory: the tests' own files go in a
    # hidden folder there, so that the rest of what lies beside it stays refused.
    tempfile.tempdir = os.environ["TMPDIR"] = tempfile.mkdtemp(prefix=".outbox-tests-")
    os.chmod(tempfile.tempdir, 0o1777)  # as the temporary directory is: the server's user too
    atexit.register(shutil.rmtree, tempfile.tempdir, ignore_errors=True)
_ALLOWED = tuple(
    os.path.join(os.path.abspath(root), "")
    for root in (REPO, sys.prefix, sys.base_prefix, tempfile.gettempdir(), *sys.path)
    if root
)
sys.addaudithook(_refuse_files_beside_the_repository)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    engine = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE DATABASE outbox_template"))
    engine.dispose()
    template = db.create_engine(server.url("outbox_template"))
    db.migrate(template)
    template.dispose()
    yield server
    server.destroy()


def new_pg_database(server: PostgresServer, template: str | None = "outbox_template") -> str:
    """A new database: a copy of the migrated template, or empty with template=None."""
    name = f"outbox_test_{next(_db_numbers)}"
    copy = f" TEMPLATE {template}" if template else ""
    engine = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}{copy}"))
    engine.dispose()
    return server.url(name)


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    return new_pg_database(pg_server)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    engine = db.create_engine(url)
    db.migrate(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database never migrated (on SQLite, a file that does not exist yet)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return new_pg_database(request.getfixturevalue("pg_server"), template=None)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = db.create_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: sa.Engine) -> OutboxStore:
    return OutboxStore(engine)


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    server = Endpoint()
    yield server
    server.close()


def fast_settings(db_url: str, endpoint_url: str, **overrides: Any) -> Settings:
    """Settings for a test: short waits, drains and exits."""
    budget = overrides.pop("budget", RetryBudget(backoff_base=0.05, backoff_max=0.2))
    values: dict[str, Any] = {
        "database_url": db_url,
        "endpoint_url": endpoint_url,
        "ma_key": KEY,
        "api_key": KEY,
        "budget": budget,
        "concurrency": 4,
        "batch_size": 20,
        "poll_interval": 0.05,
        "timeout": 2.0,
        "lease": 10.0,
        "halt_probe_interval": 0.2,
        "exit_when_drained": True,
        **overrides,
    }
    return Settings(**values).check()


def deliver(engine: sa.Engine, endpoint_url: str, **overrides: Any) -> int:
    """Run the real daemon in this process until drained; return its exit code."""
    url = engine.url.render_as_string(hide_password=False)
    settings = fast_settings(url, endpoint_url, **overrides)
    return build_daemon(settings, engine=engine).run()


def rows(engine: sa.Engine, sql: str = "SELECT * FROM outbox_events ORDER BY id") -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql)).all()


def run_cli(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m worker ...` as a real subprocess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=full_env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start daemons (`python -m worker run`); whatever still runs at the end is killed."""
    from tests.daemons import DaemonProcess

    started: list[DaemonProcess] = []

    def start(url: str, endpoint_url: str, *flags: str) -> DaemonProcess:
        daemon = DaemonProcess(url, endpoint_url, tmp_path / f"daemon-{len(started)}.log", *flags)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)
