"""What a valid event is, and the exact body sent: worker/event.py, no database, no HTTP."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import SAMPLE_EVENTS, SHARED_EVENTS
from worker.event import MAX_BODY_BYTES, InvalidEvent, from_json_object, from_stored, validate


def _lines(name: str) -> list[dict[str, Any]]:
    path = SHARED_EVENTS / name
    if not path.exists():  # the shared samples ship beside the repository
        path = SAMPLE_EVENTS if name == "valid.jsonl" else path
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


INVALID = _lines("invalid.jsonl")
VALID = _lines("valid.jsonl")


@pytest.mark.parametrize("case", INVALID, ids=[f"{c['field']}-{c['why']}" for c in INVALID])
def test_every_invalid_sample_is_refused_naming_its_field(case):
    with pytest.raises(InvalidEvent) as error:
        from_json_object(case["input"])
    assert error.value.field == case["field"]
    assert str(error.value).startswith(case["field"])


@pytest.mark.parametrize("sample", VALID, ids=[s["event"] for s in VALID])
def test_every_valid_sample_is_sent_as_exactly_its_fields(sample):
    body = json.loads(from_json_object(sample).body())
    assert body == sample


def test_the_body_has_no_invented_nulls_and_keeps_empty_objects():
    assert json.loads(validate("a@example.com", "x").body()) == {
        "email": "a@example.com",
        "event": "x",
    }
    body = json.loads(validate("a@example.com", "x", {}, {}).body())
    assert body == {"email": "a@example.com", "event": "x", "properties": {}, "eventdata": {}}


@pytest.mark.parametrize(
    "email",
    ["a b@example.com", "a@@example.com", "a@b@example.com", "@example.com", "a@example",
     "a@.example.com", "a@example.com.", " a@example.com", "a@example.com\n"],
)  # fmt: skip
def test_email_rules(email):
    with pytest.raises(InvalidEvent) as error:
        validate(email, "x")
    assert error.value.field == "email"


@pytest.mark.parametrize("email", ["a@b.co", "first.last+tag@sub.example.co.uk", "Zoë@exämple.com"])
def test_addresses_that_pass(email):
    assert validate(email, "x").email == email


@pytest.mark.parametrize("event", ["", "   ", "\t\n"])
def test_an_event_name_of_only_whitespace_is_refused(event):
    with pytest.raises(InvalidEvent, match="event"):
        validate("a@example.com", event)


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("properties", {"n": math.nan}, "finite"),
        ("properties", {"n": math.inf}, "finite"),
        ("eventdata", {"data": {"n": -math.inf}}, "finite"),
        ("properties", {"when": object()}, "JSON-serialisable"),
        ("properties", {"s": {1, 2}}, "JSON-serialisable"),
        ("properties", {"b": b"bytes"}, "JSON-serialisable"),
        ("properties", {"s": "\ud800"}, "UTF-8"),
        ("eventdata", {"data": {"s": "nul\x00"}}, "NUL"),
    ],
)
def test_values_json_cannot_carry_are_refused_naming_the_field(field, value, rule):
    kwargs = {field: value}
    with pytest.raises(InvalidEvent, match=rule) as error:
        validate("a@example.com", "x", **kwargs)
    assert error.value.field == field


def test_a_circular_reference_is_refused():
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(InvalidEvent, match="circular"):
        validate("a@example.com", "x", properties=loop)


def test_deep_nesting_is_refused_not_a_crash():
    deep: Any = "leaf"
    for _ in range(100_000):
        deep = {"d": deep}
    with pytest.raises(InvalidEvent, match="nested too deeply"):
        validate("a@example.com", "x", eventdata={"data": deep})


def test_text_that_is_not_utf8_in_email_or_event_is_refused():
    with pytest.raises(InvalidEvent) as error:
        validate("a@example.com", "bad\udcff")
    assert error.value.field == "event"


def test_the_body_size_limit_names_size_and_is_configurable():
    big = {"blob": "x" * MAX_BODY_BYTES}
    with pytest.raises(InvalidEvent, match="size") as error:
        validate("a@example.com", "x", properties=big)
    assert error.value.field == "body"
    assert validate("a@example.com", "x", properties=big, max_body_bytes=2 * MAX_BODY_BYTES)
    with pytest.raises(InvalidEvent, match="size"):
        validate("a@example.com", "x", properties={"a": "b" * 100}, max_body_bytes=64)


def test_the_limit_counts_encoded_bytes_not_characters():
    # 30,000 three-byte characters: under the limit as text, over it as UTF-8.
    with pytest.raises(InvalidEvent, match="size"):
        validate("a@example.com", "x", properties={"t": "東" * 30_000})


@pytest.mark.parametrize(
    ("properties", "eventdata", "field"),
    [("not json", None, "properties"), (None, "{broken", "eventdata"),
     ("NaN", None, "properties"), ("[1, 2]", None, "properties"), (None, '{"id": 5}', "eventdata")],
)  # fmt: skip
def test_a_stored_row_with_bad_json_gets_a_reason_not_a_crash(properties, eventdata, field):
    with pytest.raises(InvalidEvent) as error:
        from_stored("a@example.com", "x", properties, eventdata)
    assert error.value.field == field


def test_a_stored_row_with_json_null_sends_no_field():
    event = from_stored("a@example.com", "x", "null", None)
    assert json.loads(event.body()) == {"email": "a@example.com", "event": "x"}


def test_a_json_lines_record_with_an_unknown_field_is_refused():
    with pytest.raises(InvalidEvent) as error:
        from_json_object({"email": "a@example.com", "event": "x", "contact": "y"})
    assert error.value.field == "contact"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(properties=json_values, eventdata=json_values, event=st.text(max_size=10))
def test_any_input_is_either_valid_and_round_trips_or_refused_cleanly(properties, eventdata, event):
    try:
        valid = validate("a@example.com", event, properties, eventdata)
    except InvalidEvent as error:
        assert error.field in {"event", "properties", "eventdata", "body"}
        return
    sent = json.loads(valid.body())
    assert sent["event"] == event
    if properties is not None:
        assert sent["properties"] == properties
    if eventdata is not None:
        assert sent["eventdata"] == eventdata
