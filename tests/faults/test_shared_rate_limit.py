"""One rate limit for the account, shared by every daemon on one PostgreSQL database.

Real daemons as subprocesses, on one PostgreSQL (and through a transaction-
pooling PgBouncer), against a test endpoint that answers 429 to a request
above N in the sliding second that ends with it, and keeps every request.
Each daemon posts to its own query string, so the endpoint's log says which
daemon sent what. Everything is measured from that log.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from tests.daemons import DaemonProcess, enqueue, status_counts, wait_until
from tests.endpoint import Endpoint, Received, Reply
from tests.faults.test_pgbouncer import bouncer  # noqa: F401  (the fixture)
from worker.db import create_engine as engine_for
from worker.ratelimit import parse_rate_limit

pytestmark = pytest.mark.slow  # a fault module: real crashes, outages, proxies or daemon fleets

N = 10  # the account's limit, requests per second
EVENTS = 100  # about ten seconds of work at the limit: a backlog all along
RUN = ("--rate-limit", f"{N}/s", "--concurrency", "4", "--poll-interval", "0.2")
CHUNK = parse_rate_limit(f"{N}/s").chunk


@pytest.fixture
def limited() -> Iterator[Endpoint]:
    server = Endpoint(limit_per_second=N)
    yield server
    server.close()


def start(spawn, url: str, endpoint: Endpoint, count: int, *flags: str) -> list[DaemonProcess]:
    daemons = [spawn(url, f"{endpoint.url}?daemon={i}", *RUN, *flags) for i in range(count)]
    for daemon in daemons:
        wait_until(lambda d=daemon: "delivering to" in d.log(), 30, "the daemon to start")
    return daemons


def sender(request: Received) -> str:
    return request.path.rsplit("daemon=", 1)[1]


def most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(times):
        while times[first] <= at - 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def utilisation(times: list[float]) -> float:
    """Requests sent / requests the limit allowed, from the first request to the last."""
    times = sorted(times)
    return (len(times) - 1) / (N * (times[-1] - times[0]))


def stop_all(daemons: list[DaemonProcess]) -> None:
    for daemon in daemons:
        if daemon.proc.poll() is None:
            assert daemon.stop() == 0, daemon.log()


def run_backlog(spawn, url: str, endpoint: Endpoint, daemons: int) -> list[DaemonProcess]:
    engine = engine_for(url)
    running = start(spawn, url, endpoint, daemons)
    enqueue(engine, EVENTS)
    wait_until(lambda: status_counts(engine) == {"delivered": EVENTS}, 90, "every delivery")
    stop_all(running)
    engine.dispose()
    return running


# -- the limit holds for the account, whatever the number of daemons -----------------------


@pytest.mark.parametrize("daemons", [1, 2, 4])
def test_daemons_sharing_the_limit_never_exceed_it_and_use_at_least_90_percent(
    daemons, pg_url, limited, spawn
):
    running = run_backlog(spawn, pg_url, limited, daemons)

    times = [r.at for r in limited.requests]
    assert limited.refused == [], [d.log() for d in running]
    assert most_in_one_second(times) <= N
    assert len(times) == EVENTS
    assert utilisation(times) >= 0.9, utilisation(times)


def test_every_daemon_gets_a_fair_share(pg_url, limited, spawn):
    run_backlog(spawn, pg_url, limited, 4)

    shares = {d: 0 for d in "0123"}
    for request in limited.requests:
        shares[sender(request)] += 1
    # An equal share is a quarter; each gets at least half of that.
    assert min(shares.values()) >= EVENTS / 4 / 2, shares


def test_through_a_transaction_pooling_pgbouncer_the_limit_still_holds(bouncer, limited, spawn):  # noqa: F811
    running = run_backlog(spawn, bouncer, limited, 2)

    times = [r.at for r in limited.requests]
    assert limited.refused == [], [d.log() for d in running]
    assert most_in_one_second(times) <= N
    assert utilisation(times) >= 0.9, utilisation(times)
    assert all("Traceback" not in d.log() for d in running)


def test_on_sqlite_the_limit_is_kept_in_process(sqlite_url, limited, spawn):
    running = run_backlog(spawn, sqlite_url, limited, 1)

    times = [r.at for r in limited.requests]
    assert limited.refused == []
    assert utilisation(times) >= 0.9, utilisation(times)
    assert "this daemon" in running[0].log()


# -- a pause for one is a pause for all -----------------------------------------------------


@pytest.mark.parametrize("through", ["postgresql", "pgbouncer"])
def test_a_429_with_retry_after_2_to_one_daemon_stops_every_daemon_for_2s(
    through, pg_url, limited, spawn, request
):
    url = pg_url if through == "postgresql" else request.getfixturevalue("bouncer")
    refused: list[Received] = []

    def refuse_one(received: Received) -> Reply | None:
        if not refused and sender(received) == "0" and len(limited.requests) > 15:
            refused.append(received)
            return Reply(429, b'{"code":"too_many_requests"}', {"Retry-After": "2"})
        return None

    limited.respond = refuse_one
    engine = engine_for(url)
    running = start(spawn, url, limited, 2)
    enqueue(engine, 60)
    wait_until(lambda: status_counts(engine) == {"delivered": 60}, 90, "every delivery")
    stop_all(running)
    engine.dispose()

    (throttled,) = refused
    during = [r for r in limited.requests if throttled.at < r.at < throttled.at + 2.0]
    # The daemon answered stops at once; the other hears of it from the database,
    # at the latest when its chunk of slots is used up.
    assert [r for r in during if sender(r) == "0"] == []
    assert len(during) <= CHUNK, [round(r.at - throttled.at, 3) for r in during]
    assert all(r.at - throttled.at < 1.0 for r in during)
    assert any(r.at >= throttled.at + 2.0 for r in limited.requests)  # and then it resumed
    assert limited.refused == []
    assert "endpoint says 429" in running[0].log()
    assert "honouring the shared pause" in running[1].log()  # logged once, with its end


# -- a daemon killed while it holds slots ------------------------------------------------------


def test_a_daemon_killed_holding_slots_neither_lets_others_exceed_nor_starves_them(
    pg_url, limited, spawn
):
    engine = engine_for(pg_url)
    victim, *others = start(spawn, pg_url, limited, 3, "--lease", "4")
    enqueue(engine, 120)
    wait_until(
        lambda: sum(sender(r) == "0" for r in limited.requests) >= 8, 30, "the victim to send"
    )
    victim.kill()
    killed_at = limited.requests[-1].at
    wait_until(lambda: status_counts(engine) == {"delivered": 120}, 90, "every delivery")
    stop_all(others)
    engine.dispose()

    after = sorted(r.at for r in limited.requests if r.at > killed_at)
    assert limited.refused == []
    assert most_in_one_second([r.at for r in limited.requests]) <= N
    # The slots the victim held are a gap of at most one chunk in the timeline;
    # the rows it held come back after the lease, so look at the first seconds.
    gaps = [b - a for a, b in itertools.pairwise(t for t in after if t < killed_at + 3.0)]
    lifetime = CHUNK * parse_rate_limit(f"{N}/s").interval
    assert max(gaps) < lifetime + 0.5, (max(gaps), lifetime)
