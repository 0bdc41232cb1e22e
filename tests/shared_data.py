"""Where the project's real benchmark data is (`../shared/data` beside a checkout, or
$MODALMERGE_DATA), and a skip mark for the tests that need it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def find_data() -> Path | None:
    env = os.environ.get("MODALMERGE_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "data" for p in [Path.cwd(), *here.parents]]
    for c in candidates:
        if (c / "sentconv" / "stsa.binary.train").is_file():
            return c
    return None


DATA = find_data()
needs_data = pytest.mark.skipif(DATA is None, reason="sentconv data not found (set MODALMERGE_DATA)")
