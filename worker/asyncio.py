"""track_event and track_events for asyncio applications (AsyncSession, AsyncConnection).

Each call runs the synchronous function through SQLAlchemy's `run_sync`, in the
caller's own transaction, so validation, the no-flush rule and idempotency are
exactly those of `worker.track_event`: one implementation, two calling styles.
Needs SQLAlchemy's asyncio support (`pip install "sqlalchemy[asyncio]"`) and an
async driver (aiosqlite, or psycopg 3 which is async as well).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from worker import enqueue
from worker.enqueue import DeliverAfter
from worker.event import MAX_BODY_BYTES

__all__ = ["track_event", "track_events"]


async def track_event(
    session: AsyncSession | AsyncConnection,
    *,
    email: str,
    event: str,
    properties: Mapping[str, Any] | None = None,
    eventdata: Mapping[str, Any] | None = None,
    deliver_after: DeliverAfter = None,
    idempotency_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    transport: str = "tracker",
) -> int:
    """Record one event in the caller's open async transaction and return its outbox id.

    The same call as `worker.track_event`, awaited: it raises InvalidEvent before
    any SQL, never commits or flushes, and the event exists if and only if the
    caller's transaction commits.
    """
    return await _async(session).run_sync(
        enqueue.track_event,
        email=email,
        event=event,
        properties=properties,
        eventdata=eventdata,
        deliver_after=deliver_after,
        idempotency_key=idempotency_key,
        max_body_bytes=max_body_bytes,
        transport=transport,
    )


async def track_events(
    session: AsyncSession | AsyncConnection,
    events: Iterable[Mapping[str, Any]],
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    transport: str = "tracker",
) -> list[int]:
    """Record many events in multi-row INSERTs; their ids in the order given.

    The same call as `worker.track_events`, awaited: every event is validated
    before any SQL, so one invalid event writes nothing.
    """
    return await _async(session).run_sync(
        enqueue.track_events, events, max_body_bytes=max_body_bytes, transport=transport
    )


def _async(session: AsyncSession | AsyncConnection) -> AsyncSession | AsyncConnection:
    # A sync Session here would fail later with an AttributeError on run_sync;
    # say what is wrong instead, the way worker.track_event does.
    if isinstance(session, (AsyncSession, AsyncConnection)):
        return session
    raise TypeError(
        "worker.asyncio.track_event needs an AsyncSession or AsyncConnection, not"
        f" {type(session).__name__} (use worker.track_event for a Session or Connection)"
    )
