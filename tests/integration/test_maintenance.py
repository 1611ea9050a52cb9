"""Maintenance keeps its thread alive through any failure of one round."""

from __future__ import annotations

import threading

from worker.maintenance import Maintenance
from worker.store import DaemonReport, OutboxStore
from worker.telemetry import Telemetry


class _FailingOnceStore(OutboxStore):
    """A real store whose first heartbeat raises a non-database error."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.heartbeats = 0
        self.second_round = threading.Event()

    def heartbeat(self, *args, **kwargs) -> None:
        self.heartbeats += 1
        if self.heartbeats == 1:
            raise RuntimeError("not a database error")
        super().heartbeat(*args, **kwargs)
        self.second_round.set()


def test_maintenance_logs_and_survives_an_exception_that_is_not_a_database_error(engine, caplog):
    store = _FailingOnceStore(engine)
    maintenance = Maintenance(
        store,
        Telemetry(),
        lease=10,
        retain_delivered=None,
        on_rescue=lambda: None,
        report=DaemonReport,
        name="test:1",
        interval=0.05,
    )
    maintenance.start()
    maintenance.nudge()
    try:
        assert store.second_round.wait(timeout=30), "maintenance stopped after one failure"
    finally:
        maintenance.stop()
        maintenance.join()
    assert "not a database error" in caplog.text
