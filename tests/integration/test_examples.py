"""The examples, run for real: Flask and FastAPI apps through their test clients on
SQLite and PostgreSQL, the plain-SQL example through the real psql, and then the
real daemon delivering what each wrote. Also worker.asyncio, which FastAPI uses.

Expected bodies are written with object keys shortest first: PostgreSQL's jsonb
stores them in that order, so these bodies are byte-exact on both backends.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from fastapi.testclient import TestClient
from flask.testing import FlaskClient
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tests.conftest import REPO, deliver, rows
from tests.endpoint import Endpoint
from tests.pgserver import find_bin_dir, free_port
from worker import InvalidEvent, db
from worker import asyncio as outbox_async

EXAMPLES = REPO / "examples"
ORDER = {"email": "jane@example.com", "product": "Wrist watch", "price": "50.00"}
SIGNUP = {"email": "jane@example.com", "plan": "pro"}


def load_example(name: str) -> ModuleType:
    """Import examples/<name>.py once (examples/ is a folder of scripts, not a package)."""
    module_name = f"outbox_example_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # Flask finds its root path through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def async_url(url: str) -> str:
    """The same database through an async driver: aiosqlite, or psycopg 3's async side."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    return parsed.render_as_string(hide_password=False)


def count(engine: sa.Engine, table: str) -> int:
    return rows(engine, f"SELECT count(*) FROM {table}")[0][0]


# -- Flask + Flask-SQLAlchemy ----------------------------------------------------


@pytest.fixture
def flask_client(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlaskClient]:
    example = load_example("flask_app")
    monkeypatch.setenv("SHOP_DATABASE_URL", db_url)
    app = example.create_app()
    yield app.test_client()
    with app.app_context():
        example.db.engine.dispose()


def test_flask_order_and_its_event_commit_together(
    flask_client: FlaskClient, engine: sa.Engine
) -> None:
    answer = flask_client.post("/orders", json=ORDER)

    assert answer.status_code == 201, answer.get_data(as_text=True)
    order_id, outbox_id = answer.json["order_id"], answer.json["outbox_id"]
    assert rows(engine, "SELECT id, email FROM shop_orders") == [(order_id, ORDER["email"])]
    [event] = rows(engine)
    assert (event.id, event.event, event.status) == (outbox_id, "order_completed", "pending")


def test_flask_declined_payment_leaves_neither_order_nor_event(
    flask_client: FlaskClient, engine: sa.Engine
) -> None:
    answer = flask_client.post("/orders", json={**ORDER, "payment_token": "tok_declined"})

    assert answer.status_code == 402
    assert (count(engine, "shop_orders"), count(engine, "outbox_events")) == (0, 0)


def test_flask_invalid_email_answers_422_and_leaves_no_order(
    flask_client: FlaskClient, engine: sa.Engine
) -> None:
    answer = flask_client.post("/orders", json={**ORDER, "email": "jane at example.com"})

    assert (answer.status_code, answer.json["field"]) == (422, "email")
    assert (count(engine, "shop_orders"), count(engine, "outbox_events")) == (0, 0)


def test_flask_order_event_is_delivered_with_the_exact_body(
    flask_client: FlaskClient, engine: sa.Engine, endpoint: Endpoint
) -> None:
    order_id = flask_client.post("/orders", json={**ORDER, "first_name": "Jane"}).json["order_id"]

    assert deliver(engine, endpoint.url) == 0
    assert [r.raw for r in endpoint.requests] == [
        b'{"email":"jane@example.com","event":"order_completed",'
        b'"properties":{"FIRSTNAME":"Jane"},'
        b'"eventdata":{"id":"order:%d","data":{"price":"50.00","product":"Wrist watch"}}}'
        % order_id
    ]


# -- FastAPI + SQLAlchemy asyncio -------------------------------------------------


@pytest.fixture
def fastapi_client(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("SIGNUPS_DATABASE_URL", async_url(db_url))
    app = load_example("fastapi_app").create_app()
    with TestClient(app) as client:  # runs the lifespan: creates the table, disposes the engine
        yield client


def test_fastapi_signup_and_its_event_commit_together(
    fastapi_client: TestClient, engine: sa.Engine
) -> None:
    answer = fastapi_client.post("/signups", json=SIGNUP)

    assert answer.status_code == 201, answer.text
    assert rows(engine, "SELECT email, plan FROM signups") == [("jane@example.com", "pro")]
    [event] = rows(engine)
    assert (event.id, event.event, event.status) == (
        answer.json()["outbox_id"],
        "signed_up",
        "pending",
    )


def test_fastapi_duplicate_signup_answers_409_and_leaves_no_second_event(
    fastapi_client: TestClient, engine: sa.Engine
) -> None:
    first = fastapi_client.post("/signups", json=SIGNUP)
    second = fastapi_client.post("/signups", json={**SIGNUP, "plan": "free"})

    assert (first.status_code, second.status_code) == (201, 409)
    assert rows(engine, "SELECT id FROM outbox_events") == [(first.json()["outbox_id"],)]
    assert count(engine, "signups") == 1


def test_fastapi_invalid_email_answers_422_and_leaves_no_signup(
    fastapi_client: TestClient, engine: sa.Engine
) -> None:
    answer = fastapi_client.post("/signups", json={**SIGNUP, "email": "jane@localhost"})

    assert (answer.status_code, answer.json()["detail"]["field"]) == (422, "email")
    assert (count(engine, "signups"), count(engine, "outbox_events")) == (0, 0)


def test_fastapi_signup_event_is_delivered_with_the_exact_body(
    fastapi_client: TestClient, engine: sa.Engine, endpoint: Endpoint
) -> None:
    assert fastapi_client.post("/signups", json=SIGNUP).status_code == 201

    assert deliver(engine, endpoint.url) == 0
    assert [r.raw for r in endpoint.requests] == [
        b'{"email":"jane@example.com","event":"signed_up","properties":{"PLAN":"pro"},'
        b'"eventdata":{"id":"signup:jane@example.com","data":{"plan":"pro"}}}'
    ]


# -- plain SQL through psql --------------------------------------------------------


def psql_binary() -> str:
    bundled = find_bin_dir() / "psql"  # the client of the server the tests run
    found = str(bundled) if bundled.exists() else shutil.which("psql")
    assert found, "no psql: install the postgresql-client package"
    return found


def run_plain_sql_example(pg_url: str) -> subprocess.CompletedProcess[str]:
    libpq_url = sa.make_url(pg_url).set(drivername="postgresql")
    return subprocess.run(
        [
            psql_binary(),
            libpq_url.render_as_string(hide_password=False),
            "-X",  # no ~/.psqlrc: the file alone decides what runs
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            str(EXAMPLES / "plain_sql.sql"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_psql_example_commits_the_invoice_and_its_event_and_rolls_back_the_other(
    pg_url: str,
) -> None:
    result = run_plain_sql_example(pg_url)

    assert result.returncode == 0, result.stderr
    engine = db.create_engine(pg_url)
    try:
        assert rows(engine, "SELECT email FROM invoices") == [("jane@example.com",)]
        assert rows(engine, "SELECT email, event, status FROM outbox_events") == [
            ("jane@example.com", "invoice_paid", "pending")
        ]
    finally:
        engine.dispose()


def test_psql_example_event_is_delivered_with_the_exact_body(
    pg_url: str, endpoint: Endpoint
) -> None:
    assert run_plain_sql_example(pg_url).returncode == 0
    engine = db.create_engine(pg_url)
    try:
        [(invoice_id,)] = rows(engine, "SELECT id FROM invoices")
        assert deliver(engine, endpoint.url) == 0
    finally:
        engine.dispose()
    assert [r.raw for r in endpoint.requests] == [
        b'{"email":"jane@example.com","event":"invoice_paid","properties":{"FIRSTNAME":"Jane"},'
        b'"eventdata":{"id":"invoice:%d","data":{"amount":"42.00"}}}' % invoice_id
    ]


# -- worker.asyncio ------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Note(Base):
    """A business row of the test's own, to see what a flush would send."""

    __tablename__ = "test_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]


@pytest.fixture
def async_engine(db_url: str) -> Iterator[AsyncEngine]:
    engine = create_async_engine(async_url(db_url))

    async def create_notes() -> None:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

    asyncio.run(create_notes())
    yield engine
    asyncio.run(engine.dispose())


EVENT: dict[str, Any] = {"email": "jane@example.com", "event": "cart_updated"}


def test_async_session_event_commits_with_the_transaction(
    async_engine: AsyncEngine, engine: sa.Engine
) -> None:
    async def scenario() -> int:
        async with AsyncSession(async_engine) as session, session.begin():
            return await outbox_async.track_event(session, **EVENT)

    outbox_id = asyncio.run(scenario())

    assert rows(engine, "SELECT id, event FROM outbox_events") == [(outbox_id, "cart_updated")]


def test_async_session_rollback_leaves_no_row(async_engine: AsyncEngine, engine: sa.Engine) -> None:
    async def scenario() -> None:
        async with AsyncSession(async_engine) as session:
            await outbox_async.track_event(session, **EVENT)
            await session.rollback()

    asyncio.run(scenario())

    assert count(engine, "outbox_events") == 0


def test_async_connection_event_commits_with_the_transaction(
    async_engine: AsyncEngine, engine: sa.Engine
) -> None:
    async def scenario() -> int:
        async with async_engine.begin() as conn:
            return await outbox_async.track_event(conn, **EVENT)

    outbox_id = asyncio.run(scenario())

    assert rows(engine, "SELECT id FROM outbox_events") == [(outbox_id,)]


def test_async_track_events_returns_ids_in_the_order_given(
    async_engine: AsyncEngine, engine: sa.Engine
) -> None:
    events = [{"email": f"c{n}@example.com", "event": "signed_up"} for n in range(3)]

    async def scenario() -> list[int]:
        async with AsyncSession(async_engine) as session, session.begin():
            return await outbox_async.track_events(session, events)

    ids = asyncio.run(scenario())

    stored = dict(rows(engine, "SELECT id, email FROM outbox_events"))
    assert [stored[i] for i in ids] == [e["email"] for e in events]


def test_async_invalid_event_is_raised_before_any_sql(async_engine: AsyncEngine) -> None:
    sent: list[str] = []
    sa.event.listen(
        async_engine.engine,
        "before_cursor_execute",
        lambda _conn, _cursor, statement, *_: sent.append(statement),
    )

    async def scenario() -> None:
        async with AsyncSession(async_engine) as session, session.begin():
            session.add(Note(text="a flush would INSERT this"))
            await outbox_async.track_event(session, email="not-an-address", event="x")

    with pytest.raises(InvalidEvent) as raised:
        asyncio.run(scenario())

    assert raised.value.field == "email"
    assert sent == []


def test_async_track_event_does_not_flush_the_callers_pending_objects(
    async_engine: AsyncEngine,
) -> None:
    async def scenario() -> bool:
        async with AsyncSession(async_engine) as session, session.begin():
            note = Note(text="still pending")
            session.add(note)
            await outbox_async.track_event(session, **EVENT)
            return note in session.new

    assert asyncio.run(scenario()) is True


def test_async_repeated_idempotency_key_returns_the_first_id(
    async_engine: AsyncEngine, engine: sa.Engine
) -> None:
    async def scenario() -> tuple[int, int]:
        async with AsyncSession(async_engine) as session, session.begin():
            first = await outbox_async.track_event(session, **EVENT, idempotency_key="cart:1")
            again = await outbox_async.track_event(session, **EVENT, idempotency_key="cart:1")
            return first, again

    first, again = asyncio.run(scenario())

    assert first == again
    assert count(engine, "outbox_events") == 1


def test_async_track_event_refuses_a_sync_session(engine: sa.Engine) -> None:
    async def scenario() -> None:
        with Session(engine) as session:
            await outbox_async.track_event(session, **EVENT)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="AsyncSession"):
        asyncio.run(scenario())


# -- examples/README.md: its commands run as printed -------------------------------

README = EXAMPLES / "README.md"
# What the README may call without the project's .venv: the shell and common tools.
SYSTEM_COMMANDS = {"export", "cat", "curl", "psql", "cd", "python3"}


def readme_commands() -> list[str]:
    """Each command of the README's sh blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text("utf-8"), re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    lines = (line.split(" #")[0].strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def programs(command: str) -> list[str]:
    """The programs one line runs: the first word of each `&&` part, past VAR=value words."""
    found = []
    for part in command.split("&&"):
        words = [w for w in shlex.split(part) if not re.match(r"^[A-Z_]+=", w)]
        if words:
            found.append(words[0])
    return found


def test_every_readme_command_is_installed_by_the_readmes_install() -> None:
    venv_bin = Path(sys.prefix) / "bin"
    called = {program for command in readme_commands() for program in programs(command)}
    assert ".venv/bin/uvicorn" in called
    for program in called - SYSTEM_COMMANDS:
        assert program.startswith(".venv/bin/"), f"{program} is not in .venv: call .venv/bin/..."
        assert (venv_bin / program.removeprefix(".venv/bin/")).exists(), program


def test_the_readmes_install_brings_every_extra_it_names() -> None:
    install = next(c for c in readme_commands() if "pip install" in c)
    extras = re.search(r"\.\[([\w,-]+)\]", install)
    assert extras, install
    requires = metadata.requires("outbox-worker") or []
    wanted = [
        req
        for name in extras.group(1).split(",")
        for req in requires
        if re.search(rf"extra == .{name}.", req)
    ]
    assert any(req.startswith("uvicorn") for req in wanted), wanted


@pytest.mark.slow  # a uvicorn subprocess
def test_the_fastapi_example_serves_with_the_readmes_uvicorn_command(tmp_path: Path) -> None:
    # The README's own lines, run from a folder laid out like the repository root.
    (tmp_path / "examples").symlink_to(EXAMPLES)
    (tmp_path / ".venv").symlink_to(sys.prefix)
    commands = readme_commands()
    migrate = next(c for c in commands if "migrate" in c and "signups.db" in c)
    serve = next(c for c in commands if c.startswith(".venv/bin/uvicorn"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "SIGNUPS_"))},
        "SIGNUPS_DATABASE_URL": "sqlite+aiosqlite:///signups.db",
    }
    done = subprocess.run(
        migrate, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    port = free_port()
    server = subprocess.Popen(
        f"exec {serve} --port {port}",
        shell=True,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        answer = post_when_up(f"http://127.0.0.1:{port}/signups", SIGNUP, server)
        assert answer.status_code == 201, answer.text
    finally:
        server.terminate()
        server.communicate(timeout=30)
    engine = db.create_engine(f"sqlite:///{tmp_path / 'signups.db'}")
    try:
        assert [(r.email, r.event) for r in rows(engine)] == [("jane@example.com", "signed_up")]
    finally:
        engine.dispose()


def post_when_up(url: str, body: Any, server: subprocess.Popen[str]) -> requests.Response:
    """POST once the server listens; fail with its output if it exits first."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return requests.post(url, json=body, timeout=10)
        except requests.ConnectionError:
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "the server never listened"
            time.sleep(0.1)
