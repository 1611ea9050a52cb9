"""The console over HTTP, on SQLite and PostgreSQL: every page and every action,
through Starlette's TestClient against real databases; then `outbox-worker
console` as a real subprocess serving 127.0.0.1.

Grouped by page: the overview, the events and one event, the dead letters and
their actions, blocked contacts; then safety (CSRF, tokens, hosts, masking)
and the command.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from html import unescape
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from tests.integration.test_store import add, attempt_rows, make_dead, make_delivered, row, set_row
from worker.admin_reports import stats
from worker.console.app import create_app
from worker.console.context import ConsoleOptions
from worker.event import from_stored
from worker.schema import outbox_attempts, outbox_daemons

TOKEN = "console-token-0123456789abcdef"


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def client_for(engine: sa.Engine, **options: Any) -> TestClient:
    # 127.0.0.1 as the Host: without a token the console answers only to loopback names.
    return TestClient(create_app(engine, ConsoleOptions(**options)), base_url="http://127.0.0.1")


@pytest.fixture
def client(engine: sa.Engine) -> TestClient:
    return client_for(engine)


def text_of(html: str) -> str:
    """The page as a person reads it: tags dropped, whitespace folded."""
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", html))).strip()


def csrf(client: TestClient, path: str = "/dead-letters") -> str:
    page = client.get(path)
    return re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text).group(1)


def listed_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<td><a href="/events/(\d+)">', html)]


def add_attempt(
    engine: sa.Engine,
    event_id: int,
    attempt: int,
    code: int,
    error: str,
    transport: str | None = None,
) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(outbox_attempts).values(
                event_id=event_id,
                attempt=attempt,
                status_code=code,
                error=error,
                duration_ms=12,
                transport=transport,
            )
        )


def add_daemon(engine: sa.Engine, name: str, **state: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(outbox_daemons).values(name=name, delivered=7, **state))


# -- the overview ----------------------------------------------------------------------


def test_overview_shows_counts_by_status_the_backlog_and_the_last_hour(engine, client):
    ids = add(engine, *(f"u{n}@example.com" for n in range(6)))
    make_delivered(engine, ids[:3])
    make_dead(engine, ids[3])
    add_attempt(engine, ids[3], 1, 400, "HTTP 400 refused")
    page = client.get("/")
    assert page.status_code == 200
    shown = text_of(page.text)
    assert "2 pending" in shown and "3 delivered" in shown and "1 dead" in shown
    assert "2 due now" in shown
    assert "3 delivered 1 failed attempts" in shown  # the chart's legend: the last hour
    assert page.text.count('class="delivered"') == 1  # one minute's bar, drawn in SVG
    assert "No daemon has reported" in shown


def test_overview_says_loudly_when_delivery_is_halted_or_paused(engine, client):
    began = (now() - dt.timedelta(hours=3)).replace(microsecond=0)
    add_daemon(
        engine,
        "host-a:1",
        halted_reason="HTTP 401 unauthorized (check the ma-key)",
        halted_since=began,
    )
    add_daemon(engine, "host-b:2", paused_until=now() + dt.timedelta(minutes=30))
    shown = text_of(client.get("/").text)
    assert (
        "Delivery is halted by daemon host-a:1: HTTP 401 unauthorized (check the ma-key)" in shown
    )
    assert f"since {began:%Y-%m-%d %H:%M:%S} UTC (3.0h ago)" in shown
    until = (now() + dt.timedelta(minutes=30)).strftime("%Y-%m-%d %H:")
    assert "Paused by the endpoint's rate limit until " + until in shown
    assert "host-a:1" in shown and "host-b:2" in shown


def test_overview_daemons_table_says_since_when_halted_and_until_when_paused(engine, client):
    began = (now() - dt.timedelta(hours=3)).replace(microsecond=0)
    until = (now() + dt.timedelta(minutes=30)).replace(microsecond=0)
    add_daemon(engine, "host-a:1", halted_reason="HTTP 401 unauthorized", halted_since=began)
    add_daemon(engine, "host-b:2", paused_until=until)
    add_daemon(engine, "host-c:3", halted_reason="HTTP 401 unauthorized")  # before 0007 filled it
    table = client.get("/").text.split('id="daemons"')[1].split("</table>")[0]
    states = {
        text_of(cells[0]): text_of(cells[-1])
        for cells in (re.findall(r"<td>(.*?)</td>", tr, re.S) for tr in table.split("<tr>")[2:])
    }
    assert states == {
        "host-a:1": f"halted since {began:%Y-%m-%d %H:%M:%S} UTC (3.0h ago)",
        "host-b:2": f"paused until {until:%Y-%m-%d %H:%M:%S} UTC",
        "host-c:3": "halted",
    }


def test_overview_sums_the_live_daemons_figures_per_transport(engine, client):
    figures = {"requests": 2, "events_sent": 300, "largest_batch": 200, "dead": 4}
    add_daemon(engine, "host-a:1", transport="v3-batch", **figures)
    add_daemon(engine, "host-b:2", transport="v3-batch", **figures)
    add_daemon(engine, "host-c:3")  # from before 0009: names no transport
    table = client.get("/").text.split('id="transports"')[1].split("</table>")[0]
    (row,) = [re.findall(r"<td>(.*?)</td>", tr, re.S) for tr in table.split("<tr>")[2:]]
    assert [text_of(cell) for cell in row] == [
        "v3-batch",
        "2",
        "4",
        "600",
        "150.0",
        "200",
        "14",
        "8",
    ]


def test_overview_refreshes_only_its_live_part(engine, client):
    add(engine, "a@example.com")
    live = client.get("/?live=1")
    assert live.status_code == 200
    assert "<html" not in live.text and 'id="count-pending">1<' in live.text


# -- events ------------------------------------------------------------------------------


def test_events_filter_by_status_event_email_code_and_error(engine, client):
    a, b, c, d = add(engine, "a@example.com", "B@Example.com", "c@example.com", "b@example.com")
    set_row(engine, c, event="order_completed")
    make_dead(engine, d, code=503, last_error="HTTP 503 Service Unavailable")
    assert listed_ids(client.get("/events").text) == [d, c, b, a]
    assert listed_ids(client.get("/events?status=dead").text) == [d]
    assert listed_ids(client.get("/events?event=order_completed").text) == [c]
    assert listed_ids(client.get("/events?email=b@example.COM").text) == [d, b]
    assert listed_ids(client.get("/events?status_code=503").text) == [d]
    assert listed_ids(client.get("/events?error_contains=unavailABLE").text) == [d]
    assert listed_ids(client.get("/events?since=1h&until=2099-01-01T00:00:00Z").text) == [
        d,
        c,
        b,
        a,
    ]
    assert "4 matching" in text_of(client.get("/events").text)


def test_events_are_paged_by_id_and_the_next_page_keeps_the_filters(engine):
    ids = add(engine, *(f"p{n}@example.com" for n in range(7)), event="paged")
    add(engine, "other@example.com", event="other")
    client = client_for(engine, page_size=3)
    first = client.get("/events?event=paged").text
    assert listed_ids(first) == ids[6:3:-1]
    link = unescape(re.search(r'href="(/events\?[^"]+)" id="next-page"', first).group(1))
    assert "event=paged" in link and f"before_id={ids[4]}" in link
    second = client.get(link).text
    assert listed_ids(second) == ids[3:0:-1]
    third = client.get(unescape(re.search(r'href="([^"]+)" id="next-page"', second).group(1)))
    assert listed_ids(third.text) == [ids[0]]
    assert 'id="next-page"' not in third.text


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("since=yesterday", "since"),
        ("status_code=abc", "status code must be a whole number"),
        ("status=lost", "status must be one of"),
        ("before_id=x", "before_id must be an event id"),
    ],
)
def test_a_filter_that_cannot_be_used_answers_400_saying_why(client, query, words):
    page = client.get(f"/events?{query}")
    assert page.status_code == 400
    assert words in text_of(page.text)


def test_one_event_shows_the_exact_body_sent_and_every_attempt(engine, client):
    (event_id,) = add(
        engine,
        "jane@example.com",
        event="cart_updated",
        properties={"FIRSTNAME": "Jane"},
        eventdata={"id": "cart:1", "data": {"price": "50.00"}},
    )
    add_attempt(engine, event_id, 1, 503, "HTTP 503 busy")  # written before 0009: no transport
    add_attempt(engine, event_id, 2, 500, "HTTP 500 oops", transport="v3-batch")
    set_row(engine, event_id, attempts=2, last_status_code=500, last_error="HTTP 500 oops")
    page = client.get(f"/events/{event_id}")
    assert page.status_code == 200
    with engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT CAST(properties AS TEXT), CAST(eventdata AS TEXT) FROM outbox_events")
        ).one()
    sent = from_stored("jane@example.com", "cart_updated", *stored).body().decode()
    assert unescape(re.search(r'<pre id="body">(.*?)</pre>', page.text, re.S).group(1)) == sent
    shown = text_of(page.text)
    assert re.search(
        r"1 \S+ \S+ - 503 12 HTTP 503 busy 2 \S+ \S+ v3-batch 500 12 HTTP 500 oops", shown
    )


def test_one_event_shows_the_body_of_the_consoles_transport(engine):
    (event_id,) = add(engine, "jane@example.com", event="cart_updated", properties={"PLAN": "pro"})
    page = client_for(engine, transport="v3").get(f"/events/{event_id}")
    body = json.loads(unescape(re.search(r'<pre id="body">(.*?)</pre>', page.text, re.S).group(1)))
    assert body["event_name"] == "cart_updated"
    assert body["identifiers"] == {"email_id": "jane@example.com"}
    assert body["contact_properties"] == {"PLAN": "pro"} and "event_date" in body
    assert "v3" in text_of(page.text).split("The body sent", 1)[1][:80]


def test_one_event_shows_the_contacts_events_before_and_after_it(engine, client):
    older, _other, this, newer = add(
        engine, "jo@example.com", "zed@example.com", "JO@example.com", "jo@example.com"
    )
    page = client.get(f"/events/{this}").text
    before = page.split('id="before"')[1].split('id="after"')[0]
    after = page.split('id="after"')[1]
    assert listed_ids(before) == [older]
    assert listed_ids(after) == [newer]


def test_an_event_that_cannot_be_sent_says_why_and_an_unknown_one_is_404(engine, client):
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO outbox_events (email, event) VALUES ('x@y.com', ' ')"))
        event_id = conn.execute(sa.text("SELECT max(id) FROM outbox_events")).scalar_one()
    assert "cannot be sent (event: must not be empty)" in text_of(
        client.get(f"/events/{event_id}").text
    )
    assert client.get("/events/999999").status_code == 404


# -- dead letters and their actions -------------------------------------------------------


def three_dead(engine: sa.Engine) -> list[int]:
    ids = add(engine, "a@example.com", "b@example.com", "c@example.com")
    make_dead(engine, ids[:2], code=400)
    make_dead(engine, ids[2], code=503, last_error="HTTP 503 busy")
    return ids


def test_dead_letters_list_only_dead_events_and_take_the_filters(engine, client):
    ids = three_dead(engine)
    add(engine, "alive@example.com")
    assert listed_ids(client.get("/dead-letters").text) == ids[::-1]
    assert listed_ids(client.get("/dead-letters?status_code=400").text) == ids[1::-1]
    assert listed_ids(client.get("/dead-letters?error_contains=busy").text) == [ids[2]]
    assert listed_ids(client.get("/dead-letters?since=1h").text) == ids[::-1]  # failed_at


def test_requeue_of_selected_rows_says_the_count_first_then_changes_only_them(
    engine, client, caplog
):
    ids = three_dead(engine)
    token = csrf(client)
    asked = client.post(
        "/dead-letters/requeue", data={"csrf_token": token, "ids": [ids[0], ids[2]]}
    )
    assert asked.status_code == 200
    assert "Requeue 2 dead events?" in text_of(asked.text)
    assert {row(engine, i).status for i in ids} == {"dead"}  # nothing changed yet

    with caplog.at_level(logging.INFO, logger="worker.console"):
        done = client.post(
            "/dead-letters/requeue",
            data={"csrf_token": token, "ids": [ids[0], ids[2]], "confirm": "yes"},
        )
    assert done.status_code == 200  # followed the redirect back to the list
    assert f"requeued 2 dead events: ids {ids[0]}, {ids[2]}" in text_of(done.text)
    for i in (ids[0], ids[2]):
        requeued = row(engine, i)
        assert (requeued.status, requeued.attempts, requeued.failed_at) == ("pending", 0, None)
    assert row(engine, ids[1]).status == "dead"
    assert f"console: requeued 2 dead events: ids {ids[0]}, {ids[2]}" in caplog.text


def test_requeue_of_everything_matching_never_touches_rows_newer_than_the_count(engine, client):
    ids = three_dead(engine)
    token = csrf(client)
    asked = client.post(
        "/dead-letters/requeue",
        data={"csrf_token": token, "status_code": "400", "scope": "matching", "ids": [ids[2]]},
    )
    assert "Requeue 2 dead events?" in text_of(asked.text)  # the filter, not the ticked box
    up_to = re.search(r'name="up_to_id" value="(\d+)"', asked.text).group(1)
    (late,) = add(engine, "late@example.com")
    make_dead(engine, late, code=400)
    client.post(
        "/dead-letters/requeue",
        data={
            "csrf_token": token,
            "status_code": "400",
            "scope": "matching",
            "up_to_id": up_to,
            "confirm": "yes",
        },
    )
    assert [row(engine, i).status for i in ids] == ["pending", "pending", "dead"]
    assert row(engine, late).status == "dead"


def test_requeue_selected_with_nothing_ticked_changes_nothing(engine, client):
    ids = three_dead(engine)
    answer = client.post(
        "/dead-letters/requeue", data={"csrf_token": csrf(client), "scope": "selected"}
    )
    assert answer.status_code == 400 and "select the rows to requeue first" in answer.text
    assert {row(engine, i).status for i in ids} == {"dead"}


def test_purge_deletes_the_selected_dead_events_and_their_attempts(engine, client):
    ids = three_dead(engine)
    add_attempt(engine, ids[0], 1, 400, "refused")
    token = csrf(client)
    asked = client.post("/dead-letters/purge", data={"csrf_token": token, "ids": [ids[0]]})
    assert "Purge 1 dead events?" in text_of(asked.text)
    client.post("/dead-letters/purge", data={"csrf_token": token, "ids": ids[0], "confirm": "yes"})
    assert row(engine, ids[0]) is None and attempt_rows(engine, ids[0]) == []
    assert row(engine, ids[1]).status == "dead"


def test_purge_of_every_dead_letter_counts_them_all_first(engine, client):
    ids = three_dead(engine)
    (alive,) = add(engine, "alive@example.com")
    token = csrf(client)
    asked = client.post("/dead-letters/purge", data={"csrf_token": token, "scope": "matching"})
    assert "Purge 3 dead events?" in text_of(asked.text)
    up_to = re.search(r'name="up_to_id" value="(\d+)"', asked.text).group(1)
    done = client.post(
        "/dead-letters/purge",
        data={"csrf_token": token, "scope": "matching", "up_to_id": up_to, "confirm": "yes"},
    )
    assert "purged 3 dead events" in text_of(done.text)
    assert [row(engine, i) for i in ids] == [None, None, None]
    assert row(engine, alive).status == "pending"


def test_cancel_makes_selected_pending_events_dead_and_says_what_was_left(engine, client):
    pending, delivered = add(engine, "a@example.com", "b@example.com")
    make_delivered(engine, delivered)
    token = csrf(client, "/events")
    asked = client.post("/events/cancel", data={"csrf_token": token, "ids": [pending, delivered]})
    assert "Cancel 1 pending events?" in text_of(asked.text)
    done = client.post(
        "/events/cancel", data={"csrf_token": token, "ids": [pending, delivered], "confirm": "yes"}
    )
    assert f"cancelled 1 pending events: ids {pending}; 1 not cancelled: id {delivered}" in (
        text_of(done.text)
    )
    cancelled = row(engine, pending)
    assert (cancelled.status, cancelled.last_error) == ("dead", "cancelled by operator")
    assert row(engine, delivered).status == "delivered"


def test_cancel_by_the_events_pages_filters(engine, client):
    keep, drop = add(engine, "a@example.com", "b@example.com")
    set_row(engine, drop, event="mistake")
    token = csrf(client, "/events")
    asked = client.post(
        "/events/cancel", data={"csrf_token": token, "event": "mistake", "scope": "matching"}
    )
    assert "Cancel 1 pending events?" in text_of(asked.text)
    client.post(
        "/events/cancel",
        data={"csrf_token": token, "event": "mistake", "scope": "matching", "confirm": "yes"},
    )
    assert (row(engine, keep).status, row(engine, drop).status) == ("pending", "dead")


def test_an_action_with_nothing_to_change_says_so(engine, client):
    answer = client.post(
        "/dead-letters/requeue", data={"csrf_token": csrf(client), "scope": "matching"}
    )
    assert "Nothing to requeue" in text_of(answer.text)


# -- blocked contacts ----------------------------------------------------------------------


def test_blocked_contacts_show_the_retrying_head_and_how_many_wait_behind_it(engine, client):
    head, _behind1, _behind2, _free = add(
        engine, "stuck@example.com", "stuck@example.com", "STUCK@example.com", "ok@example.com"
    )
    set_row(engine, head, attempts=2, last_status_code=503, last_error="HTTP 503 busy")
    add_attempt(engine, head, 1, 503, "HTTP 503 busy")
    page = client.get("/contacts/blocked")
    assert listed_ids(page.text) == [head]
    cells = text_of(page.text.split('id="blocked"')[1])
    assert re.search(rf"stuck@example.com {head} signed_up 2 \d{{4}}-", cells)
    assert "HTTP 503 busy" in cells and "ok@example.com" not in cells


# -- safety ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/dead-letters/requeue", "/dead-letters/purge", "/events/cancel"])
@pytest.mark.parametrize("given", [None, "0" * 64])
def test_a_post_without_a_valid_csrf_token_is_403_and_changes_nothing(engine, client, path, given):
    ids = add(engine, "a@example.com", "b@example.com")
    make_dead(engine, ids[0])
    client.get("/")  # the browser has its CSRF cookie
    data: dict[str, Any] = {"ids": ids, "confirm": "yes"}
    if given:
        data["csrf_token"] = given
    answer = client.post(path, data=data)
    assert answer.status_code == 403
    assert [row(engine, i).status for i in ids] == ["dead", "pending"]


def test_a_csrf_token_from_another_browser_is_refused(engine, client):
    (dead,) = add(engine, "a@example.com")
    make_dead(engine, dead)
    stolen = csrf(client_for(engine))  # a second browser's token, under this process' secret
    answer = client.post(
        "/dead-letters/requeue", data={"csrf_token": stolen, "ids": dead, "confirm": "yes"}
    )
    assert answer.status_code == 403 and row(engine, dead).status == "dead"


def test_without_a_token_the_console_answers_only_to_loopback_host_names(engine):
    app = create_app(engine, ConsoleOptions())
    assert TestClient(app, base_url="http://localhost:8800").get("/").status_code == 200
    assert TestClient(app, base_url="http://rebound.example:8800").get("/").status_code == 403


def test_with_a_token_every_page_needs_it_and_the_login_form_gives_a_session(engine):
    (dead,) = add(engine, "a@example.com")
    make_dead(engine, dead)
    client = client_for(engine, token=TOKEN)
    for path in ("/", "/events", f"/events/{dead}", "/dead-letters", "/contacts/blocked"):
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
    assert client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/", auth=("operator", TOKEN)).status_code == 200
    assert client.get("/", auth=("operator", "wrong")).history  # sent to log in

    token = csrf(client, "/login")
    wrong = client.post("/login", data={"csrf_token": token, "token": "nope", "next": "/"})
    assert wrong.status_code == 403 and "not the console's token" in wrong.text
    client.post("/login", data={"csrf_token": token, "token": TOKEN, "next": "/dead-letters"})
    assert TOKEN not in str(client.cookies.items())  # the session holds an HMAC of it
    assert listed_ids(client.get("/dead-letters").text) == [dead]
    client.post("/dead-letters/requeue", data={"csrf_token": token, "ids": dead, "confirm": "yes"})
    assert row(engine, dead).status == "pending"


def test_with_a_token_a_post_without_a_session_is_403(engine):
    (dead,) = add(engine, "a@example.com")
    make_dead(engine, dead)
    client = client_for(engine, token=TOKEN)
    token = csrf(client, "/login")
    answer = client.post(
        "/dead-letters/requeue", data={"csrf_token": token, "ids": dead, "confirm": "yes"}
    )
    assert answer.status_code == 403 and row(engine, dead).status == "dead"


def test_login_only_ever_sends_back_to_a_page_of_the_console(engine):
    client = client_for(engine, token=TOKEN)
    answer = client.post(
        "/login",
        data={"csrf_token": csrf(client, "/login"), "token": TOKEN, "next": "//evil.example/"},
        follow_redirects=False,
    )
    assert answer.headers["location"] == "/"


def test_mask_emails_shows_no_address_anywhere(engine):
    a, b = add(engine, "jane.doe@example.com", "john@example.org", eventdata={"id": "x"})
    make_dead(engine, b)
    set_row(engine, a, attempts=1)
    client = client_for(engine, mask_emails=True)
    pages = [client.get(p).text for p in ("/events", f"/events/{a}", "/dead-letters")]
    pages.append(client.get("/contacts/blocked").text)
    for page in pages:
        assert "jane.doe@" not in page and "john@" not in page
    assert "j***@example.com" in pages[0] and "j***@example.org" in pages[2]
    body = unescape(re.search(r'<pre id="body">(.*?)</pre>', pages[1], re.S).group(1))
    assert json.loads(body)["email"] == "j***@example.com"
    # the filter still takes the full address
    assert listed_ids(client.get("/events?email=jane.doe@example.com").text) == [a]


def test_counts_past_their_limit_say_at_least_so(engine, client, monkeypatch):
    from worker.console import pages

    monkeypatch.setattr(pages, "OVERVIEW_COUNT_LIMIT", 2)
    monkeypatch.setattr(pages, "LIST_COUNT_LIMIT", 3)
    add(engine, *(f"n{n}@example.com" for n in range(5)))
    assert 'id="count-pending">2+<' in client.get("/").text
    assert "3+ matching" in text_of(client.get("/events").text)
    assert "5 matching" not in text_of(client.get("/events").text)


def test_a_bounded_stats_reading_counts_each_status_up_to_its_limit(engine):
    ids = add(engine, *(f"s{n}@example.com" for n in range(5)))
    make_dead(engine, ids[:3])
    exact, bounded = stats(engine), stats(engine, count_limit=2)
    assert exact.counts == {"pending": 2, "in_flight": 0, "delivered": 0, "dead": 3}
    assert bounded.counts == {"pending": 2, "in_flight": 0, "delivered": 0, "dead": 3}  # limit + 1
    assert bounded.counts_capped_at == 2 and exact.counts_capped_at is None
    assert exact.dead_by_status_code == {"400": 3}
    assert bounded.dead_by_status_code == {"400": 2}  # among the newest 2


def test_blocked_contacts_probe_the_open_contact_index_on_sqlite(sqlite_url):
    """Bound status parameters kept SQLite off the partial index: 23.7 s at 100k rows."""
    from worker import db
    from worker.admin_reports import blocked_statement

    engine = db.create_engine(sqlite_url)
    compiled = blocked_statement(100).compile(engine, compile_kwargs={"render_postcompile": True})
    params = tuple(compiled.params[name] for name in compiled.positiontup or ())
    with engine.connect() as conn:
        answer = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params)
        plan = " ".join(str(r[-1]) for r in answer)
    assert plan.count("ix_outbox_events_open_contact") == 2, plan  # older and newer


def test_logout_ends_the_session(engine):
    client = client_for(engine, token=TOKEN)
    token = csrf(client, "/login")
    client.post("/login", data={"csrf_token": token, "token": TOKEN, "next": "/"})
    assert client.get("/", follow_redirects=False).status_code == 200
    client.post("/logout", data={"csrf_token": token})
    assert client.get("/", follow_redirects=False).status_code == 303
