from sqlalchemy.orm import Session

from tests.conftest import deliver, rows
from worker import track_event


def test_one_event_is_delivered(engine, endpoint):
    with Session(engine) as s, s.begin():
        track_event(s, email="a@example.com", event="signed_up")
    assert deliver(engine, endpoint.url) == 0
    assert [r.status for r in rows(engine)] == ["delivered"]
    assert endpoint.events() == [{"email": "a@example.com", "event": "signed_up"}]
