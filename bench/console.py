"""How long the console takes to render its pages with a large outbox.

    .venv/bin/python bench/console.py                      # 1,000,000 rows, both backends
    .venv/bin/python bench/console.py --rows 100000 --runs 5 --backend sqlite   # quick

It fills a fresh database (its own PostgreSQL from the server binaries, a
SQLite file) with `--rows` events shaped like a working outbox (mostly
delivered over the last two days, some dead, pending and retrying, one failed
attempt for each dead or retrying row, 50,000 contacts, one event in 1,000 of a
rare name), then times each page, with the events searched by one contact's
email and by the rare name, through the real application (Starlette's
TestClient, no network), as the median of `--runs` renders after one warm-up.
Every figure is also a ratio against the same page on an empty database in
the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from starlette.testclient import TestClient  # noqa: E402

from tests.pgserver import PostgresServer  # noqa: E402
from worker import db  # noqa: E402
from worker.console.app import create_app  # noqa: E402
from worker.console.context import ConsoleOptions  # noqa: E402

PAGES = (
    "/",
    "/events",
    "/events?email=C123@Example.com",  # one contact's 20 events (any case: the contact key)
    "/events?event=order_refunded",  # one event in 1,000, across the whole history
    "/dead-letters",
    "/dead-letters?status_code=400",
    "/contacts/blocked",
)

# Row n's shape by n % 100: 0-3 dead (400 or 503), 4-7 pending (4-5 retrying), else delivered;
# 50,000 contacts; every 1,000th event (a delivered one) is an order_refunded.
_PG_FILL = """
INSERT INTO outbox_events (email, event, eventdata, status, attempts, created_at,
    next_attempt_at, delivered_at, failed_at, last_status_code, last_error)
SELECT 'c' || (n % 50000) || '@example.com',
    CASE WHEN n % 1000 = 999 THEN 'order_refunded' ELSE 'cart_updated' END,
    jsonb_build_object('id', 'e' || n),
    CASE WHEN n % 100 < 4 THEN 'dead' WHEN n % 100 < 8 THEN 'pending' ELSE 'delivered' END,
    CASE WHEN n % 100 < 6 THEN 1 ELSE 0 END,
    now() - make_interval(secs => (:rows - n) * 172800.0 / :rows),
    now() + CASE WHEN n % 100 IN (4, 5) THEN interval '5 minutes' ELSE interval '0' END,
    CASE WHEN n % 100 >= 8 THEN now() - make_interval(secs => (:rows - n) * 172800.0 / :rows) END,
    CASE WHEN n % 100 < 4 THEN now() - make_interval(secs => (:rows - n) * 172800.0 / :rows) END,
    CASE WHEN n % 100 < 2 THEN 400 WHEN n % 100 < 6 THEN 503 WHEN n % 100 >= 8 THEN 204 END,
    CASE WHEN n % 100 < 2 THEN 'HTTP 400 invalid_parameter' WHEN n % 100 < 6 THEN 'HTTP 503' END
FROM generate_series(1, :rows) AS n
"""
_SQLITE_FILL = """
WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < :rows),
t(n, at) AS (SELECT n, strftime('%Y-%m-%d %H:%M:%f', 'now',
    printf('-%.3f seconds', (:rows - n) * 172800.0 / :rows)) FROM s)
INSERT INTO outbox_events (email, event, eventdata, status, attempts, created_at,
    next_attempt_at, delivered_at, failed_at, last_status_code, last_error)
SELECT 'c' || (n % 50000) || '@example.com',
    CASE WHEN n % 1000 = 999 THEN 'order_refunded' ELSE 'cart_updated' END,
    json_object('id', 'e' || n),
    CASE WHEN n % 100 < 4 THEN 'dead' WHEN n % 100 < 8 THEN 'pending' ELSE 'delivered' END,
    CASE WHEN n % 100 < 6 THEN 1 ELSE 0 END, at,
    CASE WHEN n % 100 IN (4, 5) THEN strftime('%Y-%m-%d %H:%M:%f', 'now', '+5 minutes') ELSE at END,
    CASE WHEN n % 100 >= 8 THEN at END, CASE WHEN n % 100 < 4 THEN at END,
    CASE WHEN n % 100 < 2 THEN 400 WHEN n % 100 < 6 THEN 503 WHEN n % 100 >= 8 THEN 204 END,
    CASE WHEN n % 100 < 2 THEN 'HTTP 400 invalid_parameter' WHEN n % 100 < 6 THEN 'HTTP 503' END
FROM t
"""
_ATTEMPTS = """
INSERT INTO outbox_attempts (event_id, attempt, attempted_at, status_code, error, duration_ms)
SELECT id, 1, coalesce(failed_at, created_at), last_status_code, last_error, 40
FROM outbox_events WHERE attempts > 0 OR status = 'dead'
"""


def fill(engine: sa.Engine, rows: int) -> float:
    started = time.perf_counter()
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as conn:
        conn.execute(sa.text(_PG_FILL if postgres else _SQLITE_FILL), {"rows": rows})
        conn.execute(sa.text(_ATTEMPTS))
    with engine.connect() as conn:
        if postgres:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("VACUUM ANALYZE"))
        else:
            conn.execute(sa.text("ANALYZE"))
            conn.commit()
    return time.perf_counter() - started


def render_ms(engine: sa.Engine, runs: int) -> dict[str, float]:
    client = TestClient(create_app(engine, ConsoleOptions()), base_url="http://127.0.0.1")
    timings = {}
    for page in PAGES:
        assert client.get(page).status_code == 200, page  # warm-up, and a check
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            client.get(page)
            samples.append((time.perf_counter() - started) * 1000)
        timings[page] = statistics.median(samples)
    return timings


def database(backend: str, workdir: Path, pg: PostgresServer | None, name: str) -> sa.Engine:
    if backend == "sqlite":
        url = f"sqlite:///{workdir / f'{name}.db'}"
    else:
        assert pg is not None
        admin = sa.create_engine(pg.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        admin.dispose()
        url = pg.url(name)
    engine = db.create_engine(url)
    db.migrate(engine)
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="events in the table")
    parser.add_argument("--runs", type=int, default=11, help="renders per page (the median)")
    parser.add_argument("--backend", choices=("postgresql", "sqlite", "both"), default="both")
    args = parser.parse_args()
    chosen = ["postgresql", "sqlite"] if args.backend == "both" else [args.backend]
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-console-"))
    pg = PostgresServer().start() if "postgresql" in chosen else None
    try:
        for backend in chosen:
            empty = database(backend, workdir, pg, "console_empty")
            full = database(backend, workdir, pg, "console_full")
            seconds = fill(full, args.rows)
            baseline, timed = render_ms(empty, args.runs), render_ms(full, args.runs)
            print(
                f"\n{backend}: {args.rows:,} rows (filled in {seconds:.0f}s), median of {args.runs}"
            )
            print(f"  {'page':<34}{'empty ms':>10}{'full ms':>10}{'ratio':>8}")
            for page in PAGES:
                ratio = timed[page] / baseline[page]
                print(f"  {page:<34}{baseline[page]:>10.1f}{timed[page]:>10.1f}{ratio:>8.1f}")
            empty.dispose()
            full.dispose()
    finally:
        if pg is not None:
            pg.destroy()


if __name__ == "__main__":
    main()
