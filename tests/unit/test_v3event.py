"""Brevo's v3 rules and bodies, the batch transport's packing and its reading of
per-event errors: pure, no database, no sockets."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from worker import InvalidEvent, track_event
from worker.batch import V3BatchTransport, failed_indexes
from worker.delivery import Deliverer
from worker.event import validate
from worker.policy import Action, Answer, classify
from worker.store import ClaimedEvent
from worker.v3event import body, check, event_date

WHEN = dt.datetime(2026, 5, 6, 14, 30, 0, 123456, tzinfo=dt.timezone.utc)


def v3(event: str = "cart_updated", properties=None, eventdata=None, transport: str = "v3") -> None:
    check(validate("jane@example.com", event, properties, eventdata), transport)


def test_a_v3_body_maps_the_row_and_keeps_when_it_happened():
    event = validate("jane@example.com", "cart_updated", {"FIRSTNAME": "Jane"}, {"id": "cart:1"})
    assert json.loads(body(event, WHEN)) == {
        "event_name": "cart_updated",
        "identifiers": {"email_id": "jane@example.com"},
        "event_date": "2026-05-06T14:30:00.123Z",
        "contact_properties": {"FIRSTNAME": "Jane"},
        "event_properties": {"id": "cart:1"},
    }


def test_a_v3_body_sends_only_the_fields_given():
    assert json.loads(body(validate("a@example.com", "signed_up"), WHEN)) == {
        "event_name": "signed_up",
        "identifiers": {"email_id": "a@example.com"},
        "event_date": "2026-05-06T14:30:00.123Z",
    }


def test_event_date_is_utc_whatever_the_offset():
    paris = dt.timezone(dt.timedelta(hours=2))
    assert event_date(WHEN.astimezone(paris)) == "2026-05-06T14:30:00.123Z"


@pytest.mark.parametrize("name", ["cart updated", "café", "a.b"])
def test_event_name_must_be_letters_digits_dash_underscore(name):
    with pytest.raises(InvalidEvent, match="event_name") as caught:
        v3(name)
    assert caught.value.field == "event"


def test_no_transport_takes_an_event_name_over_255_characters():
    with pytest.raises(InvalidEvent, match="event: is longer than 255 characters"):
        validate("jane@example.com", "x" * 256)


def test_the_tracker_takes_any_event_name():
    check(validate("a@example.com", "cart updated!"), "tracker")
    v3("Cart-updated_2" + "x" * 241)  # 255 characters


def test_keys_longer_than_255_characters_are_refused_at_any_depth():
    with pytest.raises(InvalidEvent, match="key longer than 255"):
        v3(eventdata={"data": {"k" * 256: 1}})
    with pytest.raises(InvalidEvent, match="key longer than 255"):
        v3(properties={"k" * 256: "v"})


def test_event_properties_over_50000_bytes_are_refused():
    v3(eventdata={"data": {"text": "x" * 49_900}})
    with pytest.raises(InvalidEvent, match="over the v3 limit of 50000 for event_properties"):
        v3(eventdata={"data": {"text": "x" * 50_000}})


def test_the_batch_schema_refuses_booleans_and_other_contact_values():
    v3(properties={"VIP": True, "SCORE": 1.5}, eventdata={"gift": True})  # the single schema
    for value in (True, 1.5, None, {"a": 1}, [1]):
        with pytest.raises(InvalidEvent, match="string or an integer for the v3 batch"):
            v3(properties={"VIP": value}, transport="v3-batch")
    with pytest.raises(InvalidEvent, match="no true/false values"):
        v3(eventdata={"data": {"items": [{"gift": False}]}}, transport="v3-batch")
    v3(properties={"NAME": "Jane", "AGE": 40}, eventdata={"data": {"n": 1.5}}, transport="v3-batch")


def test_track_event_checks_the_transport_rules_before_any_sql():
    with pytest.raises(InvalidEvent, match="event_name"):
        track_event(None, email="a@example.com", event="has space", transport="v3")  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent, match="transport: must be one of"):
        track_event(None, email="a@example.com", event="x", transport="smtp")  # type: ignore[arg-type]


# -- the batch transport -------------------------------------------------------


def claimed(n: int, email: str | None = None, text: str = "") -> ClaimedEvent:
    data = json.dumps({"id": f"m:{n}", "data": {"text": text}})
    return ClaimedEvent(n, email or f"c{n}@example.com", "cart_updated", None, data, 0, WHEN, "t")


def batching(**options) -> V3BatchTransport:
    deliverer = Deliverer(
        "http://127.0.0.1:9/v3/events/batch", "k" * 12, timeout=2.0, keep_content=True
    )
    return V3BatchTransport(deliverer, max_body_bytes=64 * 1024, **options)


def test_a_batch_holds_at_most_max_events():
    requests, rejected = batching(max_events=3).prepare([claimed(n) for n in range(7)])
    assert [len(r.events) for r in requests] == [3, 3, 1] and rejected == []
    assert [e.id for r in requests for e in r.events] == list(range(7))


def test_a_batch_holds_at_most_max_bytes():
    events = [claimed(n, text="x" * 400) for n in range(6)]
    requests, _ = batching(max_bytes=1500).prepare(events)
    assert all(len(r.body) <= 1500 for r in requests) and len(requests) == 3


def test_a_batch_holds_one_event_per_contact_and_keeps_their_order():
    events = [claimed(n, "Same@example.com" if n % 2 else "SAME@example.com") for n in range(4)]
    events += [claimed(9)]
    requests, _ = batching().prepare(events)
    assert [[e.id for e in r.events] for r in requests] == [[0, 9], [1], [2], [3]]


def test_an_event_bigger_than_a_batch_is_rejected_naming_the_flag():
    _, rejected = batching(max_bytes=1000).prepare([claimed(1, text="x" * 2000)])
    assert "over --batch-max-bytes 1000" in rejected[0].reason


def test_both_body_shapes():
    (obj,), _ = batching().prepare([claimed(1)])
    (arr,), _ = batching(shape="array").prepare([claimed(1)])
    assert json.loads(obj.body)["events"] == json.loads(arr.body)


def test_failed_indexes_reads_every_variant_and_ignores_the_rest():
    body = {"errors": [{"eventIndex": [0, 2], "message": "bad name"}, {"eventIndex": 5}]}
    assert failed_indexes(json.dumps(body).encode()) == [
        (0, "bad name"),
        (2, "bad name"),
        (5, "refused"),
    ]
    assert failed_indexes(b'[{"eventIndex": 1, "message": "m"}]') == [(1, "m")]
    for nothing in (
        b"",
        b"<html>",
        b'{"code": "bad_request"}',
        b'{"errors": [{"eventIndex": [true]}]}',
    ):
        assert failed_indexes(nothing) == []


# -- one batch answer into each event's -------------------------------------------


def exchange(answers, count: int = 8):
    """Run the batch transport's exchange with scripted answers (one per request)."""
    transport = batching()
    (request,), _ = transport.prepare([claimed(n) for n in range(count)])
    sent: list[int] = []

    def attempt(body: bytes) -> Answer | None:
        sent.append(len(json.loads(body)["events"]))
        return answers(json.loads(body)["events"]) if callable(answers) else answers.pop(0)

    result = transport.exchange(request, attempt)
    shares = {event.id: share for event, share in result.results}
    return shares, sent, result


def actions(shares) -> dict[int, Any]:
    return {i: (s.action or classify(s.status_code)) if s else None for i, s in shares.items()}


def test_a_400_naming_indexes_dead_letters_those_and_delivers_the_rest():
    body = json.dumps({"errors": [{"eventIndex": [2, 5], "message": "bad name"}]}).encode()
    shares, sent, _ = exchange([Answer(400, "HTTP 400", content=body)])
    assert sent == [8]
    dead = {i for i, v in actions(shares).items() if v is Action.DEAD}
    assert dead == {2, 5} and set(actions(shares).values()) == {Action.DEAD, Action.DELIVERED}
    assert shares[2].error == "HTTP 400 bad name (eventIndex 2 of a batch of 8)"


def test_a_207_naming_none_delivers_all():
    shares, _, _ = exchange([Answer(207, None, content=b'{"message": "ok"}')])
    assert set(actions(shares).values()) == {Action.DELIVERED}


def test_a_400_naming_none_is_split_until_the_bad_event_is_alone():
    def answers(events):
        bad = any(e["event_properties"]["id"] == "m:5" for e in events)
        return Answer(400, "HTTP 400 bad batch") if bad else Answer(202)

    shares, sent, result = exchange(answers)
    assert sent == [8, 4, 4, 2, 1, 1, 2]  # depth first: the bad half is split before the next
    assert {i for i, v in actions(shares).items() if v is Action.DEAD} == {5}
    assert len(result.answers) == len(sent) and len(shares) == 8


def test_a_413_naming_none_is_split_too():
    answers = [Answer(413, "HTTP 413 too large")] + [Answer(202)] * 2
    shares, sent, _ = exchange(answers)
    assert sent == [8, 4, 4] and set(actions(shares).values()) == {Action.DELIVERED}


def test_a_split_stops_at_a_429_and_sends_no_more_halves():
    shares, sent, _ = exchange([Answer(400, "HTTP 400 bad batch"), Answer(429, "HTTP 429")])
    assert sent == [8, 4]
    assert [i for i, s in shares.items() if s is None] == [4, 5, 6, 7]  # back, uncharged
    assert {shares[i].status_code for i in range(4)} == {429}


def test_an_unsent_batch_leaves_every_event_unsent():
    shares, _, result = exchange([None])
    assert set(shares.values()) == {None} and result.answers == []
