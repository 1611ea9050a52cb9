"""A durable transactional outbox for marketing-automation events.

Call track_event inside your own transaction; `outbox-worker run` delivers.
"""

from worker.enqueue import track_event, track_events
from worker.event import InvalidEvent

__all__ = ["InvalidEvent", "track_event", "track_events"]
