"""The operator's commands through the real CLI, on SQLite and PostgreSQL.

Grouped by what the operator does: give dates and durations, enqueue from a
file, look at events, find them, cancel them, act on dead letters, prune.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest

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

UTC = dt.timezone.utc


def utc_seconds(value: dt.datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


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
