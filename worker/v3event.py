"""What Brevo's v3 events API accepts, and the exact JSON it is sent: pure, like worker.event.

A row is first a valid event by worker.event's rules (those of the tracker);
the v3 API adds its own (below), stricter still for its batch schema. The
mapping: `email` -> identifiers.email_id, `event` -> event_name, `properties`
-> contact_properties, `eventdata` -> event_properties, and the row's
`created_at` -> event_date, so an event that waited keeps the time it happened.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from worker.event import Event, InvalidEvent, dumps, quote

TRANSPORTS = ("tracker", "v3", "v3-batch")
DEFAULT_TRANSPORT = TRANSPORTS[0]
# A batch body: {"events": [...]} as documented (and the Python SDK), or a bare array (Node SDK).
BATCH_SHAPES = ("object", "array")
MAX_KEY_LENGTH = 255
# Brevo says 50 KB; whether that is 1,000 or 1,024 bytes is not said: the smaller.
MAX_EVENT_PROPERTIES_BYTES = 50_000
_EVENT_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check(event: Event, transport: str) -> None:
    """Raise InvalidEvent if `transport` cannot carry this (already valid) event."""
    if transport not in TRANSPORTS:
        raise InvalidEvent(
            "transport", f"must be one of {', '.join(TRANSPORTS)}, not {transport!r}"
        )
    if transport == "tracker":
        return
    batch = transport == "v3-batch"
    # The length (at most 255, v3's limit too) is every transport's rule: event.validate.
    if not _EVENT_NAME.fullmatch(event.event):
        raise InvalidEvent(
            "event", "may hold only letters, digits, - and _ for the v3 API (event_name)"
        )
    if event.properties is not None:
        for key, value in event.properties.items():  # a flat object: a few keys
            _check_key("properties", key)
            if batch and (type(value) is bool or not isinstance(value, (str, int))):
                raise InvalidEvent(
                    "properties",
                    f"{key!r} must be a string or an integer for the v3 batch API"
                    f" (contact_properties), not {_kind(value)}",
                )
    if event.eventdata is not None:
        _check_event_properties(event.eventdata, event.eventdata_json, batch)


def encoded(event: Event, transport: str, created_at: dt.datetime | None) -> bytes:
    """The JSON `transport` sends for this (checked) event: the tracker's body, or the v3
    event, which is also its element of a v3 batch's list."""
    return event.body() if transport == "tracker" else body(event, created_at)


def body(event: Event, created_at: dt.datetime | None) -> bytes:
    """One v3 event as JSON: only the fields given, event_date from the row's created_at."""
    return encode(event, created_at).encode("utf-8")


def encode(event: Event, created_at: dt.datetime | None) -> str:
    parts = [
        f'{{"event_name":{quote(event.event)},"identifiers":{{"email_id":{quote(event.email)}}}'
    ]
    if created_at is not None:
        parts.append(f',"event_date":{quote(event_date(created_at))}')
    if event.properties is not None:
        parts.append(f',"contact_properties":{event.properties_json or dumps(event.properties)}')
    if event.eventdata is not None:
        parts.append(f',"event_properties":{event.eventdata_json or dumps(event.eventdata)}')
    parts.append("}")
    return "".join(parts)


def event_date(created_at: dt.datetime) -> str:
    """ISO 8601 in UTC with milliseconds and Z, as Brevo writes its own dates."""
    utc = created_at.astimezone(dt.timezone.utc)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_event_properties(value: dict[str, Any], text: str | None, batch: bool) -> None:
    text = text if text is not None else dumps(value)
    size = len(text.encode("utf-8"))
    if size > MAX_EVENT_PROPERTIES_BYTES:
        raise InvalidEvent(
            "eventdata",
            f"size {size} bytes is over the v3 limit of {MAX_EVENT_PROPERTIES_BYTES}"
            " for event_properties",
        )
    # The walk is the costly part: text this short holds no key that long, and
    # text without true or false holds no boolean.
    if size <= MAX_KEY_LENGTH and not (batch and ("true" in text or "false" in text)):
        return
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key in item:
                _check_key("eventdata", key)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif batch and type(item) is bool:
            raise InvalidEvent(
                "eventdata",
                "must hold no true/false values for the v3 batch API (event_properties)",
            )


def _check_key(field: str, key: str) -> None:
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidEvent(
            field, f"has a key longer than {MAX_KEY_LENGTH} characters (v3): {key[:40]!r}..."
        )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "true/false", float: "a number with a fraction", dict: "an object",
            list: "a list"}.get(type(value), type(value).__name__)  # fmt: skip
