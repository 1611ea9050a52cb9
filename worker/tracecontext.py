"""The W3C trace context of the application's active span, as the row records it.

`track_event` calls `current_context()`: when the application uses OpenTelemetry,
the active span's `traceparent` (and `tracestate`) go into the row. Nothing here
imports OpenTelemetry: the test is one dictionary lookup in `sys.modules`, so an
application without it pays nothing. The daemon reads the columns back with
`parse_traceparent`, under the W3C rules: a value written by plain SQL that
breaks them is ignored, never an error.
"""

from __future__ import annotations

import re
import sys
from typing import Any

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_NO_TRACE = "0" * 32
_NO_SPAN = "0" * 16


def current_context() -> dict[str, str | None] | None:
    """The active span's W3C context as row columns, or None (no OpenTelemetry, no span)."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # the application never imported OpenTelemetry
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    state = context.trace_state.to_header() if context.trace_state else ""
    return {
        "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}"
        f"-{int(context.trace_flags):02x}",
        "tracestate": state or None,
    }


def parse_traceparent(value: Any) -> tuple[str, str, int] | None:
    """(trace id, parent span id, flags) of a valid traceparent header, else None."""
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if not match:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    # Version ff is forbidden; version 00 has exactly four fields; later ones may add more.
    if (
        version == "ff"
        or (version == "00" and rest)
        or trace_id == _NO_TRACE
        or span_id == _NO_SPAN
    ):
        return None
    return trace_id, span_id, int(flags, 16)
