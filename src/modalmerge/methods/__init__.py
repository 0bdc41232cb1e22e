"""One file per merge method; `registry.METHODS` is the table of them.

Methods do not import each other. What several share lives in modules that are not methods:
sign_election.py (TIES's trim, sign election and disjoint merge), combine.py (weighted sum and
elected merge of processed task vectors), drop_rescale.py (DARE's random drop and rescale),
task_masks.py (TALL's shared vector and masks), neuron_subspaces.py (NeuroMerging's vector),
statistics.py (whole-model statistics passes) and schedules.py (per-layer parameter values).
"""

from .base import ElectionState, Merged, Method, Params, Statistic, Stats, TensorGroup, TensorInfo
from .registry import METHODS, get_method

__all__ = ["ElectionState", "Merged", "Method", "Params", "Statistic", "Stats", "TensorGroup", "TensorInfo",
           "METHODS", "get_method"]
