"""What a mergekit recipe says about its output, whether it lists `models` or `slices`: the
folder its config comes from and the output dtype (engine/recipe.py and engine/slices.py)."""

from __future__ import annotations

from typing import Any

from ..errors import MergeError, one_line


def output_fields(data: dict[str, Any], base: str | None, where: str) -> dict[str, Any]:
    """`copy_files_from` and `dtype` of the native recipe for mergekit recipe `data`."""
    out: dict[str, Any] = {}
    if base is not None:
        out["copy_files_from"] = base  # mergekit takes config files from the base model
    if data.get("out_dtype") is not None and data.get("dtype") not in (None, "float32"):
        # with out_dtype given, mergekit's `dtype` is the arithmetic's: here it is always float32
        raise MergeError(f"{where}: mergekit `dtype` {one_line(data['dtype'], 40)!r} (the dtype of the arithmetic, "
                         "as `out_dtype` is given) is not applied: modalmerge computes in float32; remove `dtype` "
                         "or set it to float32")
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype:
        out["dtype"] = dtype
    return out
