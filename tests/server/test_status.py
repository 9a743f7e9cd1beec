"""The status page in a real headless browser (Debian's chromium + chromedriver): it shows
each model and worker and updates without a reload, and charts the server's history."""

from __future__ import annotations

import http.client
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _serving import ServerProcess

from _accounts import store_do
from _deps import need_module, need_program
from _waiting import wait_for
from modelpool import demo


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


def _infer(server: ServerProcess, seconds: float, model: str = "sleepy") -> int:
    body = {"inputs": [{"name": "SECONDS", "datatype": "FP64", "shape": [1], "data": [seconds]}]}
    conn = http.client.HTTPConnection(server.host_port, timeout=30)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=json.dumps(body))
        return conn.getresponse().status
    finally:
        conn.close()


def test_status_page_shows_workers_and_updates_live(browser: Any, tmp_path: Path) -> None:
    config = {
        "models": {
            "sleepy": {"model": "_server_models:Sleepy", "workers": 2},
            "iris": {"model": demo.MODEL},
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

        wait_for(
            lambda: attributes("section.model", "data-model"), 15, "the page to list the models"
        )
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
        wait_for(lambda: served() >= before + 5, 15, "five more requests on the page")

        # a long request shows as a busy worker with its age
        caller = threading.Thread(target=_infer, args=(server, 2.0))
        caller.start()
        busy = wait_for(lambda: texts(f"{sleepy} td.state.busy"), 15, "a busy worker on the page")
        assert busy[0] == "busy"
        ages = wait_for(
            lambda: [t for t in texts(f"{sleepy} tr.worker td:nth-child(7)") if t],
            15,
            "a busy worker's age on the page",
        )
        assert ages[0].endswith(" s")  # the current request's age
        caller.join(10)
        (p50,) = texts(f"{sleepy} .p50")
        assert p50.endswith(" ms")


#: each worker row of each model section: its version cell (None without one) and pid
_ROWS = """
const out = {};
for (const section of document.querySelectorAll("section.model")) {
  out[section.dataset.model] = Array.from(section.querySelectorAll("tr.worker"), r => [
    r.querySelector("td.version") ? r.querySelector("td.version").textContent : null,
    r.querySelector("td.pid").textContent]);
  out[section.dataset.model + " figures"] = Array.from(
    section.querySelectorAll(".figures"), e => e.textContent);
}
return out;
"""


def test_status_page_shows_every_version_of_a_model(browser: Any, tmp_path: Path) -> None:
    """A model with two versions: one section, a line for each version and a version column
    in its worker table; a model with one version has neither."""
    versions = {"1": {"options": {"tag": 1.0}}, "2": {"options": {"tag": 2.0}, "workers": 2}}
    config = {
        "models": {
            "tagged": {"model": "_server_models:Tagged", "versions": versions},
            "sleepy": {"model": "_server_models:Sleepy"},
        }
    }
    with ServerProcess(config=config, tmp=tmp_path) as server:
        browser.get(server.url + "/")
        seen: dict[str, Any] = {}

        def rendered() -> bool:
            seen.clear()
            seen.update(browser.execute_script(_ROWS))
            return len(seen.get("tagged", [])) == 3

        wait_for(rendered, 15, "the page to list the workers of both versions")
        assert sorted(v for v, _ in seen["tagged"]) == ["1", "2", "2"]
        status = json.loads(_get(server, "/status.json"))
        (tagged,) = (m for m in status["models"] if m["name"] == "tagged")
        assert tagged["version"] == "2"  # the default: the highest
        by_version = {"2": {w["pid"] for w in tagged["workers"]}}
        by_version |= {
            o["version"]: {w["pid"] for w in o["workers"]} for o in tagged["other_versions"]
        }
        for version, pid in seen["tagged"]:
            assert int(pid) in by_version[version]
        default_line, other_line = seen["tagged figures"]
        assert default_line.startswith("default version 2: queue depth")
        assert other_line.startswith("version 1 (_server_models:Tagged): ready")
        assert [v for v, _ in seen["sleepy"]] == [None]
        (sleepy_line,) = seen["sleepy figures"]
        assert sleepy_line.startswith("queue depth")


def _get(server: ServerProcess, path: str) -> bytes:
    conn = http.client.HTTPConnection(server.host_port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        return response.read()
    finally:
        conn.close()


#: per model section, read in one script (the charts are redrawn every second): the number of
#: points of each line, the distinct heights each line takes, the stacked worker-state areas and
#: the restart markers
_CHART_INFO = """
const out = {};
for (const section of document.querySelectorAll("section.model")) {
  const info = {charts: section.querySelectorAll("svg.chart").length, points: {}, heights: {},
                areas: [], restarts: 0};
  for (const p of section.querySelectorAll("svg.chart path.series")) {
    const coords = Array.from(p.getAttribute("d").matchAll(/[ML][-0-9.]+,([-0-9.]+)/g));
    info.points[p.dataset.series] = coords.length;
    info.heights[p.dataset.series] = new Set(coords.map(c => c[1])).size;
  }
  for (const a of section.querySelectorAll('svg.chart[data-chart="workers"] path.area')) {
    info.areas.push(a.dataset.series);
  }
  info.restarts = section.querySelectorAll('svg.chart[data-chart="workers"] line.restart').length;
  out[section.dataset.model] = info;
}
return out;
"""


def _charted(info: dict[str, Any]) -> bool:
    sleepy, crashy = info.get("sleepy"), info.get("crashy")
    if not sleepy or not crashy:
        return False
    points, heights = sleepy["points"], sleepy["heights"]
    return (
        sleepy["charts"] == 4
        and all(points.get(s, 0) >= 5 for s in ("requests", "queued", "in_flight"))
        and all(points.get(q, 0) >= 3 for q in ("p50", "p90", "p99"))
        and heights["requests"] >= 2  # a line that moves, not a flat zero
        and "busy" in sleepy["areas"]
        and "idle" in sleepy["areas"]
        and crashy["restarts"] >= 1
    )


def test_status_page_charts_traffic_latency_queue_workers_and_restarts(
    browser: Any, tmp_path: Path
) -> None:
    ui = need_module("selenium.webdriver.support.ui")
    cv2 = need_module("cv2")
    config = {
        "models": {
            "sleepy": {"model": "_server_models:Sleepy", "workers": 2},
            "crashy": {"model": "_server_models:Abort"},
        }
    }
    with ServerProcess(config=config, tmp=tmp_path) as server:
        stop = threading.Event()

        def traffic(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                _infer(server, rng.choice([0.001, 0.005, 0.02, 0.06]))
                stop.wait(0.02)  # pacing, so three callers sometimes queue behind two workers

        callers = [threading.Thread(target=traffic, args=(i,), daemon=True) for i in range(3)]
        for caller in callers:
            caller.start()
        try:
            # the worker aborts: the request fails and the worker is restarted (a marker)
            assert _infer(server, 0, model="crashy") == 503
            browser.set_window_size(1400, 1200)
            browser.get(server.url + "/")
            info: dict[str, Any] = {}

            def charted(driver: Any) -> bool:
                info.update(driver.execute_script(_CHART_INFO))
                return _charted(info)

            try:
                ui.WebDriverWait(browser, 90, poll_frequency=0.2).until(charted)
            except Exception as exc:
                raise AssertionError(f"the charts did not fill in: {info}") from exc
        finally:
            stop.set()
            for caller in callers:
                caller.join(30)

        # the history the page draws: latency percentiles in order, rates that add up
        history = json.loads(_get(server, "/status/history.json"))
        assert history["window_s"] == 600
        sleepy = next(m for m in history["models"] if m["name"] == "sleepy")
        assert sum(sleepy["requests_per_s"]) > 0
        latency = sleepy["latency_ms"]
        for p50, p90, p99 in zip(latency["p50"], latency["p90"], latency["p99"], strict=True):
            assert (p50 is None) == (p99 is None)
            assert p50 is None or p50 <= p90 <= p99
        crashy = next(m for m in history["models"] if m["name"] == "crashy")
        assert crashy["restarts"]
        assert sum(r["count"] for r in crashy["restarts"]) >= 1
        assert crashy["restarts"][0]["reasons"]  # the tooltip says why

        # a screenshot: it decodes, and the sleepy charts' region is drawn (many colours)
        browser.execute_script(
            "document.querySelector('section[data-model=\"sleepy\"]').scrollIntoView()"
        )
        box = browser.execute_script(
            "const r = document.querySelector('section[data-model=\"sleepy\"] .charts')"
            ".getBoundingClientRect();"
            "return [r.left, r.top, r.right, r.bottom, window.devicePixelRatio];"
        )
        shot = tmp_path / "status-charts.png"
        assert browser.save_screenshot(str(shot))
        image = cv2.imread(str(shot), cv2.IMREAD_COLOR)
        assert image is not None, "the screenshot is not a PNG that decodes"
        left, top, right, bottom = (v * box[4] for v in box[:4])
        height, width = image.shape[:2]
        region = image[
            max(0, int(top)) : min(height, int(bottom)), max(0, int(left)) : min(width, int(right))
        ]
        assert region.size > 0, f"the charts are off screen: {box} in {width}x{height}"
        colours = {tuple(int(c) for c in px) for px in region.reshape(-1, 3)[::3]}
        assert len(colours) >= 50, f"the charts look blank: {len(colours)} colours, {shot}"


def test_the_status_page_asks_to_log_in_and_shows_the_account_and_its_keys(
    browser: Any, tmp_path: Path
) -> None:
    """With authentication on: the page sends a browser to the login form; a wrong password
    shows the form again with the reason; the right one comes back to the page, which shows
    who is signed in and their API keys' usage; logging out ends it."""
    by = need_module("selenium.webdriver.common.by").By
    ui = need_module("selenium.webdriver.support.ui")
    url = f"sqlite:///{tmp_path / 'm.db'}"

    async def accounts(store: Any) -> str:
        await store.add_user("ann", "a long password")
        return str((await store.create_key("ann"))[0])

    key = store_do(url, accounts)
    config = {"database": url, "auth": {}, "models": {"iris": {"model": demo.MODEL}}}
    with ServerProcess(config=config, tmp=tmp_path) as server:
        conn = http.client.HTTPConnection(server.host_port, timeout=30)
        for _ in range(3):  # some usage to show
            conn.request("GET", "/v2/models/iris", headers={"Authorization": f"Bearer {key}"})
            assert conn.getresponse().read()
        conn.close()

        def log_in(password: str) -> None:
            browser.find_element(by.ID, "username").send_keys("ann")
            browser.find_element(by.ID, "password").send_keys(password)
            browser.find_element(by.CSS_SELECTOR, "button[type=submit]").click()

        wait = ui.WebDriverWait(browser, 30, poll_frequency=0.1)
        browser.get(server.url + "/")
        assert "/auth/login" in browser.current_url
        log_in("not the password")  # the form again, with the reason (a new page: waited for)
        problem = wait.until(lambda d: d.find_elements(by.CSS_SELECTOR, ".problem"))
        assert problem[0].text == "wrong user name or password"
        log_in("a long password")
        wait.until(lambda d: d.title == "modelpool status")
        assert browser.current_url.rstrip("/") == server.url

        def account(driver: Any) -> Any:
            return driver.execute_script(
                "const u = document.querySelector('#account .user');"
                "const k = document.querySelector('#keys tr.key');"
                "return u && k ? [u.textContent, k.querySelector('.prefix').textContent,"
                " k.querySelector('.requests').textContent] : null;"
            )

        wait.until(account)
        user, prefix, requests = account(browser)
        assert (user, prefix) == ("ann", key[:11])
        assert int(requests) >= 3
        browser.find_element(by.ID, "logout").click()
        wait.until(lambda d: "/auth/login" in d.current_url)
        browser.get(server.url + "/")
        assert "/auth/login" in browser.current_url  # the session is over
