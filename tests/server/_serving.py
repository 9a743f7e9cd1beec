"""A real ``modelpool serve`` process for end-to-end tests."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

TESTS = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on (http://\S+)")
_GRPC = re.compile(r"grpc +(\S+) \(GRPCInferenceService\)")


class ServerProcess:
    """``modelpool serve`` in a subprocess; its stderr collected in ``output``."""

    def __init__(
        self,
        *args: str,
        config: dict[str, Any] | None = None,
        tmp: Path | None = None,
        pythonpath: tuple[str, ...] = (),
    ):
        command = [sys.executable, "-m", "modelpool.cli", "serve", *args]
        if config is not None:
            assert tmp is not None
            path = tmp / "modelpool.yaml"
            config = {**config, "server": {"port": 0, **config.get("server", {})}}
            path.write_text(yaml.safe_dump(config))
            command.insert(4, str(path))
        elif "--port" not in args:
            command += ["--port", "0"]
        path = [*pythonpath, str(TESTS), str(TESTS / "server")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=str(TESTS),
        )
        self.lines: list[str] = []
        self.url = ""
        self.grpc_target = ""  # host:port of the gRPC service, when the server has one
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = _LISTENING.search(line)
            if match:
                self.url = match.group(1)
            match = _GRPC.search(line)
            if match:
                self.grpc_target = match.group(1)
            if "Press Ctrl+C to stop." in line:  # the banner's last line (plain or JSON)
                self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 60.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not become ready:\n{self.output}")
        return self

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("http://")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def __enter__(self) -> ServerProcess:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def request(
    server: ServerProcess, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to ``server``: (status, headers, body)."""
    conn = http.client.HTTPConnection(server.host_port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post_json(server: ServerProcess, path: str, doc: Any = None) -> tuple[int, Any]:
    """POST ``doc`` as JSON (nothing when None): (status, the answer's JSON or None)."""
    body = json.dumps(doc).encode() if doc is not None else b""
    status, _, answer = request(server, "POST", path, body)
    return status, json.loads(answer) if answer else None


def infer_body(name: str, datatype: str, shape: list[int], data: list[Any]) -> bytes:
    """The JSON body of an inference request with one tensor."""
    tensor = {"name": name, "datatype": datatype, "shape": shape, "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


def slow_body(seconds: float) -> bytes:
    """A request for ``_server_models:Sleepy``: sleep ``seconds``, then answer."""
    return infer_body("SECONDS", "FP64", [1], [seconds])


def model_status(server: ServerProcess, name: str) -> dict[str, Any]:
    """The model's entry in ``/status.json`` (queued, in_flight, workers, latency_ms...)."""
    status = json.loads(request(server, "GET", "/status.json")[2])
    (model,) = [m for m in status["models"] if m["name"] == name]
    return model  # type: ignore[no-any-return]
