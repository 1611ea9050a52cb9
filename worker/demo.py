"""`outbox-worker demo`: the whole flow on SQLite with the local sink, in one process.

Migrate, enqueue the sample events through track_events (plus one row written
with plain SQL that breaks the rules, and one the sink is told to refuse),
deliver them with the real daemon, and show what happened and the SQL to see it.
"""

from __future__ import annotations

import json
import secrets
from importlib.resources import files
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker import db, output, track_events
from worker.config import Settings
from worker.daemon import Daemon
from worker.delivery import Deliverer
from worker.policy import RetryBudget
from worker.schema import outbox_events
from worker.sink import Sink
from worker.store import OutboxStore

REFUSED_EVENT = "coupon_redeemed"


def run_demo(database_url: str) -> int:
    url = db.normalize_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and Path(url.database).exists():
        Path(url.database).unlink()  # the demo's own file: start clean every time
    engine = db.create_engine(url)
    db.migrate(engine)
    print(f"1. migrated {db.redact(url)}")

    samples = [
        json.loads(line)
        for line in files("worker").joinpath("demo_events.jsonl").read_text("utf-8").splitlines()
        if line.strip()
    ]
    samples.append({"email": "vip@example.com", "event": REFUSED_EVENT, "eventdata": {"id": "c:9"}})
    with Session(engine) as session, session.begin():
        track_events(session, samples)
        # What another program might write with plain SQL: "event" is empty.
        session.execute(
            sa.text("INSERT INTO outbox_events (email, event) VALUES ('legacy@example.com', ' ')")
        )
    print(
        f"2. enqueued {len(samples)} events with track_events and 1 with plain SQL"
        f" (the sink refuses {REFUSED_EVENT!r} events; the plain-SQL row has an empty event)"
    )

    key = secrets.token_hex(16)  # a throwaway key shared by the sink and the daemon
    with Sink(key, refuse_events=[REFUSED_EVENT]) as sink:
        settings = Settings(
            database_url=str(url),
            endpoint_url=sink.url,
            ma_key=key,
            budget=RetryBudget(backoff_base=0.2, backoff_max=1.0),
            concurrency=4,
            poll_interval=0.2,
            exit_when_drained=True,
        ).check()
        deliverer = Deliverer(sink.url, key, pool_size=settings.concurrency)
        code = Daemon(settings, OutboxStore(engine), deliverer).run()
        print(f"3. delivered to the local sink at {sink.url}: it accepted {len(sink.received)}")

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
    database = url.database or "outbox-demo.db"
    print(
        f"""
Look at it yourself:
  sqlite3 {database} "SELECT status, count(*) FROM outbox_events GROUP BY status"
  sqlite3 {database} "SELECT id, event, last_status_code, last_error FROM outbox_dead_letters"
  outbox-worker dead-letters list --database-url sqlite:///{database}
  outbox-worker stats --database-url sqlite:///{database}"""
    )
    return code
