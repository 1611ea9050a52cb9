"""The operator's commands, on SQLite and PostgreSQL: worker.admin's selections
and changes against real databases, then the real CLI as a subprocess.

Grouped by what the operator does: select events (one filter, one WHERE
clause), give dates and durations, enqueue from a file, look at events, find
them, cancel them, act on dead letters, prune.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import re
import subprocess
import sys

import pytest
import sqlalchemy as sa

from tests.conftest import KEY, deliver
from tests.endpoint import Endpoint, Reply
from tests.integration.test_cli import (
    FAST_RUN,
    REFUSAL_400,
    assert_one_line_error,
    by_id,
    clean_env,
    cli,
    count,
    events_table,
    execute,
    finished_rows,
    keyed,
    seed,
    three_dead,
    utcnow,
)
from tests.integration.test_store import (
    add,
    attempt_rows,
    claim,
    ids_of,
    make_dead,
    make_delivered,
    row,
    set_row,
)
from worker import db
from worker.admin import EventFilter, InvalidSelection, OutboxAdmin
from worker.backends.sql import contact_key
from worker.policy import Action, Outcome
from worker.schema import outbox_events
from worker.store import Record

UTC = dt.timezone.utc


def utc_seconds(value: dt.datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- worker.admin: one filter, one WHERE clause --------------------------------------


@pytest.fixture
def admin(engine: sa.Engine) -> OutboxAdmin:
    return OutboxAdmin(engine)


def selected(admin: OutboxAdmin, **criteria: object) -> list[int]:
    return sorted(r.id for r in admin.list_events(EventFilter(**criteria), limit=1000).rows)


def test_the_email_filter_is_the_daemons_contact_rule_on_both_backends(engine, admin):
    emails = ["Jane@Example.COM", "jane@example.com", "JÄNE@example.com", "jäne@example.com"]
    ids = add(engine, *emails, "other@example.com")
    assert selected(admin, email="JANE@EXAMPLE.com") == ids[:2]
    # Only ASCII letters fold, as in the per-contact order: Ä and ä are two contacts.
    assert selected(admin, email="jäne@example.com") == [ids[3]]
    with engine.connect() as conn:
        same_contact = conn.execute(
            sa.select(outbox_events.c.id).where(
                contact_key(outbox_events.c.email) == contact_key(sa.literal("jane@example.com"))
            )
        ).scalars()
        assert sorted(same_contact) == ids[:2]


def test_error_contains_ignores_ascii_case_and_takes_like_wildcards_literally(engine, admin):
    a, b, c = add(engine, "a@x.com", "b@x.com", "c@x.com")
    make_dead(engine, a, last_error="HTTP 503 Service Unavailable")
    make_dead(engine, b, last_error="timeout after 10s: 100% lost")
    make_dead(engine, c, last_error="HTTP 400 invalid_parameter")
    assert selected(admin, error_contains="service unavailable") == [a]
    assert selected(admin, error_contains="100%") == [b]
    assert selected(admin, error_contains="invalid_p") == [c]
    assert selected(admin, error_contains="invalid%p") == []


def test_since_and_until_take_timestamps_and_durations_ago(engine, admin):
    old, recent = add(engine, "a@x.com", "b@x.com")
    set_row(engine, old, created_at=utcnow() - dt.timedelta(days=2))
    day = dt.timedelta(days=1)
    assert selected(admin, since=day) == [recent]
    assert selected(admin, until=day) == [old]
    assert selected(admin, since=utcnow() - 3 * day, until=utcnow() - day) == [old]


def test_since_on_dead_letters_can_compare_when_they_failed(engine, admin):
    long_dead, newly_dead = add(engine, "a@x.com", "b@x.com")
    make_dead(engine, long_dead, failed_at=utcnow() - dt.timedelta(days=2))
    make_dead(engine, newly_dead)
    hour = dt.timedelta(hours=1)
    assert selected(admin, status="dead", since=hour, dated_by="failed_at") == [newly_dead]
    assert selected(admin, status="dead", since=hour) == [long_dead, newly_dead]


def test_every_criterion_given_must_hold(engine, admin):
    a, b, c = add(engine, "a@x.com", "a@x.com", "b@x.com", event="x")
    make_dead(engine, [a, c], code=400)
    make_dead(engine, b, code=503)
    assert selected(admin, status="dead", email="a@x.com", status_code=400) == [a]
    assert selected(admin, ids=(a, b, c), status_code=503) == [b]
    assert selected(admin, event="y") == []


def test_lists_are_paged_by_id_newest_first(engine, admin):
    ids = add(engine, *(f"u{n}@x.com" for n in range(5)))
    pages, before = [], None
    while True:
        page = admin.list_events(EventFilter(), limit=2, before_id=before)
        pages.append([r.id for r in page.rows])
        if page.next_before_id is None:
            break
        before = page.next_before_id
    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[:1]]


def test_a_full_last_page_says_there_is_no_next_one(engine, admin):
    add(engine, "a@x.com", "b@x.com")
    assert admin.list_events(EventFilter(), limit=2).next_before_id is None


def test_an_unknown_status_is_refused():
    with pytest.raises(InvalidSelection, match="status"):
        EventFilter(status="retrying")


def test_a_change_needs_a_selection_and_everything_takes_no_filters(admin):
    with pytest.raises(InvalidSelection):
        admin.requeue(EventFilter())
    with pytest.raises(InvalidSelection):
        admin.purge(EventFilter(status_code=400), everything=True)


# -- worker.admin: requeue and purge ---------------------------------------------


def assert_requeued(engine: sa.Engine, event_id: int) -> None:
    r = row(engine, event_id)
    assert r.status == "pending"
    assert r.attempts == 0
    assert r.next_attempt_at <= utcnow() + dt.timedelta(seconds=1)


def test_requeue_by_id_sets_only_those_rows_pending_and_due_now(engine, store, admin):
    a, b, c = add(engine, "a@x.com", "b@x.com", "c@x.com")
    make_dead(engine, [a, b, c])

    assert admin.requeue(EventFilter(ids=(b,))).count == 1

    assert_requeued(engine, b)
    assert [row(engine, i).status for i in (a, c)] == ["dead", "dead"]
    assert ids_of(claim(store)) == [b]


def test_requeue_by_status_code_takes_only_dead_rows_with_that_code(engine, admin):
    a, b, c = add(engine, "a@x.com", "b@x.com", "c@x.com")
    make_dead(engine, [a, c], code=400)
    make_dead(engine, b, code=422)

    assert admin.requeue(EventFilter(status_code=400)).count == 2

    assert_requeued(engine, a)
    assert_requeued(engine, c)
    assert row(engine, b).status == "dead"


def test_requeue_everything_takes_every_dead_row_and_nothing_else(engine, store, admin):
    dead1, dead2, delivered, backoff = add(engine, "a@x.com", "b@x.com", "c@x.com", "d@x.com")
    make_dead(engine, dead1, code=400)
    make_dead(engine, dead2, code=None)
    make_delivered(engine, delivered)
    set_row(engine, backoff, attempts=4, next_attempt_at=utcnow() + dt.timedelta(hours=1))

    assert admin.requeue(EventFilter(), everything=True).count == 2

    assert_requeued(engine, dead1)
    assert_requeued(engine, dead2)
    assert row(engine, delivered).status == "delivered"
    assert row(engine, backoff).attempts == 4
    assert sorted(ids_of(claim(store))) == [dead1, dead2]


def test_ids_left_alone_are_named_with_the_reason(engine, admin):
    dead, pending = add(engine, "a@x.com", "b@x.com")
    make_dead(engine, dead)
    change = admin.requeue(EventFilter(ids=(dead, pending, 999)))
    assert (change.count, change.ids) == (1, [dead])
    assert change.missed == {pending: "pending, not dead", 999: "no such event"}


def test_a_dry_run_changes_nothing_and_says_what_it_would(engine, admin):
    a, b = add(engine, "a@x.com", "b@x.com")
    make_dead(engine, [a, b])
    for change in (
        admin.requeue(EventFilter(), everything=True, dry_run=True),
        admin.purge(EventFilter(), everything=True, dry_run=True),
    ):
        assert (change.count, change.ids) == (2, [b, a])
    assert [row(engine, i).status for i in (a, b)] == ["dead", "dead"]


def test_purge_deletes_dead_rows_and_their_attempts(engine, store, admin):
    dead, retrying = add(engine, "a@x.com", "b@x.com")
    by_id = {c.id: c for c in claim(store)}
    store.record(
        [
            Record(by_id[dead], Outcome(Action.DEAD, 400, "HTTP 400 bad")),
            Record(by_id[retrying], Outcome(Action.RETRY, 503, "HTTP 503", 60.0)),
        ]
    )

    assert admin.purge(EventFilter(), everything=True).count == 1

    assert row(engine, dead) is None
    assert attempt_rows(engine, dead) == []
    assert row(engine, retrying).status == "pending"
    assert len(attempt_rows(engine, retrying)) == 1


def test_purge_by_id_keeps_the_other_dead_rows(engine, admin):
    a, b = add(engine, "a@x.com", "b@x.com")
    make_dead(engine, [a, b])
    assert admin.purge(EventFilter(ids=(a,))).count == 1
    assert row(engine, a) is None
    assert row(engine, b).status == "dead"


def test_purge_never_deletes_rows_that_are_not_dead(engine, admin):
    pending, delivered = add(engine, "a@x.com", "b@x.com")
    make_delivered(engine, delivered)
    assert admin.purge(EventFilter(ids=(pending, delivered))).count == 0
    assert row(engine, pending) is not None
    assert row(engine, delivered) is not None


def test_purge_up_to_an_id_leaves_newer_dead_rows(engine, admin):
    a, b = add(engine, "a@x.com", "b@x.com")
    make_dead(engine, [a, b])
    assert admin.purge(EventFilter(), everything=True, up_to_id=a).count == 1
    assert row(engine, b).status == "dead"


def test_dead_letters_list_the_newest_dead_rows_first(engine, admin):
    a, _, c = add(engine, "a@x.com", "b@x.com", "c@x.com")
    make_dead(engine, [a, c], code=400)
    listed = admin.list_events(EventFilter(status="dead")).rows
    assert [(r.id, r.last_status_code, r.last_error) for r in listed] == [
        (c, 400, "HTTP 400 refused"),
        (a, 400, "HTTP 400 refused"),
    ]


# -- dates and durations in every flag ------------------------------------------------


def test_enqueue_deliver_after_takes_an_iso_timestamp(db_url):
    result = cli(
        db_url,
        "enqueue",
        "--email",
        "a@example.com",
        "--event",
        "x",
        "--deliver-after",
        "2031-05-06T14:30:15+02:00",
    )
    assert result.returncode == 0, result.stderr
    (row,) = by_id(db_url).values()
    assert utc_seconds(row.next_attempt_at) == "2031-05-06 12:30:15"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("-5m", "negative"),
        ("2031-05-06T14:30:15", "offset"),
        ("99999999999d", "too long"),
        ("soon", "90s"),
    ],
)
def test_enqueue_deliver_after_that_is_no_time_exits_2_with_one_line(sqlite_url, value, words):
    # Joined with "=": argparse reads a separate "-5m" as an option.
    result = cli(
        sqlite_url, "enqueue", "--email", "a@b.example", "--event", "x", f"--deliver-after={value}"
    )
    line = assert_one_line_error(result, 2)
    assert "--deliver-after" in line and words in line
    assert count(sqlite_url) == 0


def test_enqueue_file_takes_deliver_after_as_a_timestamp_a_duration_or_seconds(db_url):
    lines = [
        {"email": "a@example.com", "event": "x", "deliver_after": "2031-05-06T14:30:15Z"},
        {"email": "b@example.com", "event": "x", "deliver_after": "2h"},
        {"email": "c@example.com", "event": "x", "deliver_after": 90},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    result = cli(db_url, "enqueue", "--file", "-", input=text)
    assert result.returncode == 0, result.stderr
    a, b, c = by_id(db_url).values()
    assert utc_seconds(a.next_attempt_at) == "2031-05-06 14:30:15"
    assert abs((b.next_attempt_at - b.created_at).total_seconds() - 7200) <= 2
    assert abs((c.next_attempt_at - c.created_at).total_seconds() - 90) <= 2


def test_enqueue_file_with_a_negative_deliver_after_names_the_line_and_field(sqlite_url):
    line = json.dumps({"email": "a@example.com", "event": "x", "deliver_after": "-10m"})
    result = cli(sqlite_url, "enqueue", "--file", "-", input=line + "\n")
    assert result.returncode == 2
    assert "line 1: deliver_after" in result.stderr and "negative" in result.stderr
    assert count(sqlite_url) == 0


# -- enqueue --file: every bad line, then nothing written -------------------------------


def test_enqueue_file_reports_every_bad_line_and_enqueues_nothing(db_url, tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"email": "a@example.com", "event": "one"}\n'
        '{"event": "no_email"}\n'
        '{"email": "c@example.com", "event": "three"}\n'
        '{"email": "d@example.com", "event": \n'
        '{"email": "e@example.com", "event": "x", "deliver_after": "soon"}\n',
        encoding="utf-8",
    )
    result = cli(db_url, "enqueue", "--file", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("line 2: email")
    assert lines[1].startswith("line 4: not valid JSON")
    assert lines[2].startswith("line 5: deliver_after")
    assert lines[3] == "outbox-worker: nothing was enqueued: 3 bad lines (of 5)"
    assert len(lines) == 4 and "Traceback" not in result.stderr
    assert count(db_url) == 0


def test_enqueue_file_shows_the_first_20_bad_lines_and_counts_the_rest(sqlite_url):
    text = "".join(
        '{"event": "no_email"}\n' if n % 2 else '{"email": "a@example.com", "event": "x"}\n'
        for n in range(60)
    )
    result = cli(sqlite_url, "enqueue", "--file", "-", input=text)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:20]] == [f"line {n}" for n in range(2, 41, 2)]
    assert lines[20] == "... and 10 more bad lines"
    assert lines[21] == "outbox-worker: nothing was enqueued: 30 bad lines (of 60)"
    assert count(sqlite_url) == 0


@pytest.mark.parametrize("flag", ["--max-age", "--retain-delivered"])
def test_run_with_a_huge_duration_exits_2_with_one_line(sqlite_url, flag):
    result = cli(sqlite_url, *FAST_RUN, flag, "99999999999d", env=keyed(key=KEY))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]  # after argparse's usage lines
    assert flag in line and "too long" in line


def test_prune_older_than_a_negative_duration_exits_2(sqlite_url):
    line = assert_one_line_error(cli(sqlite_url, "prune", "--older-than=-7d"), 2)
    assert "--older-than" in line and "negative" in line


def test_prune_older_than_a_timestamp_deletes_what_finished_before_it(db_url, endpoint):
    named = finished_rows(db_url, endpoint)
    week_ago = (utcnow() - dt.timedelta(days=7)).isoformat()
    result = cli(db_url, "prune", "--older-than", week_ago, "--include-dead")
    assert result.returncode == 0, result.stderr
    assert f"pruned 2 delivered and dead events finished before {week_ago}" in result.stdout
    assert set(by_id(db_url)) == {named[n] for n in ("new_delivered", "new_dead", "pending")}


# -- events show -------------------------------------------------------------------------

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$")


def failed_twice(url: str, endpoint: Endpoint) -> int:
    """One event answered 503, then 400: dead after two attempts, each recorded."""
    endpoint.script("flaky", Reply(503, b'{"code":"unavailable","message":"down"}'))
    endpoint.script("flaky", Reply(400, REFUSAL_400))
    (event_id,) = seed(
        url,
        endpoint,
        [{"email": "jane@example.com", "event": "flaky", "properties": {"PLAN": "pro"}}],
    )
    # The drained run left it waiting out its backoff: make it due, and run again.
    engine = db.create_engine(url)
    try:
        set_row(engine, event_id, next_attempt_at=utcnow())
        assert deliver(engine, endpoint.url) == 0
    finally:
        engine.dispose()
    assert by_id(url)[event_id].status == "dead"
    return event_id


def test_events_show_prints_the_row_the_exact_body_sent_and_every_attempt(db_url, endpoint):
    event_id = failed_twice(db_url, endpoint)
    result = cli(db_url, "events", "show", str(event_id), env={"OUTBOX_MA_KEY": KEY})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"outbox id {event_id}: dead\n")
    assert "jane@example.com" in out and "flaky" in out
    assert f"  {endpoint.requests[-1].raw.decode()}\n" in out  # the body, byte for byte
    attempts = out.split("attempts:\n", 1)[1].splitlines()[1:]
    assert [line.split()[0] for line in attempts] == ["1", "2"]
    assert "503" in attempts[0] and "400" in attempts[1]
    assert [line.split()[3] for line in attempts] == ["tracker", "tracker"]  # the transport
    assert KEY not in out + result.stderr


def test_events_show_json_has_the_row_the_body_and_the_attempts(db_url, endpoint):
    event_id = failed_twice(db_url, endpoint)
    result = cli(db_url, "events", "show", str(event_id), "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["event"]["id"] == event_id and shown["event"]["status"] == "dead"
    assert shown["event"]["properties"] == {"PLAN": "pro"}
    assert shown["body"] == endpoint.requests[-1].raw.decode()
    assert shown["body_error"] is None
    assert [a["status_code"] for a in shown["attempts"]] == [503, 400]
    assert [a["transport"] for a in shown["attempts"]] == ["tracker", "tracker"]
    assert ISO_UTC.match(shown["event"]["created_at"])
    assert ISO_UTC.match(shown["attempts"][0]["attempted_at"])


def test_events_show_of_a_row_that_cannot_be_sent_says_why(sqlite_url):
    execute(sqlite_url, sa.text("INSERT INTO outbox_events (email, event) VALUES ('nobody', 'x')"))
    result = cli(sqlite_url, "events", "show", "1")
    assert result.returncode == 0, result.stderr
    assert "body: none, it cannot be sent (email: is not an address" in result.stdout


@pytest.mark.parametrize(
    ("transport", "chosen"), [("v3", "flag"), ("v3-batch", "env")], ids=["v3-flag", "v3-batch-env"]
)
def test_events_show_prints_the_body_the_chosen_transport_sends(
    sqlite_url, endpoint, transport, chosen
):
    engine = db.create_engine(sqlite_url)
    (event_id,) = add(engine, "jane@example.com", event="cart_updated", properties={"PLAN": "pro"})
    assert deliver(engine, endpoint.url_for(transport), transport=transport) == 0
    engine.dispose()
    args, env = (
        (["--transport", transport], None)
        if chosen == "flag"
        else ([], {"OUTBOX_TRANSPORT": transport})
    )
    result = cli(sqlite_url, "events", "show", str(event_id), "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    sent = endpoint.requests[-1].raw.decode()
    # A batch request of one event wraps its element: the element is what is shown.
    assert sent == (shown["body"] if transport == "v3" else '{"events":[' + shown["body"] + "]}")
    assert '"event_date":' in shown["body"] and shown["transport"] == transport


def test_events_show_names_the_rule_when_the_chosen_transport_cannot_carry_the_row(sqlite_url):
    execute(
        sqlite_url,
        sa.text("INSERT INTO outbox_events (email, event) VALUES ('a@example.com', 'has space')"),
    )
    tracker = json.loads(cli(sqlite_url, "events", "show", "1", "--json").stdout)
    assert tracker["body"] == '{"email":"a@example.com","event":"has space"}'
    result = cli(sqlite_url, "events", "show", "1", "--transport", "v3")
    assert result.returncode == 0, result.stderr
    assert (
        "body: none, it cannot be sent (invalid event for --transport v3: event: may hold only"
        in result.stdout
    )


def test_events_show_refuses_a_transport_that_does_not_exist(sqlite_url):
    line = assert_one_line_error(cli(sqlite_url, "events", "show", "1", "--transport", "v4"), 2)
    assert "--transport" in line and "tracker, v3, v3-batch" in line


def test_events_show_of_an_unknown_id_exits_1(sqlite_url):
    line = assert_one_line_error(cli(sqlite_url, "events", "show", "999"), 1)
    assert "no event with id 999" in line


# -- events list -------------------------------------------------------------------------


def listed(url: str, *args: str) -> list[int]:
    result = cli(url, "events", "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    return sorted(json.loads(line)["id"] for line in result.stdout.splitlines())


def test_events_list_filters_by_status_event_and_email(db_url, engine):
    a, b, c, d = add(engine, "Jane@Example.com", "jane@example.com", "bob@example.com", "x@y.com")
    set_row(engine, d, event="other")
    make_delivered(engine, b)
    assert listed(db_url) == [a, b, c, d]
    assert listed(db_url, "--status", "pending") == [a, c, d]
    assert listed(db_url, "--event", "other") == [d]
    assert listed(db_url, "--email", "JANE@example.COM") == [a, b]
    assert listed(db_url, "--email", "jane@example.com", "--status", "delivered") == [b]


def test_events_list_since_and_until_take_durations_and_timestamps(db_url, engine):
    old, recent = add(engine, "a@x.com", "b@x.com")
    set_row(engine, old, created_at=utcnow() - dt.timedelta(days=2))
    assert listed(db_url, "--since", "1d") == [recent]
    assert listed(db_url, "--until", "1d") == [old]
    day_ago = (utcnow() - dt.timedelta(days=1)).isoformat()
    assert listed(db_url, "--since", day_ago) == [recent]


def test_events_list_pages_newest_first_and_says_how_to_go_on(db_url, engine):
    ids = add(engine, *(f"u{n}@x.com" for n in range(5)))
    pages, args = [], ["--limit", "2"]
    while True:
        result = cli(db_url, "events", "list", *args)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()
        hint = lines[-1] if lines[-1].startswith("more:") else None
        rows = lines[1 : -1 if hint else None]
        pages.append([int(line.split()[0]) for line in rows])
        if hint is None:
            break
        args = ["--limit", "2", "--before-id", hint.rsplit(" ", 1)[1]]
    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[:1]]


def test_events_list_json_keeps_the_next_page_hint_off_stdout(db_url, engine):
    ids = add(engine, "a@x.com", "b@x.com", "c@x.com")
    result = cli(db_url, "events", "list", "--json", "--limit", "2")
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [ids[2], ids[1]]
    assert f"--before-id {ids[1]}" in result.stderr


@pytest.mark.parametrize("flag", ["--since", "--until"])
def test_events_list_with_a_time_that_is_none_exits_2_with_one_line(sqlite_url, flag):
    line = assert_one_line_error(cli(sqlite_url, "events", "list", flag, "yesterday"), 2)
    assert flag in line and "90s" in line


# -- events cancel -----------------------------------------------------------------------


def claimed(engine: sa.Engine, event_id: int) -> None:
    """As a daemon leaves a row it is sending: in_flight under a lease."""
    set_row(
        engine,
        event_id,
        status="in_flight",
        lease_token="host:1:1",
        lease_expires_at=utcnow() + dt.timedelta(minutes=1),
    )


def test_cancel_makes_pending_and_retrying_events_dead_with_the_reason(db_url, engine):
    pending, retrying, delivered = add(engine, "a@x.com", "b@x.com", "c@x.com")
    set_row(engine, retrying, attempts=2, last_status_code=503, last_error="HTTP 503")
    make_delivered(engine, delivered)
    result = cli(db_url, "events", "cancel", str(pending), str(retrying), "--reason", "duplicate")
    assert result.returncode == 0, result.stderr
    assert f"cancelled 2 pending events: ids {pending}, {retrying}" in result.stdout
    rows = by_id(db_url)
    for id_ in (pending, retrying):
        assert rows[id_].status == "dead"
        assert rows[id_].last_error == "cancelled by operator: duplicate"
        assert rows[id_].last_status_code is None and rows[id_].failed_at is not None
    assert rows[delivered].status == "delivered"


def test_a_cancelled_event_is_never_sent_and_can_be_requeued(db_url, engine, endpoint):
    first, second = add(engine, "jane@example.com", "jane@example.com", event="ordered")
    assert cli(db_url, "events", "cancel", str(first)).returncode == 0
    # The contact's newer event is not held behind the cancelled one.
    assert cli(db_url, *FAST_RUN, env=keyed(endpoint.url)).returncode == 0
    assert len(endpoint.requests) == 1
    assert by_id(db_url)[second].status == "delivered"
    listed_dead = cli(db_url, "dead-letters", "list", "--json").stdout
    assert json.loads(listed_dead)["last_error"] == "cancelled by operator"
    assert cli(db_url, "dead-letters", "requeue", "--id", str(first)).returncode == 0
    assert cli(db_url, *FAST_RUN, env=keyed(endpoint.url)).returncode == 0
    assert by_id(db_url)[first].status == "delivered"


def test_cancel_skips_an_event_in_flight_and_exits_1_when_nothing_else_matched(db_url, engine):
    (sending,) = add(engine, "a@x.com")
    claimed(engine, sending)
    result = cli(db_url, "events", "cancel", str(sending))
    assert result.returncode == 1
    assert f"id {sending} not cancelled: in flight: a daemon is sending it now" in result.stderr
    assert by_id(db_url)[sending].status == "in_flight"


def test_cancel_by_filter_takes_the_pending_ones_and_says_how_many_were_in_flight(db_url, engine):
    a, b, sending, other = add(engine, "a@x.com", "b@x.com", "c@x.com", "d@x.com")
    set_row(engine, [a, b, sending], event="promo")
    claimed(engine, sending)
    result = cli(db_url, "events", "cancel", "--event", "promo")
    assert result.returncode == 0, result.stderr
    assert "cancelled 2 pending events" in result.stdout
    assert "1 matching events are in flight" in result.stderr
    statuses = {i: r.status for i, r in by_id(db_url).items()}
    assert statuses == {a: "dead", b: "dead", sending: "in_flight", other: "pending"}


def test_cancel_dry_run_changes_nothing(db_url, engine):
    a, _b = add(engine, "a@x.com", "b@x.com")
    result = cli(db_url, "events", "cancel", "--email", "a@x.com", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"would cancel 1 pending events: ids {a} (dry run: nothing changed)" in result.stdout
    assert {r.status for r in by_id(db_url).values()} == {"pending"}


@pytest.mark.parametrize("args", [(), ("1", "--event", "x")])
def test_cancel_without_a_selection_or_with_two_kinds_exits_2(db_url, engine, args):
    add(engine, "a@x.com")
    assert_one_line_error(cli(db_url, "events", "cancel", *args), 2)
    assert by_id(db_url)[1].status == "pending"


# -- dead-letters: filters, selectors, confirmation ---------------------------------------


@pytest.mark.parametrize("action", ["requeue", "purge"])
@pytest.mark.parametrize(
    "selectors",
    [("--id", "5", "--all"), ("--all", "--status-code", "400"), ("--id", "5", "--event", "x")],
)
def test_conflicting_selectors_exit_2_and_change_nothing(db_url, engine, action, selectors):
    (dead,) = add(engine, "a@x.com")
    make_dead(engine, dead)
    assert_one_line_error(cli(db_url, "dead-letters", action, *selectors, input=""), 2)
    assert by_id(db_url)[dead].status == "dead"


@pytest.mark.parametrize(("action", "done"), [("requeue", "requeued"), ("purge", "purged")])
def test_ids_that_did_not_match_are_named_and_none_matching_exits_1(db_url, engine, action, done):
    dead, pending = add(engine, "a@x.com", "b@x.com")
    make_dead(engine, dead)
    nothing = cli(db_url, "dead-letters", action, "--id", "999", str(pending), input="")
    assert nothing.returncode == 1
    assert f"id 999 not {done}: no such event" in nothing.stderr
    assert f"id {pending} not {done}: pending, not dead" in nothing.stderr
    assert f"{done} 0 dead events" in nothing.stdout
    some = cli(db_url, "dead-letters", action, "--id", str(dead), "999", input="")
    assert some.returncode == 0, some.stderr
    assert f"{done} 1 dead events: ids {dead}" in some.stdout
    assert f"id 999 not {done}: no such event" in some.stderr


def test_dead_letters_filters_pick_the_same_rows_for_list_requeue_and_purge(db_url, endpoint):
    _ok, a400, b400, c422 = three_dead(db_url, endpoint)
    listing = cli(db_url, "dead-letters", "list", "--json", "--status-code", "422").stdout
    assert [json.loads(line)["id"] for line in listing.splitlines()] == [c422]
    assert listed(db_url, "--status", "dead", "--error-contains", "TRACKER REFUSED") == [a400, b400]
    requeued = cli(db_url, "dead-letters", "requeue", "--email", "A@EXAMPLE.COM")
    assert "requeued 1 dead events" in requeued.stdout, requeued.stderr
    purged = cli(db_url, "dead-letters", "purge", "--error-contains", "cannot PROCESS", input="")
    assert "purged 1 dead events" in purged.stdout, purged.stderr
    rows = by_id(db_url)
    assert (rows[a400].status, rows[b400].status, c422 in rows) == ("pending", "dead", False)


def test_dead_letters_since_compares_when_they_failed(db_url, engine):
    old_event_new_death, long_dead = add(engine, "a@x.com", "b@x.com")
    set_row(engine, old_event_new_death, created_at=utcnow() - dt.timedelta(days=5))
    make_dead(engine, old_event_new_death)
    make_dead(engine, long_dead, failed_at=utcnow() - dt.timedelta(days=2))
    result = cli(db_url, "dead-letters", "list", "--json", "--since", "1d")
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [old_event_new_death]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("dead-letters", "requeue", "--all"), "would requeue 3 dead events"),
        (("dead-letters", "purge", "--all"), "would purge 3 dead events"),
        (("dead-letters", "purge", "--status-code", "400"), "would purge 2 dead events"),
        (("events", "cancel", "--event", "ok"), "would cancel 0 pending events"),
        (("prune", "--older-than", "0s", "--include-dead"), "would prune 4 delivered and dead"),
    ],
)
def test_dry_run_says_what_would_change_and_changes_nothing(db_url, endpoint, args, says):
    three_dead(db_url, endpoint)
    before = events_table(db_url)
    result = cli(db_url, *args, "--dry-run", input="")
    assert result.returncode == 0, result.stderr
    assert says in result.stdout and "dry run: nothing changed" in result.stdout
    assert events_table(db_url) == before


def test_purging_more_than_one_row_off_a_terminal_needs_yes(sqlite_url, endpoint):
    ok, *_dead = three_dead(sqlite_url, endpoint)
    line = assert_one_line_error(cli(sqlite_url, "dead-letters", "purge", "--all", input=""), 2)
    assert "purge 3 dead events" in line and "--yes" in line and "terminal" in line
    assert len(by_id(sqlite_url)) == 4
    result = cli(sqlite_url, "dead-letters", "purge", "--all", "--yes", input="")
    assert result.returncode == 0, result.stderr
    assert sorted(by_id(sqlite_url)) == [ok]


def test_purging_one_row_off_a_terminal_needs_no_yes(sqlite_url, endpoint):
    ok, a400, b400, _c422 = three_dead(sqlite_url, endpoint)
    result = cli(sqlite_url, "dead-letters", "purge", "--status-code", "422", input="")
    assert result.returncode == 0, result.stderr
    assert sorted(by_id(sqlite_url)) == [ok, a400, b400]


@pytest.mark.parametrize(("answer", "left"), [("y", 1), ("n", 4)])
def test_purge_on_a_terminal_asks_first(sqlite_url, endpoint, answer, left):
    three_dead(sqlite_url, endpoint)
    controller, terminal = pty.openpty()
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "dead-letters",
            "purge",
            "--all",
            "--database-url",
            sqlite_url,
        ],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        text=True,
    ) as proc:
        os.close(terminal)
        os.write(controller, f"{answer}\n".encode())
        _out, err = proc.communicate(timeout=60)
    os.close(controller)
    assert "purge 3 dead events? [y/N]" in err
    assert proc.returncode == (0 if answer == "y" else 1), err
    assert len(by_id(sqlite_url)) == left


# -- JSON output ---------------------------------------------------------------------------


def test_json_output_writes_every_timestamp_in_iso_8601_with_t_and_an_offset(db_url, endpoint):
    _ok, *_ = three_dead(db_url, endpoint)
    lines = [
        *cli(db_url, "dead-letters", "list", "--json").stdout.splitlines(),
        *cli(db_url, "events", "list", "--json").stdout.splitlines(),
    ]
    stamps = [v for line in lines for k, v in json.loads(line).items() if k.endswith("_at")]
    assert len(stamps) >= 8
    for stamp in filter(None, stamps):
        assert ISO_UTC.match(stamp), stamp
