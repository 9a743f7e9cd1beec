"""Log formats (text and JSON) and ``modelpool.request_id()``, in this process and carried
to a pool's worker (``_logs``). Input errors, worded two ways: test_model.py."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import numpy as np
import pytest

import modelpool
from modelpool import _logs


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_request_id_is_none_outside_a_request_and_follows_the_context() -> None:
    assert modelpool.request_id() is None
    token = _logs.REQUEST_ID.set("abc")
    try:
        assert modelpool.request_id() == "abc"
    finally:
        _logs.REQUEST_ID.reset(token)
    assert modelpool.request_id() is None


def test_json_lines_carry_context_fields_and_traceback(restore_root: None) -> None:
    stream = io.StringIO()
    _logs.configure("info", "json", stream, {"model": "m", "worker_pid": 7})
    log = logging.getLogger("t.json")
    token = _logs.REQUEST_ID.set("r-1")
    try:
        log.debug("not shown")
        log.info("multi\nline", extra={"fields": {"status": 200}})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        _logs.REQUEST_ID.reset(token)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "multi\nline"
    assert first["level"] == "INFO"
    assert first["logger"] == "t.json"
    assert first["time"].endswith("Z")
    assert (first["model"], first["worker_pid"], first["request_id"]) == ("m", 7, "r-1")
    assert first["status"] == 200
    assert "ValueError: boom" in second["traceback"]


def test_text_lines_show_context_in_brackets_then_the_traceback(restore_root: None) -> None:
    stream = io.StringIO()
    _logs.configure("warning", "text", stream)
    log = logging.getLogger("t.text")
    log.info("not shown")
    fields = {"model": "m", "worker_pid": 7, "request_id": "r\n2"}
    log.error("it broke", extra={"fields": fields, "traceback": "Traceback...\nKeyError: 'x'"})
    text = stream.getvalue()
    assert " ERROR t.text: it broke [model=m worker_pid=7 request_id=r\\n2]\nTraceback" in text
    assert text.rstrip().endswith("KeyError: 'x'")


def test_configure_replaces_its_own_handler_only(restore_root: None) -> None:
    root = logging.getLogger()
    mine = logging.NullHandler()
    root.addHandler(mine)
    _logs.configure("info", "text", io.StringIO())
    _logs.configure("debug", "json", io.StringIO())
    ours = [h for h in root.handlers if getattr(h, "_modelpool", False)]
    assert len(ours) == 1
    assert mine in root.handlers
    assert root.level == logging.DEBUG
    with pytest.raises(ValueError, match="log level"):
        _logs.configure("loud", "text")


@pytest.mark.parametrize("batch", [1, 8], ids=["single", "batching"])
def test_a_pool_carries_the_request_id_to_the_worker(batch: int) -> None:
    with modelpool.Pool("_models:RequestIdEcho", max_batch_size=batch) as pool:
        assert pool.predict({"x": np.zeros(1)}, request_id="r-7")["rid"][0] == "r-7"
        assert pool.predict({"x": np.zeros(1)})["rid"][0] == ""
        with pytest.raises(TypeError, match="request_id"):
            pool.predict({"x": np.zeros(1)}, request_id=7)  # type: ignore[arg-type]
        assert pool.stats().workers[0].served == 2
