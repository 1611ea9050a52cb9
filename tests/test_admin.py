"""The operator's commands, on SQLite and PostgreSQL: worker.admin's selections
and changes against real databases, then the real CLI as a subprocess.

Grouped by what the operator does: select events (one filter, one WHERE
clause), give dates and durations, enqueue from a file, look at events, find
them, cancel them, act on dead letters, prune.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
import sqlalchemy as sa

from tests.conftest import KEY
from tests.test_cli import (
    FAST_RUN,
    assert_one_line_error,
    by_id,
    cli,
    count,
    finished_rows,
    keyed,
    utcnow,
)
from tests.test_store import (
    add,
    attempt_rows,
    claim,
    ids_of,
    make_dead,
    make_delivered,
    row,
    set_row,
)
from worker.admin import EventFilter, InvalidSelection, OutboxAdmin
from worker.policy import Action, Outcome
from worker.schema import contact_key, outbox_events
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
    line = assert_one_line_error(result, 2)
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
