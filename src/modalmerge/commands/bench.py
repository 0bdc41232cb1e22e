"""`modalmerge bench …`: benchmarks, each with a --quick mode that CI runs. `bench speed` times
merges against an I/O floor; `bench text`, `bench mllm` and `bench moe` register from their own modules."""

from __future__ import annotations

import json
from pathlib import Path

from .options import check_bench_outputs


def default_cache() -> Path:
    from ..bench import cache_dir

    return cache_dir("bench")


def cmd_speed(args) -> int:
    from ..bench.speed import DEFAULT_METHODS, QUICK, Mergekit, Shape, method_of, run_speed, table
    from ..errors import MergeError

    base = QUICK if args.quick else Shape()
    shape = Shape(hidden=args.hidden or base.hidden, layers=args.layers or base.layers,
                  vocab=args.vocab or base.vocab, intermediate=args.intermediate or base.intermediate,
                  models=args.models or base.models)
    if min(shape.hidden, shape.layers, shape.vocab, shape.models, shape.ffn) < 1:
        raise MergeError("bench speed: --hidden, --layers, --vocab, --intermediate and --models must be positive")
    methods = args.methods or DEFAULT_METHODS
    for m in methods:
        method_of(m)   # unknown names fail before anything is built
    repeats = args.repeats or (1 if args.quick else 3)
    check_bench_outputs({"--out": args.out, "--markdown": args.markdown, "--cache": args.cache}, {})
    mergekit = None
    if args.mergekit is not None:
        if args.mergekit and not (Path(args.mergekit) / "mergekit").is_dir():
            raise MergeError(f"bench speed: --mergekit {args.mergekit}: no `mergekit` package folder there; give the "
                             "folder that holds it (pip install --target DIR mergekit==0.1.5), or no folder to use "
                             "the mergekit this Python imports")
        import shlex

        mergekit = Mergekit(str(Path(args.mergekit).resolve()) if args.mergekit else None,
                            shlex.split(args.mergekit_args or ""))
    elif args.mergekit_args:
        raise MergeError("bench speed: --mergekit-args needs --mergekit; add it or remove --mergekit-args")
    try:
        result = run_speed(shape, Path(args.cache or default_cache()), methods, repeats, args.threads,
                           mergekit=mergekit)
    except RuntimeError as e:
        raise MergeError(str(e)) from None
    text = table(result)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (speed, text, mllm, moe, search)", description="Benchmarks; each has a --quick mode.")
    bench = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    s = bench.add_parser(
        "speed", help="wall time and peak memory of merges next to an I/O floor",
        description="Build Llama-shaped synthetic bfloat16 checkpoints (a base and N fine-tunes) once into a "
                    "cache, then time each method's merge and two floors (read every input tensor, write the "
                    "output, no arithmetic: one after the other, and overlapped as the merge does), each in a "
                    "fresh process; report medians and peak RSS. With --mergekit, each row that mergekit can "
                    "express also runs through mergekit, and the two outputs are compared.")
    s.add_argument("--cache", help="folder for the synthetic checkpoints (default ~/.cache/modalmerge/bench, "
                                   "or $MODALMERGE_CACHE/bench)")
    s.add_argument("--hidden", type=int, help="hidden size (default 1024; quick 256)")
    s.add_argument("--layers", type=int, help="decoder layers (default 24; quick 4)")
    s.add_argument("--vocab", type=int, help="vocabulary size (default 32000; quick 4096)")
    s.add_argument("--intermediate", type=int, help="MLP size (default 4 x hidden)")
    s.add_argument("--models", type=int, help="fine-tuned models besides the base (default 8; quick 3)")
    s.add_argument("--methods", nargs="+", metavar="METHOD[:k=v,...]",
                   help="methods to time, with parameters, e.g. ties:scope=tensor; NAME@mergekit:k=v,... gives "
                        "a row as mergekit's recipe (mergekit's method name, parameters and defaults) "
                        "(default: linear task_arithmetic ties:scope=global ties:scope=tensor)")
    s.add_argument("--repeats", type=int, help="runs per measurement, the median is reported (default 3; quick 1)")
    s.add_argument("--threads", type=int, help="torch threads for the merges (default: all cores)")
    s.add_argument("--quick", action="store_true", help="a tiny shape, one run each: seconds, for CI")
    s.add_argument("--mergekit", nargs="?", const="", metavar="DIR",
                   help="also run each method that mergekit can express through mergekit (python -m "
                        "mergekit.scripts.run_yaml, a fresh process per run, the same --threads) and compare the "
                        "outputs; DIR: a folder holding the mergekit package, put first on its PYTHONPATH "
                        "(default: the mergekit this Python imports)")
    s.add_argument("--mergekit-args", metavar="FLAGS",
                   help="extra run_yaml flags for the mergekit runs, as one string: --mergekit-args=\"--async-write\"")
    s.add_argument("--out", help="write the results (every run) as JSON here")
    s.add_argument("--markdown", help="write the table as Markdown here")
    s.set_defaults(func=cmd_speed)
    from .bench_mllm import register_mllm
    from .bench_moe import register_moe
    from .bench_search import register_search
    from .bench_text import register_text

    register_text(bench)
    register_mllm(bench)
    register_moe(bench)
    register_search(bench)
