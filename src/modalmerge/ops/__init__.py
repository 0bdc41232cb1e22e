"""Pure tensor functions: tensors in, tensors out. No files, configs or models here."""

from .election import disjoint_merge, elect_and_merge, elect_sign, tie_positions
from .sparsify import (
    keep_top_fraction,
    kth_largest_magnitude,
    kth_largest_magnitudes,
    magnitude_histogram,
    mass_below,
    threshold_from_histogram,
    trim_magnitude_,
)
from . import fused  # noqa: F401  (ops.fused: the fused C kernels)
from . import trimmed_merge  # noqa: F401  (ops.trimmed_merge: TIES's trim and merge, C or torch)
from .assignment import best_permutation
from .bits import pack_bits, unpack_bits, unpack_bits_scaled
from .reduce import deterministic_dot, deterministic_sum, weighted_sum

__all__ = [
    "elect_sign",
    "disjoint_merge",
    "elect_and_merge",
    "tie_positions",
    "keep_top_fraction",
    "kth_largest_magnitude",
    "kth_largest_magnitudes",
    "magnitude_histogram",
    "threshold_from_histogram",
    "trim_magnitude_",
    "mass_below",
    "pack_bits",
    "unpack_bits",
    "unpack_bits_scaled",
    "deterministic_sum",
    "deterministic_dot",
    "weighted_sum",
    "best_permutation",
]
