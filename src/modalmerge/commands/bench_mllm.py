"""`modalmerge bench mllm`: the mini multimodal-LLM merging benchmark (MMER's setting)."""

from __future__ import annotations

import sys
from pathlib import Path

from .options import check_bench_outputs, set_threads


def default_cache() -> Path:
    from ..bench import cache_dir

    return cache_dir("bench-mllm")


def cmd_mllm(args) -> int:
    from ..bench import mllm
    from ..errors import MergeError
    from ..methods.registry import METHODS

    set_threads(args.threads)
    make = mllm.tiny_config if args.tiny else mllm.quick_config if args.quick else mllm.Config
    cfg = make(seed=args.seed)
    if args.tasks:
        cfg.tasks = tuple(args.tasks)
    if args.methods:
        for m in args.methods:
            if m not in mllm.LABELS or (m != "mmer" and m not in METHODS):
                raise MergeError(f"bench mllm: unknown method {m!r}; choose from {', '.join(mllm.LABELS)}")
        cfg.methods = tuple(args.methods)
    if args.no_forgetting:
        cfg.forgetting = False
    check_bench_outputs({"--out": args.out, "--cache": args.cache}, {"data folder": args.data_dir})
    cache = None if args.no_cache else Path(args.cache or default_cache())
    out = Path(args.out)
    result = mllm.run(cfg, cache=cache, data_root=args.data_dir, out=out, missing_ok=args.quick or args.tiny,
                      log=lambda s: print(s, file=sys.stderr), progress=not args.no_progress)
    print(mllm.markdown(result), end="")
    print(f"\nseed {cfg.seed}; mixed inputs of decoupled merges: {result['routed']}")
    print(f"{result['seconds']:.0f} s; wrote {out / 'mllm.json'}, {out / 'mllm.md'}, {out / 'mllm.png'}")
    return 0


def register_mllm(bench) -> None:
    s = bench.add_parser(
        "mllm", help="merge mini multimodal LLMs (MiniLM + frozen encoders) and score each method",
        description="Fine-tune one mini-MLLM per modality (frozen encoder + projector + the pretrained "
                    "all-MiniLM-L6-v2 as the language model; images: MNIST, speech: FSDD, table: "
                    "scikit-learn digits), cache them, then merge the language models with task "
                    "arithmetic, TIES, DARE-TIES, TALL, EMR and MMER and report per-modality accuracy "
                    "and retention, mask density, mixed-modality inputs, the base's SST-2 text skill, "
                    "forgetting and storage. Hyperparameters are chosen on validation splits.")
    s.add_argument("--quick", action="store_true", help="small subsets and grids: a few minutes, for CI")
    s.add_argument("--tiny", action="store_true", help=argparse_suppress())
    s.add_argument("--data-dir", help="folder holding fsdd/ and sentconv/ (default $MODALMERGE_DATA or "
                                      "../shared/data)")
    s.add_argument("--cache", help="fine-tuned models (default ~/.cache/modalmerge/bench-mllm, or "
                                   "$MODALMERGE_CACHE/bench-mllm)")
    s.add_argument("--no-cache", action="store_true", help="fine-tune again and store nothing")
    s.add_argument("--out", default="bench-mllm", help="folder for mllm.json, mllm.md, mllm.png (default ./bench-mllm)")
    s.add_argument("--tasks", nargs="+", choices=["image", "speech", "table"], help="modalities (default all three)")
    s.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="merges to compare (default task_arithmetic ties dare_ties tall emr mmer)")
    s.add_argument("--no-forgetting", action="store_true", help="skip the forgetting setting")
    s.add_argument("--seed", type=int, default=0, help="seed of splits, encoders and training (default 0)")
    s.add_argument("--threads", type=int, help="torch threads (default: the cores available)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_mllm)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS
