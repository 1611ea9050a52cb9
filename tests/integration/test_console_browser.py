"""The console in a real headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium), served by the real `outbox-worker console` process.

An operator opens the overview, filters the dead letters, requeues a
selection; the test reads the rows in the database, then a real daemon
delivers them and the endpoint receives them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import deliver
from tests.console_server import ConsoleProcess
from tests.daemons import wait_until
from tests.endpoint import Endpoint, Reply
from tests.integration.test_store import add, row
from worker import db

pytestmark = pytest.mark.slow  # a real Chromium and a console server: seconds per test

CHROMIUM = os.environ.get("OUTBOX_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("OUTBOX_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
REFUSAL = b'{"code":"invalid_parameter","message":"coupon expired"}'


def start_chromium() -> Any:
    """Headless Chromium from the system packages: Selenium downloads nothing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(
            f"the browser tests need {CHROMIUM} and {CHROMEDRIVER}:"
            " apt-get install chromium chromium-driver (.ci/test does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-proxy-server",  # the console is on loopback, whatever the environment says
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    # Selenium talks to chromedriver on loopback: no proxy from the environment either.
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.lower().endswith("_proxy")}
    driver = start_chromium()
    yield driver
    driver.quit()
    os.environ.update(saved)


@pytest.fixture
def console(db_url: str, tmp_path: Path) -> Iterator[ConsoleProcess]:
    process = ConsoleProcess(db_url, tmp_path / "console.log", "--refresh", "1")
    yield process
    assert process.stop() == 0, process.log()


def text(driver: Any, element_id: str) -> str:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    # The overview replaces its live part as it refreshes: an element found just
    # before a refresh is stale by the time its text is read. Find it again.
    for _ in range(10):
        try:
            return str(driver.find_element(By.ID, element_id).text)
        except StaleElementReferenceException:
            continue
    return str(driver.find_element(By.ID, element_id).text)


def follow(driver: Any, element: Any) -> None:
    """Click a link or a form's button, and return once the page it leads to has loaded.

    A click returns as soon as the browser has it, not when the next page is there:
    read at once, the old page (or none, in between) is what a test finds.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    wait = WebDriverWait(driver, 10)
    wait.until(expected_conditions.staleness_of(page))
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")


def dead_letters_through_a_real_daemon(engine: sa.Engine, endpoint: Endpoint) -> dict[str, int]:
    """Five events: three refused with 400, one with 422, one delivered. {marker: id}."""
    specs = [("coupon_redeemed", f"c{n}") for n in range(3)]
    specs += [("order_completed", "o1"), ("signed_up", "s1")]
    ids = {}
    for event, marker in specs:
        (ids[marker],) = add(engine, f"{marker}@example.com", event=event, eventdata={"id": marker})
    endpoint.script("coupon_redeemed", *[Reply(400, REFUSAL)] * 3)
    endpoint.script("order_completed", Reply(422, b'{"code":"unprocessable","message":"no"}'))
    assert deliver(engine, endpoint.url) == 0
    return ids


def test_an_operator_filters_dead_letters_requeues_two_and_a_daemon_delivers_them(
    db_url, endpoint, console, chromium, spawn
):
    from selenium.webdriver.common.by import By

    engine = db.create_engine(db_url)
    ids = dead_letters_through_a_real_daemon(engine, endpoint)
    driver = chromium

    driver.get(console.url)
    assert text(driver, "count-dead") == "4" and text(driver, "count-delivered") == "1"
    assert (
        driver.find_element(By.ID, "throughput")
        .get_attribute("aria-label")
        .startswith("1 delivered and 4 failed attempts")
    )

    follow(driver, driver.find_element(By.LINK_TEXT, "Dead letters"))
    assert text(driver, "matching").startswith("4 dead events")
    driver.find_element(By.NAME, "status_code").send_keys("400")
    follow(driver, driver.find_element(By.ID, "apply-filters"))
    assert text(driver, "matching").startswith("3 dead events")
    shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "table.events td:nth-child(2)")]
    assert shown == [str(ids[m]) for m in ("c2", "c1", "c0")]

    chosen = (ids["c0"], ids["c2"])
    for event_id in chosen:
        driver.find_element(By.CSS_SELECTOR, f"input[name=ids][value='{event_id}']").click()
    follow(driver, driver.find_element(By.ID, "requeue-selected"))
    assert text(driver, "question") == "Requeue 2 dead events?"
    assert {row(engine, i).status for i in ids.values()} == {"dead", "delivered"}  # not yet
    follow(driver, driver.find_element(By.ID, "confirm"))
    assert f"requeued 2 dead events: ids {chosen[0]}, {chosen[1]}" in text(driver, "notice")
    assert driver.find_element(By.NAME, "status_code").get_attribute("value") == "400"

    for event_id in chosen:
        requeued = row(engine, event_id)
        assert (requeued.status, requeued.attempts) == ("pending", 0)
    assert [row(engine, ids[m]).status for m in ("c1", "o1", "s1")] == ["dead", "dead", "delivered"]

    before = len(endpoint.requests)
    daemon = spawn(db_url, endpoint.url, "--exit-when-drained")
    assert daemon.wait(60) == 0, daemon.log()
    sent = [r.json["eventdata"]["id"] for r in endpoint.requests[before:]]
    assert sorted(sent) == ["c0", "c2"]
    assert {row(engine, i).status for i in chosen} == {"delivered"}


def test_the_overview_refreshes_itself(db_url, console, chromium):
    engine = db.create_engine(db_url)
    driver = chromium
    driver.get(console.url)
    assert text(driver, "count-pending") == "0"
    add(engine, "new@example.com")
    wait_until(lambda: text(driver, "count-pending") == "1", 30, "the overview to refresh")


def test_the_event_page_shows_the_body_and_the_attempts(db_url, endpoint, console, chromium):
    engine = db.create_engine(db_url)
    ids = dead_letters_through_a_real_daemon(engine, endpoint)
    driver = chromium
    driver.get(f"{console.url}events/{ids['c1']}")
    assert text(driver, "status") == "dead"
    assert '"eventdata":{"id":"c1"}' in text(driver, "body").replace(" ", "")
    assert "HTTP 400 invalid_parameter: coupon expired" in text(driver, "attempts")
