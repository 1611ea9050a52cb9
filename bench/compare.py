"""Daemon throughput of this checkout against another one, in interleaved rounds.

    git worktree add ../outbox-before d3cec3f                     # the other version, detached
    (cd ../outbox-before && python3 -m venv .venv && .venv/bin/pip install -q -e .)
    .venv/bin/python bench/compare.py ../outbox-before --events 20000 --rounds 3

Each run gets a fresh database (a new database on one PostgreSQL server, a new
SQLite file), migrated by that checkout's own `outbox-worker migrate` and filled
through its own `track_events` (bench/backlog.py run by its interpreter), since
the schema differs between versions. That checkout's daemon then delivers the
backlog to one nginx answering 204, with `run --exit-when-drained` and only
flags both versions understand (bench.py's throughput settings). Every round
runs every setting once for each checkout, back to back, the other first in
odd rounds and this one first in even ones, so that the machine's noise falls
on both. The table gives the medians over the rounds, the ratio this / other
of the medians and the range of the rounds' own ratios; worker CPU is the user
and system time of the daemon processes (os.wait4), per event delivered.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import ROOT, Backend, backends, count, environment, machine, run_daemon

BACKLOG = Path(__file__).with_name("backlog.py")


@dataclass
class Checkout:
    """A source tree and the interpreter that has its `worker` package installed."""

    name: str
    root: Path
    python: str

    def run(self, *arguments: str) -> str:
        """This checkout's interpreter in its own directory; its output, or exit saying why."""
        done = subprocess.run(
            [self.python, *arguments], cwd=self.root, capture_output=True, text=True
        )
        if done.returncode != 0:
            sys.exit(
                f"compare: {self.python} {' '.join(arguments[:3])} exited {done.returncode}:"
                f" {done.stderr.strip()}"
            )
        return done.stdout

    def check(self) -> str:
        """Its commit; exits unless its interpreter imports its own `worker`."""
        if not Path(self.python).exists():
            sys.exit(
                f"compare: no {self.python}: make it with `python3 -m venv .venv &&"
                " .venv/bin/pip install -e .` in that checkout"
            )
        found = Path(self.run("-c", "import worker; print(worker.__file__)").strip())
        if not found.is_relative_to(self.root):
            sys.exit(f"compare: {self.python} imports {found}, not {self.root}/worker")
        return subprocess.run(
            ["git", "-C", str(self.root), "describe", "--always", "--dirty"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip

    def prepare(self, be: Backend, n: int) -> str:
        """A fresh database with n pending events, migrated and written by this checkout."""
        url = be.new_database()
        self.run("-m", "worker", "migrate", "--database-url", url)
        self.run(str(BACKLOG), url, str(n))
        return url


@dataclass
class Samples:
    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_ms)


def measure(
    checkout: Checkout, be: Backend, n: int, flags: list[str], procs: int, endpoint: str
) -> tuple[float, float]:
    """One run: events/s, and worker CPU ms per event."""
    url = checkout.prepare(be, n)
    result = run_daemon(url, endpoint, flags, procs, checkout.python, checkout.root)
    delivered = count(url, "delivered")
    if delivered != n:
        raise RuntimeError(f"{checkout.name}: {delivered} of {n} events delivered")
    return n / result.seconds, result.cpu_seconds * 1000 / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout, with its own .venv")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    other_root = args.other.resolve()
    this = Checkout("this", ROOT, sys.executable)
    other = Checkout("other", other_root, str(other_root / ".venv" / "bin" / "python"))
    versions = {c.name: c.check() for c in (this, other)}

    print(f"# this checkout against another, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"this: {ROOT} ({versions['this']}); other: {other_root} ({versions['other']})")
    print(f"{args.events:,} events a run, {args.rounds} interleaved rounds")
    print(f"{machine()} (at the start)", flush=True)
    with environment() as (pg, nginx, workdir):
        configs = [(be, *c) for be in backends(pg, workdir) for c in be.throughput_configs()]
        samples = {(i, c.name): Samples() for i in range(len(configs)) for c in (this, other)}
        for r in range(args.rounds):
            for i, (be, label, flags, procs) in enumerate(configs):
                for checkout in (other, this) if r % 2 == 0 else (this, other):
                    rate, cpu = measure(checkout, be, args.events, flags, procs, nginx.url)
                    samples[i, checkout.name].rates.append(rate)
                    samples[i, checkout.name].cpu_ms.append(cpu)
                    print(
                        f"round {r + 1}/{args.rounds}: {be.name}, {label}, {checkout.name}:"
                        f" {rate:,.0f} events/s, {cpu:.3f} CPU ms/event",
                        file=sys.stderr,
                        flush=True,
                    )

    print(f"\n{machine()} (at the end)\n")
    print(
        "| backend | settings | other events/s | this events/s | this / other | rounds' ratios"
        " | other CPU ms/event | this CPU ms/event | this / other |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for i, (be, label, _, _) in enumerate(configs):
        o, t = samples[i, "other"], samples[i, "this"]
        ratios = [a / b for a, b in zip(t.rates, o.rates, strict=True)]
        print(
            f"| {be.name} | {label} | {o.rate:,.0f} | {t.rate:,.0f} | {t.rate / o.rate:.2f}"
            f" | {min(ratios):.2f}-{max(ratios):.2f} | {o.cpu:.3f} | {t.cpu:.3f}"
            f" | {t.cpu / o.cpu:.2f} |"
        )


if __name__ == "__main__":
    main()
