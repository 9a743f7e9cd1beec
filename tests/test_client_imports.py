"""The HTTP client stays light: importing it (or reaching ``modelpool.Client``) loads neither
the server package nor the server's dependencies (aiohttp, pydantic). Each check runs in a fresh
interpreter, since this one has imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("modelpool.server", "pydantic", "aiohttp")

PROGRAM = """
import json, sys
{imports}
heavy = {heavy!r}
loaded = [m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy)]
print(json.dumps(sorted(loaded)))
"""


def _loaded_after(imports: str) -> list[str]:
    code = PROGRAM.format(imports=imports, heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize(
    "imports",
    [
        "import modelpool.client",
        "from modelpool.client import Client, ServerError, ServerTimeoutError",
        "import modelpool\nmodelpool.Client, modelpool.ServerError, modelpool.ServerTimeoutError",
    ],
)
def test_the_client_loads_no_server_pydantic_or_aiohttp(imports: str) -> None:
    assert _loaded_after(imports) == []


def test_the_check_sees_what_the_server_loads() -> None:
    """The same check flags the server's imports (so an empty list above means something)."""
    loaded = _loaded_after("import modelpool.server")
    assert {"modelpool.server", "pydantic", "aiohttp"} <= set(loaded)
