"""Rough edges of the CLI a newcomer hits in the first hour, each through the real CLI."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import requests
import sqlalchemy as sa

from tests.conftest import KEY, run_cli
from tests.integration.test_cli import (
    FAST_RUN,
    assert_one_line_error,
    clean_env,
    cli,
    execute,
    keyed,
    query,
    start_sink,
)
from worker import db


def test_version_prints_the_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("outbox-worker 0.")


def test_a_closed_pipe_ends_a_command_quietly(sqlite_url: str) -> None:
    # `stats --watch | head -1`: the reader goes away while the command still writes.
    ran = subprocess.run(
        f"{sys.executable} -m worker stats --watch --interval 0.05 --database-url {sqlite_url}"
        " | head -1; exit ${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.stdout.count("\n") == 1
    assert ran.stderr == ""
    assert ran.returncode == 0


def test_bogus_log_level_from_the_environment_exits_2_with_a_sentence(sqlite_url: str) -> None:
    result = run_cli("stats", "--database-url", sqlite_url, env={"OUTBOX_LOG_LEVEL": "bogus"})
    assert result.returncode == 2
    assert "OUTBOX_LOG_LEVEL" in result.stderr and "unexpected" not in result.stderr


def test_unknown_log_format_from_the_environment_exits_2(sqlite_url: str) -> None:
    result = run_cli("stats", "--database-url", sqlite_url, env={"OUTBOX_LOG_FORMAT": "xml"})
    assert result.returncode == 2
    assert "OUTBOX_LOG_FORMAT" in result.stderr


def test_purge_by_status_code_works_as_its_help_says(db_url: str) -> None:
    help_text = cli(db_url, "dead-letters", "purge", "--help").stdout
    assert "--status-code" in help_text
    result = cli(db_url, "dead-letters", "purge", "--status-code", "400")
    assert result.returncode == 0, result.stderr
    assert "purged 0" in result.stdout


def test_a_key_shorter_than_8_characters_is_refused_at_start(sqlite_url: str) -> None:
    result = cli(sqlite_url, *FAST_RUN, env={"OUTBOX_MA_KEY": "wor"})
    assert result.returncode == 2
    assert "8 characters" in result.stderr
    assert "wor" not in result.stderr.replace("worker", "")


def test_redaction_replaces_the_key_only_where_it_stands_alone() -> None:
    import logging

    from worker.output import LogFormatter

    formatter = LogFormatter(secrets=["worker-key-1234"])
    record = logging.LogRecord(
        "worker.daemon", logging.INFO, __file__, 1, "key=worker-key-1234 in worker.daemon", (), None
    )
    line = formatter.format(record)
    assert "worker-key-1234" not in line
    assert "worker.daemon: key=[redacted] in worker.daemon" in line


def test_a_get_to_the_sink_answers_405_in_json() -> None:
    proc, url = start_sink()
    try:
        response = requests.get(url, timeout=5)
        assert response.status_code == 405
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["code"] == "method_not_allowed"
        assert response.headers["allow"] == "POST"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_the_sink_has_no_database_url_flag() -> None:
    result = run_cli("sink", "--help")
    assert "--database-url" not in result.stdout


def test_a_repeated_idempotency_key_is_reported_as_already_there(sqlite_url: str) -> None:
    args = ("enqueue", "--email", "a@example.com", "--event", "x", "--idempotency-key", "k1")
    first = cli(sqlite_url, *args)
    second = cli(sqlite_url, *args)
    assert first.stdout.strip() == "enqueued outbox id 1"
    assert second.returncode == 0
    assert "already" in second.stdout and "1" in second.stdout


def test_two_lines_sharing_a_key_count_as_one_event(sqlite_url: str) -> None:
    line = json.dumps({"email": "a@example.com", "event": "x", "idempotency_key": "k"}) + "\n"
    result = cli(sqlite_url, "enqueue", "--file", "-", input=line * 2)
    assert result.returncode == 0, result.stderr
    assert "enqueued 1 event" in result.stdout and "1 already" in result.stdout


def test_the_key_never_appears_in_any_of_these_outputs(sqlite_url: str) -> None:
    result = cli(sqlite_url, *FAST_RUN, env={"OUTBOX_MA_KEY": KEY})
    assert KEY not in result.stdout + result.stderr


# -- configuration errors: exit 2 with one sentence, never "please report it" ---------------

URL_COMMANDS = pytest.mark.parametrize(
    "command",
    [
        ["migrate"],
        ["stats"],
        ["enqueue", "--email", "a@example.com", "--event", "x"],
        ["dead-letters", "list"],
        [*FAST_RUN],
    ],
    ids=lambda c: c[0],
)
# Each URL holds the password "secretpw", which no answer may show.
BAD_URLS = {
    "a driver that is not installed": ("postgresql+asyncpg://u:secretpw@127.0.0.1/db", "driver"),
    "a port that is not a number": ("postgresql://u:secretpw@127.0.0.1:abc/db", "port"),
    "a port out of range": ("postgresql://u:secretpw@127.0.0.1:99999/db", "port"),
    "an unclosed IPv6 bracket": ("postgresql://u:secretpw@[::1/db", "database URL"),
    "no scheme": ("postgresql//u:secretpw@127.0.0.1/db", "database URL"),
}


@URL_COMMANDS
@pytest.mark.parametrize("kind", BAD_URLS)
def test_a_database_url_that_cannot_work_exits_2_naming_what_is_wrong(command, kind) -> None:
    url, named = BAD_URLS[kind]
    result = run_cli(*command, "--database-url", url, env={"OUTBOX_MA_KEY": KEY})
    line = assert_one_line_error(result, 2)
    assert named in line
    assert "secretpw" not in line and "unexpected" not in line


@URL_COMMANDS
def test_a_sqlite_file_in_a_missing_folder_exits_2_naming_the_folder(command, tmp_path) -> None:
    folder = tmp_path / "no-such-folder"
    result = run_cli(
        *command, "--database-url", f"sqlite:///{folder}/outbox.db", env={"OUTBOX_MA_KEY": KEY}
    )
    line = assert_one_line_error(result, 2)
    assert str(folder) in line and "does not exist" in line
    assert not folder.exists()


def test_migrate_on_a_database_newer_than_the_code_exits_2_saying_to_upgrade(db_url) -> None:
    execute(db_url, sa.text("UPDATE outbox_alembic_version SET version_num = '9999_future'"))
    line = assert_one_line_error(cli(db_url, "migrate"), 2)
    assert "9999_future" in line and "newer than this outbox-worker" in line
    assert "upgrade outbox-worker" in line
    assert query(db_url, "SELECT version_num FROM outbox_alembic_version") == [("9999_future",)]


def test_a_key_file_that_is_not_utf8_exits_2_without_showing_it(sqlite_url, tmp_path) -> None:
    key_file = tmp_path / "ma-key"
    key_file.write_bytes(b"\xffsecret-key-\xfe1234")
    result = cli(sqlite_url, *FAST_RUN, "--ma-key-file", str(key_file))
    line = assert_one_line_error(result, 2)
    assert "UTF-8" in line and "--ma-key-file" in line
    assert "secret-key" not in result.stdout + result.stderr


def test_a_key_file_that_cannot_be_read_exits_2(sqlite_url, tmp_path) -> None:
    result = cli(sqlite_url, *FAST_RUN, "--ma-key-file", str(tmp_path))  # a folder
    line = assert_one_line_error(result, 2)
    assert "--ma-key-file" in line


# -- every numeric flag is finite and in its stated range -------------------------------------

OUT_OF_RANGE = {
    "--poll-interval": ["nan", "inf", "0", "-1"],
    "--lease": ["nan", "inf", "-5"],
    "--backoff-base": ["nan", "-inf", "0"],
    "--backoff-max": ["nan", "inf"],
    "--timeout": ["nan", "inf", "0"],
    "--shutdown-timeout": ["nan", "inf", "-1"],
    "--rate-limit": ["nan", "inf", "-1", "1e9"],
    "--concurrency": ["0", "257", "100000"],
    "--batch-size": ["0", "1001"],
    "--max-attempts": ["0", "-3", "1000001"],
    "--max-body-bytes": ["0", "99999999999"],
    "--metrics-port": ["0", "-1", "65536", "99999"],
}


def assert_usage_error_naming(result: subprocess.CompletedProcess[str], flag: str) -> None:
    """Exit 2, and the last line of stderr (argparse's, or our one line) names the flag."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert flag in last and "unexpected" not in last, result.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [(flag, value) for flag, values in OUT_OF_RANGE.items() for value in values],
)
def test_a_numeric_run_flag_that_is_not_finite_or_out_of_range_exits_2(
    flag, value, sqlite_url
) -> None:
    result = cli(sqlite_url, *FAST_RUN, f"{flag}={value}", env={"OUTBOX_MA_KEY": KEY})
    assert_usage_error_naming(result, flag)


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_stats_interval_must_be_finite_and_positive(value, sqlite_url) -> None:
    result = cli(sqlite_url, "stats", "--watch", f"--interval={value}")
    assert_usage_error_naming(result, "--interval")


def test_the_ranges_are_stated_in_run_help() -> None:
    help_text = " ".join(run_cli("run", "--help").stdout.split())
    assert "1 to 256" in help_text  # --concurrency
    assert "1 to 1000" in help_text  # --batch-size
    assert "1 to 65535" in help_text  # --metrics-port


# -- a key that cannot be an HTTP header value is refused at start ----------------------------

UNSENDABLE_KEYS = {
    "cyrillic": "ключ-ключ-ключ",
    "a control character": "abcd\x01efgh1234",
    "a tab": "abcd\tefgh1234",
    "a line break": "abcd\nefgh1234",
}


@pytest.mark.parametrize("kind", UNSENDABLE_KEYS)
def test_a_key_that_cannot_be_a_header_value_is_refused_at_start(kind, sqlite_url) -> None:
    key = UNSENDABLE_KEYS[kind]
    result = cli(sqlite_url, *FAST_RUN, env={"OUTBOX_MA_KEY": key})
    line = assert_one_line_error(result, 2)
    assert "HTTP header" in line
    assert key not in result.stdout + result.stderr
    assert "ключ" not in result.stderr and "efgh" not in result.stderr


def test_a_key_file_whose_key_cannot_be_a_header_value_is_refused(sqlite_url, tmp_path) -> None:
    key_file = tmp_path / "ma-key"
    key_file.write_text("ключ-ключ-ключ\n", encoding="utf-8")
    result = cli(sqlite_url, *FAST_RUN, "--ma-key-file", str(key_file))
    line = assert_one_line_error(result, 2)
    assert "HTTP header" in line and "ключ" not in line


def test_the_sink_refuses_a_key_that_cannot_be_a_header_value() -> None:
    result = run_cli("sink", "--port", "0", env={"OUTBOX_MA_KEY": "ключ-ключ-ключ"}, timeout=20)
    line = assert_one_line_error(result, 2)
    assert "HTTP header" in line and "ключ" not in line


# -- run --help: every option says its default and the variable that sets it ----------------


def help_entries(help_text: str) -> dict[str, str]:
    """Each option of an argparse --help, with the text that follows it."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.split("options:", 1)[1].splitlines():
        match = re.match(r"^  (-[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line[match.end() :]
        elif current:
            entries[current] += " " + line.strip()
    return entries


def test_every_run_option_has_help_with_its_default_and_its_environment_variable() -> None:
    entries = help_entries(run_cli("run", "--help").stdout)
    entries.pop("-h")
    assert len(entries) >= 20
    for option, text in entries.items():
        assert "default" in text, option
        assert "env OUTBOX_" in text, option


def started(result: subprocess.CompletedProcess[str]) -> str:
    """The daemon's start line: what it runs with."""
    return next(line for line in result.stderr.splitlines() if "delivering to" in line)


def test_run_takes_each_flag_from_its_environment_variable(sqlite_url, endpoint) -> None:
    env = keyed(
        endpoint.url,
        OUTBOX_CONCURRENCY="3",
        OUTBOX_BATCH_SIZE="7",
        OUTBOX_RATE_LIMIT="5",
        OUTBOX_EXIT_WHEN_DRAINED="true",  # without it the run would not end
    )
    result = cli(sqlite_url, "run", "--poll-interval", "0.1", env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "concurrency 3, batch 7" in started(result) and "rate limit 5/s" in started(result)


def test_a_flag_wins_over_its_environment_variable(sqlite_url, endpoint) -> None:
    env = keyed(endpoint.url, OUTBOX_CONCURRENCY="3")
    result = cli(sqlite_url, *FAST_RUN, "--concurrency", "2", env=env)
    assert result.returncode == 0, result.stderr
    assert "concurrency 2," in started(result)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OUTBOX_CONCURRENCY", "abc"),
        ("OUTBOX_CONCURRENCY", "0"),
        ("OUTBOX_POLL_INTERVAL", "nan"),
        ("OUTBOX_EXIT_WHEN_DRAINED", "maybe"),
        ("OUTBOX_MAX_AGE", "soon"),
    ],
)
def test_a_bad_value_from_the_environment_exits_2_naming_the_variable(
    variable, value, sqlite_url
) -> None:
    result = cli(sqlite_url, "run", env=keyed(**{variable: value}), timeout=30)
    assert_usage_error_naming(result, variable)


# -- a busy port is one sentence naming it ------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_busy_metrics_port_exits_2_naming_the_port(sqlite_url, busy_port) -> None:
    result = cli(
        sqlite_url,
        *FAST_RUN,
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        str(busy_port),
        env={"OUTBOX_MA_KEY": KEY},
    )
    line = assert_one_line_error(result, 2)
    assert f"port {busy_port}" in line and "already in use" in line and "--metrics-port" in line
    assert "Errno" not in line


def test_a_busy_sink_port_exits_2_naming_the_port(busy_port) -> None:
    result = run_cli("sink", "--port", str(busy_port), env={"OUTBOX_MA_KEY": KEY}, timeout=20)
    line = assert_one_line_error(result, 2)
    assert f"port {busy_port}" in line and "already in use" in line and "--port" in line
    assert "Errno" not in line


@pytest.mark.parametrize("port", ["-1", "65536", "99999"])
def test_a_sink_port_out_of_range_exits_2(port) -> None:
    result = run_cli("sink", f"--port={port}", env={"OUTBOX_MA_KEY": KEY}, timeout=20)
    line = assert_one_line_error(result, 2)
    assert "--port" in line and "0 to 65535" in line


# -- migrate is safe to run concurrently -------------------------------------------------------


def test_three_migrates_started_at_once_all_succeed_and_migrate_once(empty_url) -> None:
    # As in a deploy whose every replica runs `migrate` in its init container.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "worker", "migrate", "--database-url", empty_url],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [(proc.wait(timeout=120), *proc.communicate()) for proc in procs]
    assert [code for code, _, _ in results] == [0, 0, 0], results
    outputs = sorted(out for _, out, _ in results)
    assert sum("migrated from empty" in out for out in outputs) == 1, outputs
    assert sum("already at" in out for out in outputs) == 2, outputs
    current, head = schema_revision_of(empty_url)
    assert current == head
    engine = db.create_engine(empty_url)
    try:
        assert {"outbox_events", "outbox_attempts"} <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def schema_revision_of(url: str) -> tuple[str | None, str]:
    engine = db.create_engine(url)
    try:
        return db.schema_revision(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("flag", ["--max-age", "--retain-delivered"])
def test_a_duration_longer_than_any_can_be_exits_2(flag, sqlite_url) -> None:
    result = cli(sqlite_url, *FAST_RUN, f"{flag}=99999999999d", env={"OUTBOX_MA_KEY": KEY})
    assert_usage_error_naming(result, flag)


SECRET_ON_COMMAND_LINE = "s3cr3t-typed-on-the-command-line"


@pytest.mark.parametrize(
    "flag, variable", [("--ma-key", "OUTBOX_MA_KEY"), ("--api-key", "OUTBOX_API_KEY")]
)
@pytest.mark.parametrize("joined", [False, True], ids=["space", "equals"])
def test_a_key_given_as_a_flag_is_refused_saying_where_keys_come_from(
    sqlite_url, flag, variable, joined
) -> None:
    args = (f"{flag}={SECRET_ON_COMMAND_LINE}",) if joined else (flag, SECRET_ON_COMMAND_LINE)
    result = cli(sqlite_url, "run", *args, env=keyed())
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]  # after argparse's usage
    assert SECRET_ON_COMMAND_LINE not in result.stderr + result.stdout
    assert flag in line and variable in line and f"{flag}-file" in line


def test_a_near_miss_flag_is_no_abbreviation_and_its_value_is_not_shown(sqlite_url) -> None:
    # argparse would take --ma-key-fil for --ma-key-file, and echo an unknown flag's value.
    result = cli(sqlite_url, "run", "--ma-key-fil", SECRET_ON_COMMAND_LINE, env=keyed())
    assert result.returncode == 2
    assert SECRET_ON_COMMAND_LINE not in result.stderr + result.stdout
    assert "unrecognized arguments: --ma-key-fil " in result.stderr.strip().splitlines()[-1]
