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


def check_bench_outputs(outputs: dict[str, "str | None"], inputs: dict[str, "str | None"]) -> None:
    """Before a benchmark runs: each folder or file it writes (results, its cache) is none of its
    inputs (the data folder, a model or tokenizer folder), lies inside none and contains none, and
    its parent folder can be written, so that a long run does not fail only at its end."""
    from ..checkpoint.output import refuse_output_over_inputs
    from ..errors import MergeError

    data = inputs.get("data folder") or os.environ.get("MODALMERGE_DATA")
    pairs = [(label, path) for label, path in {**inputs, "data folder": data}.items() if path]
    for flag, out in outputs.items():
        if not out:
            continue
        refuse_output_over_inputs(out, pairs)
        parent = os.path.dirname(os.path.abspath(out))
        while not os.path.exists(parent):  # folders still to be made: their first existing parent
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise MergeError(f"{flag} {out}: cannot write there ({parent} is not a writable folder); "
                             "choose another path")
