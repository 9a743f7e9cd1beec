"""Authentication on a real ``modelpool serve`` (issue 13): API keys, login sessions, what is
protected and what stays open, the refusal to serve an exposed address without it. Each test
that touches the database runs on SQLite and on a real PostgreSQL server (``database_url``)."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _serving import ServerProcess, infer_body, request

from _accounts import store_do
from _postgres import PostgresServer
from _waiting import wait_for
from modelpool import demo
from modelpool.auth._store import Store

IRIS = infer_body("INPUT0", "FP32", [2, 4], [5.1, 3.5, 1.4, 0.2, 6.9, 3.1, 5.8, 2.2])
PASSWORD = "correct horse battery"


@dataclass
class Authed:
    server: ServerProcess
    url: str
    keys: dict[str, str] = field(default_factory=dict)

    def call(
        self, method: str, path: str, body: bytes = b"", key: str | None = None, **headers: str
    ) -> tuple[int, dict[str, str], Any]:
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        status, answer_headers, data = request(self.server, method, path, body, **headers)
        try:
            parsed: Any = json.loads(data)
        except ValueError:
            parsed = data
        return status, answer_headers, parsed


def _config(url: str, **auth: Any) -> dict[str, Any]:
    return {
        "database": url,
        "auth": {"login_window": 60, **auth},
        "server": {"access_log": "on", "log_level": "debug"},
        "models": {
            "iris": {"model": demo.MODEL, "workers": 1},
            "other": {"model": demo.MODEL, "workers": 1},
        },
    }


def _populate(url: str) -> dict[str, str]:
    async def go(store: Store) -> dict[str, str]:
        await store.add_user("root", PASSWORD, admin=True)
        await store.add_user("ann", PASSWORD)
        keys = {
            "admin": (await store.create_key("root"))[0],
            "ann": (await store.create_key("ann"))[0],
            "iris-only": (await store.create_key("ann", models=["iris"]))[0],
            "metrics": (await store.create_key("ann", metrics=True))[0],
            "slow": (await store.create_key("ann", rate_limit=1))[0],
        }
        return keys

    return store_do(url, go)


@pytest.fixture
def authed(tmp_path: Path, database_url: str) -> Iterator[Authed]:
    keys = _populate(database_url)
    with ServerProcess(config=_config(database_url), tmp=tmp_path) as server:
        yield Authed(server, database_url, keys)


def _error(answer: Any) -> str:
    assert isinstance(answer, dict), answer
    assert set(answer) == {"error"}, answer
    return str(answer["error"])


def test_keys_guard_inference_and_every_protected_route(authed: Authed) -> None:
    keys = authed.keys
    for path in ("/v2/models/iris/infer", "/v2/models/iris/versions/1/infer"):  # fast path
        status, headers, answer = authed.call("POST", path, IRIS)
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Bearer realm="modelpool"'
        assert "Authorization: Bearer" in _error(answer)
        status, _, answer = authed.call("POST", path, IRIS, key=keys["ann"])
        assert status == 200, answer
        assert answer["outputs"][1]["data"] == [0, 2]
    wrong = keys["ann"][:-4] + "AAAA"
    status, headers, answer = authed.call("POST", "/v2/models/iris/infer", IRIS, key=wrong)
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="modelpool", error="invalid_token"'
    assert "not valid" in _error(answer)
    status, _, answer = authed.call("POST", "/v2/models/iris/infer", IRIS, Authorization="Basic x")
    assert status == 401
    assert "Bearer" in _error(answer)

    # a key limited to a model: that one only (and no hint whether others exist)
    for model in ("other", "no-such-model"):
        status, _, answer = authed.call(
            "POST", f"/v2/models/{model}/infer", IRIS, key=keys["iris-only"]
        )
        assert status == 403
        assert _error(answer) == f"this API key may not use model '{model}'"
    assert authed.call("GET", "/v2/models/iris", key=keys["iris-only"])[0] == 200

    protected = [
        ("GET", "/v2/models/iris"),
        ("GET", "/v2/models/iris/ready"),
        ("GET", "/v2/models/iris/config"),
        ("GET", "/v2/models/iris/versions/1"),
        ("GET", "/v2"),
        ("POST", "/v2/repository/index"),
        ("GET", "/status.json"),
        ("GET", "/status/history.json"),
    ]
    for method, path in protected:
        status, _, answer = authed.call(method, path)
        assert status == 401, (path, answer)
        _error(answer)
        status, _, answer = authed.call(method, path, key=keys["ann"])
        assert status == 200, (path, answer)
    for path in ("/v2/health/live", "/v2/health/ready"):  # probes need no key
        assert authed.call("GET", path)[0] == 200
    status, headers, _ = authed.call("GET", "/")
    assert (status, headers["Location"]) == (303, "/auth/login?next=/")

    # loading and unloading models: an admin's
    for action in ("load", "unload"):
        path = f"/v2/repository/models/iris/{action}"
        assert authed.call("POST", path)[0] == 401
        status, _, answer = authed.call("POST", path, key=keys["ann"])
        assert status == 403, answer
    assert authed.call("POST", "/v2/repository/models/iris/load", key=keys["admin"])[0] == 200


def test_a_revoked_key_stops_working_within_a_second(authed: Authed) -> None:
    key = authed.keys["ann"]
    assert authed.call("POST", "/v2/models/iris/infer", IRIS, key=key)[0] == 200
    store_do(authed.url, lambda store: store.revoke_key(key[:11]))  # (its visible prefix)
    revoked = time.monotonic()
    while authed.call("POST", "/v2/models/iris/infer", IRIS, key=key)[0] == 200:
        assert time.monotonic() - revoked < 1.0, "the revoked key still worked after 1 s"
    assert authed.call("POST", "/v2/models/iris/infer", IRIS, key=key)[0] == 401


def test_disabled_users_expired_keys_and_rate_limits(authed: Authed) -> None:
    short = store_do(authed.url, lambda store: store.create_key("ann", expires_in=3.0))[0]
    assert authed.call("GET", "/v2/models/iris", key=short)[0] == 200
    # until its lifetime is over (a cached key is judged by its expiry on every request)
    wait_for(lambda: authed.call("GET", "/v2/models/iris", key=short)[0] != 200, 30, "expiry")
    status, _, answer = authed.call("GET", "/v2/models/iris", key=short)
    assert status == 401
    assert "not valid" in _error(answer)

    slow = authed.keys["slow"]  # 1 request per second, a burst of 1
    codes = [authed.call("GET", "/v2/models/iris", key=slow) for _ in range(3)]
    assert [c[0] for c in codes].count(429) >= 1
    status, headers, answer = next(c for c in codes if c[0] == 429)
    assert int(headers["Retry-After"]) >= 1
    assert "1 requests per second" in _error(answer)

    store_do(authed.url, lambda store: store.set_disabled("ann", True))
    deadline = time.monotonic() + 1.0
    while authed.call("GET", "/v2/models/iris", key=authed.keys["ann"])[0] == 200:
        assert time.monotonic() < deadline, "a disabled user's key worked after 1 s"
    assert authed.call("GET", "/v2/models/iris", key=authed.keys["admin"])[0] == 200


def test_usage_is_counted_per_key_and_written_in_batches(authed: Authed) -> None:
    key = authed.keys["iris-only"]
    for _ in range(3):
        assert authed.call("POST", "/v2/models/iris/infer", IRIS, key=key)[0] == 200
    assert authed.call("POST", "/v2/models/other/infer", IRIS, key=key)[0] == 403
    bad = infer_body("INPUT0", "FP32", [1, 3], [1.0, 2.0, 3.0])
    assert authed.call("POST", "/v2/models/iris/infer", bad, key=key)[0] == 400
    prefix = key[:11]  # "mp_" and 8 characters

    def counted() -> Any:
        (record,) = [k for k in store_do(authed.url, lambda s: s.keys()) if k.prefix == prefix]
        return record

    wait_for(lambda: counted().requests >= 5, 30, "the usage to be written (every 2 s)")
    record = counted()
    assert (record.requests, record.rows, record.errors) == (5, 6, 2)
    assert record.last_used_at is not None
    assert abs(record.last_used_at - time.time()) < 60


def _login(authed: Authed, name: str, password: str, cookie: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if cookie:
        headers["Cookie"] = cookie
    body = json.dumps({"username": name, "password": password}).encode()
    return authed.call("POST", "/auth/login", body, **headers)


def _session_cookie(headers: dict[str, str]) -> str:
    match = re.search(r"modelpool_session=([^;]+)", headers.get("Set-Cookie", ""))
    assert match, headers
    return f"modelpool_session={match[1]}"


def test_login_sessions_csrf_fixation_and_logout(authed: Authed) -> None:
    status, headers, answer = _login(authed, "ann", PASSWORD)
    assert status == 200, answer
    cookie_line = headers["Set-Cookie"]
    assert "HttpOnly" in cookie_line
    assert "SameSite=Lax" in cookie_line
    assert "Secure" not in cookie_line  # plain HTTP here; over TLS it is set
    cookie, csrf = _session_cookie(headers), answer["csrf"]
    assert authed.call("GET", "/status.json", Cookie=cookie)[0] == 200
    assert authed.call("POST", "/v2/models/iris/infer", IRIS, Cookie=cookie)[0] == 403  # no CSRF
    status, _, answer = authed.call(
        "POST", "/v2/models/iris/infer", IRIS, Cookie=cookie, **{"X-CSRF-Token": "forged"}
    )
    assert status == 403
    assert "CSRF" in _error(answer)
    status, _, _ = authed.call(
        "POST", "/v2/models/iris/infer", IRIS, Cookie=cookie, **{"X-CSRF-Token": csrf}
    )
    assert status == 200

    # fixation: a session presented at login is replaced, never kept
    status, headers, _ = _login(authed, "ann", PASSWORD, cookie=cookie)
    fresh = _session_cookie(headers)
    assert fresh != cookie
    assert authed.call("GET", "/status.json", Cookie=cookie)[0] == 401
    planted = "modelpool_session=chosen-by-the-attacker"
    status, headers, _ = _login(authed, "ann", PASSWORD, cookie=planted)
    assert _session_cookie(headers) != planted
    assert authed.call("GET", "/status.json", Cookie=planted)[0] == 401

    csrf = authed.call("GET", "/auth/session", Cookie=fresh)[2]["csrf"]
    assert authed.call("POST", "/auth/logout", Cookie=fresh)[0] == 403  # CSRF here too
    status, headers, answer = authed.call(
        "POST", "/auth/logout", Cookie=fresh, **{"X-CSRF-Token": csrf}
    )
    assert (status, answer) == (200, {"logged_out": True})
    assert "Max-Age=0" in headers["Set-Cookie"]
    status, _, answer = authed.call("GET", "/status.json", Cookie=fresh)
    assert status == 401
    assert "log in again" in _error(answer)


@pytest.mark.parametrize("attack", ["x' OR '1'='1", "'; DROP TABLE modelpool_users; --"])
def test_sql_injection_through_http_is_an_ordinary_refusal(tmp_path: Path, attack: str) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    keys = _populate(url)
    with ServerProcess(config=_config(url, registration="open"), tmp=tmp_path) as server:
        authed = Authed(server, url)
        assert _login(authed, attack, attack)[0] == 401
        assert _login(authed, "ann", attack)[0] == 401
        body = json.dumps({"username": attack, "password": PASSWORD}).encode()
        status, _, answer = authed.call(
            "POST", "/auth/register", body, **{"Content-Type": "application/json"}
        )
        assert status == 400
        assert "not allowed" in _error(answer)
        assert authed.call("GET", "/v2/models/iris", key=attack)[0] == 401
        assert authed.call("GET", "/status.json", Cookie=f"modelpool_session={attack}")[0] == 401
        assert authed.call("GET", "/v2/models/iris", key=keys["ann"])[0] == 200  # all intact
        assert _login(authed, "ann", PASSWORD)[0] == 200


def test_a_session_expires(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    _populate(url)
    with ServerProcess(config=_config(url, session_ttl="3s"), tmp=tmp_path) as server:
        authed = Authed(server, url)
        status, headers, answer = _login(authed, "ann", PASSWORD)
        assert (status, answer["expires_in"]) == (200, 3.0)
        cookie = _session_cookie(headers)
        assert "Max-Age=3" in headers["Set-Cookie"]
        assert authed.call("GET", "/status.json", Cookie=cookie)[0] == 200
        wait_for(lambda: authed.call("GET", "/status.json", Cookie=cookie)[0] != 200, 30, "expiry")
        status, _, answer = authed.call("GET", "/status.json", Cookie=cookie)
        assert status == 401
        assert "expired" in _error(answer)


def test_logins_are_throttled_per_account_and_per_address(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    _populate(url)
    config = _config(url, login_attempts=3, secure_cookies="always")  # (a TLS proxy in front)
    with ServerProcess(config=config, tmp=tmp_path) as server:
        authed = Authed(server, url)
        codes = [_login(authed, "ann", "wrong password")[0] for _ in range(3)]
        assert codes == [401, 401, 401]
        status, headers, answer = _login(authed, "ann", PASSWORD)  # even the right one, now
        assert status == 429
        assert int(headers["Retry-After"]) > 0
        assert "too many failed logins" in _error(answer)
        status, headers, _ = _login(authed, "root", PASSWORD)
        assert status == 200  # another account is not blocked
        assert "Secure" in headers["Set-Cookie"]
        for i in range(9):  # this address: 4 x the per-account limit, over any accounts
            assert _login(authed, f"nobody{i}", "wrong password")[0] == 401
        assert _login(authed, "root", PASSWORD)[0] == 429


def test_registration_is_closed_by_default_and_checks_what_it_is_given(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    _populate(url)
    register = {"Content-Type": "application/json"}

    def body(name: str, password: str) -> bytes:
        return json.dumps({"username": name, "password": password}).encode()

    with ServerProcess(config=_config(url), tmp=tmp_path) as server:
        status, _, answer = Authed(server, url).call(
            "POST", "/auth/register", body("eve", PASSWORD), **register
        )
        assert status == 403
        assert "registration is closed" in _error(answer)
    with ServerProcess(config=_config(url, registration="open"), tmp=tmp_path) as server:
        authed = Authed(server, url)
        status, _, answer = authed.call("POST", "/auth/register", body("eve", PASSWORD), **register)
        assert (status, answer) == (201, {"user": "eve", "role": "user"})
        assert authed.call("POST", "/auth/register", body("eve", PASSWORD), **register)[0] == 409
        status, _, answer = authed.call("POST", "/auth/register", body("eve2", "short"), **register)
        assert status == 400
        assert "too short" in _error(answer)
        assert _login(authed, "eve", PASSWORD)[0] == 200


def test_metrics_by_key_when_configured(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    keys = _populate(url)
    with ServerProcess(config=_config(url, metrics="key"), tmp=tmp_path) as server:
        authed = Authed(server, url)
        assert authed.call("GET", "/metrics")[0] == 401
        status, _, answer = authed.call("GET", "/metrics", key=keys["ann"])
        assert status == 403
        assert "--metrics" in _error(answer)
        assert authed.call("GET", "/metrics", key=keys["metrics"])[0] == 200
        assert authed.call("GET", "/metrics", key=keys["admin"])[0] == 200
    with ServerProcess(config=_config(url), tmp=tmp_path) as server:  # loopback (default)
        assert Authed(server, url).call("GET", "/metrics")[0] == 200  # (this is loopback)


def test_the_clients_send_the_key(authed: Authed, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    import modelpool

    flowers = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    with modelpool.Client(authed.server.url) as client:
        with pytest.raises(modelpool.ServerError) as info:
            client.infer("iris", {"INPUT0": flowers})
        assert info.value.status == 401
    with modelpool.Client(authed.server.url, api_key=authed.keys["ann"]) as client:
        assert "api_key=..." in repr(client)
        assert authed.keys["ann"] not in repr(client)
        assert client.infer("iris", {"INPUT0": flowers})["LABEL"].tolist() == [0]
    monkeypatch.setenv("MODELPOOL_API_KEY", authed.keys["iris-only"])
    with modelpool.Client(authed.server.url) as client:
        assert client.infer("iris", {"INPUT0": flowers})["LABEL"].tolist() == [0]
        with pytest.raises(modelpool.ServerError) as info:
            client.infer("other", {"INPUT0": flowers})
        assert info.value.status == 403

        async def asynchronous() -> Any:
            try:
                return await client.ainfer("iris", {"INPUT0": flowers})
            finally:
                await client.aclose()

        assert asyncio.run(asynchronous())["LABEL"].tolist() == [0]

    httpclient = pytest.importorskip("tritonclient.http")  # (a test dependency: installed)
    triton = httpclient.InferenceServerClient(authed.server.host_port)
    try:
        auth = {"Authorization": f"Bearer {authed.keys['ann']}"}
        assert triton.is_server_live()  # probes: no key
        assert triton.is_model_ready("iris", headers=auth)
        tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(flowers, binary_data=True)
        result = triton.infer("iris", [tensor], headers=auth)
        assert result.as_numpy("LABEL").tolist() == [0]
        with pytest.raises(Exception, match=r"401|API key"):
            triton.infer("iris", [tensor])
    finally:
        triton.close()


def test_keys_and_passwords_never_reach_the_logs(authed: Authed) -> None:
    secrets = [authed.keys["ann"], authed.keys["admin"], PASSWORD, "a-wrong-password-123"]
    authed.call("POST", "/v2/models/iris/infer", IRIS, key=authed.keys["ann"])
    authed.call("POST", "/v2/models/iris/infer", IRIS, key=authed.keys["ann"] + "x")
    authed.call("GET", "/metrics", key=authed.keys["admin"])
    _login(authed, "ann", "a-wrong-password-123")
    _status, headers, answer = _login(authed, "ann", PASSWORD)
    token = _session_cookie(headers).split("=", 1)[1]
    secrets += [token, answer["csrf"]]
    authed.server.stop()
    output = authed.server.output
    assert "POST /auth/login" in output or '"path": "/auth/login"' in output  # it logged
    for secret in secrets:
        assert secret not in output
    assert re.search(r"mp_[A-Za-z0-9]{8}_[A-Za-z0-9_-]{20,}", output) is None


def test_an_exposed_address_is_refused_without_auth_and_served_when_opted_out(
    tmp_path: Path,
) -> None:
    server = ServerProcess("--host", "0.0.0.0", "--port", "0")
    server.proc.wait(60)  # it refuses and exits by itself
    assert server.stop() == 2
    assert "refusing to serve on 0.0.0.0 without authentication" in server.output
    assert "auth: {enabled: false}" in server.output
    with ServerProcess("--host", "0.0.0.0", "--no-auth") as server:
        port = server.url.rsplit(":", 1)[1]
        conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
        conn.request("GET", "/v2/models/iris")
        assert conn.getresponse().status == 200
        conn.close()
    config = {
        "auth": {"enabled": False},
        "server": {"host": "0.0.0.0"},
        "models": {"iris": {"model": demo.MODEL, "workers": 1}},
    }
    with ServerProcess(config=config, tmp=tmp_path) as server:
        assert "auth          on" not in server.output


def test_instances_sharing_a_postgresql_database_see_the_same_keys_and_revocations(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.new_database()
    keys = _populate(url)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        ServerProcess(config=_config(url), tmp=tmp_path / "a") as first,
        ServerProcess(config=_config(url), tmp=tmp_path / "b") as second,
    ):
        instances = [Authed(first, url), Authed(second, url)]
        late = store_do(url, lambda store: store.create_key("ann"))[0]  # after both started
        for instance in instances:
            for key in (keys["ann"], late):
                assert instance.call("POST", "/v2/models/iris/infer", IRIS, key=key)[0] == 200
        store_do(url, lambda store: store.revoke_key(late[:11]))
        revoked = time.monotonic()
        for instance in instances:
            while instance.call("GET", "/v2/models/iris", key=late)[0] == 200:
                assert time.monotonic() - revoked < 1.0, "an instance kept a revoked key for 1 s"
            assert instance.call("GET", "/v2/models/iris", key=keys["ann"])[0] == 200
        status, headers, _ = _login(instances[0], "ann", PASSWORD)
        assert status == 200
        cookie = _session_cookie(headers)
        assert instances[1].call("GET", "/status.json", Cookie=cookie)[0] == 200  # one session


def test_with_the_database_down_cached_keys_work_and_logins_fail_clearly(
    tmp_path: Path,
) -> None:
    """PostgreSQL stopped under a running server: keys it has seen keep working, a key it has
    not seen and a login get 503 with Retry-After and a message that says why, nothing
    crashes, and everything works again once the database is back."""
    database = PostgresServer()
    try:
        url = database.new_database()
        keys = _populate(url)
        with ServerProcess(config=_config(url), tmp=tmp_path) as server:
            authed = Authed(server, url)
            assert authed.call("POST", "/v2/models/iris/infer", IRIS, key=keys["ann"])[0] == 200
            database.stop()
            for _ in range(3):
                status, _, _ = authed.call("POST", "/v2/models/iris/infer", IRIS, key=keys["ann"])
                assert status == 200
            status, headers, answer = authed.call("GET", "/v2/models/iris", key=keys["admin"])
            assert status == 503
            assert int(headers["Retry-After"]) > 0
            assert "cannot be checked right now" in _error(answer)
            status, headers, answer = _login(authed, "ann", PASSWORD)
            assert status == 503
            assert "logins are unavailable" in _error(answer)
            assert authed.call("GET", "/v2/health/ready")[0] == 200
            wait_for(lambda: "unreachable" in server.output, 30, "the outage to be logged")
            database.start()
            wait_for(
                lambda: authed.call("GET", "/v2/models/iris", key=keys["admin"])[0] == 200,
                30,
                "the server to recover",
            )
            assert _login(authed, "ann", PASSWORD)[0] == 200
            wait_for(lambda: "answers again" in server.output, 30, "the recovery to be logged")
            assert server.proc.poll() is None
        assert "authentication database is unreachable" in server.output
    finally:
        database.remove()
