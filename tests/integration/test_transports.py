"""One outcome, order, crash and secret suite for every transport, on both backends.

The real daemon (in this process, or as a subprocess for crashes), a real
database and a real HTTP endpoint that answers like Brevo's APIs: a refused
event is a 400 alone, or in a batch a 207 (400 if all are bad) naming its
`eventIndex`.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import KEY, deliver, rows, run_cli
from tests.daemons import all_delivered, enqueue, received, wait_until
from tests.endpoint import Endpoint, Received, Reply, data_of, name_of
from worker import InvalidEvent, track_events
from worker.schema import outbox_events

TRANSPORTS = ["tracker", "v3", "v3-batch"]
BAD = "refused_event"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def run(engine: sa.Engine, endpoint: Endpoint, transport: str, **overrides: Any) -> int:
    return deliver(engine, endpoint.url_for(transport), transport=transport, **overrides)


def run_until_settled(
    engine: sa.Engine, endpoint: Endpoint, transport: str, **overrides: Any
) -> None:
    """Drained runs until no row is pending: a row waiting out its backoff ends a drained run."""
    wait_until(
        lambda: (
            run(engine, endpoint, transport, **overrides) == 0
            and not {r.status for r in rows(engine)} & {"pending", "in_flight"}
        ),
        30,
        "every row to settle",
    )


def add(engine: sa.Engine, specs: list[dict[str, Any]]) -> list[int]:
    with engine.begin() as conn:
        return track_events(conn, specs)


def spec(n: int, event: str = "cart_updated", contact: int | None = None) -> dict[str, Any]:
    return {
        "email": f"c{n if contact is None else contact}@example.com",
        "event": event,
        "properties": {"FIRSTNAME": "Jane"},
        "eventdata": {"id": f"m:{n}", "data": {"price": "50.00"}},
    }


def brevo_like(message: str = f"{BAD} is refused", name_indexes: bool = True) -> Any:
    """Refuse every event named BAD as the API would: alone a 400; in a batch a 207
    naming each bad one's eventIndex (400 when every one is bad, or naming none)."""

    def respond(request: Received) -> Reply | None:
        events = request.events
        bad = [i for i, event in enumerate(events) if name_of(event) == BAD]
        if not bad:
            return None
        if not request.path.endswith("/batch"):
            return Reply(
                400, json.dumps({"code": "invalid_parameter", "message": message}).encode()
            )
        if not name_indexes:
            return Reply(400, b'{"code":"invalid_parameter","message":"bad batch"}')
        errors = [{"eventIndex": [i], "message": message} for i in bad]
        status = 400 if len(bad) == len(events) else 207
        return Reply(status, json.dumps({"errors": errors}).encode())

    return respond


def first_requests(count: int, reply: Reply) -> Any:
    """The first `count` requests get `reply`; the rest the default."""
    seen = collections.Counter[str]()

    def respond(request: Received) -> Reply | None:
        seen["n"] += 1
        return reply if seen["n"] <= count else None

    return respond


def attempts(engine: sa.Engine) -> list[Any]:
    return rows(engine, "SELECT event_id, attempt, status_code, error FROM outbox_attempts")


# -- outcomes -------------------------------------------------------------------


def test_every_event_is_delivered_once_with_its_fields(engine, endpoint, transport):
    ids = add(engine, [spec(n) for n in range(5)])
    assert run(engine, endpoint, transport) == 0
    assert {r.id: (r.status, r.attempts) for r in rows(engine)} == {
        i: ("delivered", 1) for i in ids
    }
    assert sorted(received(endpoint).values()) == [1] * 5
    request = endpoint.requests[0]
    if transport == "tracker":
        assert request.path == "/api/v2/trackEvent" and request.headers["ma-key"] == KEY
        assert request.json == spec(0) | {"email": "c0@example.com"}
        return
    assert "ma-key" not in request.headers and request.headers["api-key"] == KEY
    if transport == "v3-batch":
        assert request.path == "/v3/events/batch" and len(endpoint.requests) == 1
        assert list(request.json) == ["events"] and len(request.json["events"]) == 5
    else:
        assert request.path == "/v3/events" and len(endpoint.requests) == 5
    with engine.connect() as conn:
        created = conn.execute(sa.select(outbox_events.c.created_at).limit(1)).scalar_one()
    first = next(e for e in endpoint.events() if data_of(e)["id"] == "m:0")
    assert first == {
        "event_name": "cart_updated",
        "identifiers": {"email_id": "c0@example.com"},
        "event_date": first["event_date"],
        "contact_properties": {"FIRSTNAME": "Jane"},
        "event_properties": {"id": "m:0", "data": {"price": "50.00"}},
    }
    sent = dt.datetime.fromisoformat(first["event_date"].replace("Z", "+00:00"))
    assert abs(sent - created) < dt.timedelta(milliseconds=1)  # when it happened, not when sent


def test_a_refused_event_is_dead_with_its_message_and_the_rest_delivered(
    engine, endpoint, transport
):
    specs = [spec(n, BAD if n in (3, 7) else "cart_updated") for n in range(10)]
    ids = add(engine, specs)
    endpoint.respond = brevo_like()
    assert run(engine, endpoint, transport) == 0
    by_id = {r.id: r for r in rows(engine)}
    dead = {ids[3], ids[7]}
    for i in ids:
        row = by_id[i]
        assert (row.status, row.attempts) == ("dead" if i in dead else "delivered", 1)
    for i in dead:
        assert f"{BAD} is refused" in by_id[i].last_error
    assert sorted(a.event_id for a in attempts(engine)) == sorted(dead)
    good = received(endpoint)
    assert all(good[f"m:{n}"] == 1 for n in range(10) if n not in (3, 7))


def test_each_attempt_names_the_transport_it_went_by(engine, endpoint, transport):
    add(engine, [spec(n, BAD if n == 1 else "cart_updated") for n in range(3)])
    endpoint.respond = brevo_like()
    assert run(engine, endpoint, transport) == 0
    assert rows(engine, "SELECT transport FROM outbox_attempts") == [(transport,)]


def test_a_bad_request_naming_no_event_never_dead_letters_the_good_ones(
    engine, endpoint, transport
):
    specs = [spec(n, BAD if n == 11 else "cart_updated") for n in range(20)]
    ids = add(engine, specs)
    endpoint.respond = brevo_like(name_indexes=False)
    assert run(engine, endpoint, transport) == 0
    states = {r.id: (r.status, r.attempts) for r in rows(engine)}
    assert states == {i: ("dead" if i == ids[11] else "delivered", 1) for i in ids}
    assert [a.event_id for a in attempts(engine)] == [ids[11]]  # one attempt, the last answer
    accepted = collections.Counter(
        data_of(e)["id"]
        for r in endpoint.requests
        if endpoint.respond(r) is None  # answered 2xx
        for e in r.events
    )
    assert all(accepted[f"m:{n}"] == 1 for n in range(20) if n != 11)  # each good one once
    if transport == "v3-batch":
        assert len(endpoint.requests) <= 1 + 2 * 5  # halves down to the bad one: log2(20) rounds


def test_a_server_error_retries_the_request_and_counts_each_attempt_once(
    engine, endpoint, transport, caplog
):
    ids = add(engine, [spec(n) for n in range(6)])
    endpoint.respond = first_requests(1, Reply(503, b"busy"))
    with caplog.at_level(logging.WARNING, logger="worker"):
        run_until_settled(engine, endpoint, transport, concurrency=1)
    warnings = [r.getMessage() for r in caplog.records if "503" in r.getMessage()]
    if transport == "v3-batch":  # one line for the request, not six
        assert warnings == [
            f"a request of 6 events (outbox ids from {ids[0]}) failed (HTTP 503 busy):"
            " each is retried after its backoff"
        ]
    else:
        assert len(warnings) == 1 and "attempt 1 failed (HTTP 503 busy)" in warnings[0]
    failed = attempts(engine)
    assert {a.status_code for a in failed} == {503} and all(a.attempt == 1 for a in failed)
    assert len(failed) == (6 if transport == "v3-batch" else 1)
    retried = {a.event_id for a in failed}
    assert {r.id: (r.status, r.attempts) for r in rows(engine)} == {
        i: ("delivered", 2 if i in retried else 1) for i in ids
    }


def test_429_retries_later_and_charges_nothing(engine, endpoint, transport):
    ids = add(engine, [spec(n) for n in range(4)])
    limited = Reply(429, b"", {"x-sib-ratelimit-remaining": "0", "x-sib-ratelimit-reset": "0"})
    endpoint.respond = first_requests(1, limited)
    run_until_settled(engine, endpoint, transport, concurrency=1)
    assert {r.id: (r.status, r.attempts) for r in rows(engine)} == {
        i: ("delivered", 1) for i in ids
    }
    assert attempts(engine) == []


def test_a_refused_key_halts_everything_and_spends_nothing(engine, endpoint, transport, caplog):
    add(engine, [spec(n) for n in range(5)])
    endpoint.default = Reply(401, b'{"code":"unauthorized","message":"Key not found"}')
    with caplog.at_level(logging.ERROR, logger="worker"):
        assert run(engine, endpoint, transport) == 1
    assert {(r.status, r.attempts) for r in rows(engine)} == {("pending", 0)}
    assert len(endpoint.requests) == 1  # slow start: one request learns the key is wrong
    variable = "OUTBOX_MA_KEY" if transport == "tracker" else "OUTBOX_API_KEY"
    assert f"check {variable}" in caplog.text


# -- validation -------------------------------------------------------------------


def test_a_row_the_transport_cannot_carry_is_dead_naming_the_rule(engine, endpoint, transport):
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_events (email, event, properties) VALUES"
                " ('a@example.com', 'has space', NULL),"
                " ('b@example.com', 'flagged', '{\"VIP\": true}')"
            )
        )
    assert run(engine, endpoint, transport) == 0
    got = {r.email: (r.status, r.attempts, r.last_error) for r in rows(engine)}
    expected = {
        "tracker": ("delivered", "delivered"),
        "v3": ("dead", "delivered"),
        "v3-batch": ("dead", "dead"),
    }[transport]
    assert (got["a@example.com"][0], got["b@example.com"][0]) == expected
    if transport != "tracker":
        assert got["a@example.com"][1:] == (
            0,
            f"invalid event for --transport {transport}: event: may hold only letters, digits,"
            " - and _ for the v3 API (event_name)",
        )
    if transport == "v3-batch":
        assert "'VIP' must be a string or an integer" in got["b@example.com"][2]
    assert attempts(engine) == []


# -- order ------------------------------------------------------------------------


def test_per_contact_order_holds_and_a_batch_holds_one_event_per_contact(
    engine, endpoint, transport
):
    specs = [spec(n, f"step_{n // 3}", contact=n % 3) for n in range(15)]
    add(engine, specs)
    assert run(engine, endpoint, transport, concurrency=4) == 0
    assert {r.status for r in rows(engine)} == {"delivered"}
    seen: dict[str, list[int]] = collections.defaultdict(list)
    for request in endpoint.requests:
        contacts = [
            e.get("email", e.get("identifiers", {}).get("email_id")) for e in request.events
        ]
        assert len(contacts) == len(set(contacts))
        for event, contact in zip(request.events, contacts, strict=True):
            seen[contact].append(int(data_of(event)["id"][2:]))
    assert all(numbers == sorted(numbers) for numbers in seen.values()) and len(seen) == 3


# -- secrets ----------------------------------------------------------------------


def test_the_key_never_reaches_the_log_or_the_database(engine, endpoint, transport, caplog):
    add(engine, [spec(n, BAD if n == 1 else "cart_updated") for n in range(3)])
    endpoint.respond = brevo_like(message=f"key {KEY} may not send {BAD}")
    with caplog.at_level(logging.DEBUG, logger="worker"):
        assert run(engine, endpoint, transport) == 0
    stored = rows(engine) + attempts(engine)
    assert "[redacted]" in " ".join(str(r) for r in stored)
    assert KEY not in caplog.text and KEY not in " ".join(str(r) for r in stored)


# -- crashes ----------------------------------------------------------------------


@pytest.mark.slow  # two daemon subprocesses, 300 events
def test_a_killed_daemon_loses_nothing(engine, endpoint, transport, spawn):
    url = engine.url.render_as_string(hide_password=False)
    markers = enqueue(engine, 300, contacts=40)
    endpoint.default = Reply(204, delay=0.01)
    flags = (
        "--transport",
        transport,
        "--concurrency",
        "4",
        "--lease",
        "2",
        "--batch-max-events",
        "25",
    )
    first = spawn(url, endpoint.url_for(transport), *flags)
    wait_until(lambda: len(received(endpoint)) >= 30, 30, "some deliveries")
    first.kill()
    second = spawn(url, endpoint.url_for(transport), *flags)  # takes back the dead one's claims
    wait_until(all_delivered(engine, 300), 60, "the second daemon to deliver every event")
    assert second.stop() == 0, second.log()
    assert set(received(endpoint)) == set(markers)  # at least once each, none lost


# -- metrics ----------------------------------------------------------------------


def test_metrics_count_requests_and_events_per_request_by_transport(engine, endpoint, transport):
    from tests.conftest import fast_settings
    from worker.daemon import build_daemon
    from worker.telemetry import Telemetry

    add(engine, [spec(n) for n in range(6)])
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO outbox_events (email, event) VALUES ('x@example.com', ' ')")
        )
    telemetry = Telemetry()
    url = engine.url.render_as_string(hide_password=False)
    settings = fast_settings(url, endpoint.url_for(transport), transport=transport)
    assert build_daemon(settings, engine=engine, telemetry=telemetry).run() == 0
    value = telemetry.registry.get_sample_value
    requests = 1 if transport == "v3-batch" else 6
    assert (
        value("outbox_requests_total", {"transport": transport, "status_code": "204"}) == requests
    )
    assert value("outbox_request_events_count", {"transport": transport}) == requests
    assert value("outbox_request_events_sum", {"transport": transport}) == 6
    assert value("outbox_events_rejected_total", {"transport": transport}) == 1
    assert value("outbox_events_delivered_total") == 6


@pytest.mark.slow  # a daemon subprocess, read once its heartbeat (every 5 s) has come
def test_stats_per_transport_are_what_the_endpoint_counted(engine, endpoint, transport, spawn):
    url = engine.url.render_as_string(hide_password=False)
    add(engine, [spec(n, BAD if n in (4, 9) else "cart_updated") for n in range(25)])
    with engine.begin() as conn:  # a row no transport carries: dead before any request
        conn.execute(
            sa.text("INSERT INTO outbox_events (email, event) VALUES ('x@example.com', ' ')")
        )
    endpoint.respond = brevo_like()
    flags = ("--transport", transport, "--batch-max-events", "10")
    daemon = spawn(url, endpoint.url_for(transport), *flags)
    wait_until(
        lambda: not {r.status for r in rows(engine)} & {"pending", "in_flight"},
        30,
        "every row to settle",
    )
    carried = [len(r.events) for r in endpoint.requests]
    expected = {
        "daemons": 1,
        "requests": len(carried),
        "events_sent": sum(carried),
        "events_per_request": sum(carried) / len(carried),
        "largest_batch": max(carried),
        "delivered": 23,
        "dead": 3,
    }
    if transport == "v3-batch":
        assert max(carried) == 10 and len(carried) < 26  # batches, not one event each

    def shown() -> Any:
        stats = json.loads(run_cli("stats", "--json", "--database-url", url).stdout)
        return stats["transports"].get(transport)

    wait_until(lambda: shown() == expected, 30, f"stats to show {expected}")
    text = run_cli("stats", "--database-url", url).stdout
    assert "by transport (live daemons, since each started):" in text
    line = next(x for x in text.splitlines() if x.split()[:1] == [transport])
    assert line.split() == [
        transport,
        "1",
        str(len(carried)),
        str(sum(carried)),
        f"{sum(carried) / len(carried):.1f}",
        str(max(carried)),
        "23",
        "3",
    ]
    assert daemon.stop() == 0, daemon.log()


def test_each_request_takes_one_turn_of_the_rate_gate(engine, endpoint, transport):
    from tests.conftest import fast_settings
    from worker.daemon import build_daemon

    add(engine, [spec(n) for n in range(6)])
    url = engine.url.render_as_string(hide_password=False)
    settings = fast_settings(url, endpoint.url_for(transport), transport=transport, rate_limit=50)
    daemon = build_daemon(settings, engine=engine)
    turns = []
    wait_turn = daemon.gate.wait_turn
    daemon.gate.wait_turn = lambda cancel=None, tokens=1: (
        turns.append(tokens) or wait_turn(cancel, tokens)
    )  # type: ignore[method-assign]
    assert daemon.run() == 0
    requests = 1 if transport == "v3-batch" else 6
    assert turns == [1] * requests and len(endpoint.requests) == requests


def test_the_async_track_event_checks_the_transport_rules_too(sqlite_url):
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    from worker import asyncio as outbox

    engine = create_async_engine(sqlite_url.replace("sqlite://", "sqlite+aiosqlite://"))

    async def track() -> None:
        async with engine.begin() as conn:
            await outbox.track_events(
                conn, [{"email": "a@example.com", "event": "x", "properties": {"V": True}}],
                transport="v3-batch",
            )  # fmt: skip

    with pytest.raises(InvalidEvent, match="string or an integer for the v3 batch API"):
        asyncio.run(track())
    asyncio.run(engine.dispose())
