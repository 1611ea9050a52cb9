"""What the console's indexes (migration 0008) cost the hot path: enqueue and delivery.

    .venv/bin/python bench/write_cost.py                                  # both backends
    .venv/bin/python bench/write_cost.py --events 5000 --rounds 3 --backend sqlite   # quick

Each round makes two fresh databases at the newest revision, one with the
three indexes dropped again, and on each in turn enqueues `--events` events
with track_events (100 a transaction, as an application's batch would), then
delivers them with `outbox-worker run --exit-when-drained` to an nginx that
answers 204. Taking turns, each first in every other round, puts a shared
machine's load on both alike. Prints the medians of `--rounds` and the ratio
with / without.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from console import database  # noqa: E402

from bench import Nginx, run_daemon  # noqa: E402  (bench/ is the script's folder)
from tests.pgserver import PostgresServer  # noqa: E402
from worker import db, track_events  # noqa: E402

CONSOLE_INDEXES = (
    "ix_outbox_events_contact",
    "ix_outbox_events_event",
    "ix_outbox_attempts_attempted_at",
)
PER_TX = 100


def new_database(backend: str, indexed: bool, workdir: Path, pg: PostgresServer | None) -> str:
    engine = database(backend, workdir, pg, f"write_cost_{time.monotonic_ns()}")
    url = engine.url.render_as_string(hide_password=False)
    if not indexed:  # the daemon runs only on the newest revision: drop what 0008 adds
        with engine.begin() as conn:
            for index in CONSOLE_INDEXES:
                conn.execute(sa.text(f"DROP INDEX {index}"))
    engine.dispose()
    return url


def enqueue_us(url: str, events: int) -> float:
    """µs per event for track_events, PER_TX events a transaction."""
    engine = db.create_engine(url)
    started = time.perf_counter()
    for start in range(0, events, PER_TX):
        with engine.begin() as conn:
            track_events(
                conn,
                [
                    {"email": f"c{i % 5000}@example.com", "event": f"event_{i % 20}"}
                    for i in range(start, min(events, start + PER_TX))
                ],
            )
    engine.dispose()
    return (time.perf_counter() - started) / events * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000, help="events per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (the median)")
    parser.add_argument("--backend", choices=("postgresql", "sqlite", "both"), default="both")
    args = parser.parse_args()
    chosen = ["postgresql", "sqlite"] if args.backend == "both" else [args.backend]
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-write-cost-"))
    pg = PostgresServer().start() if "postgresql" in chosen else None
    nginx = Nginx()
    try:
        for backend in chosen:
            enqueue: dict[bool, list[float]] = {False: [], True: []}
            deliver: dict[bool, list[float]] = {False: [], True: []}
            for n in range(args.rounds):
                for indexed in (n % 2 == 0, n % 2 == 1):  # each goes first in every other round
                    url = new_database(backend, indexed, workdir, pg)
                    enqueue[indexed].append(enqueue_us(url, args.events))
                    result = run_daemon(url, nginx.url, [])
                    deliver[indexed].append(args.events / result.seconds)
            print(f"\n{backend}: {args.events:,} events a round, median of {args.rounds}")
            print(f"  {'':<22}{'without':>10}{'with':>10}{'ratio':>8}")
            for label, figures in (
                ("enqueue, µs/event", enqueue),
                ("delivery, events/s", deliver),
            ):
                without, with_ = statistics.median(figures[False]), statistics.median(figures[True])
                print(f"  {label:<22}{without:>10,.1f}{with_:>10,.1f}{with_ / without:>8.2f}")
    finally:
        nginx.stop()
        if pg is not None:
            pg.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
