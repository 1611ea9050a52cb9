"""Dates and durations as people write them: one parser for every flag and JSON Lines field.

A time is an ISO 8601 timestamp with an offset or `Z` (read as that instant,
returned in UTC), or a duration: `90s`, `10m`, `2h`, `1d`, `2w` (`ms` too),
or a bare number of seconds. What a duration means (from now, or ago) is the
caller's business.
"""

from __future__ import annotations

import datetime as dt
import math
import re

# Longer than any retry budget or retention anyone means, and far from where
# Python's and the databases' date arithmetic would overflow.
MAX_DURATION = dt.timedelta(days=36500)

_DURATION = re.compile(r"\s*([+-]?)([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?\s*", re.ASCII)
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_EXAMPLES = "e.g. 90s, 10m, 2h, 1d, or a timestamp such as 2026-05-01T09:00:00Z"


class InvalidTime(ValueError):
    """A time or duration that cannot be used, named by where it was given and the rule."""

    def __init__(self, name: str, rule: str) -> None:
        super().__init__(f"{name}: {rule}")
        self.name = name
        self.rule = rule


def parse_when(value: str | float, name: str) -> dt.datetime | dt.timedelta:
    """An aware UTC datetime for a timestamp, a timedelta for a duration or a number."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidTime(name, f"must be a timestamp or a duration ({_EXAMPLES})")
    if not isinstance(value, str):
        return _seconds(value, name)
    match = _DURATION.fullmatch(value)
    if match:
        sign, number, unit = match.groups()
        if sign == "-":
            raise InvalidTime(name, f"{value.strip()!r} is negative: give a duration ({_EXAMPLES})")
        return _seconds(float(number) * _UNIT_SECONDS[unit], name, value.strip())
    return _timestamp(value, name)


def parse_duration(value: str | float, name: str) -> dt.timedelta:
    """A duration only (a retry budget, a retention): a timestamp is refused."""
    parsed = parse_when(value, name)
    if isinstance(parsed, dt.datetime):
        raise InvalidTime(name, f"{value!r} is a timestamp: give a duration, e.g. 90s, 10m, 2h, 1d")
    return parsed


def _seconds(seconds: float, name: str, shown: str | None = None) -> dt.timedelta:
    shown = shown or repr(seconds)
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise InvalidTime(name, f"{shown} is not a finite number of seconds")
    if seconds < 0:
        raise InvalidTime(name, f"{shown} is negative: give a duration ({_EXAMPLES})")
    if seconds > MAX_DURATION.total_seconds():
        raise InvalidTime(name, f"{shown} is too long: at most {MAX_DURATION.days}d")
    return dt.timedelta(seconds=seconds)


def _timestamp(text: str, name: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidTime(name, f"{text!r} is not a time or a duration ({_EXAMPLES})") from None
    if parsed.tzinfo is None:
        raise InvalidTime(
            name,
            f"{text!r} has no UTC offset, so it could be any zone's time:"
            " add Z for UTC or an offset such as +02:00",
        )
    try:
        return parsed.astimezone(dt.timezone.utc)
    except OverflowError:
        raise InvalidTime(name, f"{text!r} is out of range (years 1 to 9999 in UTC)") from None


def duration_text(delta: dt.timedelta) -> str:
    """A duration as --help and messages spell it, in the largest whole unit: 3d, 90m, 45s."""
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
