"""What a valid event is, and the exact JSON body sent for it.

Used twice: by `track_event` before anything is written, and by the daemon for
rows that another program inserted with plain SQL. It knows nothing of
databases or HTTP.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, NamedTuple

MAX_BODY_BYTES = 64 * 1024
MAX_EMAIL_LENGTH = 254  # the longest address SMTP carries (RFC 5321)
# Brevo's v3 limit, and far below what PostgreSQL's B-tree index on (event, id) holds.
MAX_EVENT_LENGTH = 255

# No whitespace, exactly one "@", a non-empty local part, a domain with a dot
# that neither starts nor ends it.
_EMAIL = re.compile(r"[^\s@]+@[^\s@.][^\s@]*\.[^\s@]*[^\s@.]")


# An escaped NUL in JSON text: \u0000 after an even number of backslashes (an
# odd number means the backslash itself was escaped: the text "\\u0000").
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class InvalidEvent(ValueError):
    """An event that the track-event endpoint would refuse, named by field and rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class Event(NamedTuple):
    """A validated event: the fields exactly as they will be sent, and the body that carries them."""

    email: str
    event: str
    properties: dict[str, Any] | None
    eventdata: dict[str, Any] | None
    encoded: bytes  # the request body: only the fields given, no invented nulls
    # The JSON text of each object field as encoded above, for another transport's body.
    properties_json: str | None = None
    eventdata_json: str | None = None

    def body(self) -> bytes:
        return self.encoded


def validate(
    email: Any,
    event: Any,
    properties: Any = None,
    eventdata: Any = None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    _from_json_text: bool = False,
) -> Event:
    """Check every rule of the endpoint and return the event, or raise InvalidEvent."""
    if email is None:
        raise InvalidEvent("email", "is required")
    if not isinstance(email, str):
        raise InvalidEvent("email", f"must be a string, not {type(email).__name__}")
    if not email:
        raise InvalidEvent("email", "must not be empty")
    if len(email) > MAX_EMAIL_LENGTH:
        raise InvalidEvent("email", f"is longer than {MAX_EMAIL_LENGTH} characters")
    if not _EMAIL.fullmatch(email):
        raise InvalidEvent(
            "email",
            "is not an address (one @, no whitespace, a domain with a dot)",
        )
    if event is None:
        raise InvalidEvent("event", "is required")
    if not isinstance(event, str):
        raise InvalidEvent("event", f"must be a string, not {type(event).__name__}")
    if not event.strip():
        raise InvalidEvent("event", "must not be empty")
    if len(event) > MAX_EVENT_LENGTH:
        raise InvalidEvent("event", f"is longer than {MAX_EVENT_LENGTH} characters")
    for field, text in (("email", email), ("event", event)):
        if "\x00" in text:
            raise InvalidEvent(field, "must not contain a NUL character")
    parts = [f'{{"email":{quote(email)},"event":{quote(event)}']
    extra = 0  # bytes the numbers gain once PostgreSQL has stored them
    properties_json = eventdata_json = None
    if properties is not None:
        properties = _object("properties", properties)
        if "email" in properties or "event" in properties:
            key = "email" if "email" in properties else "event"
            raise InvalidEvent("properties", f"must not use the reserved key {key!r}")
        properties_json, more = _encode_json("properties", properties, _from_json_text)
        parts.append(f',"properties":{properties_json}')
        extra += more
    if eventdata is not None:
        eventdata = _object("eventdata", eventdata)
        if "id" in eventdata and not isinstance(eventdata["id"], str):
            raise InvalidEvent("eventdata", "id must be a string")
        if "data" in eventdata and not isinstance(eventdata["data"], Mapping):
            raise InvalidEvent("eventdata", "data must be an object")
        eventdata_json, more = _encode_json("eventdata", eventdata, _from_json_text)
        parts.append(f',"eventdata":{eventdata_json}')
        extra += more
    parts.append("}")
    try:
        encoded = "".join(parts).encode("utf-8")
    except UnicodeEncodeError:
        raise _not_utf8(
            email=email, event=event, properties=properties, eventdata=eventdata
        ) from None
    # Measured with numbers as PostgreSQL's jsonb writes them back, so that an
    # event accepted here is never too big on the way out.
    size = len(encoded) + extra
    if size > max_body_bytes:
        raise InvalidEvent("body", f"size {size} bytes is over the limit of {max_body_bytes}")
    return Event(email, event, properties, eventdata, encoded, properties_json, eventdata_json)


def from_stored(
    email: Any,
    event: Any,
    properties_json: str | None,
    eventdata_json: str | None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Event:
    """Validate a row as stored: its JSON columns still as text, possibly malformed."""
    return validate(
        email,
        event,
        _loads("properties", properties_json),
        _loads("eventdata", eventdata_json),
        max_body_bytes=max_body_bytes,
        _from_json_text=all(
            isinstance(t, (str, type(None))) for t in (properties_json, eventdata_json)
        ),
    )


def from_json_object(obj: Any, *, max_body_bytes: int = MAX_BODY_BYTES) -> Event:
    """Validate one decoded JSON Lines record: an object with only the event's fields."""
    if not isinstance(obj, Mapping):
        raise InvalidEvent("event", "each line must be a JSON object")
    unknown = sorted(set(obj) - {"email", "event", "properties", "eventdata"})
    if unknown:
        raise InvalidEvent(unknown[0], "is not a field of an event")
    return validate(
        obj.get("email"),
        obj.get("event"),
        obj.get("properties"),
        obj.get("eventdata"),
        max_body_bytes=max_body_bytes,
    )


def _object(field: str, value: Any) -> dict[str, Any]:
    """The value as a plain dict (what gets stored), or InvalidEvent if it is no object."""
    if type(value) is dict:
        return value
    if not isinstance(value, Mapping):
        raise InvalidEvent(field, f"must be a JSON object, not {type(value).__name__}")
    return dict(value)


def _not_utf8(**fields: Any) -> InvalidEvent:
    """Which field holds text that UTF-8 cannot encode (lone surrogates)."""
    for field, value in fields.items():
        text = value if isinstance(value, str) else _dumps(value)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return InvalidEvent(field, "contains text that is not valid UTF-8")
    return InvalidEvent("body", "is not valid UTF-8")


def _encode_json(field: str, value: Any, from_json_text: bool = False) -> tuple[str, int]:
    """The field as JSON text and the bytes its numbers gain in jsonb, or
    InvalidEvent saying why it cannot be sent."""
    try:
        text = _dumps(value)
    except RecursionError:
        raise InvalidEvent(field, "is nested too deeply") from None
    except ValueError as exc:
        # allow_nan=False, circular references and Python's cap on the digits
        # of an int all land here.
        if "Circular" in str(exc):
            raise InvalidEvent(field, "contains a circular reference") from None
        if "digits" in str(exc):
            raise InvalidEvent(field, "contains an integer with too many digits") from None
        raise InvalidEvent(
            field, "contains a number that is not finite (NaN or infinity)"
        ) from None
    except TypeError as exc:
        raise InvalidEvent(field, f"is not JSON-serialisable ({exc})") from None
    if "\\u0000" in text and _JSON_NUL.search(text):
        # PostgreSQL's jsonb cannot store the NUL character.
        raise InvalidEvent(field, "must not contain a NUL character")
    if from_json_text:
        # Decoded from stored JSON: every key is a string, and the numbers are as the
        # database writes them back, so there is nothing to walk for (the hot path).
        return text, 0
    return text, _walk(field, value)


def _walk(field: str, value: Any) -> int:
    """Check that every object key is a string (json would write 1 and "1" as one
    key, losing a value) and return the bytes the floats gain when PostgreSQL's
    jsonb writes them out in full (1e+300 comes back as 301 digits)."""
    extra, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if not all(type(key) is str for key in item):
                raise InvalidEvent(field, "has an object key that is not a string")
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif type(item) is float and "e" in (text := repr(item)):
            extra += len(format(Decimal(text), "f")) - len(text)
    return extra


# One encoder for the process: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_dumps = _ENCODER.encode
dumps = _dumps  # compact JSON, as every body is written (worker.v3event too)
# A string as a JSON string, exactly as the encoder writes one (its C function, without
# the encoder's Python-level call around it: a few of them for every event sent).
quote = json.encoder.encode_basestring


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for the process, as for the encoder: json.loads with an option builds one.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _loads(field: str, text: Any) -> Any:
    if text is None:
        return None
    if isinstance(text, (dict, list)):
        return text
    try:
        if isinstance(text, str):
            return _DECODER.decode(text)
        return json.loads(text, parse_constant=_reject_constant)
    except (TypeError, ValueError, RecursionError):
        raise InvalidEvent(field, "is not valid JSON") from None
