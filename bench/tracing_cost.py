"""What trace context costs track_event: nothing without OpenTelemetry, little with it.

Measured first without OpenTelemetry imported (the check is one `sys.modules`
lookup), then with the SDK and a recording span active around the
transactions, each against the other in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker import db, track_event
from worker.tracecontext import current_context


def _per_tx_us(engine: sa.Engine, txs: int, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(txs):
            with Session(engine) as session, session.begin():
                track_event(session, email="jane@example.com", event="order_completed")
        runs.append((time.perf_counter() - started) / txs * 1e6)
    return statistics.median(runs)


def tracing_cost(args: argparse.Namespace, new_urls: list[tuple[str, Callable[[], str]]]) -> None:
    assert "opentelemetry.trace" not in sys.modules, "measure 'off' before anything imports it"
    print("\n## 2b. Trace context in track_event (1 event per transaction)\n")
    off_ns = min(timeit.repeat(current_context, number=100_000, repeat=5)) / 100_000 * 1e9
    engines = [(name, db.create_engine(new_url())) for name, new_url in new_urls]
    off = {name: _per_tx_us(engine, args.enqueue_tx, args.repeat) for name, engine in engines}

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())  # recording spans, exported nowhere
    on_ns = 0.0
    with trace.get_tracer("bench").start_as_current_span("request"):
        on_ns = min(timeit.repeat(current_context, number=100_000, repeat=5)) / 100_000 * 1e9
        on = {name: _per_tx_us(engine, args.enqueue_tx, args.repeat) for name, engine in engines}
    print(
        f"reading the context: {off_ns:.0f} ns without OpenTelemetry, {on_ns:,.0f} ns in a span\n"
    )
    print("| backend | µs/tx, no OpenTelemetry | µs/tx, in a recording span | ratio |")
    print("|---|---:|---:|---:|")
    for name, engine in engines:
        print(f"| {name} | {off[name]:,.0f} | {on[name]:,.0f} | {on[name] / off[name]:.2f}x |")
        engine.dispose()
