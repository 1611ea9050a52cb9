"""What the daemon's telemetry keeps for its heartbeat beside the metrics."""

from __future__ import annotations

from worker.policy import Answer
from worker.telemetry import Carried, Telemetry


def test_every_answer_adds_its_request_and_the_events_it_carried():
    telemetry = Telemetry()
    assert telemetry.carried == Carried(0, 0, 0)
    for carried in (10, 1, 7):
        telemetry.answered("v3-batch", carried, Answer(204))
    telemetry.answered("v3-batch", 3, Answer(None, "connection refused"))  # a failed one too
    assert telemetry.carried == Carried(requests=4, events=21, largest=10)
