"""Console output that must never stop the server or a worker (``_output``): output lost
mid-write is silenced, never raised. ``modelpool serve | head`` end to end:
tests/server/test_main.py."""

from __future__ import annotations

import io
import os

from modelpool._output import Output


def test_output_lost_mid_write_is_silenced_not_raised() -> None:
    r, w = os.pipe()
    stream = open(w, "w", buffering=1)  # noqa: SIM115 (closed below)
    try:
        os.close(r)  # the reader is gone: writes fail with EPIPE
        out = Output(stream)
        out.write("banner\n")
        out.flush()
        assert out.lost
        stream.write("a log line\n")  # the descriptor now points at /dev/null
        stream.flush()
    finally:
        stream.close()
    dead = io.StringIO()
    dead.close()
    out = Output(dead)
    out.write("x")  # a closed file: dropped as well
    assert out.lost
    assert not out.isatty()
