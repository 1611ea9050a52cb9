"""The shared rate limit: utilisation and 429s for 1, 2 and 4 daemons on one PostgreSQL.

    .venv/bin/python bench/ratelimit.py                  # 60 s per run: 10/s and 100/s
    .venv/bin/python bench/ratelimit.py --rates 10 100 1000 --seconds 60
    .venv/bin/python bench/ratelimit.py --quick          # 10 s per run, a smoke test

Each run starts its own database and daemons (`python -m worker run
--rate-limit N/s`, subprocesses) against the test endpoint (tests/endpoint.py),
which answers 429 to any request above N in the sliding second that ends with
it. With a backlog all along, it prints per run: requests sent / allowed over
the measured seconds (the limit's spacing caps it at 1/1.05, 95.2%, for N/s:
the 50 ms slack per window), the 429s, the database statements the rate limit took
per request granted (its chunks, from the table), and all the database's
transactions per request (claims, records, heartbeats too: for scale).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.daemons import DaemonProcess, enqueue, wait_until  # noqa: E402
from tests.endpoint import Endpoint  # noqa: E402
from tests.pgserver import PostgresServer  # noqa: E402
from worker import db  # noqa: E402


def run(pg: PostgresServer, number: int, rate: int, daemons: int, seconds: float) -> dict:
    name = f"ratelimit_{number}"
    admin = sa.create_engine(pg.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    url = pg.url(name)
    engine = db.create_engine(url)
    db.migrate(engine)
    enqueue(engine, int(rate * (seconds + 10)))
    endpoint = Endpoint(limit_per_second=rate)
    logs = Path(tempfile.mkdtemp(prefix="outbox-bench-ratelimit-"))
    flags = ("--rate-limit", f"{rate}/s", "--poll-interval", "0.2", "--retain-delivered", "forever")
    started = [
        DaemonProcess(url, f"{endpoint.url}?daemon={i}", logs / f"d{i}.log", *flags)
        for i in range(daemons)
    ]
    try:
        wait_until(lambda: len(endpoint.requests) > rate, 60, "the daemons to send")
        begin = time.monotonic()
        with admin.connect() as conn:
            xacts_before = _transactions(conn, name)
        with engine.connect() as conn:
            granted_before, grants_before = _grants(conn)
        time.sleep(seconds)  # a benchmark measures a span of time: that is the point here
        with admin.connect() as conn:
            xacts = _transactions(conn, name) - xacts_before
        with engine.connect() as conn:
            granted_now, grants_now = _grants(conn)
        granted, grants = granted_now - granted_before, grants_now - grants_before
        end = begin + seconds
    finally:
        for daemon in started:
            daemon.stop()
    sent = [r for r in endpoint.requests if begin <= r.at < end]
    shares = sorted(sum(1 for r in sent if r.path.endswith(f"={i}")) for i in range(daemons))
    result = {
        "rate": rate,
        "daemons": daemons,
        "sent": len(sent),
        "utilisation": len(sent) / (rate * seconds),
        "429": len([r for r in endpoint.refused if begin <= r.at < end]),
        "statements_per_request": grants / max(1, granted),
        "transactions_per_request": xacts / max(1, len(sent)),
        "shares": shares,
    }
    endpoint.close()
    engine.dispose()
    admin.dispose()
    return result


def _grants(conn: sa.Connection) -> tuple[int, int]:
    row = conn.execute(sa.text("SELECT granted, grants FROM outbox_rate_limit")).first()
    return (row.granted, row.grants) if row else (0, 0)


def _transactions(conn: sa.Connection, name: str) -> int:
    conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
    return conn.execute(
        sa.text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :n"),
        {"n": name},
    ).scalar_one()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--daemons", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="10 s per run")
    args = parser.parse_args()
    seconds = 10.0 if args.quick else args.seconds
    pg = PostgresServer().start()
    print(f"each run: {seconds:g} s measured, with a backlog all along\n")
    print("| limit | daemons | sent | utilisation | 429s | rate-limit statements / request"
          " | all transactions / request | requests per daemon |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    try:
        number = 0
        for rate in args.rates:
            for daemons in args.daemons:
                number += 1
                r = run(pg, number, rate, daemons, seconds)
                print(
                    f"| {rate}/s | {daemons} | {r['sent']:,} | {r['utilisation']:.1%} | {r['429']}"
                    f" | {r['statements_per_request']:.3f} | {r['transactions_per_request']:.2f}"
                    f" | {' / '.join(map(str, r['shares']))} |",
                    flush=True,
                )
    finally:
        pg.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
