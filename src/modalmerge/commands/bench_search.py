"""`modalmerge bench search`: trials per minute of a search with 1, 2 and 4 workers, and the memory
the workers hold (bench/search.py)."""

from __future__ import annotations

import json
from pathlib import Path

from .options import check_bench_outputs, command_line, set_threads


def cmd_search_bench(args) -> int:
    from ..bench import cache_dir
    from ..bench.search import QUICK, SearchShape, markdown, run_search_bench
    from ..errors import MergeError

    check_bench_outputs({"--out": args.out, "--cache": args.cache}, {})
    base = QUICK if args.quick else SearchShape()
    shape = SearchShape(**{**base.__dict__, **{k: v for k, v in (("hidden", args.hidden), ("layers", args.layers),
                                                                 ("models", args.models), ("trials", args.trials))
                                           if v is not None}})
    if min(shape.hidden, shape.layers, shape.models, shape.trials) < 1 or any(w < 1 for w in args.workers or ()):
        raise MergeError("bench search: --hidden, --layers, --models, --trials and --workers must be positive")
    set_threads(args.threads)  # the in-process row; Ray workers set their own share
    workers = tuple(args.workers or ((1, 2) if args.quick else (1, 2, 4)))
    result = run_search_bench(shape, Path(args.cache or cache_dir("bench")), workers, threads=args.threads)
    result["command"] = command_line(args, "bench", "search")
    text = f"`{result['command']}`\n\n" + markdown(result)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "search.json").write_text(json.dumps(result, indent=2))
        (out / "search.md").write_text(text)
    return 0


def register_search(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "search", help="trials per minute of `modalmerge search` with 1, 2, 4 workers, and the workers' memory",
        description="Build a Llama-shaped base and two fine-tunes (float32) into the cache, then run the same "
                    "search (task arithmetic's lambda, random sampler, no pruning) in this process and on a local "
                    "Ray instance with each --workers count; report the time until the workers are ready, trials "
                    "per minute, and each worker's PSS (psutil) against the inputs' size x workers.")
    p.add_argument("--quick", action="store_true", help="a tiny model, 4 trials, 1 and 2 workers: seconds, for CI")
    p.add_argument("--workers", type=int, nargs="+", help="Ray worker counts (default 1 2 4; quick 1 2)")
    p.add_argument("--trials", type=int, help="trials per row (default 16; quick 4)")
    p.add_argument("--hidden", type=int, help="hidden size (default 512; quick 64)")
    p.add_argument("--layers", type=int, help="decoder layers (default 8; quick 2)")
    p.add_argument("--models", type=int, help="fine-tunes besides the base (default 2)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: the cores / workers)")
    p.add_argument("--cache", help="folder for the built models (default ~/.cache/modalmerge/bench)")
    p.add_argument("--out", help="write search.json and search.md into this folder")
    p.set_defaults(func=cmd_search_bench)
