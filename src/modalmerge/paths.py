"""Where modalmerge keeps what it builds once per machine (benchmark checkpoints, kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str) -> Path:
    """$MODALMERGE_CACHE/<name>, else ~/.cache/modalmerge/<name>."""
    env = os.environ.get("MODALMERGE_CACHE")
    return Path(env) / name if env else Path.home() / ".cache" / "modalmerge" / name
