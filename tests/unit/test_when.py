"""The one parser of dates and durations: flags, JSON Lines fields and track_event alike."""

from __future__ import annotations

import datetime as dt

import pytest

from worker.when import MAX_DURATION, InvalidTime, parse_duration, parse_when

UTC = dt.timezone.utc


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("10m", 600),
        ("2h", 7200),
        ("1d", 86400),
        ("2w", 1209600),
        ("1.5h", 5400),
        (" 15m ", 900),
        ("0", 0),
    ],
)
def test_a_duration_is_read_in_its_unit_and_a_bare_number_in_seconds(text, seconds):
    assert parse_when(text, "--x") == dt.timedelta(seconds=seconds)
    assert parse_duration(text, "--x") == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2031-05-06T14:30:15Z", dt.datetime(2031, 5, 6, 14, 30, 15, tzinfo=UTC)),
        ("2031-05-06T14:30:15+02:00", dt.datetime(2031, 5, 6, 12, 30, 15, tzinfo=UTC)),
        ("2031-05-06 14:30:15.250-05:00", dt.datetime(2031, 5, 6, 19, 30, 15, 250000, tzinfo=UTC)),
    ],
)
def test_a_timestamp_with_an_offset_is_read_as_that_instant_in_utc(text, expected):
    parsed = parse_when(text, "--since")
    assert parsed == expected
    assert parsed.utcoffset() == dt.timedelta(0)


def test_a_number_is_seconds():
    assert parse_when(90, "deliver_after") == dt.timedelta(seconds=90)
    assert parse_when(2.5, "deliver_after") == dt.timedelta(seconds=2.5)


@pytest.mark.parametrize("text", ["2031-05-06T14:30:15", "2031-05-06"])
def test_a_timestamp_without_an_offset_is_refused_saying_to_add_one(text):
    with pytest.raises(InvalidTime) as caught:
        parse_when(text, "--since")
    assert str(caught.value).startswith("--since: ")
    assert "offset" in str(caught.value) and "Z" in str(caught.value)


@pytest.mark.parametrize("value", ["-5m", "-1", -30, -0.5])
def test_a_negative_duration_is_refused(value):
    with pytest.raises(InvalidTime, match="negative"):
        parse_when(value, "--deliver-after")


@pytest.mark.parametrize("value", ["99999999999d", "1e400", 10**400, 99999999999 * 86400.0])
def test_a_huge_duration_is_refused_with_its_limit_not_an_overflow(value):
    with pytest.raises(InvalidTime) as caught:
        parse_when(value, "--max-age")
    message = str(caught.value)
    assert "OverflowError" not in message
    assert "too long" in message or "not a time" in message


def test_the_longest_duration_accepted_is_the_limit():
    days = MAX_DURATION.days
    assert parse_duration(f"{days}d", "--max-age") == MAX_DURATION
    with pytest.raises(InvalidTime, match="too long"):
        parse_duration(f"{days + 1}d", "--max-age")


@pytest.mark.parametrize(
    "value", ["soon", "", "5 minutes", "1y", "nan", "\u0663s", float("nan"), True]
)
def test_anything_else_is_refused_with_examples_of_what_works(value):
    with pytest.raises(InvalidTime) as caught:
        parse_when(value, "--since")
    assert "90s" in str(caught.value) or "finite" in str(caught.value)


def test_a_timestamp_where_only_a_duration_works_is_refused():
    with pytest.raises(InvalidTime, match="duration"):
        parse_duration("2031-05-06T14:30:15Z", "--max-age")


def test_a_timestamp_beyond_the_year_9999_in_utc_is_refused_as_out_of_range():
    with pytest.raises(InvalidTime, match="range"):
        parse_when("9999-12-31T23:00:00-05:00", "deliver_after")


def test_the_error_names_the_flag_and_the_rule_separately():
    with pytest.raises(InvalidTime) as caught:
        parse_when("-5m", "deliver_after")
    assert caught.value.name == "deliver_after"
    assert "negative" in caught.value.rule
