"""The table of merge methods: an explicit list, not an import side effect."""

from ..errors import MergeError
from .base import Method
from .linear import LINEAR
from .neuromerging import NEUROMERGING
from .task_arithmetic import TASK_ARITHMETIC
from .ties import TIES

METHODS: dict[str, Method] = {m.name: m for m in (
    LINEAR,
    TASK_ARITHMETIC,
    TIES,
    NEUROMERGING,
)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise MergeError(f"unknown method {name!r}; `modalmerge methods` lists them: {', '.join(METHODS)}") from None


def mergekit_method(name: str) -> Method:
    for m in METHODS.values():
        if name in m.mergekit_names:
            return m
    known = sorted(n for m in METHODS.values() for n in m.mergekit_names)
    raise MergeError(f"mergekit merge_method {name!r} is not supported; supported: {', '.join(known)}")
