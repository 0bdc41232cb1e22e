"""modalmerge: training-free model merging, streamed tensor by tensor."""

from .api import describe, merge, merge_state_dicts, plan
from .errors import MergeError
from .version import __version__

__all__ = ["merge", "merge_state_dicts", "plan", "describe", "MergeError", "__version__"]
