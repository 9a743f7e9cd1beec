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
    config = {
        "models": {
            "sleepy": {"model": "_server_models:Sleepy", "workers": 2},
            "iris": {"model": "modelpool.demo:IrisClassifier"},
        }
    }
    with ServerProcess(config=config, tmp=tmp_path) as server:
        browser.get(server.url + "/")
        assert browser.title == "modelpool status"

        def texts(selector: str) -> list[str]:
            """Read in one script: the page re-renders every second, so elements found in one
            call may be gone by the next."""
            script = (
                "return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent)"
            )
            return list(browser.execute_script(script, selector))

        def attributes(selector: str, name: str) -> list[str]:
            script = (
                "return Array.from(document.querySelectorAll(arguments[0]),"
                " e => e.getAttribute(arguments[1]))"
            )
            return list(browser.execute_script(script, selector, name))

        _until(lambda: attributes("section.model", "data-model"))
        assert sorted(attributes("section.model", "data-model")) == ["iris", "sleepy"]
        sleepy = 'section[data-model="sleepy"]'
        (title,) = texts(f"{sleepy} h2")
        assert "ready" in title
        pids = texts(f"{sleepy} tr.worker td.pid")
        assert len(pids) == 2
        assert all(p.isdigit() for p in pids)

        def served() -> int:
            return sum(int(t) for t in texts(f"{sleepy} td.served"))

        before = served()
        for _ in range(5):
            assert _infer(server, 0) == 200
        # the page updates itself (no reload): the served count goes up by at least 5
        _until(lambda: served() >= before + 5)

        # a long request shows as a busy worker with its age
        caller = threading.Thread(target=_infer, args=(server, 2.0))
        caller.start()
        busy = _until(lambda: texts(f"{sleepy} td.state.busy"))
        assert busy[0] == "busy"
        ages = _until(lambda: [t for t in texts(f"{sleepy} tr.worker td:nth-child(7)") if t])
        assert ages[0].endswith(" s")  # the current request's age
        caller.join(10)
        (p50,) = texts(f"{sleepy} .p50")
        assert p50.endswith(" ms")
