"""The status-code table, the retry schedule and its budget: worker/policy.py, pure."""

from __future__ import annotations

import datetime as dt
import statistics

import pytest

from worker.policy import (
    MAX_THROTTLE_PAUSE,
    Action,
    Answer,
    RetryBudget,
    Verdict,
    classify,
    decide,
    throttle_pause,
)

YOUNG = dt.timedelta(seconds=1)


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (200, Verdict.DELIVERED), (201, Verdict.DELIVERED), (202, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (400, Verdict.DEAD), (405, Verdict.DEAD), (409, Verdict.DEAD), (413, Verdict.DEAD),
        (422, Verdict.DEAD),
        (408, Verdict.RETRY), (500, Verdict.RETRY), (502, Verdict.RETRY), (503, Verdict.RETRY),
        (504, Verdict.RETRY), (None, Verdict.RETRY),
        (401, Verdict.HALT), (403, Verdict.HALT), (404, Verdict.HALT), (301, Verdict.HALT),
        (302, Verdict.HALT), (307, Verdict.HALT),
        (429, Verdict.THROTTLE),
    ],
)  # fmt: skip
def test_classification_table(code, verdict):
    assert classify(code) is verdict


def test_a_delivery_charges_one_attempt():
    verdict, outcome = decide(Answer(204), 0, YOUNG, RetryBudget())
    assert (verdict, outcome.action, outcome.charged) == (Verdict.DELIVERED, Action.DELIVERED, True)


def test_a_400_is_dead_at_once_with_the_endpoints_words():
    _, outcome = decide(
        Answer(400, "HTTP 400 invalid_parameter: bad email"), 0, YOUNG, RetryBudget()
    )
    assert outcome.action is Action.DEAD and outcome.charged
    assert outcome.error == "HTTP 400 invalid_parameter: bad email"


@pytest.mark.parametrize("code", [401, 403, 404, 302, 429])
def test_halts_and_throttles_release_the_row_without_charging(code):
    _, outcome = decide(Answer(code, "no"), 5, YOUNG, RetryBudget())
    assert outcome.action is Action.RELEASE and not outcome.charged


def test_failures_retry_until_the_attempt_budget_then_die_saying_so():
    budget = RetryBudget(max_attempts=3)
    _, first = decide(Answer(503, "HTTP 503"), 0, YOUNG, budget)
    _, second = decide(Answer(503, "HTTP 503"), 1, YOUNG, budget)
    _, third = decide(Answer(None, "connect timeout"), 2, YOUNG, budget)
    assert [first.action, second.action, third.action] == [Action.RETRY, Action.RETRY, Action.DEAD]
    assert "gave up after 3 attempts" in third.error
    assert third.error.startswith("connect timeout")


def test_an_event_past_its_maximum_age_is_dead_instead_of_retried():
    budget = RetryBudget(max_age=dt.timedelta(hours=1))
    _, outcome = decide(Answer(500, "HTTP 500"), 0, dt.timedelta(minutes=59, seconds=59), budget)
    assert outcome.action is Action.DEAD
    assert "older than 1h" in outcome.error


def test_a_retry_is_scheduled_by_the_backoff():
    budget = RetryBudget(backoff_base=10, backoff_max=1000)
    _, outcome = decide(Answer(502, "HTTP 502"), 3, YOUNG, budget)
    assert outcome.action is Action.RETRY
    assert 40 <= outcome.retry_in <= 80  # the 4th attempt: 10 * 2**3, half of it jitter


def test_backoff_grows_exponentially_within_half_to_full_step():
    budget = RetryBudget(backoff_base=2, backoff_max=10_000)
    for attempt in range(1, 10):
        step = 2 * 2 ** (attempt - 1)
        waits = [budget.backoff(attempt) for _ in range(200)]
        assert min(waits) >= step / 2
        assert max(waits) <= step


def test_backoff_is_jittered():
    budget = RetryBudget(backoff_base=2, backoff_max=10_000)
    waits = [budget.backoff(5) for _ in range(200)]
    assert statistics.pstdev(waits) > 0.5
    assert len({round(w, 3) for w in waits}) > 100


def test_backoff_never_exceeds_its_cap():
    budget = RetryBudget(backoff_base=2, backoff_max=60)
    assert max(budget.backoff(attempt) for attempt in range(1, 40) for _ in range(20)) <= 60


def test_a_429_pause_honours_retry_after_up_to_an_hour():
    budget = RetryBudget(backoff_base=1, backoff_max=5)
    assert throttle_pause(Answer(429, retry_after=30), budget, 1) == 30
    assert throttle_pause(Answer(429, retry_after=10 * 3600), budget, 1) == MAX_THROTTLE_PAUSE


def test_a_429_without_a_hint_backs_off_more_with_each_in_a_row():
    budget = RetryBudget(backoff_base=1, backoff_max=1000)
    first = throttle_pause(Answer(429), budget, 1)
    fifth = throttle_pause(Answer(429), budget, 5)
    assert 0.5 <= first <= 1 and 8 <= fifth <= 16
