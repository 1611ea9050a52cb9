"""The outbox benchmark: throughput, enqueue cost, latency, history and ordering.

Run it with `bash bench/run` (installs nginx and wrk when missing). It starts
its own PostgreSQL from the server binaries and an nginx that answers 204 on
127.0.0.1, and prints one table per question: every figure is the median of
several runs, every timing also a ratio against a baseline measured in the
same invocation. `bench/compare.py` measures this checkout's throughput against
another checkout's (an older commit's worktree), in interleaved rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backlog import BAD_EVENT, fill  # noqa: E402  (bench/ is the script's folder)
from latency import latency  # noqa: E402
from tracing_cost import tracing_cost  # noqa: E402

from tests.pgserver import PostgresServer, free_port  # noqa: E402
from worker import db, track_event, track_events  # noqa: E402
from worker.schema import outbox_events  # noqa: E402

KEY = "bench-key"
BODY = (
    '{"email":"jane.doe@example.com","event":"cart_updated","properties":{"FIRSTNAME":"Jane"},'
    '"eventdata":{"id":"cart:1001","data":{"price":"50.00"}}}'
)
DEFAULT_FLAGS: list[str] = []
BEST_FLAGS = ["--concurrency", "32", "--batch-size", "200"]
# The throughput question's settings: label, flags, daemon processes.
THROUGHPUT_CONFIGS = [
    ("defaults", DEFAULT_FLAGS, 1),
    ("best, 1 process", BEST_FLAGS, 1),
    ("best, 2 processes", BEST_FLAGS, 2),
]


# -- the endpoint ------------------------------------------------------------


class Nginx:
    """nginx answering 204 to everything: never the bottleneck."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-bench-nginx-"))
        self.port = free_port()
        (self.dir / "nginx.conf").write_text(
            f"""
worker_processes 1;
daemon on;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {self.dir}/body;
  keepalive_requests 10000000;
  server {{
    listen 127.0.0.1:{self.port};
    location / {{ return 204; }}
  }}
}}
"""
        )
        subprocess.run(["nginx", "-c", str(self.dir / "nginx.conf")], check=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v2/trackEvent"

    def stop(self) -> None:
        pid = int((self.dir / "nginx.pid").read_text())
        os.kill(pid, signal.SIGTERM)


def wrk_ceiling(url: str, seconds: int = 5, connections: int = 16) -> float:
    """Requests/s that wrk gets from the endpoint, posting the same body."""
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [[{BODY}]]\n"
        'wrk.headers["content-type"] = "application/json"\n'
        f'wrk.headers["ma-key"] = "{KEY}"\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("Requests/sec"))
    return float(line.split()[1])


# -- databases ---------------------------------------------------------------


@dataclass
class Backend:
    name: str
    new_database: Callable[[], str]  # the URL of a fresh, empty database

    def new_url(self) -> str:
        """A fresh database, migrated by this checkout."""
        url = self.new_database()
        engine = db.create_engine(url)
        db.migrate(engine)
        engine.dispose()
        return url

    def throughput_configs(self) -> list[tuple[str, list[str], int]]:
        # One daemon per SQLite file.
        return [c for c in THROUGHPUT_CONFIGS if self.name != "sqlite" or c[2] == 1]


def backends(pg: PostgresServer, workdir: Path) -> list[Backend]:
    counter = iter(range(10**6))

    def pg_database() -> str:
        name = f"bench_{next(counter)}"
        admin = sa.create_engine(pg.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        admin.dispose()
        return pg.url(name)

    def sqlite_database() -> str:
        return f"sqlite:///{workdir / f'bench_{next(counter)}.db'}"

    return [Backend("postgresql", pg_database), Backend("sqlite", sqlite_database)]


def count(url: str, status: str) -> int:
    engine = db.create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(
            sa.select(sa.func.count()).where(outbox_events.c.status == status)
        ).scalar_one()
    engine.dispose()
    return n


# -- the daemon --------------------------------------------------------------


@dataclass
class RunResult:
    seconds: float
    cpu_seconds: float
    max_rss_kb: int


def run_daemon(
    url: str,
    endpoint: str,
    flags: list[str],
    processes: int = 1,
    python: str = sys.executable,
    cwd: Path = ROOT,
) -> RunResult:
    """`outbox-worker run --exit-when-drained` as real processes; wall and CPU time.

    `python -m worker` runs the `worker` package found from `cwd` first: another
    checkout's daemon is that checkout's interpreter run in its own directory."""
    env = {**os.environ, "OUTBOX_MA_KEY": KEY, "OUTBOX_API_KEY": KEY}
    command = [
        python, "-m", "worker", "run", "--exit-when-drained", "--log-level", "WARNING",
        "--database-url", url, "--endpoint-url", endpoint, *flags,
    ]  # fmt: skip
    started = time.monotonic()
    procs = [subprocess.Popen(command, env=env, cwd=cwd) for _ in range(processes)]
    cpu, rss = 0.0, 0
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"the daemon exited {proc.returncode}")
        cpu += usage.ru_utime + usage.ru_stime
        rss = max(rss, usage.ru_maxrss)
    return RunResult(time.monotonic() - started, cpu, rss)


# -- the questions -------------------------------------------------------------


def throughput(args: argparse.Namespace, bes: list[Backend], nginx: Nginx, ceiling: float) -> None:
    print("\n## 1. Delivery throughput (events/s; CPU ms per event; share of the wrk ceiling)\n")
    print(f"wrk ceiling of the endpoint: {ceiling:,.0f} requests/s\n")
    print("| backend | events | settings | events/s | worker CPU ms/event | of ceiling |")
    print("|---|---:|---|---:|---:|---:|")
    for be in bes:
        for n in args.sizes:
            for label, flags, procs in be.throughput_configs():
                rates, cpus = [], []
                for _ in range(args.repeat):
                    url = be.new_url()
                    fill(url, n)
                    result = run_daemon(url, nginx.url, flags, procs)
                    assert count(url, "delivered") == n
                    rates.append(n / result.seconds)
                    cpus.append(result.cpu_seconds * 1000 / n)
                rate = statistics.median(rates)
                print(
                    f"| {be.name} | {n:,} | {label} | {rate:,.0f} | {statistics.median(cpus):.3f}"
                    f" | {rate / ceiling:.1%} |",
                    flush=True,
                )


def enqueue_cost(args: argparse.Namespace, bes: list[Backend]) -> None:
    print("\n## 2. Enqueue cost (per transaction that also inserts one business row)\n")
    print("| backend | events/tx | bare INSERT µs/tx | track_event(s) µs/tx | ratio |")
    print("|---|---:|---:|---:|---:|")
    business = sa.Table(
        "bench_orders",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("total", sa.Text),
    )
    spec = {
        "email": "jane@example.com",
        "event": "order_completed",
        "properties": {"FIRSTNAME": "Jane"},
        "eventdata": {"id": "order:1", "data": {"total": "50.00"}},
    }
    bare_row = {k: v for k, v in spec.items()}
    for be in bes:
        url = be.new_url()
        engine = db.create_engine(url)
        business.create(engine)
        for per_tx in (1, 100):
            txs = args.enqueue_tx // per_tx

            def bare(session: Session, per_tx: int = per_tx) -> None:
                session.execute(sa.insert(business).values(total="50.00"))
                session.execute(sa.insert(outbox_events), [bare_row] * per_tx)

            def tracked(session: Session, per_tx: int = per_tx) -> None:
                session.execute(sa.insert(business).values(total="50.00"))
                if per_tx == 1:
                    track_event(session, **spec)
                else:
                    track_events(session, [spec] * per_tx)

            timings: dict[str, list[float]] = {"bare": [], "tracked": []}
            for _ in range(args.repeat):
                for name, body in (("bare", bare), ("tracked", tracked)):
                    started = time.perf_counter()
                    for _ in range(txs):
                        with Session(engine) as session, session.begin():
                            body(session)
                    timings[name].append((time.perf_counter() - started) / txs * 1e6)
            b, t = statistics.median(timings["bare"]), statistics.median(timings["tracked"])
            print(f"| {be.name} | {per_tx} | {b:,.0f} | {t:,.0f} | {t / b:.2f}x |", flush=True)
        engine.dispose()


def history(args: argparse.Namespace, pg_backend: Backend, nginx: Nginx) -> None:
    n_hist = args.history_rows
    print(f"\n## 4. Scale of history (PostgreSQL, {n_hist:,} rows)\n")
    n = args.sizes[0]
    empty, full = [], []
    for _ in range(args.repeat):
        url = pg_backend.new_url()
        fill(url, n)
        empty.append(n / run_daemon(url, nginx.url, DEFAULT_FLAGS).seconds)
        url = pg_backend.new_url()
        bulk_history(url, n_hist)
        fill(url, n)
        full.append(n / run_daemon(url, nginx.url, DEFAULT_FLAGS).seconds)
    print("| measure | baseline | figure | ratio |")
    print("|---|---:|---:|---:|")
    e, f = statistics.median(empty), statistics.median(full)
    print(
        f"| events/s, {n:,} events, empty table vs {n_hist:,} delivered rows | {e:,.0f} | {f:,.0f} | {f / e:.2f}x |"
    )

    # RSS with a large backlog: the daemon streams batches, it never loads the table.
    url = pg_backend.new_url()
    bulk_history(url, n_hist, status="pending")
    small = pg_backend.new_url()
    fill(small, 1000)
    rss_small = run_daemon(small, nginx.url, DEFAULT_FLAGS).max_rss_kb
    env = {**os.environ, "OUTBOX_MA_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "run", "--log-level", "WARNING",
         "--database-url", url, "--endpoint-url", nginx.url],
        env=env,
    )  # fmt: skip
    time.sleep(args.rss_seconds)
    proc.send_signal(signal.SIGTERM)
    _, _, usage = os.wait4(proc.pid, 0)
    print(
        f"| peak RSS, MB: 1,000-row backlog vs {n_hist:,}-row backlog"
        f" ({args.rss_seconds}s of delivery) | {rss_small / 1024:.0f} | {usage.ru_maxrss / 1024:.0f}"
        f" | {usage.ru_maxrss / rss_small:.2f}x |"
    )
    churn(args, pg_backend, nginx)


def bulk_history(url: str, n: int, status: str = "delivered") -> None:
    """n rows in one statement: delivered a month ago, or a pending backlog."""
    delivered = status == "delivered"
    delivered_at = "now() - interval '30 days'" if delivered else "NULL"
    engine = db.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_events (email, event, properties, status, attempts, delivered_at)"
                " SELECT 'h' || g || '@example.com', 'cart_updated', '{\"FIRSTNAME\": \"Jane\"}',"
                f" '{status}', {1 if delivered else 0},"
                f" {delivered_at}"
                " FROM generate_series(1, :n) AS g"
            ),
            {"n": n},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE outbox_events"))
    engine.dispose()


def table_size(url: str) -> tuple[int, int]:
    engine = db.create_engine(url)
    with engine.connect() as conn:
        heap, indexes = conn.execute(
            sa.text("SELECT pg_table_size('outbox_events'), pg_indexes_size('outbox_events')")
        ).one()
    engine.dispose()
    return heap, indexes


def churn(args: argparse.Namespace, pg_backend: Backend, nginx: Nginx) -> None:
    """Deliver and prune in a rolling window: the table must not bloat."""
    url = pg_backend.new_url()
    window = args.churn_window
    rounds = args.churn_events // window
    sizes = []
    for _ in range(rounds):
        round_started = time.monotonic()
        fill(url, window)
        run_daemon(url, nginx.url, BEST_FLAGS)
        # Keep this round's rows, prune every earlier round's.
        age = f"{time.monotonic() - round_started:.3f}s"
        subprocess.run(
            [sys.executable, "-m", "worker", "prune", "--older-than", age, "--database-url", url],
            check=True,
            capture_output=True,
        )
        sizes.append(table_size(url))
    (h0, i0), (h1, i1) = sizes[0], sizes[-1]
    print(
        f"| table + index MB after {window:,} events vs after {rounds * window:,}"
        f" delivered and pruned in a rolling window | {(h0 + i0) / 2**20:.1f}"
        f" | {(h1 + i1) / 2**20:.1f} | {(h1 + i1) / (h0 + i0):.2f}x |"
    )


def ordering(args: argparse.Namespace, bes: list[Backend], nginx: Nginx) -> None:
    print("\n## 5. Per-contact order on vs off (10% of events share 50 contacts)\n")
    print("| backend | ordered events/s | unordered events/s | ordered / unordered |")
    print("|---|---:|---:|---:|")
    n = args.sizes[0]
    for be in bes:
        results: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeat):
            for ordered in (True, False):
                url = be.new_url()
                fill_shared_contacts(url, n)
                flags = DEFAULT_FLAGS + ([] if ordered else ["--unordered"])
                results[ordered].append(n / run_daemon(url, nginx.url, flags).seconds)
        o, u = statistics.median(results[True]), statistics.median(results[False])
        print(f"| {be.name} | {o:,.0f} | {u:,.0f} | {o / u:.2f}x |", flush=True)


def fill_shared_contacts(url: str, n: int) -> None:
    engine = db.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(outbox_events),
            [
                {
                    "email": f"shared{i % 50}@example.com" if i % 10 == 0 else f"c{i}@example.com",
                    "event": "cart_updated",
                    "properties": {"FIRSTNAME": "Jane"},
                }
                for i in range(n)
            ],
        )
    engine.dispose()


def transports(args: argparse.Namespace, bes: list[Backend], nginx: Nginx) -> None:
    print("\n## 6. Transports: v3-batch vs the tracker (same backlog, nginx answering 204)\n")
    print(
        "| backend | events | settings | tracker events/s | v3-batch events/s | ratio"
        " | tracker CPU ms/event | v3-batch CPU ms/event | v3-batch, less start-up |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    v3_url = nginx.url.replace("/api/v2/trackEvent", "/v3/events")
    for be in bes:
        # A run with nothing to deliver: the process's start-up and exit, in CPU seconds.
        idle = run_daemon(be.new_url(), v3_url, ["--transport", "v3-batch"]).cpu_seconds
        for n in args.transport_sizes:
            for label, flags in (("defaults", DEFAULT_FLAGS), ("best", BEST_FLAGS)):
                figures: dict[str, list[tuple[float, float]]] = {"tracker": [], "v3-batch": []}
                for _ in range(args.repeat):
                    for name, endpoint in (("tracker", nginx.url), ("v3-batch", v3_url)):
                        url = be.new_url()
                        fill(url, n)
                        result = run_daemon(url, endpoint, [*flags, "--transport", name])
                        assert count(url, "delivered") == n
                        figures[name].append((n / result.seconds, result.cpu_seconds * 1000 / n))
                t_rate, t_cpu = (
                    statistics.median(x) for x in zip(*figures["tracker"], strict=True)
                )
                b_rate, b_cpu = (
                    statistics.median(x) for x in zip(*figures["v3-batch"], strict=True)
                )
                print(
                    f"| {be.name} | {n:,} | {label} | {t_rate:,.0f} | {b_rate:,.0f}"
                    f" | {b_rate / t_rate:.1f}x | {t_cpu:.3f} | {b_cpu:.3f}"
                    f" | {b_cpu - idle * 1000 / n:.3f} |",
                    flush=True,
                )


def bad_events(args: argparse.Namespace, bes: list[Backend]) -> None:
    """v3-batch against the local sink: clean, 1% bad events spread at random, and
    under the sink's 10 requests/s with the daemon's --rate-limit 10."""
    import random

    from worker.sink import Sink

    n = args.transport_sizes[0]
    print(f"\n## 7. v3-batch with bad events and a rate limit (local sink, {n:,} events)\n")
    print(
        "| backend | run | events/s (good ones) | of the clean run | dead | 429s | exactly once |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    rng = random.Random(11)
    for be in bes:
        clean = 0.0
        runs = (("clean", 0, 0), ("1% bad", n // 100, 0), ("sink 10 req/s, --rate-limit 10", 0, 10))
        for label, bad_count, limit in runs:
            bad = frozenset(rng.sample(range(n), bad_count))
            url = be.new_url()
            fill(url, n, bad=bad)
            with Sink(
                KEY, refuse_events=[BAD_EVENT], transport="v3-batch", rate_limit=limit
            ) as sink:
                flags = ["--transport", "v3-batch", "--rate-limit", str(limit)]
                result = run_daemon(url, sink.url, flags)
                good = [e["event_properties"]["id"] for e in sink.received]
                throttled = sink.counts.get(429, 0)
            rate = (n - bad_count) / result.seconds
            clean = clean or rate
            dead = count(url, "dead")
            once = len(good) == len(set(good)) == n - bad_count and dead == bad_count
            print(
                f"| {be.name} | {label} | {rate:,.0f} | {rate / clean:.0%} | {dead}"
                f" | {throttled} | {'yes' if once else 'NO'} |",
                flush=True,
            )


# -- main ------------------------------------------------------------------------


def machine() -> str:
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cores,"
        f" {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB;"
        f" Python {platform.python_version()}; sqlite {__import__('sqlite3').sqlite_version};"
        f" load average {os.getloadavg()[0]:.1f}"
    )


@contextlib.contextmanager
def environment() -> Iterator[tuple[PostgresServer, Nginx, Path]]:
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    pg = PostgresServer().start()
    nginx = Nginx()
    try:
        yield pg, nginx, workdir
    finally:
        nginx.stop()
        pg.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["throughput", "enqueue", "latency", "history", "ordering", "transports"],
    )
    args = parser.parse_args()
    args.repeat = 1 if args.quick else 3
    args.sizes = [5000] if args.quick else [20000, 100000]
    args.transport_sizes = [20000] if args.quick else [20000, 100000]
    args.enqueue_tx = 500 if args.quick else 3000
    args.latency_seconds = 3 if args.quick else 10
    args.idle_seconds = 20
    args.full_events = 5000 if args.quick else 20000
    args.history_rows = 100_000 if args.quick else 1_000_000
    args.rss_seconds = 5 if args.quick else 20
    args.churn_window = 10_000 if args.quick else 50_000
    args.churn_events = 30_000 if args.quick else 1_000_000
    only = set(
        args.only or ["throughput", "enqueue", "latency", "history", "ordering", "transports"]
    )

    print(f"# outbox-worker benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(machine())
    with environment() as (pg, nginx, workdir):
        bes = backends(pg, workdir)
        ceiling = wrk_ceiling(nginx.url)
        if "throughput" in only:
            throughput(args, bes, nginx, ceiling)
        if "enqueue" in only:
            enqueue_cost(args, bes)
            tracing_cost(args, [(be.name, be.new_url) for be in bes])
        if "latency" in only:
            by_name = {be.name: be.new_url for be in bes}
            latency(args, lambda name: by_name[name](), fill, nginx.url, KEY)
        if "history" in only:
            history(args, bes[0], nginx)
        if "ordering" in only:
            ordering(args, bes, nginx)
        if "transports" in only:
            transports(args, bes, nginx)
            bad_events(args, bes)


if __name__ == "__main__":
    main()
