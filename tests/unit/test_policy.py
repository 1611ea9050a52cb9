"""The status-code table, the retry schedule and its budget (INTERFACE sections 4 and 6).

worker/policy.py is pure: an answer and the row's history go in, what to write
comes out. No database, no HTTP.
"""

from __future__ import annotations

import datetime as dt
import itertools
import statistics

import pytest

from worker.policy import (
    MAX_PAUSE,
    MIN_PAUSE,
    Action,
    Answer,
    RetryBudget,
    classify,
    decide,
    pause_for,
)

YOUNG = dt.timedelta(seconds=1)
SAMPLES = 200


# -- the classification table ------------------------------------------------------


@pytest.mark.parametrize("code", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(code: int) -> None:
    assert classify(code) is Action.DELIVERED


@pytest.mark.parametrize("code", [400, 405, 409, 410, 413, 415, 422, 451, 499])
def test_permanent_4xx_is_dead(code: int) -> None:
    assert classify(code) is Action.DEAD


@pytest.mark.parametrize("code", [408, 500, 502, 503, 504, 599])
def test_408_and_5xx_are_retried(code: int) -> None:
    assert classify(code) is Action.RETRY


def test_no_answer_at_all_is_retried() -> None:
    assert classify(None) is Action.RETRY


@pytest.mark.parametrize("code", [401, 403, 404])
def test_bad_key_or_wrong_url_halts(code: int) -> None:
    assert classify(code) is Action.HALT


@pytest.mark.parametrize("code", [300, 301, 302, 303, 307, 308])
def test_3xx_halts_because_redirects_are_not_followed(code: int) -> None:
    assert classify(code) is Action.HALT


def test_429_throttles() -> None:
    assert classify(429) is Action.THROTTLE


# -- what each action writes -------------------------------------------------------

# action: (the row's status, an attempt spent, released, an outbox_attempts row)
WRITES = {
    Action.DELIVERED: ("delivered", True, False, False),
    Action.RETRY: ("pending", True, False, True),
    Action.DEAD: ("dead", True, False, True),
    Action.REJECTED: ("dead", False, False, False),
    Action.HALT: ("pending", False, True, False),
    Action.THROTTLE: ("pending", False, True, False),
    Action.UNSENT: ("pending", False, True, False),
}


@pytest.mark.parametrize("action", list(Action), ids=lambda a: a.value)
def test_each_action_says_what_it_writes(action: Action) -> None:
    said = (action.status, action.charged, action.released, action.writes_attempt)
    assert said == WRITES[action]


def test_a_share_of_a_batch_answer_is_decided_by_its_own_action() -> None:
    share = Answer(400, None, action=Action.DELIVERED)  # a 400 naming another event
    assert decide(share, 0, YOUNG, RetryBudget()).action is Action.DELIVERED


# -- decide -----------------------------------------------------------------------


def test_delivery_is_marked_delivered() -> None:
    outcome = decide(Answer(204), 0, YOUNG, RetryBudget())
    assert outcome.action is Action.DELIVERED


def test_delivery_charges_one_attempt() -> None:
    outcome = decide(Answer(204), 0, YOUNG, RetryBudget())
    assert outcome.action.charged


def test_delivery_keeps_no_error() -> None:
    outcome = decide(Answer(204, "ignored"), 0, YOUNG, RetryBudget())
    assert outcome.error is None


def test_400_is_dead_at_once_on_the_first_attempt() -> None:
    outcome = decide(Answer(400, "HTTP 400 invalid_parameter: bad"), 0, YOUNG, RetryBudget())
    assert outcome.action is Action.DEAD


def test_dead_charges_once() -> None:
    outcome = decide(Answer(422, "HTTP 422 nope"), 0, YOUNG, RetryBudget())
    assert outcome.action.charged


def test_dead_keeps_the_endpoints_words_and_code() -> None:
    outcome = decide(Answer(400, "HTTP 400 invalid_parameter: bad"), 0, YOUNG, RetryBudget())
    assert (outcome.status_code, outcome.error) == (400, "HTTP 400 invalid_parameter: bad")


@pytest.mark.parametrize("code", [401, 403, 404, 302])
def test_halt_releases_the_row(code: int) -> None:
    outcome = decide(Answer(code, "no"), 5, YOUNG, RetryBudget())
    assert outcome.action is Action.HALT and outcome.action.released


@pytest.mark.parametrize("code", [401, 403, 404, 302])
def test_halt_charges_nothing(code: int) -> None:
    outcome = decide(Answer(code, "no"), 5, YOUNG, RetryBudget())
    assert not outcome.action.charged


def test_throttle_releases_the_row_uncharged() -> None:
    outcome = decide(Answer(429, "HTTP 429"), 5, YOUNG, RetryBudget())
    assert (outcome.action, outcome.action.released, outcome.action.charged) == (
        Action.THROTTLE,
        True,
        False,
    )


def test_a_throttled_row_is_due_when_the_pause_in_effect_ends() -> None:
    outcome = decide(Answer(429, "HTTP 429"), 0, YOUNG, RetryBudget(), paused_for=42.5)
    assert outcome.retry_in == 42.5


def test_a_halted_row_is_due_at_once_for_the_probe() -> None:
    outcome = decide(Answer(401, "no"), 0, YOUNG, RetryBudget(), paused_for=42.5)
    assert outcome.retry_in == 0.0


def test_halt_is_released_even_on_the_last_attempt_of_the_budget() -> None:
    budget = RetryBudget(max_attempts=3)
    outcome = decide(Answer(401, "no"), 2, YOUNG, budget)
    assert outcome.action is Action.HALT


def test_throttle_is_released_even_past_the_maximum_age() -> None:
    budget = RetryBudget(max_age=dt.timedelta(hours=1))
    outcome = decide(Answer(429, "slow"), 0, dt.timedelta(hours=2), budget)
    assert outcome.action is Action.THROTTLE


@pytest.mark.parametrize("code", [None, 408, 500, 503])
def test_retryable_failure_is_retried_and_charged(code: int | None) -> None:
    outcome = decide(Answer(code, "boom"), 0, YOUNG, RetryBudget())
    assert (outcome.action, outcome.action.charged) == (Action.RETRY, True)


def test_retry_keeps_the_error() -> None:
    outcome = decide(Answer(None, "connect timeout"), 0, YOUNG, RetryBudget())
    assert outcome.error == "connect timeout"


def test_retry_is_scheduled_by_the_backoff_of_the_next_attempt() -> None:
    budget = RetryBudget(backoff_base=10, backoff_max=1000)
    outcome = decide(Answer(502, "HTTP 502"), 3, YOUNG, budget)
    assert 40 <= outcome.retry_in <= 80  # the 4th attempt: step 10 * 2**3, half jitter


def test_retries_continue_until_the_last_attempt_of_the_budget() -> None:
    budget = RetryBudget(max_attempts=3)
    actions = [decide(Answer(503, "HTTP 503"), n, YOUNG, budget).action for n in (0, 1)]
    assert actions == [Action.RETRY, Action.RETRY]


def test_the_last_attempt_of_the_budget_is_dead() -> None:
    budget = RetryBudget(max_attempts=3)
    outcome = decide(Answer(503, "HTTP 503"), 2, YOUNG, budget)
    assert (outcome.action, outcome.action.charged) == (Action.DEAD, True)


def test_giving_up_on_attempts_says_so() -> None:
    budget = RetryBudget(max_attempts=3)
    outcome = decide(Answer(None, "connect timeout"), 2, YOUNG, budget)
    assert outcome.error is not None
    assert "gave up after 3 attempts" in outcome.error


def test_giving_up_keeps_the_last_error() -> None:
    budget = RetryBudget(max_attempts=3)
    outcome = decide(Answer(None, "connect timeout"), 2, YOUNG, budget)
    assert outcome.error is not None and outcome.error.startswith("connect timeout")


def test_a_budget_of_one_attempt_never_retries() -> None:
    outcome = decide(Answer(500, "HTTP 500"), 0, YOUNG, RetryBudget(max_attempts=1))
    assert outcome.action is Action.DEAD


def test_event_older_than_max_age_is_dead() -> None:
    budget = RetryBudget(max_age=dt.timedelta(hours=1))
    outcome = decide(Answer(500, "HTTP 500"), 0, dt.timedelta(hours=2), budget)
    assert outcome.action is Action.DEAD


def test_event_whose_next_retry_would_pass_max_age_is_dead() -> None:
    budget = RetryBudget(max_age=dt.timedelta(hours=1), backoff_base=10)
    outcome = decide(Answer(500, "HTTP 500"), 0, dt.timedelta(minutes=59, seconds=59), budget)
    assert outcome.action is Action.DEAD


def test_giving_up_on_age_says_so() -> None:
    budget = RetryBudget(max_age=dt.timedelta(hours=1))
    outcome = decide(Answer(500, "HTTP 500"), 0, dt.timedelta(hours=2), budget)
    assert outcome.error is not None and "older than 1h" in outcome.error


def test_event_well_inside_max_age_is_retried() -> None:
    budget = RetryBudget(max_age=dt.timedelta(hours=1), backoff_base=10)
    outcome = decide(Answer(500, "HTTP 500"), 0, dt.timedelta(minutes=30), budget)
    assert outcome.action is Action.RETRY


def test_duration_is_carried_into_the_outcome() -> None:
    outcome = decide(Answer(500, "HTTP 500", duration_ms=123), 0, YOUNG, RetryBudget())
    assert outcome.duration_ms == 123


# -- backoff ---------------------------------------------------------------------


def _samples(budget: RetryBudget, attempt: int) -> list[float]:
    return [budget.backoff(attempt) for _ in range(SAMPLES)]


def test_backoff_grows_exponentially() -> None:
    budget = RetryBudget(backoff_base=2, backoff_max=100_000)
    medians = [statistics.median(_samples(budget, n)) for n in range(1, 10)]
    ratios = [later / earlier for earlier, later in itertools.pairwise(medians)]
    assert all(1.6 < r < 2.5 for r in ratios), ratios


def test_backoff_two_attempts_later_is_always_longer() -> None:
    budget = RetryBudget(backoff_base=2, backoff_max=100_000)
    for n in range(1, 9):
        assert min(_samples(budget, n + 2)) > max(_samples(budget, n))


def test_backoff_is_jittered() -> None:
    waits = _samples(RetryBudget(backoff_base=2, backoff_max=10_000), 5)
    assert len({round(w, 6) for w in waits}) > SAMPLES // 2
    assert statistics.pstdev(waits) > 0.5


def test_backoff_is_at_least_half_the_exponential_step() -> None:
    budget = RetryBudget(backoff_base=2, backoff_max=100_000)
    for attempt in range(1, 12):
        step = 2 * 2 ** (attempt - 1)
        assert min(_samples(budget, attempt)) >= step / 2


def test_backoff_is_at_most_the_exponential_step() -> None:
    budget = RetryBudget(backoff_base=2, backoff_max=100_000)
    for attempt in range(1, 12):
        step = 2 * 2 ** (attempt - 1)
        assert max(_samples(budget, attempt)) <= step


def test_first_backoff_is_about_the_base() -> None:
    waits = _samples(RetryBudget(backoff_base=4, backoff_max=100), 1)
    assert min(waits) >= 2
    assert max(waits) <= 4


def test_backoff_never_exceeds_backoff_max() -> None:
    budget = RetryBudget(backoff_base=2, backoff_max=60)
    assert max(budget.backoff(n) for n in range(1, 60) for _ in range(20)) <= 60


def test_backoff_after_very_many_attempts_stays_within_max() -> None:
    budget = RetryBudget(backoff_base=2, backoff_max=60)
    assert all(0 < budget.backoff(10_000) <= 60 for _ in range(20))


def test_capped_backoff_is_still_at_least_half_the_max() -> None:
    budget = RetryBudget(backoff_base=2, backoff_max=60)
    assert min(_samples(budget, 30)) >= 30


def test_capped_backoff_is_still_jittered() -> None:
    waits = _samples(RetryBudget(backoff_base=2, backoff_max=60), 30)
    assert len({round(w, 6) for w in waits}) > SAMPLES // 2


# -- the pause after a 429 or a used-up rate limit -------------------------------------

BUDGET = RetryBudget(backoff_base=1, backoff_max=5)


def test_a_429_pauses_for_its_retry_after() -> None:
    assert pause_for(Answer(429, retry_after=30), BUDGET, 1) == 30


@pytest.mark.parametrize("asked", [0, -5, float("nan")], ids=["zero", "negative", "nan"])
def test_a_429_asking_for_no_wait_pauses_for_the_floor(asked: float) -> None:
    # A Retry-After of 0 or in the past: one request a second, not a hot loop.
    assert pause_for(Answer(429, retry_after=asked), BUDGET, 3) == MIN_PAUSE


@pytest.mark.parametrize("asked", [10 * 86400, float("inf")], ids=["ten-days", "inf"])
def test_a_huge_retry_after_is_capped(asked: float) -> None:
    assert pause_for(Answer(429, retry_after=asked), BUDGET, 1) == MAX_PAUSE


def test_the_pause_bounds_are_a_second_and_an_hour() -> None:
    assert (MIN_PAUSE, MAX_PAUSE) == (1.0, 3600.0)


def test_a_429_without_a_hint_pauses_for_the_backoff() -> None:
    budget = RetryBudget(backoff_base=1, backoff_max=1000)
    assert all(8 <= pause_for(Answer(429), budget, 5) <= 16 for _ in range(50))


def test_a_429_without_a_hint_pauses_longer_as_the_streak_grows() -> None:
    budget = RetryBudget(backoff_base=1, backoff_max=1000)
    first = max(pause_for(Answer(429), budget, 1) or 0 for _ in range(50))
    fourth = min(pause_for(Answer(429), budget, 4) or 0 for _ in range(50))
    assert fourth > first


@pytest.mark.parametrize("code", [204, 400, 500])
def test_any_answer_saying_the_limit_is_used_up_pauses_until_its_reset(code: int) -> None:
    answer = Answer(code, retry_after=12, rate_limit_exhausted=True)
    assert pause_for(answer, BUDGET, 1) == 12


def test_a_reset_of_31_years_on_a_2xx_is_capped() -> None:
    answer = Answer(204, retry_after=999_999_999, rate_limit_exhausted=True)
    assert pause_for(answer, BUDGET, 1) == MAX_PAUSE


def test_a_used_up_limit_without_a_reset_pauses_for_the_floor() -> None:
    assert pause_for(Answer(204, rate_limit_exhausted=True), BUDGET, 1) == MIN_PAUSE


def test_an_answer_with_limit_left_asks_for_no_pause() -> None:
    assert pause_for(Answer(204), BUDGET, 1) is None
    assert pause_for(Answer(400, retry_after=5), BUDGET, 1) is None
