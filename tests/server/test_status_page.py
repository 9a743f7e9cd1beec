"""The status page in a real headless browser (Debian's chromium + chromedriver): it shows
each model and worker and updates without a reload."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _serving import ServerProcess

from _deps import need_module, need_program


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    webdriver = need_module("selenium.webdriver")
    chromium = need_program("chromium", "chromium")
    driver_path = need_program("chromedriver", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _until(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def _infer(server: ServerProcess, seconds: float) -> int:
    body = {"inputs": [{"name": "SECONDS", "datatype": "FP64", "shape": [1], "data": [seconds]}]}
    conn = http.client.HTTPConnection(server.host_port, timeout=30)
    try:
        conn.request("POST", "/v2/models/sleepy/infer", body=json.dumps(body))
        return conn.getresponse().status
    finally:
        conn.close()


def test_status_page_shows_workers_and_updates_live(browser: Any, tmp_path: Path) -> None:
    by = need_module("selenium.webdriver.common.by").By
    config = {
        "models": {
            "sleepy": {"model": "_server_models:Sleepy", "workers": 2},
            "iris": {"model": "modelpool.demo:IrisClassifier"},
        }
    }
    with ServerProcess(config=config, tmp=tmp_path) as server:
        browser.get(server.url + "/")
        assert browser.title == "modelpool status"
        sections = _until(lambda: browser.find_elements(by.CSS_SELECTOR, "section.model"))
        assert sorted(s.get_attribute("data-model") for s in sections) == ["iris", "sleepy"]
        sleepy = browser.find_element(by.CSS_SELECTOR, 'section[data-model="sleepy"]')
        assert "ready" in sleepy.find_element(by.TAG_NAME, "h2").text
        rows = sleepy.find_elements(by.CSS_SELECTOR, "tr.worker")
        assert len(rows) == 2
        pids = {r.find_element(by.CSS_SELECTOR, "td.pid").text for r in rows}
        assert all(p.isdigit() for p in pids)

        def served() -> int:
            cells = browser.find_elements(by.CSS_SELECTOR, 'section[data-model="sleepy"] td.served')
            return sum(int(c.text) for c in cells)

        before = served()
        for _ in range(5):
            assert _infer(server, 0) == 200
        # the page updates itself (no reload): the served count goes up by at least 5
        _until(lambda: served() >= before + 5)

        # a long request shows as a busy worker with its age

        caller = threading.Thread(target=_infer, args=(server, 2.0))
        caller.start()
        busy = _until(
            lambda: browser.find_elements(
                by.CSS_SELECTOR, 'section[data-model="sleepy"] td.state.busy'
            )
        )
        assert busy[0].text == "busy"
        caller.join(10)
        p50 = browser.find_element(by.CSS_SELECTOR, 'section[data-model="sleepy"] .p50').text
        assert p50.endswith(" ms")
