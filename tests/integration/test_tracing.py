"""Trace context from track_event to the daemon's delivery spans (worker.tracecontext,
worker.tracing), on both backends, with OpenTelemetry's in-memory exporter.

The SDK's provider is global to a process and set once, so this module installs
one with an in-memory exporter and clears it before each test. The CLI's own
setup (OTEL_TRACES_EXPORTER) is tested through a real `run` subprocess.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy.orm import Session

from tests.conftest import KEY, REPO, deliver, rows, run_cli
from tests.endpoint import Reply
from worker import db, track_event, track_events
from worker.output import LogFormatter
from worker.tracecontext import parse_traceparent

EMAIL = "jane.traced@example.com"
PAYLOAD_MARK = "cart:secret-payload-mark"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    memory = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter
    exporter.clear()


def app_tracer() -> trace.Tracer:
    return trace.get_tracer("the.application")


def delivery_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == "process outbox_events"]


def enqueue_in_span(engine: sa.Engine, **fields: Any) -> tuple[int, Any]:
    """One event committed inside the application's span; its id and that span's context."""
    with app_tracer().start_as_current_span("POST /checkout") as span:
        with Session(engine) as session, session.begin():
            outbox_id = track_event(
                session,
                email=EMAIL,
                event="cart_updated",
                eventdata={"id": PAYLOAD_MARK},
                **fields,
            )
        return outbox_id, span.get_span_context()


# -- joined: the enqueuing span and the delivery span, on both backends ----------------


def test_the_delivery_span_is_a_child_of_the_enqueuing_span(engine, endpoint, spans):
    outbox_id, app = enqueue_in_span(engine)
    assert deliver(engine, endpoint.url) == 0
    (span,) = delivery_spans(spans)
    assert span.context.trace_id == app.trace_id
    assert span.parent is not None and span.parent.span_id == app.span_id
    assert span.kind is SpanKind.CONSUMER
    assert span.attributes["messaging.message.id"] == str(outbox_id)


def test_the_row_holds_the_enqueuing_spans_traceparent(engine, spans):
    outbox_id, app = enqueue_in_span(engine)
    (row,) = rows(
        engine, f"SELECT traceparent, tracestate FROM outbox_events WHERE id = {outbox_id}"
    )
    assert row.traceparent == f"00-{app.trace_id:032x}-{app.span_id:016x}-{app.trace_flags:02x}"
    assert row.tracestate is None


def test_track_events_records_the_context_on_every_row(engine, spans):
    with app_tracer().start_as_current_span("import") as span, engine.begin() as conn:
        track_events(conn, [{"email": f"c{i}@example.com", "event": "e"} for i in range(3)])
    trace_id = f"{span.get_span_context().trace_id:032x}"
    found = rows(engine, "SELECT traceparent FROM outbox_events")
    assert [parse_traceparent(r.traceparent)[0] for r in found] == [trace_id] * 3


def test_tracestate_is_carried_to_the_delivery_span(engine, endpoint, spans):
    state = trace.TraceState([("vendor", "opaque-value")])
    parent = trace.SpanContext(
        0x4BF92F3577B34DA6A3CE929D0E0E4736,
        0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=trace.TraceFlags(1),
        trace_state=state,
    )
    with trace.use_span(trace.NonRecordingSpan(parent)), engine.begin() as conn:
        track_event(conn, email=EMAIL, event="e")
    assert (
        rows(engine, "SELECT tracestate FROM outbox_events")[0].tracestate == "vendor=opaque-value"
    )
    deliver(engine, endpoint.url)
    (span,) = delivery_spans(spans)
    assert span.context.trace_state.get("vendor") == "opaque-value"
    assert span.parent.span_id == parent.span_id


def test_the_delivery_span_holds_the_semantic_attributes(engine, endpoint, spans):
    outbox_id, _ = enqueue_in_span(engine)
    deliver(engine, endpoint.url)
    (span,) = delivery_spans(spans)
    attributes = dict(span.attributes)
    assert attributes == {
        "messaging.system": "outbox",
        "messaging.operation.type": "process",
        "messaging.operation.name": "deliver",
        "messaging.destination.name": "outbox_events",
        "messaging.message.id": str(outbox_id),
        "outbox.attempt": 1,
        "outbox.outcome": "delivered",
        "outbox.duration_ms": attributes["outbox.duration_ms"],
        "http.response.status_code": 204,
    }
    assert span.status.status_code is StatusCode.UNSET
    assert span.end_time - span.start_time == attributes["outbox.duration_ms"] * 1_000_000


def test_one_span_per_attempt_and_a_failed_one_is_an_error_without_the_answer(
    engine, endpoint, spans
):
    endpoint.script("cart_updated", Reply(500, f"echo {EMAIL} {PAYLOAD_MARK} {KEY}".encode()))
    _, app = enqueue_in_span(engine)
    assert deliver(engine, endpoint.url) == 0  # drained: the retry waits out its backoff
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE outbox_events SET next_attempt_at = created_at"))
    assert deliver(engine, endpoint.url) == 0
    failed, delivered = sorted(delivery_spans(spans), key=lambda s: s.attributes["outbox.attempt"])
    assert {failed.context.trace_id, delivered.context.trace_id} == {app.trace_id}
    assert failed.attributes["outbox.outcome"] == "retry"
    assert failed.attributes["http.response.status_code"] == 500
    assert failed.attributes["error.type"] == "500"
    assert failed.status.status_code is StatusCode.ERROR
    assert delivered.attributes["outbox.attempt"] == 2


@pytest.mark.parametrize(("code", "outcome"), [(401, "halt"), (429, "throttle")])
def test_a_released_attempt_says_why_in_its_outcome(engine, endpoint, spans, code, outcome):
    endpoint.script("cart_updated", Reply(code, b'{"code":"no"}'))
    enqueue_in_span(engine)
    deliver(engine, endpoint.url)
    span = delivery_spans(spans)[0]  # a throttled row may be due again before the run ends
    assert span.attributes["outbox.outcome"] == outcome
    assert span.status.status_code is StatusCode.ERROR


def test_no_span_holds_the_email_the_payload_or_the_key(engine, endpoint, spans):
    endpoint.script(
        "cart_updated", Reply(400, f'{{"message": "{EMAIL} {PAYLOAD_MARK} {KEY}"}}'.encode())
    )
    enqueue_in_span(engine)
    deliver(engine, endpoint.url)
    exported = json.dumps([json.loads(s.to_json()) for s in delivery_spans(spans)])
    assert "outbox.outcome" in exported and '"dead"' in exported
    for secret in (EMAIL, PAYLOAD_MARK, KEY, "jane.traced"):
        assert secret not in exported


# -- rows without a context deliver as before --------------------------------------------


def test_a_row_without_trace_context_delivers_as_before(engine, endpoint, spans):
    with engine.begin() as conn:  # no span is active
        outbox_id = track_event(conn, email=EMAIL, event="cart_updated", properties={"A": 1})
    assert rows(engine, "SELECT traceparent FROM outbox_events")[0].traceparent is None
    assert deliver(engine, endpoint.url) == 0
    assert endpoint.events() == [{"email": EMAIL, "event": "cart_updated", "properties": {"A": 1}}]
    (span,) = delivery_spans(spans)
    assert span.parent is None  # a trace of its own
    assert span.attributes["messaging.message.id"] == str(outbox_id)


def test_a_plain_sql_traceparent_joins_its_trace(engine, endpoint, spans):
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO outbox_events (email, event, traceparent) VALUES (:e, 'e', :t)"),
            {"e": EMAIL, "t": TRACEPARENT},
        )
    deliver(engine, endpoint.url)
    (span,) = delivery_spans(spans)
    assert f"{span.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # no trace
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # no span
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # 00 has 4 fields
    ],
)
def test_a_traceparent_that_breaks_the_w3c_rules_is_ignored(sqlite_url, endpoint, spans, bad):
    engine = db.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_events (email, event, traceparent, tracestate)"
                " VALUES (:e, 'e', :t, 'not a = valid, state')"
            ),
            {"e": EMAIL, "t": bad},
        )
    assert deliver(engine, endpoint.url) == 0
    assert rows(engine, "SELECT status FROM outbox_events")[0].status == "delivered"
    (span,) = delivery_spans(spans)
    assert span.parent is None
    engine.dispose()


def test_a_later_traceparent_version_with_more_fields_is_read():
    assert parse_traceparent("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more") == (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
        1,
    )


# -- asyncio, and no OpenTelemetry in the application ---------------------------------------


def test_asyncio_track_event_records_the_context(sqlite_url, spans):
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    from worker.asyncio import track_event as track_event_async

    async def enqueue() -> Any:
        engine = create_async_engine(sqlite_url.replace("sqlite://", "sqlite+aiosqlite://"))
        with app_tracer().start_as_current_span("async handler") as span:
            async with engine.begin() as conn:
                await track_event_async(conn, email=EMAIL, event="e")
        await engine.dispose()
        return span.get_span_context()

    app = asyncio.run(enqueue())
    stored = rows(sa.create_engine(sqlite_url), "SELECT traceparent FROM outbox_events")
    assert parse_traceparent(stored[0].traceparent)[:2] == (
        f"{app.trace_id:032x}",
        f"{app.span_id:016x}",
    )


def test_track_event_imports_no_opentelemetry_in_an_application_without_it(sqlite_url):
    script = (
        "import sys, sqlalchemy as sa\n"
        "from worker import track_event\n"
        f"engine = sa.create_engine({sqlite_url!r})\n"
        "with engine.begin() as conn:\n"
        "    track_event(conn, email='a@example.com', event='e')\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "[]"
    assert rows(sa.create_engine(sqlite_url), "SELECT traceparent FROM outbox_events")[0][0] is None


# -- log lines carry the trace id ---------------------------------------------------------


def _record(**extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("worker.daemon", logging.WARNING, "x", 1, "attempt failed", (), None)
    record.__dict__.update(extra)
    return record


def test_a_text_log_line_ends_with_the_trace_id():
    line = LogFormatter().format(_record(trace_id="4bf92f3577b34da6a3ce929d0e0e4736"))
    assert line.endswith("attempt failed trace_id=4bf92f3577b34da6a3ce929d0e0e4736")


def test_a_json_log_line_has_the_trace_id_field():
    line = LogFormatter(as_json=True).format(_record(trace_id="4bf92f3577b34da6a3ce929d0e0e4736"))
    assert json.loads(line)["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_log_line_without_a_trace_says_nothing_of_one():
    assert "trace_id" not in LogFormatter().format(_record())
    assert "trace_id" not in json.loads(LogFormatter(as_json=True).format(_record()))


# -- the CLI: OTEL_TRACES_EXPORTER, and the attempt's log line -------------------------------


def console_spans(stdout: str) -> list[dict[str, Any]]:
    """The console exporter's output: JSON objects one after another."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while (at := stdout.find("{", at)) != -1:
        span, at = decoder.raw_decode(stdout, at)
        spans.append(span)
    return spans


def test_run_exports_spans_joined_to_the_row_and_logs_the_trace_id(sqlite_url, endpoint):
    endpoint.script("cart_updated", Reply(500, b'{"code": "oops", "message": "try later"}'))
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_events (email, event, traceparent) VALUES (:e, 'cart_updated', :t)"
            ),
            {"e": EMAIL, "t": TRACEPARENT},
        )
    engine.dispose()
    done = run_cli(
        "run", "--exit-when-drained", "--database-url", sqlite_url, "--endpoint-url", endpoint.url,
        env={"OUTBOX_MA_KEY": KEY, "OTEL_TRACES_EXPORTER": "console"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    retry_line = next(line for line in done.stderr.splitlines() if "attempt 1 failed" in line)
    assert retry_line.endswith("trace_id=4bf92f3577b34da6a3ce929d0e0e4736")
    exported = console_spans(done.stdout)
    (span,) = exported  # drained: the retry waits out its backoff
    assert span["attributes"]["outbox.outcome"] == "retry"
    assert span["context"]["trace_id"] == "0x4bf92f3577b34da6a3ce929d0e0e4736"
    assert span["parent_id"] == "0x00f067aa0ba902b7"
    assert span["resource"]["attributes"]["service.name"] == "outbox-worker"
    assert EMAIL not in done.stdout and KEY not in done.stdout


def test_run_without_an_exporter_named_exports_nothing(sqlite_url, endpoint):
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        track_event(conn, email=EMAIL, event="e")
    engine.dispose()
    done = run_cli(
        "run", "--exit-when-drained", "--database-url", sqlite_url, "--endpoint-url", endpoint.url,
        env={"OUTBOX_MA_KEY": KEY},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert len(endpoint.requests) == 1


def test_an_exporter_no_package_provides_is_one_warning_and_delivery_goes_on(sqlite_url, endpoint):
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        track_event(conn, email=EMAIL, event="e")
    engine.dispose()
    done = run_cli(
        "run", "--exit-when-drained", "--database-url", sqlite_url, "--endpoint-url", endpoint.url,
        env={"OUTBOX_MA_KEY": KEY, "OTEL_TRACES_EXPORTER": "nosuchexporter"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "'nosuchexporter'" in warnings[0]
    assert len(endpoint.requests) == 1


def test_events_show_gives_the_events_traceparent(sqlite_url):
    engine = db.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO outbox_events (email, event, traceparent) VALUES (:e, 'e', :t)"),
            {"e": EMAIL, "t": TRACEPARENT},
        )
    engine.dispose()
    shown = run_cli("events", "show", "1", "--database-url", sqlite_url)
    assert shown.returncode == 0, shown.stderr
    assert ["traceparent", TRACEPARENT] in [line.split() for line in shown.stdout.splitlines()]
    as_json = run_cli("events", "show", "1", "--json", "--database-url", sqlite_url)
    assert json.loads(as_json.stdout)["event"]["traceparent"] == TRACEPARENT
