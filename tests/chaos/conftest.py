"""The chaos suite drives ``modelpool serve`` as tests/server's tests do (their helpers)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
