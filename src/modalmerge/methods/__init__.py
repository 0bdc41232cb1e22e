"""One file per merge method; `registry.METHODS` is the table of them."""

from .base import Merged, Method, Params, Statistic, TensorGroup, TensorInfo
from .registry import METHODS, get_method

__all__ = ["Merged", "Method", "Params", "Statistic", "TensorGroup", "TensorInfo", "METHODS", "get_method"]
