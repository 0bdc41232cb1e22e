"""modalmerge: training-free model merging, streamed tensor by tensor."""

__version__ = "0.1.0"

from .api import merge, merge_state_dicts, plan  # noqa: E402
from .errors import MergeError  # noqa: E402

__all__ = ["merge", "merge_state_dicts", "plan", "MergeError", "__version__"]
