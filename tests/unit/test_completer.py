"""The completer: what it counts for each outcome it is handed (the metrics' labels)."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from worker.completer import RECORD_WITHIN, Completer
from worker.policy import Action, Outcome
from worker.store import ClaimedEvent, OutboxStore, Record
from worker.telemetry import Telemetry

NOW = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)

# action, its answer's code: the counter and labels it adds one to
COUNTED = [
    (Action.DELIVERED, 204, "outbox_events_delivered_total", {}),
    (Action.RETRY, 503, "outbox_events_retried_total", {"status_code": "503"}),
    (Action.DEAD, 400, "outbox_events_dead_total", {"status_code": "400"}),
    (Action.REJECTED, None, "outbox_events_dead_total", {"status_code": "none"}),
    (Action.HALT, 401, "outbox_events_released_total", {"reason": "halt"}),
    (Action.THROTTLE, 429, "outbox_events_released_total", {"reason": "throttle"}),
    (Action.UNSENT, None, "outbox_events_released_total", {"reason": "unsent"}),
]


@pytest.mark.parametrize(
    ("action", "code", "metric", "labels"), COUNTED, ids=[c[0].value for c in COUNTED]
)
def test_each_outcome_is_counted_under_its_metric(
    action: Action, code: int | None, metric: str, labels: dict[str, str]
) -> None:
    telemetry = Telemetry()
    # The store is not asked anything until a flush.
    completer = Completer(OutboxStore(sa.create_engine("sqlite://")), telemetry, lease=60.0)
    event = ClaimedEvent(1, "a@example.com", "e", None, None, 0, NOW, "host:1:1")
    completer.finish(event, Outcome(action, code))
    assert telemetry.registry.get_sample_value(metric, labels) == 1


def test_the_daemons_own_tally_counts_each_delivered_and_each_dead_event() -> None:
    completer = Completer(OutboxStore(sa.create_engine("sqlite://")), Telemetry(), lease=60.0)
    for n, action in enumerate([Action.DELIVERED, Action.DEAD, Action.REJECTED, Action.RETRY]):
        event = ClaimedEvent(n, "a@example.com", "e", None, None, 0, NOW, "host:1:1")
        completer.finish(event, Outcome(action, None))
    assert (completer.delivered, completer.dead) == (1, 2)


class _RenewalFailsOnce(OutboxStore):
    def __init__(self) -> None:
        super().__init__(sa.create_engine("sqlite://"))
        self.renewals: list[set[str]] = []

    def renew_leases(self, tokens, lease_seconds):  # type: ignore[no-untyped-def]
        self.renewals.append(set(tokens))
        if len(self.renewals) == 1:
            raise sa.exc.OperationalError("UPDATE", {}, Exception("server closed the connection"))


def test_a_renewal_that_failed_is_due_again_when_the_daemon_retries_it() -> None:
    now = [0.0]
    store = _RenewalFailsOnce()
    completer = Completer(store, Telemetry(), lease=60.0, clock=lambda: now[0])
    completer.hold([ClaimedEvent(1, "a@example.com", "e", None, None, 0, NOW, "host:1:1")])
    now[0] = 21.0  # past a third of the lease
    with pytest.raises(sa.exc.OperationalError):
        completer.renew_if_due()
    completer.renew_if_due()  # the daemon's retry of the same call
    assert store.renewals == [{"host:1:1"}, {"host:1:1"}]


class _Writes(OutboxStore):
    """Notes each write of outcomes instead of making it."""

    def __init__(self) -> None:
        super().__init__(sa.create_engine("sqlite://"))
        self.writes: list[list[Record]] = []

    def record(self, records):  # type: ignore[no-untyped-def]
        self.writes.append(list(records))


def _event(n: int) -> ClaimedEvent:
    return ClaimedEvent(n, f"c{n}@example.com", "e", None, None, 0, NOW, "host:1:1")


def test_outcomes_wait_to_be_written_together_until_the_first_has_waited_record_within() -> None:
    now = [0.0]
    store = _Writes()
    completer = Completer(store, Telemetry(), lease=60.0, clock=lambda: now[0])
    completer.hold([_event(n) for n in range(4)])
    for n in range(4):  # an answer every 5 ms
        now[0] = n * 0.005
        completer.finish(_event(n), Outcome(Action.DELIVERED, 204))
        completer.write_due()
    assert store.writes == []
    assert completer.write_in() == pytest.approx(RECORD_WITHIN - 0.015)  # due by the first

    now[0] = RECORD_WITHIN
    completer.write_due()
    (written,) = store.writes
    assert [r.event.id for r in written] == [0, 1, 2, 3]
    # Each is written with how long it waited: its row keeps the time its answer came.
    assert [r.waited for r in written] == pytest.approx(
        [RECORD_WITHIN - n * 0.005 for n in range(4)]
    )
    assert completer.held() == 0


def test_outcomes_answered_earlier_are_written_by_when_their_answer_came() -> None:
    now = [10.0]
    store = _Writes()
    completer = Completer(store, Telemetry(), lease=60.0, clock=lambda: now[0])
    completer.hold([_event(1)])
    # Collected late (the loop was busy): due by the answer's time, not the collection's.
    completer.finish(_event(1), Outcome(Action.DELIVERED, 204), at=10.0 - RECORD_WITHIN)
    completer.write_due()
    assert [r.waited for r in store.writes[0]] == pytest.approx([RECORD_WITHIN])


def test_a_full_buffer_of_outcomes_is_written_at_once() -> None:
    store = _Writes()
    completer = Completer(store, Telemetry(), lease=60.0, clock=lambda: 0.0, write_every=3)
    completer.hold([_event(n) for n in range(3)])
    for n in range(3):
        completer.finish(_event(n), Outcome(Action.DELIVERED, 204))
        completer.write_due()
    assert [len(w) for w in store.writes] == [3]


def test_flush_writes_every_outcome_now() -> None:
    store = _Writes()
    completer = Completer(store, Telemetry(), lease=60.0, clock=lambda: 0.0)
    completer.hold([_event(1)])
    completer.finish(_event(1), Outcome(Action.UNSENT))
    completer.flush()
    assert [len(w) for w in store.writes] == [1]
