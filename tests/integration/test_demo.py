"""`outbox-worker demo` never touches data it did not write (issue: a newcomer's first hour).

The demo may be pointed at any database with --database-url. It runs again on
its own database, but refuses (exit 2, one line) a database holding anything
else, and never deletes a file.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.integration.test_cli import cli, cli_in, status_counts

pytestmark = pytest.mark.slow  # each test runs the demo in a subprocess


def one_line_refusal(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_demo_runs_again_on_its_own_database_with_the_same_result(tmp_path: Path) -> None:
    first = cli_in(tmp_path, "demo")
    assert first.returncode == 0, first.stderr
    # A second name for the file: had the demo deleted and remade it, they would differ.
    os.link(tmp_path / "outbox-demo.db", tmp_path / "kept.db")
    second = cli_in(tmp_path, "demo")
    assert second.returncode == 0, second.stderr
    counts = status_counts(f"sqlite:///{tmp_path / 'outbox-demo.db'}")
    assert (counts["delivered"], counts["dead"]) == (10, 2)
    assert os.path.samefile(tmp_path / "outbox-demo.db", tmp_path / "kept.db")


def test_demo_refuses_a_sqlite_outbox_with_a_real_event_and_leaves_it_pending(
    sqlite_url: str,
) -> None:
    assert cli(sqlite_url, "enqueue", "--email", "real@shop.com", "--event", "paid").returncode == 0
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    line = one_line_refusal(run_cli("demo", "--database-url", sqlite_url))
    assert "not the demo's" in line and "--database-url" in line
    assert path.exists()
    assert status_counts(sqlite_url)["pending"] == 1


def test_demo_refuses_a_sqlite_file_of_another_application(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total TEXT)")
        conn.execute("INSERT INTO orders (total) VALUES ('9.99')")
    before = path.read_bytes()
    line = one_line_refusal(run_cli("demo", "--database-url", f"sqlite:///{path}"))
    assert "orders" in line
    assert path.read_bytes() == before


def test_demo_refuses_a_postgresql_outbox_with_real_events_and_sends_none(pg_url: str) -> None:
    assert cli(pg_url, "enqueue", "--email", "real@shop.com", "--event", "paid").returncode == 0
    line = one_line_refusal(run_cli("demo", "--database-url", pg_url))
    assert "1 outbox event" in line
    counts = status_counts(pg_url)
    assert counts["pending"] == 1 and counts["delivered"] == 0


def test_demo_runs_on_an_empty_postgresql_database(empty_url: str) -> None:
    result = run_cli("demo", "--database-url", empty_url)
    assert result.returncode == 0, result.stderr
    counts = status_counts(empty_url)
    assert (counts["delivered"], counts["dead"]) == (10, 2)


def test_demo_hints_run_as_printed_after_the_readme_command(tmp_path: Path) -> None:
    # The README runs `.venv/bin/outbox-worker demo` without activating the venv.
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["PATH"] = "/usr/bin:/bin"  # the venv is not on it

    def sh(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )

    result = sh(".venv/bin/outbox-worker demo")
    assert result.returncode == 0, result.stderr
    hints = [line.strip() for line in result.stdout.splitlines() if "--database-url" in line]
    assert len(hints) == 2, result.stdout
    for hint in hints:
        ran = sh(hint)
        assert ran.returncode == 0, hint + "\n" + ran.stderr
    assert re.search(r"delivered\s+10", sh(hints[-1]).stdout)
