"""`outbox-worker console` as a real subprocess: what it refuses, what it serves on
127.0.0.1, that the key and the token never reach a page or a log line, and the
README's walk-through (demo, console, requeue one, see it pending).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import KEY, REPO, run_cli
from tests.console_server import Browserless, ConsoleProcess
from tests.integration.test_cli import assert_one_line_error
from tests.integration.test_console import text_of
from tests.integration.test_store import add, make_dead, row
from worker import db

TOKEN = "console-token-0123456789abcdef"
PAGES = ("/", "/events", "/dead-letters", "/contacts/blocked")


def one_line_error(result, *words: str) -> None:
    line = assert_one_line_error(result, 2)
    for word in words:
        assert word in line


def test_a_host_that_is_not_loopback_without_a_token_exits_2(sqlite_url):
    result = run_cli("console", "--database-url", sqlite_url, "--host", "0.0.0.0")
    one_line_error(result, "--host 0.0.0.0 is not a loopback address", "OUTBOX_CONSOLE_TOKEN")


def test_a_short_token_exits_2_without_showing_it(sqlite_url):
    result = run_cli(
        "console", "--database-url", sqlite_url, env={"OUTBOX_CONSOLE_TOKEN": "short-tok"}
    )
    one_line_error(result, "at least 16 printable characters")
    assert "short-tok" not in result.stderr


def test_a_token_file_that_cannot_be_read_exits_2(sqlite_url, tmp_path):
    result = run_cli(
        "console", "--database-url", sqlite_url, "--token-file", str(tmp_path / "none")
    )
    one_line_error(result, "cannot read --token-file")


def test_the_token_is_no_flag(sqlite_url):
    result = run_cli("console", "--database-url", sqlite_url, "--token", TOKEN)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_served_pages_never_hold_the_key_or_the_token_and_sigterm_exits_0(db_url, tmp_path):
    engine = db.create_engine(db_url)
    (dead,) = add(engine, "a@example.com", eventdata={"id": KEY[:4]})
    make_dead(engine, dead, last_error="HTTP 400 bad")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    console = ConsoleProcess(
        db_url,
        tmp_path / "console.log",
        "--host",
        "0.0.0.0",  # any address: allowed, with a token
        "--token-file",
        str(token_file),
        "--log-level",
        "DEBUG",
        env={"OUTBOX_MA_KEY": KEY},
    )
    try:
        url = console.url.replace("0.0.0.0", "127.0.0.1")
        anonymous = Browserless(url)
        assert anonymous.get("/")[1].count('name="token"') == 1  # sent to the login form
        anonymous.post("/login", {"csrf_token": anonymous.csrf("/login"), "token": "wrong" * 4})
        browser = Browserless(url, headers={"Authorization": f"Bearer {TOKEN}"})
        for path in (*PAGES, f"/events/{dead}"):
            status, page = browser.get(path)
            assert status == 200, path
            assert KEY not in page and TOKEN not in page
        status, page = browser.post(
            "/dead-letters/requeue",
            {"csrf_token": browser.csrf(), "ids": dead, "confirm": "yes"},
        )
        assert status == 200 and "requeued 1 dead events" in page
    finally:
        assert console.stop() == 0  # SIGTERM
    log = console.log()
    assert "a wrong token was given at login" in log
    assert f"console: requeued 1 dead events: ids {dead}" in log
    assert KEY not in log and TOKEN not in log
    assert row(engine, dead).status == "pending"


def test_demo_then_console_requeue_one_see_it_pending_at_once_then_delivered(
    tmp_path, endpoint, spawn
):
    url = f"sqlite:///{tmp_path / 'outbox-demo.db'}"
    demo = run_cli("demo", "--database-url", url, timeout=120)
    assert demo.returncode == 0, demo.stderr
    console = ConsoleProcess(url, tmp_path / "console.log")
    try:
        browser = Browserless(console.url)
        _, overview = browser.get("/")
        assert re.search(r'id="count-delivered">\d+<', overview)
        assert 'id="count-dead">2<' in overview
        _, dead = browser.get("/dead-letters?status_code=400")
        (refused,) = [int(i) for i in re.findall(r'name="ids" value="(\d+)"', dead)]
        _, asked = browser.post(
            "/dead-letters/requeue", {"csrf_token": browser.csrf(), "ids": refused}
        )
        assert "Requeue 1 dead events?" in asked
        browser.post(
            "/dead-letters/requeue",
            {"csrf_token": browser.csrf(), "ids": refused, "confirm": "yes"},
        )
        _, page = browser.get(f"/events/{refused}")
        assert 'id="status">pending<' in page
        daemon = spawn(url, endpoint.url, "--exit-when-drained")
        assert daemon.wait(60) == 0, daemon.log()
        assert 'id="status">delivered<' in browser.get(f"/events/{refused}")[1]
    finally:
        assert console.stop() == 0


@pytest.mark.parametrize("port", ["-1", "70000"])
def test_a_port_out_of_range_exits_2(sqlite_url, port):
    one_line_error(run_cli("console", "--database-url", sqlite_url, "--port", port), "--port")


def test_a_port_in_use_exits_2_naming_it(sqlite_url, tmp_path):
    console = ConsoleProcess(sqlite_url, tmp_path / "first.log")
    try:
        port = console.url.rstrip("/").rsplit(":", 1)[1]
        result = run_cli("console", "--database-url", sqlite_url, "--port", port)
        one_line_error(result, f"port {port}", "already in use")
    finally:
        console.stop()


def test_a_database_never_migrated_exits_1_saying_to_migrate(tmp_path: Path):
    result = run_cli("console", "--database-url", f"sqlite:///{tmp_path / 'new.db'}")
    assert result.returncode == 1 and "migrate" in result.stderr


def test_without_the_console_extra_it_exits_2_saying_what_to_install(sqlite_url):
    import subprocess
    import sys

    # An interpreter where `import uvicorn` fails, as without the extra.
    script = (
        "import sys; sys.modules['uvicorn'] = None\n"
        "from worker.cli import main\n"
        f"sys.exit(main(['console', '--database-url', {sqlite_url!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    one_line_error(result, "uvicorn is missing", "pip install 'outbox-worker[console]'")


# Slow: builds a wheel, a few seconds.
def test_the_wheel_ships_the_consoles_templates_and_script(tmp_path):
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("templates/overview.html", "templates/base.html", "static/console.js"):
        assert f"worker/console/{shipped}" in names


@pytest.mark.parametrize(
    ("answer", "banner"),
    [
        (b'{"code":"unauthorized","message":"Key not found"}', 'class="banner halted"'),
        (b"", 'class="banner paused"'),
    ],
    ids=["halt", "pause"],
)
def test_a_real_daemons_halt_or_pause_shows_as_a_banner(
    db_url, endpoint, spawn, tmp_path, answer, banner
):
    from tests.daemons import wait_until
    from tests.endpoint import Reply

    engine = db.create_engine(db_url)
    endpoint.default = Reply(401, answer) if answer else Reply(429, b"", {"Retry-After": "600"})
    add(engine, "a@example.com")
    daemon = spawn(db_url, endpoint.url, "--poll-interval", "0.1")
    console = ConsoleProcess(db_url, tmp_path / "console.log")
    try:
        browser = Browserless(console.url)
        wait_until(lambda: banner in browser.get("/")[1], 60, f"the banner {banner!r}")
        shown = text_of(browser.get("/")[1].split(banner)[1].split(">", 1)[1].split("</div>")[0])
        if answer:
            assert shown.startswith("Delivery is halted by daemon") and "401" in shown
        else:
            assert shown.startswith("Paused by the endpoint's rate limit until 20")
    finally:
        daemon.stop()
        assert console.stop() == 0
