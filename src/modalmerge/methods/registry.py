"""The table of merge methods: an explicit list, not an import side effect."""

from ..errors import MergeError
from .base import Method
from .adamerging import ADAMERGING
from .arcee_fusion import ARCEE_FUSION
from .breadcrumbs import BREADCRUMBS
from .consensus import CONSENSUS
from .dare import DARE_LINEAR, DARE_TIES
from .della import DELLA, DELLA_LINEAR
from .emr import EMR
from .frank import FRANK
from .karcher import KARCHER
from .fisher import FISHER
from .linear import LINEAR
from .metrics_weighted import METRICS_WEIGHTED
from .mmer import MMER
from .model_stock import MODEL_STOCK
from .msmoe import MSMOE
from .multislerp import MULTISLERP
from .nuslerp import NUSLERP
from .nearswap import NEARSWAP
from .slerp import SLERP
from .tall import TALL
from .neuromerging import NEUROMERGING
from .opcm import OPCM
from .ota import OTA
from .passthrough import PASSTHROUGH
from .ram import RAM, RAMPLUS_TL
from .regmean import REGMEAN
from .sce import SCE
from .task_arithmetic import TASK_ARITHMETIC
from .ties import TIES
from .widen import WIDEN

def table(methods) -> dict[str, Method]:
    """The registry: name -> method. Two methods under one name (or one mergekit name) are a
    programming error, never a silent choice of the last one."""
    out: dict[str, Method] = {}
    aliases: dict[str, str] = {}
    for m in methods:
        if m.name in out:
            raise ValueError(f"two merge methods are named {m.name!r}")
        out[m.name] = m
        for alias in m.mergekit_names:
            if alias in aliases:
                raise ValueError(f"mergekit name {alias!r} is claimed by {aliases[alias]!r} and {m.name!r}")
            aliases[alias] = m.name
    return out


METHODS: dict[str, Method] = table((
    LINEAR,
    TASK_ARITHMETIC,
    TIES,
    DARE_LINEAR,
    DARE_TIES,
    DELLA,
    DELLA_LINEAR,
    BREADCRUMBS,
    MODEL_STOCK,
    SLERP,
    NUSLERP,
    MULTISLERP,
    KARCHER,
    TALL,
    CONSENSUS,
    EMR,
    NEUROMERGING,
    WIDEN,
    METRICS_WEIGHTED,
    FRANK,
    OPCM,
    FISHER,
    REGMEAN,
    OTA,
    ADAMERGING,
    MMER,
    MSMOE,
    PASSTHROUGH,
    SCE,
    NEARSWAP,
    ARCEE_FUSION,
    RAM,
    RAMPLUS_TL,
))


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise MergeError(f"unknown method {name!r}; `modalmerge methods` lists them: {', '.join(METHODS)}") from None


def mergekit_method(name: str) -> Method:
    for m in METHODS.values():
        if name in m.mergekit_names:
            return m
    known = sorted(n for m in METHODS.values() for n in m.mergekit_names)
    raise MergeError(f"mergekit merge_method {name!r} is not supported; supported: {', '.join(known)}")
