"""The viewer in a real headless browser (Debian's chromium + chromedriver, driven by selenium).

The store is filled by really driving the example proxy (tests/branched.py); the query app
is mounted on that proxy at /admin. The browser signs in through the form, opens the list,
follows the session and checks what a person sees. Selenium blocks, so it runs in a thread
while the event loop keeps serving.

Without chromium these tests skip, unless `AIOHTTP_SESSION_STORE_REQUIRE_BROWSER` is set
(CI sets it in .ci/run): then they fail.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from branched import SYSTEM, TOKEN, TOOL_RESULT, record_branched, running_proxy
from conftest import require_browser

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@pytest.fixture
def browser() -> Iterator[Any]:
    binary, driver_path = require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="viewer-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _browse(driver: Any, root: str, session_id: str) -> dict[str, Any]:
    """What a person does and sees, in one blocking run (called in a thread)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 15)
    seen: dict[str, Any] = {}
    driver.get(f"{root}/admin/viewer/")
    seen["login_url"] = driver.current_url  # not signed in: sent to the form
    field = driver.find_element(By.NAME, "token")
    field.send_keys("wrong-token-0123456789abcdef")
    field.submit()
    seen["wrong"] = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "p.error"))).text
    field = driver.find_element(By.NAME, "token")
    field.send_keys(TOKEN)
    field.submit()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table.sessions")))
    seen["list_url"] = driver.current_url
    seen["cookies"] = driver.get_cookies()
    seen["list_text"] = driver.find_element(By.TAG_NAME, "main").text
    # The search box sends ?q= to the JSON API and shows what comes back.
    box = driver.find_element(By.CSS_SELECTOR, "#search input[name=q]")
    box.send_keys("weather Paris")
    driver.find_element(By.CSS_SELECTOR, "#search button").click()
    wait.until(
        lambda d: d.find_element(By.ID, "search-results").text.strip() not in ("", "Searching…")
    )
    seen["search"] = driver.find_element(By.ID, "search-results").text
    seen["search_url"] = driver.current_url
    driver.find_element(By.CSS_SELECTOR, f"a.session-link[title='{session_id}']").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "section.thread")))
    seen["session_url"] = driver.current_url
    seen["system"] = driver.find_element(By.CSS_SELECTOR, ".msg.role-system").text
    seen["tool_calls"] = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".tool-call")]
    seen["tool_results"] = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".role-tool")]
    seen["disconnects"] = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".disconnect")]
    cut = driver.find_elements(By.CSS_SELECTOR, ".turn.client-disconnected")
    seen["disconnected_turns"] = [e.get_attribute("id") for e in cut]
    seen["branch_notes"] = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".branch-note")]
    seen["tree"] = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "ul.tree li")]
    seen["active"] = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "ul.tree li.active")]
    seen["facts"] = driver.find_element(By.CSS_SELECTOR, "#call-1 h3").text
    # A branch line links to its turn in the thread.
    driver.find_element(By.CSS_SELECTOR, "ul.tree li.active:last-child a").click()
    seen["fragment"] = driver.current_url.rsplit("#", 1)[-1]
    return seen


async def test_a_person_signs_in_follows_a_session_and_sees_the_conversation(
    browser: Any, tmp_path: Any
) -> None:
    async with running_proxy(str(tmp_path / "sessions.db")) as proxy:
        recorded = await record_branched(proxy)
        seen = await asyncio.to_thread(_browse, browser, proxy.root, recorded.session_id)

    assert seen["login_url"].endswith("/admin/viewer/login")
    assert seen["wrong"] == "That token is not right."
    assert seen["list_url"].endswith("/admin/viewer/")
    assert TOKEN not in seen["list_url"]
    assert TOKEN not in seen["session_url"]
    (cookie,) = seen["cookies"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert TOKEN not in cookie["value"]
    assert recorded.session_id[:12] in seen["list_text"]
    assert "1 client disconnected, 6 completed" in seen["list_text"]

    # The box asked the API with ?q= (search itself is another change's: until it lands the
    # API refuses the parameter, and the page says so).
    assert seen["search_url"] == seen["list_url"]  # no navigation: the script fetched
    assert "'q'" in seen["search"] or "matching call" in seen["search"]

    assert seen["session_url"].endswith(f"/admin/viewer/sessions/{recorded.session_id}")
    assert SYSTEM in seen["system"]  # shown as text: the <b> in it is not markup
    assert seen["system"].startswith("System prompt")
    assert len(seen["tool_calls"]) == 1
    assert "Tool call lookup" in seen["tool_calls"][0]
    assert '"query": "weather in Paris"' in seen["tool_calls"][0]
    assert recorded.tool_call_id in seen["tool_results"][0]
    assert TOOL_RESULT in seen["tool_results"][0]
    assert seen["disconnected_turns"] == ["call-7"]
    assert "client disconnected" in seen["disconnects"][0]
    regenerate = "↳ regenerate: the history of turn #2 again, without its reply"
    assert regenerate in seen["branch_notes"]
    edit = "↳ edit: a different next turn after turn #1, which was continued before"
    assert edit in seen["branch_notes"]
    assert len(seen["tree"]) == 6
    assert sum("Tell me a joke." in line for line in seen["tree"]) == 2  # the regenerate
    assert [re.findall(r"#\d+", line)[0] for line in seen["active"]] == ["#1", "#6"]
    assert "What is 2+2?" in seen["active"][-1]
    assert re.search(r"tokens \d+/\d+/\d+ · \d+ms \(first byte \d+ms\)", seen["facts"])
    assert seen["fragment"] == "call-6"
