"""`modalmerge bench mllm`: the mini multimodal-LLM merging benchmark (MMER's setting)."""

from __future__ import annotations

import sys
from pathlib import Path

from .options import check_bench_outputs, set_threads


def default_cache() -> Path:
    from ..bench import cache_dir

    return cache_dir("bench-mllm")


def apply_options(cfg, args):
    """--tasks, --methods (checked), --no-forgetting onto either setting's config; then the
    outputs are checked before any work."""
    from ..bench import mllm
    from ..errors import MergeError
    from ..methods.registry import METHODS

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
    return cfg


def cmd_mllm(args) -> int:
    from ..bench import mllm
    from ..errors import MergeError

    set_threads(args.threads)
    if args.setting == "collide":
        return cmd_mllm_collide(args)
    if args.seeds:
        raise MergeError("bench mllm: --seeds is for --setting collide; the small setting runs one --seed")
    if args.tasks and "text" in args.tasks:
        raise MergeError("bench mllm: the text task is in --setting collide only; the small setting has image, "
                         "speech and table")
    make = mllm.tiny_config if args.tiny else mllm.quick_config if args.quick else mllm.Config
    cfg = apply_options(make(seed=0 if args.seed is None else args.seed), args)
    cache = None if args.no_cache else Path(args.cache or default_cache())
    out = Path(args.out)
    result = mllm.run(cfg, cache=cache, data_root=args.data_dir, out=out, missing_ok=args.quick or args.tiny,
                      log=lambda s: print(s, file=sys.stderr), progress=not args.no_progress)
    print(mllm.markdown(result), end="")
    print(f"\nseed {cfg.seed}; mixed inputs of decoupled merges: {result['routed']}")
    print(f"{result['seconds']:.0f} s; wrote {out / 'mllm.json'}, {out / 'mllm.md'}, {out / 'mllm.png'}")
    return 0


def cmd_mllm_collide(args) -> int:
    """--setting collide: the generative decoder, four tasks, several seeds (bench/mllm_collide.py)."""
    from ..bench import mllm_collide

    make = mllm_collide.tiny_config if args.tiny else mllm_collide.quick_config if args.quick \
        else mllm_collide.CollideConfig
    cfg = apply_options(make(), args)
    # an explicit --seed (0 included) runs that seed alone; --tiny/--quick default to seed 0
    seeds = args.seeds or ([args.seed or 0] if (args.tiny or args.quick or args.seed is not None) else [0, 1, 2])
    cache = None if args.no_cache else Path(args.cache or mllm_collide.default_cache())
    out = Path(args.out)
    result = mllm_collide.run(cfg, seeds, cache=cache, data_root=args.data_dir, out=out,
                              log=lambda s: print(s, file=sys.stderr), progress=not args.no_progress)
    print(mllm_collide.markdown(result), end="")
    print(f"\nmixed inputs of decoupled merges: {result['per_seed'][0]['routed']}")
    print(f"{result['seconds']:.0f} s; wrote {out / 'mllm-collide.json'}, {out / 'mllm-collide.md'}, "
          f"{out / 'mllm-collide.png'}")
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
    s.add_argument("--setting", choices=["small", "collide"], default="small",
                   help="small (default): MiniLM answering from [CLS], three modalities, one seed; collide: a "
                        "decoder pretrained here on sentconv text that generates its answers, four tasks (image, "
                        "speech, table, text: TREC question type), strong fine-tunes, several seeds")
    s.add_argument("--quick", action="store_true", help="small subsets and grids: a few minutes, for CI")
    s.add_argument("--tiny", action="store_true", help=argparse_suppress())
    s.add_argument("--data-dir", help="folder holding fsdd/ and sentconv/ (default $MODALMERGE_DATA or "
                                      "../shared/data)")
    s.add_argument("--cache", help="fine-tuned models (default ~/.cache/modalmerge/bench-mllm, or "
                                   "$MODALMERGE_CACHE/bench-mllm; collide: bench-mllm-collide)")
    s.add_argument("--no-cache", action="store_true", help="fine-tune again and store nothing")
    s.add_argument("--out", default="bench-mllm", help="folder for mllm.json, mllm.md, mllm.png (default ./bench-mllm)")
    s.add_argument("--tasks", nargs="+", choices=["image", "speech", "table", "text"],
                   help="modalities (default: all of the setting's; text is collide's only)")
    s.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="merges to compare (default task_arithmetic ties dare_ties tall emr mmer)")
    s.add_argument("--no-forgetting", action="store_true", help="skip the forgetting setting")
    s.add_argument("--seed", type=int, help="seed of splits, encoders and training (default 0; collide: "
                                            "this seed alone instead of --seeds)")
    s.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="collide: the seeds to run and summarise (default 0 1 2; --quick/--tiny: --seed)")
    s.add_argument("--threads", type=int, help="torch threads (default: the cores available)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_mllm)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS
