"""What `--rate-limit` means: windows of N requests per second, minute or hour, or a preset.

Pure: no database, no clock. The gate (worker.gate) turns a limit into send
slots spaced `interval` seconds apart, which keeps every window at or under
its N at once: N requests spaced W/N apart never fit in one window of W.
Spacing, rather than a bucket that lets N through in a burst, is what makes
"at most N in *any* W" hold (a bucket full at the end of one window and
refilled in the next lets almost 2N through in one sliding window).
"""

from __future__ import annotations

import dataclasses
import math
import re

# Brevo's published limits for POST /v3/events, per account, every window at once:
# https://developers.brevo.com/docs/api-limits (the "General", "Advanced" and
# "Extended" tables). The tracker host's own limit is not published.
PRESETS: dict[str, str] = {
    "brevo-general": "10/s,36000/h",  # every plan
    "brevo-advanced": "20/s,72000/h",  # Professional and Enterprise
    "brevo-extended": "60/s",  # Enterprise
}
UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}
MAX_PER_SECOND = 10_000.0  # beyond this the daemon cannot send anyway

# Seconds by which a send may come after its slot (thread wake-up, building the
# request, the network). Slots are spaced for windows this much longer, so that
# a late send never squeezes N+1 requests into one window.
SEND_SLACK = 0.05
MAX_SLACK = 1.0  # what the slack grows to at most while the database answers slowly
# A chunk of slots granted at once lasts about this long (seconds): it bounds
# what a daemon killed while holding one wastes, and how long a daemon that has
# not heard of a shared pause yet may go on sending.
CHUNK_SECONDS = 0.5
MAX_CHUNK = 100

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|min|m|h|hr|hour))?\s*$", re.IGNORECASE)
_ALIASES = {"sec": "s", "m": "min", "hr": "h", "hour": "h"}


class InvalidRateLimit(ValueError):
    """A --rate-limit that cannot be read; the message says what to write instead."""


@dataclasses.dataclass(frozen=True)
class Window:
    requests: float  # at most this many ...
    seconds: float  # ... in any window this long

    def __str__(self) -> str:
        unit = next(u for u, s in UNITS.items() if s == self.seconds)
        return f"{_number(self.requests)}/{unit}"


@dataclasses.dataclass(frozen=True)
class RateLimit:
    """Every window holds at once; no windows is no limit."""

    windows: tuple[Window, ...] = ()
    text: str = "none"  # as the operator wrote it (a preset keeps its name)

    def __bool__(self) -> bool:
        return bool(self.windows)

    @property
    def interval(self) -> float:
        """Seconds between two sends: the strictest window's spacing, with the slack."""
        return self.interval_with(SEND_SLACK)

    def interval_with(self, slack: float) -> float:
        """The spacing that holds every window when a send may come `slack` s late."""
        if not self.windows:
            return 0.0
        return max((w.seconds + slack) / w.requests for w in self.windows)

    @property
    def per_second(self) -> float:
        """The sustained rate the limit allows (0: unlimited)."""
        return 1.0 / self.interval if self.windows else 0.0

    @property
    def chunk(self) -> int:
        """Slots granted at once: about CHUNK_SECONDS' worth, at least one."""
        if not self.windows:
            return MAX_CHUNK
        return max(1, min(MAX_CHUNK, math.floor(CHUNK_SECONDS / self.interval)))

    def describe(self) -> str:
        if not self.windows:
            return "none"
        spelled = ",".join(map(str, self.windows))
        return spelled if spelled == self.text else f"{self.text} ({spelled})"


NO_LIMIT = RateLimit()


def parse_rate_limit(text: str) -> RateLimit:
    """A preset name, a bare number (requests per second; 0 is none), or windows
    joined by commas: 10/s, 600/min, 36000/h."""
    spec = text.strip().lower()
    if spec in PRESETS:
        return dataclasses.replace(parse_rate_limit(PRESETS[spec]), text=spec)
    if spec in ("", "0", "none", "off"):
        return NO_LIMIT
    windows = []
    for part in spec.split(","):
        match = _WINDOW.match(part)
        if not match:
            raise InvalidRateLimit(
                f"{part.strip()!r} is not a rate: write N/s, N/min or N/h (e.g. 10/s,36000/h),"
                f" a number of requests per second, or a preset ({', '.join(PRESETS)})"
            )
        count, unit = float(match[1]), (match[2] or "s").lower()
        window = Window(count, UNITS[_ALIASES.get(unit, unit)])
        if not 0 < count / window.seconds <= MAX_PER_SECOND or (count < 1 and unit != "s"):
            raise InvalidRateLimit(
                f"{part.strip()!r} is out of range: from 1 request per window up to"
                f" {_number(MAX_PER_SECOND)} per second"
            )
        windows.append(window)
    if len({w.seconds for w in windows}) != len(windows):
        raise InvalidRateLimit(f"{text.strip()!r} gives one window twice: give each unit once")
    return RateLimit(tuple(sorted(windows, key=lambda w: w.seconds)), ",".join(map(str, windows)))


def as_rate_limit(value: RateLimit | float | str) -> RateLimit:
    """A limit from what a caller may pass: a RateLimit, its text, or requests per second."""
    if isinstance(value, RateLimit):
        return value
    if isinstance(value, str):
        return parse_rate_limit(value)
    if not math.isfinite(value) or value < 0 or value > MAX_PER_SECOND:
        raise InvalidRateLimit(
            f"{value:g} is out of range: 0 (none) up to {_number(MAX_PER_SECOND)} per second"
        )
    return parse_rate_limit(_number(value)) if value else NO_LIMIT


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"
