"""The daemon's delivery spans, children of the span that enqueued each event.

With the `otel` extra installed, the daemon emits one span per delivery attempt,
a child of the enqueuing span whose context the row holds (worker.tracecontext),
with OpenTelemetry's messaging attributes: the outbox id, the attempt, the
status code, the outcome and the duration; never the email, the payload, the
endpoint's answer or the key. A row without a (valid) context gets a span that
starts a trace of its own. Without OpenTelemetry installed every call is a no-op.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from worker.policy import Action, Answer, Outcome
from worker.store import ClaimedEvent
from worker.tracecontext import parse_traceparent

log = logging.getLogger("worker.tracing")

DESTINATION = "outbox_events"


def log_fields(event: ClaimedEvent) -> dict[str, str]:
    """`extra=` for a log line about this event: its trace id, when it has one."""
    parsed = parse_traceparent(event.traceparent)
    return {"trace_id": parsed[0]} if parsed else {}


class DeliveryTracing:
    """One span per delivery attempt; does nothing without OpenTelemetry installed."""

    def __init__(self) -> None:
        try:
            from opentelemetry import trace
        except ImportError:
            self._trace: Any = None
            return
        self._trace = trace
        # Looked up through the global provider at each span, so that a provider
        # set after the daemon was built (an embedding application's) is used.
        self._tracer = trace.get_tracer("worker.daemon")

    @property
    def enabled(self) -> bool:
        return self._trace is not None

    def attempt(self, event: ClaimedEvent, answer: Answer, outcome: Outcome) -> None:
        """The span of one HTTP attempt of `event`, which ended just now."""
        if self._trace is None:
            return
        trace = self._trace
        end = time.time_ns()
        span = self._tracer.start_span(
            f"process {DESTINATION}",
            context=self._parent(event),
            kind=trace.SpanKind.CONSUMER,
            start_time=end - answer.duration_ms * 1_000_000,
        )
        if span.is_recording():
            span.set_attributes(_attributes(event, answer, outcome))
            if outcome.action is not Action.DELIVERED:
                # The status code (or "network"), never the answer's text: it may echo the payload.
                span.set_status(trace.Status(trace.StatusCode.ERROR))
        span.end(end_time=end)

    def _parent(self, event: ClaimedEvent) -> Any:
        parsed = parse_traceparent(event.traceparent)
        if parsed is None:
            return None
        trace = self._trace
        trace_id, span_id, flags = parsed
        raw_state = event.tracestate
        state = trace.TraceState.from_header([raw_state]) if isinstance(raw_state, str) else None
        parent = trace.SpanContext(
            int(trace_id, 16),
            int(span_id, 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(flags & 0xFF),
            trace_state=state,
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def _attributes(event: ClaimedEvent, answer: Answer, outcome: Outcome) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": "outbox",
        "messaging.operation.type": "process",
        "messaging.operation.name": "deliver",
        "messaging.destination.name": DESTINATION,
        "messaging.message.id": str(event.id),
        "outbox.attempt": event.attempts + 1,
        "outbox.outcome": outcome.action.value,
        "outbox.duration_ms": answer.duration_ms,
    }
    if answer.status_code is not None:
        attributes["http.response.status_code"] = answer.status_code
    if outcome.action is not Action.DELIVERED:
        attributes["error.type"] = (
            str(answer.status_code) if answer.status_code is not None else "network"
        )
    return attributes


def configure_from_environment(environ: Mapping[str, str]) -> Callable[[], None] | None:
    """Export the daemon's spans as OpenTelemetry's own variables say; the shutdown to call.

    Only when `OTEL_TRACES_EXPORTER` names exporters and no SDK provider is set
    yet (`opentelemetry-instrument` sets one). Tracing never stops delivery: what
    cannot be set up is one warning, and the daemon runs without it.
    """
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names or names == ["none"]:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_TRACES_EXPORTER is set but the otel extra is not installed: no delivery"
            " spans (pip install 'outbox-worker[otel]')"
        )
        return None
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return None  # configured already, by opentelemetry-instrument or the embedding app
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "outbox-worker"}))
    provider = TracerProvider(resource=resource)
    for name in names:
        exporter = _exporter(name)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing: delivery spans exported with %s", ", ".join(names))
    return provider.shutdown


def _exporter(name: str) -> Any:
    # The SDK's own registry of exporters: console ships with it, otlp with
    # opentelemetry-exporter-otlp.
    found = importlib.metadata.entry_points(group="opentelemetry_traces_exporter", name=name)
    for entry in found:
        return entry.load()()
    log.warning(
        "OTEL_TRACES_EXPORTER names %r, which no installed package provides: spans are not"
        " exported there (for otlp: pip install opentelemetry-exporter-otlp)",
        name,
    )
    return None
