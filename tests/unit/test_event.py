"""What a valid event is and the exact body sent for it (INTERFACE sections 1 and 6).

The sample files (tests/samples) drive the table of rules; the cases that JSON cannot
spell (NaN, cycles, objects, lone surrogates, huge or deep payloads) are built
here.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import SAMPLES
from worker.event import (
    MAX_BODY_BYTES,
    InvalidEvent,
    from_json_object,
    from_stored,
    validate,
)

EMAIL = "jane@example.com"


def _lines(name: str) -> list[dict[str, Any]]:
    text = (SAMPLES / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


INVALID = _lines("invalid.jsonl")
VALID = _lines("valid.jsonl")


def _nested_dict(depth: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(depth):
        node["a"] = {}
        node = node["a"]
    return root


def _nested_list(depth: int) -> list[Any]:
    root: list[Any] = []
    node = root
    for _ in range(depth):
        child: list[Any] = []
        node.append(child)
        node = child
    return root


def _refusal(**fields: Any) -> InvalidEvent:
    fields.setdefault("email", EMAIL)
    fields.setdefault("event", "cart_updated")
    with pytest.raises(InvalidEvent) as caught:
        validate(**fields)
    return caught.value


# -- the sample files ------------------------------------------------------


def test_the_sample_files_are_not_empty() -> None:
    assert len(INVALID) >= 10
    assert len(VALID) >= 5


@pytest.mark.parametrize("case", INVALID, ids=[c["why"].replace(" ", "_") for c in INVALID])
def test_invalid_sample_is_refused_by_validate_naming_its_field(case: dict[str, Any]) -> None:
    given_fields = case["input"]
    with pytest.raises(InvalidEvent) as caught:
        validate(
            given_fields.get("email"),
            given_fields.get("event"),
            given_fields.get("properties"),
            given_fields.get("eventdata"),
        )
    assert caught.value.field == case["field"]


@pytest.mark.parametrize("case", INVALID, ids=[c["why"].replace(" ", "_") for c in INVALID])
def test_invalid_sample_is_refused_as_a_json_line_naming_its_field(
    case: dict[str, Any],
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        from_json_object(case["input"])
    assert caught.value.field == case["field"]


@pytest.mark.parametrize("fields", VALID, ids=[f"{v['event']}-{i}" for i, v in enumerate(VALID)])
def test_valid_sample_body_is_exactly_its_fields(fields: dict[str, Any]) -> None:
    event = from_json_object(fields)
    assert json.loads(event.body()) == fields


@pytest.mark.parametrize("fields", VALID, ids=[f"{v['event']}-{i}" for i, v in enumerate(VALID)])
def test_valid_sample_body_adds_no_keys(fields: dict[str, Any]) -> None:
    event = from_json_object(fields)
    assert list(json.loads(event.body())) == [
        k for k in ("email", "event", "properties", "eventdata") if k in fields
    ]


def test_body_is_utf8_json_bytes() -> None:
    event = validate("zoe@example.com", "profile_updated", {"CITY": "東京"})
    assert isinstance(event.body(), bytes)
    assert "東京".encode() in event.body()


def test_refusal_message_starts_with_the_field() -> None:
    assert str(_refusal(properties={"email": "x@example.com"})).startswith("properties")


def test_invalid_event_is_a_value_error() -> None:
    assert issubclass(InvalidEvent, ValueError)


# -- what is sent as given --------------------------------------------------------


def test_missing_optional_fields_are_not_sent_as_null() -> None:
    body = json.loads(validate(EMAIL, "signed_up").body())
    assert body == {"email": EMAIL, "event": "signed_up"}


def test_empty_properties_are_sent_as_given() -> None:
    body = json.loads(validate(EMAIL, "signed_up", properties={}).body())
    assert body == {"email": EMAIL, "event": "signed_up", "properties": {}}


def test_empty_eventdata_is_sent_as_given() -> None:
    body = json.loads(validate(EMAIL, "signed_up", eventdata={}).body())
    assert body == {"email": EMAIL, "event": "signed_up", "eventdata": {}}


def test_null_inside_properties_is_kept() -> None:
    body = json.loads(validate(EMAIL, "x", properties={"coupon": None}).body())
    assert body["properties"] == {"coupon": None}


def test_event_name_is_sent_without_stripping() -> None:
    body = json.loads(validate(EMAIL, " cart updated ").body())
    assert body["event"] == " cart updated "


def test_text_that_spells_a_backslash_u0000_is_accepted() -> None:
    # A literal backslash followed by "u0000" is ordinary text, not a NUL.
    event = validate(EMAIL, "x", properties={"path": "C:\\u0000dir"})
    assert json.loads(event.body())["properties"] == {"path": "C:\\u0000dir"}


# -- email (INTERFACE section 6) --------------------------------------------------


@pytest.mark.parametrize(
    "email",
    [" jane@example.com", "jane@example.com ", "jane @example.com", "jane@exa mple.com"],
    ids=["leading", "trailing", "before_at", "in_domain"],
)
def test_email_with_a_space_is_refused(email: str) -> None:
    assert _refusal(email=email).field == "email"


@pytest.mark.parametrize(
    "email",
    ["jane@example.com\n", "ja\tne@example.com", "jane@example\r.com", "jane\u00a0@example.com"],
    ids=["newline", "tab", "carriage_return", "nbsp"],
)
def test_email_with_other_whitespace_is_refused(email: str) -> None:
    assert _refusal(email=email).field == "email"


@pytest.mark.parametrize(
    "email", ["jane@doe@example.com", "jane@@example.com"], ids=["apart", "adjacent"]
)
def test_email_with_two_at_signs_is_refused(email: str) -> None:
    assert _refusal(email=email).field == "email"


@pytest.mark.parametrize(
    "email", ["jane@.example.com", "jane@example.com."], ids=["leading_dot", "trailing_dot"]
)
def test_email_domain_starting_or_ending_with_a_dot_is_refused(email: str) -> None:
    assert _refusal(email=email).field == "email"


def test_email_without_a_dot_in_the_domain_is_refused() -> None:
    assert _refusal(email="jane@localhost").field == "email"


def test_email_with_an_empty_local_part_is_refused() -> None:
    assert _refusal(email="@example.com").field == "email"


def test_email_with_an_empty_domain_is_refused() -> None:
    assert _refusal(email="jane@").field == "email"


@pytest.mark.parametrize(
    "email",
    [
        "a@b.co",
        "first.last+tag@sub.example.co.uk",
        "O'Brien@example.ie",
        "user@xn--bcher-kva.ch",
        "Zoë@exämple.com",
    ],
)
def test_ordinary_addresses_are_accepted(email: str) -> None:
    assert json.loads(validate(email, "x").body())["email"] == email


def test_email_is_sent_as_given_with_its_case() -> None:
    assert json.loads(validate("Jane.Doe@Example.COM", "x").body())["email"] == (
        "Jane.Doe@Example.COM"
    )


# -- event ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [" ", "   ", "\t\n", "\u3000"], ids=["one", "many", "tab_nl", "ideo"]
)
def test_whitespace_only_event_is_refused(name: str) -> None:
    assert _refusal(event=name).field == "event"


# -- reserved keys ----------------------------------------------------------------


@pytest.mark.parametrize("key", ["email", "event"])
def test_reserved_property_key_is_refused_with_its_name(key: str) -> None:
    error = _refusal(properties={"plan": "pro", key: "x"})
    assert error.field == "properties"
    assert key in str(error)


@pytest.mark.parametrize("key", ["Email", "EVENT", "e-mail", "email ", "event_name"])
def test_keys_that_only_resemble_reserved_ones_are_accepted(key: str) -> None:
    event = validate(EMAIL, "x", properties={key: "v"})
    assert json.loads(event.body())["properties"] == {key: "v"}


def test_reserved_keys_are_allowed_inside_eventdata() -> None:
    data = {"id": "a", "data": {"email": "other@example.com", "event": "y"}}
    assert json.loads(validate(EMAIL, "x", eventdata=data).body())["eventdata"] == data


# -- numbers that JSON cannot carry -------------------------------------------------


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_number_in_properties_is_refused(number: float) -> None:
    assert _refusal(properties={"score": number}).field == "properties"


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_number_in_eventdata_is_refused(number: float) -> None:
    error = _refusal(eventdata={"id": "a", "data": {"items": [{"price": number}]}})
    assert error.field == "eventdata"


def test_non_finite_number_error_names_the_rule() -> None:
    assert "finite" in str(_refusal(properties={"score": math.nan}))


# -- values that are not JSON -------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [object(), {1, 2}, dt.datetime(2024, 1, 1), b"bytes", 1 + 2j],
    ids=["object", "set", "datetime", "bytes", "complex"],
)
def test_non_serialisable_property_is_refused(value: Any) -> None:
    assert _refusal(properties={"v": value}).field == "properties"


@pytest.mark.parametrize(
    "value", [object(), {1, 2}, dt.date(2024, 1, 1)], ids=["object", "set", "date"]
)
def test_non_serialisable_eventdata_is_refused(value: Any) -> None:
    assert _refusal(eventdata={"data": {"v": value}}).field == "eventdata"


def test_non_string_property_key_that_json_cannot_spell_is_refused() -> None:
    assert _refusal(properties={("a", "b"): 1}).field == "properties"


def test_circular_properties_are_refused() -> None:
    props: dict[str, Any] = {"plan": "pro"}
    props["self"] = props
    assert _refusal(properties=props).field == "properties"


def test_circular_list_in_eventdata_is_refused() -> None:
    items: list[Any] = [1]
    items.append(items)
    assert _refusal(eventdata={"data": {"items": items}}).field == "eventdata"


def test_properties_nested_10000_deep_are_refused() -> None:
    assert _refusal(properties=_nested_dict(10_000)).field == "properties"


def test_eventdata_nested_10000_deep_in_lists_is_refused() -> None:
    assert _refusal(eventdata={"data": {"l": _nested_list(10_000)}}).field == "eventdata"


def test_eventdata_nested_100000_deep_says_nested_too_deeply() -> None:
    deep: Any = "leaf"
    for _ in range(100_000):
        deep = {"d": deep}
    assert "nested too deeply" in str(_refusal(eventdata={"data": deep}))


def test_circular_reference_error_names_the_rule() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    assert "circular" in str(_refusal(properties=loop))


def test_moderate_nesting_is_accepted() -> None:
    props = _nested_dict(50)
    assert json.loads(validate(EMAIL, "x", properties=props).body())["properties"] == props


# -- text that cannot be sent --------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"email": "ja\ud800ne@example.com"}, "email"),
        ({"event": "cart\udfff"}, "event"),
        ({"properties": {"name": "Zo\ud83d"}}, "properties"),
        ({"properties": {"k\udc00": "v"}}, "properties"),
        ({"eventdata": {"id": "cart:\ud800"}}, "eventdata"),
        ({"eventdata": {"data": {"note": ["\udfff"]}}}, "eventdata"),
    ],
    ids=["email", "event", "property_value", "property_key", "eventdata_id", "eventdata_data"],
)
def test_lone_surrogate_is_refused(fields: dict[str, Any], field: str) -> None:
    assert _refusal(**fields).field == field


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"email": "ja\x00ne@example.com"}, "email"),
        ({"event": "cart\x00updated"}, "event"),
        ({"properties": {"name": "a\x00b"}}, "properties"),
        ({"properties": {"k\x00": "v"}}, "properties"),
        ({"eventdata": {"id": "\x00"}}, "eventdata"),
        ({"eventdata": {"data": {"note": ["\x00"]}}}, "eventdata"),
    ],
    ids=["email", "event", "property_value", "property_key", "eventdata_id", "eventdata_data"],
)
def test_nul_character_is_refused(fields: dict[str, Any], field: str) -> None:
    assert _refusal(**fields).field == field


def test_other_control_characters_are_accepted() -> None:
    event = validate(EMAIL, "x", properties={"note": "line\nnext\ttab\x01"})
    assert json.loads(event.body())["properties"]["note"] == "line\nnext\ttab\x01"


# -- size --------------------------------------------------------------------------


def _padded_to(size: int) -> dict[str, Any]:
    """Properties that make the body exactly `size` bytes."""
    overhead = len(validate(EMAIL, "x", properties={"pad": ""}).body())
    return {"pad": "x" * (size - overhead)}


def test_body_of_exactly_64_kib_is_accepted() -> None:
    event = validate(EMAIL, "x", properties=_padded_to(64 * 1024))
    assert len(event.body()) == 64 * 1024


def test_body_one_byte_over_64_kib_is_refused_naming_size() -> None:
    error = _refusal(properties=_padded_to(64 * 1024 + 1))
    assert "size" in str(error)


def test_default_limit_is_64_kib() -> None:
    assert MAX_BODY_BYTES == 64 * 1024


def test_size_counts_encoded_bytes_not_characters() -> None:
    # 30,000 characters, 90,000 bytes of UTF-8.
    error = _refusal(properties={"text": "東" * 30_000})
    assert "size" in str(error)


def test_size_limit_counts_eventdata_too() -> None:
    assert "size" in str(_refusal(eventdata={"data": {"blob": "x" * 70_000}}))


def test_a_lower_configured_limit_refuses_a_small_body() -> None:
    with pytest.raises(InvalidEvent) as caught:
        validate(EMAIL, "x", properties={"note": "y" * 200}, max_body_bytes=100)
    assert "size" in str(caught.value)


def test_a_higher_configured_limit_accepts_a_large_body() -> None:
    event = validate(EMAIL, "x", properties={"blob": "x" * 100_000}, max_body_bytes=200_000)
    assert len(event.body()) > 100_000


def test_from_stored_honours_a_configured_limit() -> None:
    with pytest.raises(InvalidEvent) as caught:
        from_stored(EMAIL, "x", json.dumps({"note": "y" * 200}), None, max_body_bytes=100)
    assert "size" in str(caught.value)


def test_from_json_object_honours_a_configured_limit() -> None:
    line = {"email": EMAIL, "event": "x", "properties": {"note": "y" * 200}}
    with pytest.raises(InvalidEvent) as caught:
        from_json_object(line, max_body_bytes=100)
    assert "size" in str(caught.value)


# -- rows stored by plain SQL ----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ['{"plan": ', "not json", "{'plan': 'pro'}", "NaN", '{"n": Infinity}', ""],
    ids=["truncated", "words", "python_repr", "nan", "infinity", "empty"],
)
def test_malformed_stored_properties_are_a_dead_letter_reason(text: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        from_stored(EMAIL, "x", text, None)
    assert caught.value.field == "properties"


def test_malformed_stored_eventdata_names_eventdata() -> None:
    with pytest.raises(InvalidEvent) as caught:
        from_stored(EMAIL, "x", None, '{"id": "a",')
    assert caught.value.field == "eventdata"


def test_stored_json_nested_10000_deep_is_a_dead_letter_reason() -> None:
    text = '{"a":' * 10_000 + "1" + "}" * 10_000
    with pytest.raises(InvalidEvent) as caught:
        from_stored(EMAIL, "x", text, None)
    assert caught.value.field == "properties"


def test_stored_json_escaping_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(InvalidEvent) as caught:
        from_stored(EMAIL, "x", '{"name": "Zo\\ud83d"}', None)
    assert caught.value.field == "properties"


def test_stored_bytes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(InvalidEvent) as caught:
        from_stored(EMAIL, "x", None, b'{"id": "\xff"}')  # type: ignore[arg-type]
    assert caught.value.field == "eventdata"


def test_stored_json_array_as_properties_is_refused() -> None:
    with pytest.raises(InvalidEvent) as caught:
        from_stored(EMAIL, "x", '["a", "b"]', None)
    assert caught.value.field == "properties"


def test_stored_eventdata_with_a_numeric_id_is_refused() -> None:
    with pytest.raises(InvalidEvent) as caught:
        from_stored(EMAIL, "x", None, '{"id": 5}')
    assert caught.value.field == "eventdata"


def test_stored_json_null_sends_no_field() -> None:
    event = from_stored(EMAIL, "x", "null", None)
    assert json.loads(event.body()) == {"email": EMAIL, "event": "x"}


def test_stored_row_with_missing_email_is_refused() -> None:
    with pytest.raises(InvalidEvent) as caught:
        from_stored(None, "x", None, None)
    assert caught.value.field == "email"


def test_well_formed_stored_row_gives_its_fields_as_body() -> None:
    event = from_stored(EMAIL, "x", '{"plan": "pro"}', '{"id": "cart:1", "data": {}}')
    assert json.loads(event.body()) == {
        "email": EMAIL,
        "event": "x",
        "properties": {"plan": "pro"},
        "eventdata": {"id": "cart:1", "data": {}},
    }


def test_stored_row_without_json_columns_sends_no_nulls() -> None:
    event = from_stored(EMAIL, "x", None, None)
    assert json.loads(event.body()) == {"email": EMAIL, "event": "x"}


# -- JSON Lines records --------------------------------------------------------------


def test_unknown_field_in_a_json_line_is_refused_by_name() -> None:
    with pytest.raises(InvalidEvent) as caught:
        from_json_object({"email": EMAIL, "event": "x", "colour": "red"})
    assert caught.value.field == "colour"


def test_misspelt_field_in_a_json_line_is_refused() -> None:
    with pytest.raises(InvalidEvent) as caught:
        from_json_object({"email": EMAIL, "event": "x", "eventData": {}})
    assert caught.value.field == "eventData"


@pytest.mark.parametrize("line", [[EMAIL, "x"], "x", 42, None], ids=["list", "str", "int", "null"])
def test_a_json_line_that_is_not_an_object_is_refused(line: Any) -> None:
    with pytest.raises(InvalidEvent):
        from_json_object(line)


# -- property: anything JSON-ish either validates and round-trips, or is refused -------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(exclude_categories=()), max_size=12)
)
_keys = st.text(alphabet=st.characters(exclude_categories=()), max_size=8)
_json_ish = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=20,
)
_objects = st.dictionaries(
    _keys | st.sampled_from(["email", "event", "id", "data"]), _json_ish, max_size=5
)
_optional = st.none() | _objects | _json_ish


@settings(max_examples=300, deadline=None)
@given(properties=_optional, eventdata=_optional)
def test_json_ish_input_validates_and_round_trips_or_is_refused(
    properties: Any, eventdata: Any
) -> None:
    try:
        event = validate(EMAIL, "x", properties, eventdata)
    except InvalidEvent as error:
        assert error.field in {"properties", "eventdata", "body"}
        return
    expected: dict[str, Any] = {"email": EMAIL, "event": "x"}
    if properties is not None:
        expected["properties"] = properties
    if eventdata is not None:
        expected["eventdata"] = eventdata
    assert json.loads(event.body()) == expected
