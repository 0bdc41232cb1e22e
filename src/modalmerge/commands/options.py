"""What several commands do with their options: the torch thread count, and the command line a
benchmark records in its results."""

from __future__ import annotations

import os
import shlex


def set_threads(n: int | None) -> int:
    """torch's thread count: n, or every core this process may run on; returns the count set."""
    import torch

    if n is None:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            n = os.cpu_count() or 1
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def command_line(args, *words: str) -> str:
    """The options a run was given, as the shell command `modalmerge WORDS --option value ...`."""
    parts = ["modalmerge", *words]
    for key, value in vars(args).items():
        if key in ("func", "command", "bench") or value in (None, False):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag, *(shlex.quote(str(v)) for v in value)]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def add_trust_flags(p) -> None:
    """--trust-recipe-code and --trust-remote-code: without them, no code named by a recipe or a
    model folder is imported or run (such a merge is refused before any work)."""
    p.add_argument("--trust-recipe-code", action="store_true",
                   help="allow the recipe's calibration callables (pkg.module:function) to be imported and run")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model folders with custom modelling code (config auto_map) to be loaded by "
                        "transformers, which runs that code")
