"""The transports from the command line: `run --transport`, its key and flags, the
sink and the demo speaking v3. Real subprocesses, a real endpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import KEY, rows, run_cli
from tests.daemons import enqueue
from tests.endpoint import Endpoint
from worker import db


def drained(
    url: str, endpoint_url: str, *flags: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "run",
        "--exit-when-drained",
        "--log-level",
        "DEBUG",
        *flags,
        env={"OUTBOX_DATABASE_URL": url, "OUTBOX_ENDPOINT_URL": endpoint_url, **env},
    )


def test_v3_without_an_api_key_exits_2_naming_the_variable(sqlite_url):
    result = drained(
        sqlite_url, "http://127.0.0.1:9/v3/events", "--transport", "v3", OUTBOX_MA_KEY=KEY
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "outbox-worker: no api-key: set OUTBOX_API_KEY or pass --api-key-file"
        " (the account's v3 API key)"
    )


def test_an_api_key_that_cannot_be_a_header_exits_2_and_is_not_shown(sqlite_url):
    bad = "xkeysib-\tsecret-part"
    result = drained(
        sqlite_url, "http://127.0.0.1:9/v3/events", OUTBOX_TRANSPORT="v3-batch", OUTBOX_API_KEY=bad
    )
    assert result.returncode == 2
    assert "api-key cannot be sent as an HTTP header" in result.stderr
    assert "secret-part" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--transport", "smtp"], "--transport (env OUTBOX_TRANSPORT) must be one of tracker, v3,"),
        (["--batch-max-events", "201"], "--batch-max-events (env OUTBOX_BATCH_MAX_EVENTS) must"),
        (["--batch-max-bytes", "600000"], "--batch-max-bytes (env OUTBOX_BATCH_MAX_BYTES) must"),
        (["--batch-shape", "xml"], "--batch-shape (env OUTBOX_BATCH_SHAPE) must be one of"),
        (["--batch-request-cost", "0"], "--batch-request-cost (env OUTBOX_BATCH_REQUEST_COST)"),
    ],
)
def test_a_bad_transport_setting_exits_2_naming_it(sqlite_url, flags, says):
    result = drained(sqlite_url, "http://127.0.0.1:9/", *flags, OUTBOX_MA_KEY=KEY)
    assert result.returncode == 2 and says in result.stderr


@pytest.mark.parametrize(
    "transport, url, says",
    [
        ("v3", "https://in-automate.brevo.com/api/v2/trackEvent", "is the tracker's trackEvent"),
        ("tracker", "https://api.brevo.com/v3/events", "is the v3 events API"),
        ("v3-batch", "https://api.brevo.com/v3/events/batch", "which v3-batch adds itself"),
    ],
)
def test_an_endpoint_of_the_other_api_exits_2(sqlite_url, transport, url, says):
    result = drained(
        sqlite_url, url, "--transport", transport, OUTBOX_API_KEY=KEY, OUTBOX_MA_KEY=KEY
    )
    assert result.returncode == 2 and says in result.stderr.splitlines()[-1]


def test_v3_batch_delivers_with_the_key_from_its_file_and_never_shows_it(
    sqlite_url, endpoint: Endpoint, tmp_path: Path
):
    engine = db.create_engine(sqlite_url)
    markers = enqueue(engine, 7)
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    result = drained(
        sqlite_url,
        endpoint.v3_url,
        "--api-key-file",
        str(key_file),
        "--batch-max-events",
        "3",
        "--batch-shape",
        "array",
        OUTBOX_TRANSPORT="v3-batch",
    )
    assert result.returncode == 0, result.stderr
    assert {r.status for r in rows(engine)} == {"delivered"}
    assert sorted(len(r.json) for r in endpoint.requests) == [1, 3, 3]  # bare arrays, 3 at most
    assert {r.path for r in endpoint.requests} == {"/v3/events/batch"}
    assert {r.headers["api-key"] for r in endpoint.requests} == {KEY}
    assert sorted(e["event_properties"]["id"] for e in endpoint.events()) == sorted(markers)
    assert "transport v3-batch" in result.stderr and KEY not in result.stderr + result.stdout


# -- the sink -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def v3_sink() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "sink", "--port", "0", "--transport", "v3-batch",
         "--refuse-event", "refused", "--rate-limit", "1000"],
        env={"OUTBOX_API_KEY": KEY, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()
    match = re.fullmatch(r"sink listening on (http://\S+/v3/events)\n", first)
    assert match, f"unexpected first line {first!r}"
    yield match.group(1)
    proc.terminate()
    proc.communicate(timeout=10)


def v3_event(name: str = "cart_updated", **fields: Any) -> dict[str, Any]:
    return {"event_name": name, "identifiers": {"email_id": "jane@example.com"}, **fields}


def post(url: str, body: Any, key: str = KEY) -> requests.Response:
    headers = {"content-type": "application/json", "api-key": key}
    return requests.post(url, data=json.dumps(body), headers=headers, timeout=5)


def test_the_v3_sink_answers_a_single_event(v3_sink):
    assert post(v3_sink, v3_event()).status_code == 204
    refused = post(v3_sink, v3_event("has space"))
    assert refused.status_code == 400 and "event_name" in refused.json()["message"]
    assert post(v3_sink, v3_event(), key="wrong-key-123").status_code == 401


def test_the_v3_sink_answers_a_batch_202_207_or_400_naming_each_bad_event(v3_sink):
    batch = v3_sink + "/batch"
    good = post(batch, {"events": [v3_event(), v3_event("b")]})
    assert good.status_code == 202 and good.json()["count"] == 2
    mixed = post(batch, [v3_event(), v3_event("refused"), v3_event(contact_properties={"V": True})])
    assert mixed.status_code == 207
    assert [e["eventIndex"] for e in mixed.json()["errors"]] == [[1], [2]]
    assert mixed.json()["successful_events"] == 1
    bad = post(batch, {"events": [v3_event("refused")]})
    assert bad.status_code == 400 and bad.json()["errors"][0]["eventIndex"] == [0]
    assert post(batch, {"events": [v3_event()] * 201}).status_code == 400


def test_the_sink_answers_429_with_the_rate_limit_headers_past_its_limit():
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "sink", "--port", "0", "--transport", "v3",
         "--rate-limit", "1"],
        env={"OUTBOX_API_KEY": KEY, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]
        answers = [post(url, v3_event()) for _ in range(3)]  # within two one-second windows
        limited = [a for a in answers if a.status_code == 429]
        assert limited, [a.status_code for a in answers]
        headers = limited[0].headers
        assert headers["x-sib-ratelimit-limit"] == "1"
        assert headers["x-sib-ratelimit-remaining"] == "0"
        assert int(headers["x-sib-ratelimit-reset"]) >= 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_demo_runs_with_the_batch_transport(tmp_path: Path):
    result = run_cli(
        "demo", "--transport", "v3-batch", "--database-url", f"sqlite:///{tmp_path / 'd.db'}"
    )
    assert result.returncode == 0, result.stderr
    assert "(transport v3-batch)" in result.stdout
    assert "must be a string or an integer for the v3 batch API" in result.stdout + result.stderr
