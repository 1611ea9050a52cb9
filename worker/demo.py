"""`outbox-worker demo`: the whole flow on SQLite with the local sink, in one process.

Migrate, enqueue the sample events through track_events (plus one row written
with plain SQL that breaks the rules, and one the sink is told to refuse),
deliver them with the real daemon, and show what happened and the SQL to see it.

The demo may be pointed at any database, so it only ever works on its own:
every row it writes carries an idempotency key starting `outbox-demo:`. It
refuses a database holding anything else (another table, another row, a
running daemon that would carry its events to a real endpoint), empties its own
rows before a new run, and never deletes a file.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import sys
from importlib.resources import files

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker import db, output, track_events
from worker.admin_reports import DAEMON_SILENCE
from worker.backends import backend_for
from worker.backends.sql import seconds_from_now
from worker.config import DEMO_DATABASE_URL, Settings, SettingsError
from worker.daemon import build_daemon
from worker.policy import RetryBudget
from worker.schema import metadata, outbox_attempts, outbox_daemons, outbox_events
from worker.sink import Sink

REFUSED_EVENT = "coupon_redeemed"
DEMO_KEY = "outbox-demo:"  # the idempotency-key prefix of every row the demo writes
_OUTBOX_TABLES = {*metadata.tables, db.VERSION_TABLE}


def run_demo(database_url: str, transport: str) -> int:
    url = db.normalize_url(database_url)
    _take_over(url)
    engine = db.create_engine(url)
    db.migrate(engine)
    print(f"1. migrated {db.redact(url)}")

    samples = [
        json.loads(line)
        for line in files("worker").joinpath("demo_events.jsonl").read_text("utf-8").splitlines()
        if line.strip()
    ]
    samples.append({"email": "vip@example.com", "event": REFUSED_EVENT, "eventdata": {"id": "c:9"}})
    for number, sample in enumerate(samples):
        sample["idempotency_key"] = f"{DEMO_KEY}{number}"
    with Session(engine) as session, session.begin():
        track_events(session, samples)
        # What another program might write with plain SQL: "event" is empty.
        session.execute(
            sa.text(
                "INSERT INTO outbox_events (email, event, idempotency_key)"
                f" VALUES ('legacy@example.com', ' ', '{DEMO_KEY}plain-sql')"
            )
        )
    print(
        f"2. enqueued {len(samples)} events with track_events and 1 with plain SQL"
        f" (the sink refuses {REFUSED_EVENT!r} events; the plain-SQL row has an empty event)"
    )

    key = secrets.token_hex(16)  # a throwaway key shared by the sink and the daemon
    with Sink(key, refuse_events=[REFUSED_EVENT], transport=transport) as sink:
        settings = Settings(
            database_url=str(url),
            endpoint_url=sink.url,
            transport=transport,
            ma_key=key,
            api_key=key,
            budget=RetryBudget(backoff_base=0.2, backoff_max=1.0),
            concurrency=4,
            poll_interval=0.2,
            exit_when_drained=True,
        ).check()
        code = build_daemon(settings, engine=engine).run()
        print(
            f"3. delivered to the local sink at {sink.url} (transport {transport}): it accepted"
            f" {len(sink.received)} in {sink.requests} requests"
        )

    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                outbox_events.c.id,
                outbox_events.c.email,
                outbox_events.c.event,
                outbox_events.c.status,
                outbox_events.c.attempts,
                outbox_events.c.last_status_code,
                outbox_events.c.last_error,
            ).order_by(outbox_events.c.id)
        ).all()
    print(
        "\n"
        + output.table(
            ["id", "email", "event", "status", "tries", "code", "why it failed"],
            rows,
            [4, 32, 18, 10, 5, 5, 60],
        )
    )
    print("\nLook at it yourself:")
    for hint in _hints(url):
        print(f"  {hint}")
    return code


def _take_over(url: sa.URL) -> None:
    """Make sure the database holds nothing but the demo's own rows, then empty those.

    Raises SettingsError (exit 2) for anything else: the demo's daemon would
    claim real events and its sink would swallow them.
    """
    # A plain engine: the outbox's own would switch a stranger's SQLite file to WAL.
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        _check_and_empty(engine)
    finally:
        engine.dispose()


def _check_and_empty(engine: sa.Engine) -> None:
    redo = f"give --database-url a new, empty database (the default is {DEMO_DATABASE_URL})"
    tables = set(sa.inspect(engine).get_table_names())
    foreign = sorted(tables - _OUTBOX_TABLES)
    if foreign:
        raise SettingsError(
            f"the demo will not touch {db.redact(engine.url)}: it holds tables that are not"
            f" the demo's ({', '.join(foreign[:5])}); {redo}"
        )
    if outbox_events.name not in tables:
        return
    key = outbox_events.c.idempotency_key
    others = sa.select(sa.func.count()).where(sa.or_(key.is_(None), ~key.startswith(DEMO_KEY)))
    with engine.begin() as conn:
        real = conn.execute(others).scalar_one()
        if real:
            raise SettingsError(
                f"the demo will not touch {db.redact(engine.url)}: it holds {real} outbox"
                f" event{'s' if real != 1 else ''} that are not the demo's; {redo}"
            )
        # A live daemon would carry the demo's events to the real endpoint.
        live = (
            conn.execute(
                sa.select(outbox_daemons.c.name).where(
                    outbox_daemons.c.seen_at >= seconds_from_now(-DAEMON_SILENCE)
                )
            ).first()
            if outbox_daemons.name in tables
            else None
        )
        if live:
            raise SettingsError(
                f"the demo will not touch {db.redact(engine.url)}: daemon {live.name} delivers"
                f" from it; {redo}"
            )
        # Every row is the demo's; attempts first, as a plain SQLite connection does not cascade.
        conn.execute(sa.delete(outbox_attempts))
        conn.execute(sa.delete(outbox_events))


def _hints(url: sa.URL) -> list[str]:
    """Commands to look at the result, spelled so that they run as printed."""
    target = shlex.quote(db.redact(url))
    hints = []
    shell = backend_for(url).sql_shell(url)
    if shell:
        hints += [
            f'{shell} "SELECT status, count(*) FROM outbox_events GROUP BY status"',
            f'{shell} "SELECT id, event, last_status_code, last_error FROM outbox_dead_letters"',
        ]
    program = _program()
    hints += [
        f"{program} dead-letters list --database-url {target}",
        f"{program} stats --database-url {target}",
    ]
    return hints


def _program() -> str:
    """How this process was started: the console script as typed, or python -m worker."""
    script = sys.argv[0] if sys.argv else ""
    if not script or script.endswith("__main__.py"):
        return f"{shlex.quote(sys.executable)} -m worker"
    name = os.path.basename(script)
    found = shutil.which(name)
    if found and os.path.samefile(found, script):
        return name  # the PATH finds it as it is
    relative = os.path.relpath(script)
    return shlex.quote(relative if not relative.startswith("..") else script)
