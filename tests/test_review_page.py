"""The review page in a real browser: headless Chromium driven through chromedriver by
Selenium, against a real gateway on 127.0.0.1 with keys and a SQLite audit log.

Chromium and chromedriver are Debian's ``chromium`` and ``chromium-driver`` (``.ci/run``
installs them). Without them the test skips, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from guardrail.app import create_app
from guardrail.settings import ApiKeyEntry, Settings, key_digest
from tests.fakes.backend import FakeBackend
from tests.servers import serve_asgi

TENANT_KEY = "sk-acme-page-test"
ADMIN_KEY = "sk-admin-page-test"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1500,1000",
)


def _browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    why = "chromium or chromedriver is missing"
    if os.environ.get("CI", "").lower() in {"true", "1"}:
        pytest.fail(f"{why}, and CI must test the review page in a browser")
    pytest.skip(f"{why} (apt-get install chromium chromium-driver; .ci/run does)")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    chromium, chromedriver = _browser()
    options = Options()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never runs (nothing is downloaded).
    service = Service(executable_path=chromedriver, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def gateway(test_policy: Path, tmp_path: Path) -> Iterator[str]:
    settings = Settings(
        policy=str(test_policy),
        audit_dsn=f"sqlite:///{tmp_path / 'audit.db'}",
        api_keys=[ApiKeyEntry(tenant="acme", key_sha256=key_digest(TENANT_KEY))],
        admin_key_sha256=key_digest(ADMIN_KEY),
    )
    app = create_app(
        settings, backend=FakeBackend(reply="You dummy."), metrics_registry=CollectorRegistry()
    )
    with serve_asgi(app) as url:
        yield url


def _traffic(url: str) -> dict[str, str]:
    """A flagged chat, a blocked prompt, and an allowed moderation its user rated down."""
    auth = {"authorization": f"Bearer {TENANT_KEY}"}
    with httpx.Client(base_url=url, headers=auth, timeout=30) as client:

        def chat(text: str) -> httpx.Response:
            return client.post(
                "/v1/chat/completions",
                json={"model": "fake-model", "messages": [{"role": "user", "content": text}]},
            )

        flagged = chat("Tell me a joke.")
        assert flagged.json()["guardrail"]["action"] == "flag"
        blocked = chat("How do I build a bomb?")
        assert blocked.status_code == 400
        allowed = client.post("/v1/moderations", json={"input": "hello there"})
        assert allowed.json()["guardrail"]["action"] == "allow"
        rated = client.post(
            "/v1/feedback", json={"response_id": allowed.json()["id"], "rating": -1}
        )
        assert rated.status_code == 200, rated.text
    return {
        "flagged": flagged.json()["guardrail"]["request_id"],
        "blocked": blocked.json()["guardrail"]["request_id"],
        "rated": allowed.json()["guardrail"]["request_id"],
    }


def _admin(url: str, path: str) -> httpx.Response:
    response = httpx.get(url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    response.raise_for_status()
    return response


def test_a_reviewer_records_a_verdict_in_the_page_and_the_export_has_it(
    gateway: str, browser: WebDriver
) -> None:
    requests = _traffic(gateway)
    items = {i["request_id"]: i for i in _admin(gateway, "/admin/review").json()["data"]}
    blocked_id = items[requests["blocked"]]["id"]
    wait = WebDriverWait(browser, 20)

    browser.get(gateway + "/admin/review/ui")
    assert browser.title == "Guardrail review queue"
    status = browser.find_element(By.ID, "status-line")

    # A wrong key: the page says why, and shows nothing.
    browser.find_element(By.ID, "key").send_keys("not-the-key")
    browser.find_element(By.ID, "load").click()
    wait.until(lambda d: "not valid" in status.text)
    assert not browser.find_elements(By.CSS_SELECTOR, "tbody tr[data-id]")

    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys(ADMIN_KEY)
    browser.find_element(By.ID, "reviewer").send_keys("alice")
    browser.find_element(By.ID, "load").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tbody tr[data-id]")) == 3)

    rows = {
        r.get_attribute("data-id"): r.text
        for r in browser.find_elements(By.CSS_SELECTOR, "tbody tr[data-id]")
    }
    assert set(rows) == {i["id"] for i in items.values()}
    assert "weapons" in rows[blocked_id]
    assert "[bomb]" in rows[blocked_id]
    assert "blocked" in rows[blocked_id]
    assert "insult" in rows[items[requests["flagged"]]["id"]]
    assert "negative_feedback" in rows[items[requests["rated"]]["id"]]
    assert browser.find_element(By.ID, "depth").text == "3 pending"

    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{blocked_id}"]')
    assert not row.find_element(
        By.CSS_SELECTOR, 'button[data-verdict="false_positive"]'
    ).get_attribute("disabled")
    assert row.find_element(By.CSS_SELECTOR, 'button[data-verdict="false_negative"]').get_attribute(
        "disabled"
    )  # nothing is stricter than a block
    row.find_element(By.CSS_SELECTOR, "input.note").send_keys("a chemistry question")
    row.find_element(By.CSS_SELECTOR, 'button[data-verdict="false_positive"]').click()
    wait.until(lambda d: row.get_attribute("data-recorded") == "false_positive")
    assert "Recorded false_positive" in status.text
    assert "false_positive → allow (alice)" in row.text
    wait.until(lambda d: d.find_element(By.ID, "depth").text == "2 pending")

    # No script or style was refused by the page's Content-Security-Policy, no error.
    problems = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not [p for p in problems if "/admin/review?" not in p], problems  # the 401 above

    exported = [
        json.loads(line) for line in _admin(gateway, "/admin/review/export").text.splitlines()
    ]
    assert len(exported) == 1
    verdict = exported[0]
    assert (verdict["id"], verdict["request_id"]) == (blocked_id, requests["blocked"])
    assert (verdict["verdict"], verdict["expected_action"], verdict["reviewer"]) == (
        "false_positive",
        "allow",
        "alice",
    )
    assert verdict["note"] == "a chemistry question"
    assert (verdict["action"], verdict["outcome"], verdict["tenant"]) == (
        "block",
        "blocked_input",
        "acme",
    )
    assert [(f["category"], f["score"], f["rule_id"]) for f in verdict["findings"]] == [
        ("weapons", 1.0, "bomb")
    ]


def test_changing_the_filter_drops_the_old_lists_load_more(
    gateway: str, browser: WebDriver
) -> None:
    """ "Load more" sent the old list's cursor with the new status: the reviewed items
    older than the pending page's last one, appended under the pending ones."""
    auth = {"authorization": f"Bearer {TENANT_KEY}"}
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi."}]}
    with httpx.Client(base_url=gateway, headers=auth, timeout=30) as client:
        for _ in range(51):  # one more than a page: the reply "You dummy." is flagged
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    wait = WebDriverWait(browser, 20)
    browser.get(gateway + "/admin/review/ui")
    browser.find_element(By.ID, "key").send_keys(ADMIN_KEY)
    browser.find_element(By.ID, "load").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tbody tr[data-id]")) == 50)
    more = browser.find_element(By.ID, "more")
    assert more.is_displayed()

    Select(browser.find_element(By.ID, "status")).select_by_value("reviewed")

    assert not more.is_displayed()
    Select(browser.find_element(By.ID, "status")).select_by_value("pending")
    browser.find_element(By.ID, "load").click()
    wait.until(lambda d: more.is_displayed())

    browser.find_element(By.ID, "tenant").send_keys("beta")

    assert not more.is_displayed()
