"""End-to-end tests of `outbox-worker` (`python -m worker`): real subprocesses,
real HTTP, real SQLite files and a real PostgreSQL server, no mocks.

Grouped by command: migrate, configuration errors, enqueue, run, stats,
dead-letters, prune, sink, demo, the daemon under signals, and the ma-key.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tests.conftest import KEY, SAMPLE_EVENTS, deliver, run_cli
from tests.daemons import wait_until
from tests.endpoint import Endpoint, Reply
from tests.pgserver import free_port
from worker import db, track_events
from worker.schema import outbox_events

# A drained run that does not dawdle: short polls and retries.
FAST_RUN = (
    "run",
    "--exit-when-drained",
    "--poll-interval",
    "0.1",
    "--backoff-base",
    "0.05",
    "--backoff-max",
    "0.2",
)
REFUSAL_400 = b'{"code":"invalid_parameter","message":"the tracker refused it"}'
REFUSAL_422 = b'{"code":"unprocessable","message":"cannot process"}'


# -- helpers ---------------------------------------------------------------------


def cli(
    url: str,
    *args: str,
    env: dict[str, str] | None = None,
    input: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`python -m worker ARGS --database-url URL` (the flag: the environment has its own test)."""
    return run_cli(*args, "--database-url", url, env=env, input=input, timeout=timeout)


def keyed(endpoint_url: str | None = None, key: str | None = KEY, **extra: str) -> dict[str, str]:
    env = dict(extra)
    if key is not None:
        env["OUTBOX_MA_KEY"] = key
    if endpoint_url is not None:
        env["OUTBOX_ENDPOINT_URL"] = endpoint_url
    return env


def clean_env(**extra: str) -> dict[str, str]:
    """The environment run_cli gives: no OUTBOX_* variable unless named here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(extra)
    return env


def cli_in(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m worker ARGS` run in `cwd`, with only the OUTBOX_* variables given."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=cwd,
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=60,
    )


def query(url: str, statement: Any) -> list[Any]:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            text = sa.text(statement) if isinstance(statement, str) else statement
            return conn.execute(text).all()
    finally:
        engine.dispose()


def execute(url: str, statement: Any) -> None:
    engine = db.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(statement)
    finally:
        engine.dispose()


def events_table(url: str) -> list[Any]:
    """Every outbox row, its JSON and timestamps decoded, in id order."""
    return query(url, sa.select(outbox_events).order_by(outbox_events.c.id))


def by_id(url: str) -> dict[int, Any]:
    return {r.id: r for r in events_table(url)}


def count(url: str) -> int:
    return query(url, "SELECT count(*) FROM outbox_events")[0][0]


def status_counts(url: str) -> dict[str, int]:
    counts = {s: 0 for s in ("pending", "in_flight", "delivered", "dead")}
    counts.update(dict(query(url, "SELECT status, count(*) FROM outbox_events GROUP BY status")))
    return counts


def seed(url: str, endpoint: Endpoint, specs: list[dict[str, Any]]) -> list[int]:
    """Enqueue events and deliver them once with the real daemon (in this process).

    Events named `refused_400` / `refused_422` are answered 400 / 422 by the endpoint.
    """
    for spec in specs:
        if spec["event"] == "refused_400":
            endpoint.script("refused_400", Reply(400, REFUSAL_400))
        elif spec["event"] == "refused_422":
            endpoint.script("refused_422", Reply(422, REFUSAL_422))
    engine = db.create_engine(url)
    try:
        with Session(engine) as session, session.begin():
            ids = track_events(session, specs)
        assert deliver(engine, endpoint.url) == 0
    finally:
        engine.dispose()
    return ids


def sample_records() -> list[dict[str, Any]]:
    return [json.loads(line) for line in SAMPLE_EVENTS.read_text("utf-8").splitlines() if line]


def as_tuples(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["email"], r["event"], r.get("properties"), r.get("eventdata")) for r in records]


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """Exit `code` with one line on stderr and no traceback; return that line."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# -- migrate -----------------------------------------------------------------------


def test_migrate_creates_the_outbox_schema_on_an_empty_database(empty_url):
    result = run_cli("migrate", "--database-url", empty_url)
    assert result.returncode == 0, result.stderr
    assert "migrated from empty" in result.stdout
    engine = db.create_engine(empty_url)
    try:
        inspector = sa.inspect(engine)
        assert {"outbox_events", "outbox_attempts"} <= set(inspector.get_table_names())
        assert "outbox_dead_letters" in inspector.get_view_names()
    finally:
        engine.dispose()
    assert count(empty_url) == 0


def test_migrate_on_a_migrated_database_changes_nothing(db_url):
    execute(
        db_url, sa.text("INSERT INTO outbox_events (email, event) VALUES ('a@example.com', 'x')")
    )
    again = run_cli("migrate", "--database-url", db_url)
    assert again.returncode == 0, again.stderr
    assert "already at" in again.stdout
    assert [(r.email, r.status) for r in events_table(db_url)] == [("a@example.com", "pending")]
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["stats"],
        ["enqueue", "--email", "a@example.com", "--event", "signed_up"],
        [*FAST_RUN],
    ],
    ids=lambda c: c[0],
)
def test_a_command_on_an_unmigrated_database_exits_1_saying_to_migrate(tmp_path, command):
    url = f"sqlite:///{tmp_path / 'unmigrated.db'}"
    result = cli(url, *command, env=keyed("http://127.0.0.1:9/api/v2/trackEvent"))
    assert "Traceback" not in result.stderr
    assert result.returncode == 1, result.stderr
    assert any("run `outbox-worker migrate`" in line for line in result.stderr.splitlines())


# -- configuration from the environment ------------------------------------------------------


def test_outbox_database_url_from_the_environment_is_used(sqlite_url, tmp_path):
    result = cli_in(
        tmp_path,
        "enqueue",
        "--email",
        "a@example.com",
        "--event",
        "signed_up",
        env={"OUTBOX_DATABASE_URL": sqlite_url},
    )
    assert result.returncode == 0, result.stderr
    assert [(r.email, r.event) for r in events_table(sqlite_url)] == [
        ("a@example.com", "signed_up")
    ]


def test_the_default_database_is_outbox_db_in_the_working_directory(tmp_path):
    result = cli_in(tmp_path, "migrate")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["outbox.db"]
    assert count(f"sqlite:///{tmp_path / 'outbox.db'}") == 0


def test_outbox_endpoint_url_from_the_environment_is_used(sqlite_url, endpoint):
    cli(sqlite_url, "enqueue", "--email", "a@example.com", "--event", "signed_up")
    result = cli(sqlite_url, *FAST_RUN, env=keyed(endpoint.url))
    assert result.returncode == 0, result.stderr
    assert endpoint.events() == [{"email": "a@example.com", "event": "signed_up"}]


# -- configuration errors ----------------------------------------------------------------


def test_run_without_ma_key_exits_2(sqlite_url):
    result = cli(sqlite_url, *FAST_RUN, env=keyed(key=None))
    line = assert_one_line_error(result, 2)
    assert "OUTBOX_MA_KEY" in line


def test_run_with_an_empty_ma_key_exits_2(sqlite_url):
    result = cli(sqlite_url, *FAST_RUN, env=keyed(key=""))
    line = assert_one_line_error(result, 2)
    assert "OUTBOX_MA_KEY" in line


@pytest.mark.parametrize("command", [["stats"], [*FAST_RUN]], ids=lambda c: c[0])
def test_a_malformed_database_url_exits_2(command):
    result = run_cli(*command, "--database-url", "nonsense://", env={"OUTBOX_MA_KEY": KEY})
    line = assert_one_line_error(result, 2)
    assert "database" in line


def test_stats_on_an_unreachable_postgresql_exits_1():
    url = f"postgresql://outbox:secretpw@127.0.0.1:{free_port()}/outbox"
    result = run_cli("stats", "--database-url", url)
    line = assert_one_line_error(result, 1)
    assert "cannot use the database" in line
    assert "secretpw" not in line


def test_run_with_a_missing_ma_key_file_exits_2(sqlite_url, tmp_path):
    missing = tmp_path / "no-such-key"
    result = cli(sqlite_url, *FAST_RUN, "--ma-key-file", str(missing), env=keyed())
    line = assert_one_line_error(result, 2)
    assert "--ma-key-file" in line


def test_run_refuses_plain_http_to_a_remote_host(sqlite_url):
    result = cli(sqlite_url, *FAST_RUN, env=keyed("http://example.com/x"))
    line = assert_one_line_error(result, 2)
    assert "--allow-insecure-endpoint" in line


def test_allow_insecure_endpoint_lifts_the_plain_http_refusal(tmp_path):
    # On an unmigrated database the run stops at the schema check (exit 1)
    # before anything could be sent: proof that the endpoint check passed.
    url = f"sqlite:///{tmp_path / 'unmigrated.db'}"
    result = cli(url, *FAST_RUN, "--allow-insecure-endpoint", env=keyed("http://example.com/x"))
    assert "Traceback" not in result.stderr
    assert result.returncode == 1, result.stderr
    assert "run `outbox-worker migrate`" in result.stderr
    assert "in the clear" not in result.stderr


# -- enqueue ---------------------------------------------------------------------------


def test_enqueue_with_flags_writes_one_row_as_given(db_url):
    result = cli(
        db_url,
        "enqueue",
        "--email",
        "jane@example.com",
        "--event",
        "cart_updated",
        "--properties",
        '{"plan": "pro", "seats": 3}',
        "--eventdata",
        '{"id": "cart:1", "data": {"items": [{"name": "Watch", "price": "50.00"}]}}',
        "--idempotency-key",
        "cart-1-v1",
        "--deliver-after",
        "1h",
    )
    assert result.returncode == 0, result.stderr
    (row,) = events_table(db_url)
    assert result.stdout.strip() == f"enqueued outbox id {row.id}"
    assert (row.email, row.event, row.status, row.attempts) == (
        "jane@example.com",
        "cart_updated",
        "pending",
        0,
    )
    assert row.properties == {"plan": "pro", "seats": 3}
    assert row.eventdata == {
        "id": "cart:1",
        "data": {"items": [{"name": "Watch", "price": "50.00"}]},
    }
    assert row.idempotency_key == "cart-1-v1"
    delay = (row.next_attempt_at - row.created_at).total_seconds()
    assert 3590 <= delay <= 3610


def test_enqueue_file_writes_every_line_in_order(db_url):
    result = cli(db_url, "enqueue", "--file", str(SAMPLE_EVENTS))
    assert result.returncode == 0, result.stderr
    stored = events_table(db_url)
    assert [(r.email, r.event, r.properties, r.eventdata) for r in stored] == as_tuples(
        sample_records()
    )
    assert {r.status for r in stored} == {"pending"}
    assert f"enqueued {len(stored)} events" in result.stdout


def test_enqueue_file_dash_reads_stdin(sqlite_url):
    result = cli(sqlite_url, "enqueue", "--file", "-", input=SAMPLE_EVENTS.read_text("utf-8"))
    assert result.returncode == 0, result.stderr
    stored = events_table(sqlite_url)
    assert [(r.email, r.event, r.properties, r.eventdata) for r in stored] == as_tuples(
        sample_records()
    )


BAD_THIRD_LINES = {
    "bad-json": ('{"email": "c@example.com", "event": ', "JSON"),
    "nan": ('{"email": "c@example.com", "event": "x", "properties": {"n": NaN}}', "properties"),
    "not-an-object": ('["c@example.com", "x"]', "object"),
    "missing-email": ('{"event": "signed_up"}', "email"),
    "reserved-key": (
        '{"email": "c@example.com", "event": "x", "properties": {"email": "d@example.com"}}',
        "properties",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_THIRD_LINES))
def test_enqueue_file_with_a_bad_third_line_exits_2_names_it_and_writes_nothing(
    sqlite_url, tmp_path, kind
):
    bad_line, field = BAD_THIRD_LINES[kind]
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"email": "a@example.com", "event": "one"}\n'
        '{"email": "b@example.com", "event": "two"}\n'
        f"{bad_line}\n"
        '{"email": "d@example.com", "event": "four"}\n',
        encoding="utf-8",
    )
    before = count(sqlite_url)
    result = cli(sqlite_url, "enqueue", "--file", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line, summary = result.stderr.strip().splitlines()
    assert line.startswith("line 3: ")
    assert field in line
    assert summary == "outbox-worker: nothing was enqueued: 1 bad line (of 4)"
    assert count(sqlite_url) == before


# -- run ---------------------------------------------------------------------------------


def test_run_exit_when_drained_delivers_every_event_and_exits_0(db_url, endpoint):
    assert cli(db_url, "enqueue", "--file", str(SAMPLE_EVENTS)).returncode == 0
    result = cli(db_url, *FAST_RUN, env=keyed(endpoint.url), timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert status_counts(db_url)["delivered"] == len(sample_records()) == count(db_url)
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, endpoint.events())) == sorted(map(key, sample_records()))


def test_run_sends_the_ma_key_header(sqlite_url, endpoint):
    cli(sqlite_url, "enqueue", "--email", "a@example.com", "--event", "signed_up")
    assert cli(sqlite_url, *FAST_RUN, env=keyed(endpoint.url)).returncode == 0
    assert [r.headers.get("ma-key") for r in endpoint.requests] == [KEY]


# -- stats -------------------------------------------------------------------------------


def mixed_run(url: str, endpoint: Endpoint, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Through the CLI: three events delivered and one answered 400 (dead)."""
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "".join(
            json.dumps({"email": f"{name}@example.com", "event": event}) + "\n"
            for name, event in [("a", "ok"), ("b", "ok"), ("c", "refused_400"), ("d", "ok")]
        ),
        encoding="utf-8",
    )
    endpoint.script("refused_400", Reply(400, REFUSAL_400))
    assert cli(url, "enqueue", "--file", str(path)).returncode == 0
    return cli(url, *FAST_RUN, env=keyed(endpoint.url))


def test_stats_json_counts_match_the_table_after_a_mixed_run(db_url, endpoint, tmp_path):
    assert mixed_run(db_url, endpoint, tmp_path).returncode == 0
    result = cli(db_url, "stats", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["counts"] == status_counts(db_url)
    assert stats["counts"] == {"pending": 0, "in_flight": 0, "delivered": 3, "dead": 1}
    assert stats["dead_by_status_code"] == {"400": 1}
    assert stats["due"] == 0


def test_stats_text_shows_the_counts_by_status(sqlite_url, endpoint, tmp_path):
    assert mixed_run(sqlite_url, endpoint, tmp_path).returncode == 0
    result = cli(sqlite_url, "stats")
    assert result.returncode == 0, result.stderr
    figures = {
        m.group(1).strip(): m.group(2)
        for m in re.finditer(r"^\s*([a-z_ 0-9]+?)\s{2,}([\d,.]+)", result.stdout, re.M)
    }
    assert figures["delivered"] == "3"
    assert figures["dead"] == "1"
    assert figures["pending"] == "0"
    assert figures["400"] == "1"


# -- dead-letters ---------------------------------------------------------------------------


def test_dead_letters_list_shows_the_dead_row_and_its_reason(sqlite_url, endpoint):
    _ok, dead = seed(
        sqlite_url,
        endpoint,
        [
            {"email": "a@example.com", "event": "ok"},
            {"email": "b@example.com", "event": "refused_400"},
        ],
    )
    result = cli(sqlite_url, "dead-letters", "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2  # the header and the one dead row
    row = lines[1]
    assert row.split()[0] == str(dead)
    assert "b@example.com" in row
    assert "400" in row
    assert "invalid_parameter: the tracker refused it" in row
    assert "a@example.com" not in result.stdout


def test_dead_letters_list_json_lines_parse(db_url, endpoint):
    ids = seed(
        db_url,
        endpoint,
        [
            {"email": "a@example.com", "event": "refused_400"},
            {"email": "b@example.com", "event": "ok"},
            {"email": "c@example.com", "event": "refused_422"},
        ],
    )
    result = cli(db_url, "dead-letters", "list", "--json")
    assert result.returncode == 0, result.stderr
    listed = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(d["id"] for d in listed) == [ids[0], ids[2]]
    by_email = {d["email"]: d for d in listed}
    assert by_email["a@example.com"]["last_status_code"] == 400
    assert "invalid_parameter: the tracker refused it" in by_email["a@example.com"]["last_error"]
    assert by_email["c@example.com"]["last_status_code"] == 422
    assert by_email["c@example.com"]["attempts"] == 1


def three_dead(url: str, endpoint: Endpoint) -> list[int]:
    """One delivered row and three dead ones: 400, 400, 422; dead rows not due for a day."""
    ids = seed(
        url,
        endpoint,
        [
            {"email": "ok@example.com", "event": "ok"},
            {"email": "a@example.com", "event": "refused_400"},
            {"email": "b@example.com", "event": "refused_400"},
            {"email": "c@example.com", "event": "refused_422"},
        ],
    )
    # So that "due now" after a requeue is something the requeue did.
    execute(
        url,
        sa.update(outbox_events)
        .where(outbox_events.c.status == "dead")
        .values(next_attempt_at=utcnow() + dt.timedelta(days=1)),
    )
    return ids


def assert_requeued(row: Any) -> None:
    assert row.status == "pending"
    assert row.attempts == 0
    assert row.next_attempt_at <= utcnow() + dt.timedelta(seconds=1)


def test_requeue_by_id_sets_those_rows_pending_with_a_fresh_budget(sqlite_url, endpoint):
    ok, a400, b400, c422 = three_dead(sqlite_url, endpoint)
    result = cli(sqlite_url, "dead-letters", "requeue", "--id", str(a400))
    assert result.returncode == 0, result.stderr
    assert "requeued 1" in result.stdout
    rows = by_id(sqlite_url)
    assert_requeued(rows[a400])
    assert (rows[b400].status, rows[c422].status, rows[ok].status) == ("dead", "dead", "delivered")


def test_requeue_by_status_code_sets_only_those_rows_pending(db_url, endpoint):
    ok, a400, b400, c422 = three_dead(db_url, endpoint)
    result = cli(db_url, "dead-letters", "requeue", "--status-code", "400")
    assert result.returncode == 0, result.stderr
    rows = by_id(db_url)
    assert_requeued(rows[a400])
    assert_requeued(rows[b400])
    assert (rows[c422].status, rows[ok].status) == ("dead", "delivered")


def test_requeue_all_sets_every_dead_row_pending(sqlite_url, endpoint):
    ok, *dead = three_dead(sqlite_url, endpoint)
    result = cli(sqlite_url, "dead-letters", "requeue", "--all")
    assert result.returncode == 0, result.stderr
    assert "requeued 3" in result.stdout
    rows = by_id(sqlite_url)
    for id_ in dead:
        assert_requeued(rows[id_])
    assert rows[ok].status == "delivered"


def test_requeued_rows_are_delivered_by_the_next_run(sqlite_url, endpoint):
    three_dead(sqlite_url, endpoint)  # the endpoint's refusals are used up: it accepts now
    assert cli(sqlite_url, "dead-letters", "requeue", "--all").returncode == 0
    result = cli(sqlite_url, *FAST_RUN, env=keyed(endpoint.url))
    assert result.returncode == 0, result.stderr
    assert status_counts(sqlite_url) == {"pending": 0, "in_flight": 0, "delivered": 4, "dead": 0}


def test_purge_by_id_deletes_only_that_dead_row(sqlite_url, endpoint):
    ok, a400, b400, c422 = three_dead(sqlite_url, endpoint)
    result = cli(sqlite_url, "dead-letters", "purge", "--id", str(b400))
    assert result.returncode == 0, result.stderr
    assert "purged 1" in result.stdout
    assert sorted(by_id(sqlite_url)) == [ok, a400, c422]


def test_purge_all_deletes_every_dead_row_and_nothing_else(sqlite_url, endpoint):
    ok, *_ = three_dead(sqlite_url, endpoint)
    result = cli(sqlite_url, "dead-letters", "purge", "--all", "--yes")
    assert result.returncode == 0, result.stderr
    assert "purged 3" in result.stdout
    assert sorted(by_id(sqlite_url)) == [ok]


@pytest.mark.parametrize("action", ["requeue", "purge"])
def test_requeue_or_purge_without_a_selection_exits_2(sqlite_url, endpoint, action):
    three_dead(sqlite_url, endpoint)
    before = [(r.id, r.status) for r in events_table(sqlite_url)]
    result = cli(sqlite_url, "dead-letters", action)
    line = assert_one_line_error(result, 2)
    assert "--all" in line
    assert [(r.id, r.status) for r in events_table(sqlite_url)] == before


# -- prune ---------------------------------------------------------------------------------


def finished_rows(url: str, endpoint: Endpoint) -> dict[str, int]:
    """Delivered and dead rows, old and recent, and one pending row."""
    names = ["old_delivered", "new_delivered", "old_dead", "new_dead"]
    ids = seed(
        url,
        endpoint,
        [
            {"email": "a@example.com", "event": "ok"},
            {"email": "b@example.com", "event": "ok"},
            {"email": "c@example.com", "event": "refused_400"},
            {"email": "d@example.com", "event": "refused_400"},
            {"email": "e@example.com", "event": "later", "deliver_after": dt.timedelta(hours=1)},
        ],
    )
    named = dict(zip([*names, "pending"], ids, strict=True))
    month_ago = utcnow() - dt.timedelta(days=30)
    execute(
        url,
        sa.update(outbox_events)
        .where(outbox_events.c.id == named["old_delivered"])
        .values(delivered_at=month_ago, created_at=month_ago),
    )
    execute(
        url,
        sa.update(outbox_events)
        .where(outbox_events.c.id == named["old_dead"])
        .values(failed_at=month_ago, created_at=month_ago),
    )
    return named


def test_prune_deletes_old_delivered_rows_only(db_url, endpoint):
    named = finished_rows(db_url, endpoint)
    result = cli(db_url, "prune", "--older-than", "7d")
    assert result.returncode == 0, result.stderr
    assert "pruned 1 " in result.stdout
    left = set(by_id(db_url))
    assert left == {named[n] for n in ("new_delivered", "old_dead", "new_dead", "pending")}


def test_prune_include_dead_deletes_old_dead_rows_too(sqlite_url, endpoint):
    named = finished_rows(sqlite_url, endpoint)
    result = cli(sqlite_url, "prune", "--older-than", "7d", "--include-dead")
    assert result.returncode == 0, result.stderr
    assert "pruned 2 " in result.stdout
    left = set(by_id(sqlite_url))
    assert left == {named[n] for n in ("new_delivered", "new_dead", "pending")}


# -- sink ---------------------------------------------------------------------------------


def start_sink() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "sink", "--port", "0"],
        env=clean_env(OUTBOX_MA_KEY=KEY),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    match = re.fullmatch(r"sink listening on (http://\S+)\n", first)
    if not match:
        proc.kill()
        raise AssertionError(f"unexpected first line {first!r}: {proc.stderr.read()}")
    return proc, match.group(1)


@pytest.fixture(scope="module")
def sink_url() -> Iterator[str]:
    proc, url = start_sink()
    yield url
    proc.terminate()
    proc.communicate(timeout=10)


def post(url: str, body: Any, key: str | None = KEY) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["ma-key"] = key
    return requests.post(url, data=data, headers=headers, timeout=5)


def test_sink_answers_204_to_a_valid_event(sink_url):
    response = post(
        sink_url,
        {
            "email": "jane@example.com",
            "event": "cart_updated",
            "properties": {"plan": "pro"},
            "eventdata": {"id": "cart:1", "data": {"total": 50}},
        },
    )
    assert response.status_code == 204
    assert response.content == b""


@pytest.mark.parametrize("key", ["wrong-key", None], ids=["wrong-key", "no-key"])
def test_sink_answers_401_unauthorized_to_a_bad_key(sink_url, key):
    response = post(sink_url, {"email": "jane@example.com", "event": "x"}, key=key)
    assert response.status_code == 401
    body = response.json()
    assert body["code"] == "unauthorized"
    assert "message" in body


INVALID_BODIES = {
    "not-json": b"{not json",
    "not-an-object": b'["jane@example.com", "x"]',
    "missing-email": b'{"event": "x"}',
    "missing-event": b'{"email": "jane@example.com"}',
    "bad-email": b'{"email": "not an address", "event": "x"}',
    "empty-event": b'{"email": "jane@example.com", "event": "  "}',
    "reserved-key": b'{"email": "jane@example.com", "event": "x", "properties": {"event": 1}}',
    "properties-not-object": b'{"email": "jane@example.com", "event": "x", "properties": [1]}',
    "eventdata-id-not-string": b'{"email": "jane@example.com", "event": "x", "eventdata": {"id": 7}}',
    "nan": b'{"email": "jane@example.com", "event": "x", "properties": {"n": NaN}}',
}


@pytest.mark.parametrize("kind", list(INVALID_BODIES))
def test_sink_answers_400_with_code_and_message_to_an_invalid_body(sink_url, kind):
    response = post(sink_url, INVALID_BODIES[kind])
    assert response.status_code == 400
    body = response.json()
    assert set(body) >= {"code", "message"}
    assert body["code"] and body["message"]


def test_sink_answers_404_to_another_path(sink_url):
    other = sink_url.replace("/api/v2/trackEvent", "/api/v3/somethingElse")
    response = post(other, {"email": "jane@example.com", "event": "x"})
    assert response.status_code == 404


def test_sink_stops_on_sigterm_with_exit_0():
    proc, url = start_sink()
    assert post(url, {"email": "jane@example.com", "event": "x"}).status_code == 204
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "Traceback" not in stderr


# -- demo ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    cwd = tmp_path_factory.mktemp("demo")
    result = cli_in(cwd, "demo")
    return result, cwd


def test_demo_exits_0_and_prints_the_table_and_the_sql_to_look(demo):
    result, _ = demo
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    table = [line.split() for line in result.stdout.splitlines() if re.match(r"\d+\s", line)]
    assert sum("delivered" in cells for cells in table) == 10
    assert sum("dead" in cells for cells in table) == 2
    assert "SELECT status, count(*) FROM outbox_events" in result.stdout
    assert "outbox_dead_letters" in result.stdout
    assert "-m worker dead-letters list --database-url sqlite:///outbox-demo.db" in result.stdout


def test_demo_leaves_outbox_demo_db_with_10_delivered_and_2_dead(demo):
    result, cwd = demo
    assert result.returncode == 0, result.stderr
    path = cwd / "outbox-demo.db"
    assert path.exists()
    counts = status_counts(f"sqlite:///{path}")
    assert (counts["delivered"], counts["dead"]) == (10, 2)
    assert counts["pending"] == counts["in_flight"] == 0


# -- the daemon under signals ------------------------------------------------------------------


def enqueue_contacts(url: str, n: int) -> None:
    lines = "".join(
        json.dumps({"email": f"c{i}@example.com", "event": "signed_up"}) + "\n" for i in range(n)
    )
    assert cli(url, "enqueue", "--file", "-", input=lines).returncode == 0


def start_daemon(url: str, endpoint_url: str, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "run",
            "--database-url",
            url,
            "--poll-interval",
            "0.1",
            *flags,
        ],
        env=clean_env(**keyed(endpoint_url)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


SIGNALS = pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"]
)


@pytest.mark.slow  # answers take 1.5 s
@pytest.mark.parametrize(
    ("backend", "signum"),
    [("sqlite", signal.SIGTERM), ("postgresql", signal.SIGTERM), ("sqlite", signal.SIGINT)],
    ids=["sqlite-SIGTERM", "postgresql-SIGTERM", "sqlite-SIGINT"],
)
def test_signal_lets_requests_in_flight_finish_records_them_and_exits_0(
    request, endpoint, backend, signum
):
    db_url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    endpoint.default = Reply(delay=1.5)
    enqueue_contacts(db_url, 6)
    proc = start_daemon(db_url, endpoint.url, "--concurrency", "2")
    try:
        # Slow start: the first request goes alone; once it is answered (1.5 s), two go
        # together, and nothing more until one of those is answered 1.5 s later. At
        # the second request the third may be a moment behind it, so wait for three.
        wait_until(lambda: len(endpoint.requests) >= 3, 10, "two requests in flight")
        in_flight = {json.loads(r.raw)["email"] for r in endpoint.requests}
        proc.send_signal(signum)
        signalled = time.monotonic()
        _, stderr = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert time.monotonic() - signalled < 10  # the default --shutdown-timeout
    assert len(endpoint.requests) == len(in_flight)  # nothing new was sent
    rows = events_table(db_url)
    assert {r.email for r in rows if r.status == "delivered"} == in_flight
    assert [r for r in rows if r.status == "in_flight"] == []
    assert {(r.status, r.attempts) for r in rows if r.email not in in_flight} == {("pending", 0)}


@pytest.mark.slow  # answers take 6 s
@SIGNALS
def test_rows_unanswered_by_the_shutdown_timeout_go_back_to_pending_at_once(
    sqlite_url, endpoint, signum
):
    endpoint.default = Reply(delay=6)
    endpoint.script("signed_up", Reply(204))  # slow start: the first goes alone
    enqueue_contacts(sqlite_url, 4)
    proc = start_daemon(sqlite_url, endpoint.url, "--shutdown-timeout", "1")
    try:
        wait_until(lambda: len(endpoint.requests) >= 4, 10, "four requests in flight")
        proc.send_signal(signum)
        signalled = time.monotonic()
        _, stderr = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert time.monotonic() - signalled < 4  # well before the endpoint would answer
    rows = events_table(sqlite_url)[1:]
    assert {(r.status, r.attempts) for r in rows} == {("pending", 0)}
    assert all(r.next_attempt_at <= utcnow() for r in rows)
    assert query(sqlite_url, "SELECT count(*) FROM outbox_attempts")[0][0] == 0


# -- the ma-key never leaks ------------------------------------------------------------------


def test_the_ma_key_appears_in_no_output_and_no_database_row(sqlite_url, endpoint, tmp_path):
    endpoint.script("refused", Reply(400, REFUSAL_400))
    endpoint.script("flaky", Reply(503, b'{"code":"unavailable","message":"try later"}'))
    endpoint.script("halts", Reply(401, b'{"code":"unauthorized","message":"Key not found"}'))
    env = keyed(endpoint.url, OUTBOX_LOG_LEVEL="DEBUG")
    debug = ("--log-level", "DEBUG")
    path = tmp_path / "events.jsonl"
    path.write_text(
        "".join(
            json.dumps({"email": f"{event}@example.com", "event": event}) + "\n"
            for event in ("ok", "refused", "flaky")
        ),
        encoding="utf-8",
    )
    results = [
        cli(sqlite_url, "migrate", *debug, env=env),
        cli(sqlite_url, "enqueue", "--file", str(path), *debug, env=env),
        cli(sqlite_url, *FAST_RUN, *debug, env=env),
        cli(sqlite_url, "enqueue", "--email", "halts@example.com", "--event", "halts", env=env),
        cli(sqlite_url, *FAST_RUN, *debug, env=env),  # 401: delivery halts, exit 1
        cli(sqlite_url, "stats", *debug, env=env),
        cli(sqlite_url, "stats", "--json", env=env),
        cli(sqlite_url, "dead-letters", "list", *debug, env=env),
        cli(sqlite_url, "dead-letters", "list", "--json", env=env),
    ]
    codes = [r.returncode for r in results]
    assert codes == [0, 0, 0, 0, 1, 0, 0, 0, 0], [r.stderr for r in results]
    statuses = [r[0] for r in query(sqlite_url, "SELECT last_status_code FROM outbox_events")]
    assert {400, 401, 204} <= set(statuses)  # the mix really happened
    assert "503" in results[2].stderr
    for result in results:
        assert KEY not in result.stdout
        assert KEY not in result.stderr
    engine = db.create_engine(sqlite_url)
    try:
        tables = sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
    assert {"outbox_events", "outbox_attempts"} <= set(tables)
    for table in tables:
        for row in query(sqlite_url, f"SELECT * FROM {table}"):
            assert KEY not in repr(tuple(row)), (table, row)
