"""The dashboard in a real headless Chromium: live rounds, refusal reasons, and no request off loopback."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from server.dashboard.command import running_dashboard
from tests.browser import chromium, requested_urls
from tests.dashboard_runs import REFUSAL, close_round, finished_run, folder_state, start_run

pytestmark = pytest.mark.browser

BUDGET_REFUSAL = "PrivacyBudgetExceeded: this round would bring epsilon from 7.9 to 8.6, above max-epsilon 8"
FIGURES_DRAWN = "return document.querySelectorAll('#figures .figure .main-svg').length"


def wait_until(check: Callable[[], Any], *, seconds: float, what: str) -> float:
    """Poll ``check`` until it is truthy; return the seconds it took (fail after ``seconds``)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            pytest.fail(f"not within {seconds} s: {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def assert_only_loopback(driver: Any, base_url: str) -> None:
    urls = requested_urls(driver)
    assert urls, "the browser's request log is empty"
    assert all(u.startswith((base_url, "data:")) for u in urls), [
        u for u in urls if not u.startswith(base_url)]
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # also catches Content-Security-Policy violations


def test_live_page_shows_a_new_round_and_its_refusals_within_seconds(tmp_path):
    recorder = start_run(tmp_path / "runs" / "live", num_rounds=3)
    close_round(recorder, 1)
    with running_dashboard(runs=tmp_path / "runs", refresh_seconds=0.5) as url, chromium() as driver:
        driver.get(url + "runs/live")
        wait_until(lambda: driver.execute_script(FIGURES_DRAWN) >= 3, seconds=20, what="the plots are drawn")

        def rounds() -> str:
            return driver.find_element("id", "panel-rounds").text

        assert REFUSAL in rounds() and "round-2" not in driver.page_source
        close_round(recorder, 2, refusal=BUDGET_REFUSAL)
        took = wait_until(lambda: driver.find_elements("id", "round-2"), seconds=5, what="round 2 appears")
        assert BUDGET_REFUSAL in rounds() and BUDGET_REFUSAL in driver.find_element("id", "panel-sites").text
        assert "running" in driver.find_element("id", "panel-status").text
        assert_only_loopback(driver, url)
    assert took < 5


def test_finished_run_from_the_runs_list(tmp_path):
    runs = tmp_path / "runs"
    finished_run(runs / "done")
    before = folder_state(runs)
    with running_dashboard(runs=runs) as url, chromium() as driver:
        driver.get(url)
        wait_until(lambda: driver.find_elements("link text", "done"), seconds=10, what="the run is listed")
        assert "finished" in driver.find_element("id", "panel-runs").text
        driver.find_element("link text", "done").click()
        wait_until(lambda: driver.execute_script(FIGURES_DRAWN) >= 5, seconds=20, what="the plots are drawn")
        page = driver.find_element("tag name", "main").text
        assert "finished" in page and REFUSAL in page and "final model, after round 2" in page
        assert "pooled" in driver.find_element("id", "figure-global-dice").text  # the baseline line's label
        assert_only_loopback(driver, url)
    assert folder_state(runs) == before
