"""bench text: what the methods that need more than the fine-tuned models get.

- fisher, regmean: per-model statistics from each task's own training texts (a seeded subset of
  `calibration_examples`, no labels), computed by procedures/calibration.py's fisher_diagonal and
  gram_matrices on the task's classifier (the fine-tuned encoder + that task's head). Without
  labels the Fisher is the exact expectation over the classifier's own predicted classes, as in
  Fisher merging (Matena & Raffel).
- adamerging: coefficients fitted by entropy minimisation on the same unlabeled texts, each task's
  predictions made by its own head on the merged encoder, as in the AdaMerging paper.
  The library's fitting loop (procedures/adamerging_fit.fit_coefficients: Adam on λ, clamped to
  [0, 1], one batch per task and step, prediction_entropy), with each task's head.
- ota: AdamW's second moments kept when fine-tuning (bench/text.py's cache).
- opcm: the library's continual merging: a merge folder started with the first task's model, then
  api.continual_merge adds the others one at a time, in the order given.
- metrics_weighted: checkpoints of one fine-tuning run (its own section, not a row of the table),
  weighted by validation loss or by step.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from ..errors import MergeError
from . import sentconv, write_cache_entry
from .text_classifier import Classifier, accuracy, batches, cache_key, fine_tune, mean_loss, training_steps

if TYPE_CHECKING:
    from .text import TextBench

ENCODER_PREFIX = "clf.encoder."
# the task whose run is checkpointed for metrics_weighted (the first task when it is not benchmarked)
CHECKPOINT_TASK = "sst2"


# -- calibration statistics -------------------------------------------------------------------------

class LogitsView(torch.nn.Module):
    """A bench Classifier seen the way procedures/calibration.py calls a Hugging Face model: keyword
    inputs, an output with `.logits`. Its parameters are named `clf.encoder.*` and `clf.head.*`."""

    def __init__(self, clf: torch.nn.Module):
        super().__init__()
        self.clf = clf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=self.clf(input_ids, attention_mask))


def encoder_part(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's statistics, keyed like its state dict (the head's are dropped: heads are not merged)."""
    return {k[len(ENCODER_PREFIX):]: v for k, v in stats.items() if k.startswith(ENCODER_PREFIX)}


def calibration_batches(bench: "TextBench", task: str) -> list[dict[str, torch.Tensor]]:
    """A seeded subset of the task's training texts, unlabeled, in batches of the library's default size."""
    from ..procedures.calibration import CalibrationSpec

    cfg = bench.cfg
    examples = sentconv.subsample(bench.tasks[task].train, cfg.calibration_examples, cfg.seed, f"{task}/calibration")
    size = CalibrationSpec.model_fields["batch_size"].default
    return [{"input_ids": ids, "attention_mask": mask}
            for ids, mask, _ in batches(bench.tokenizer, examples, cfg.max_length, size, sort=False)]


def task_statistic(bench: "TextBench", kind: str, task: str) -> dict[str, torch.Tensor]:
    """Fisher or Gram statistics of one task's classifier on its calibration texts."""
    from ..procedures.calibration import fisher_diagonal, gram_matrices

    bench.encoder.load_state_dict(bench.finetuned[task])
    view = LogitsView(bench.classifiers[task]).eval()
    data = calibration_batches(bench, task)
    stats = fisher_diagonal(view, data) if kind == "fisher" else gram_matrices(view, data)
    return encoder_part(stats)


def statistics(bench: "TextBench", kind: str, method: str, params: dict) -> tuple[list[dict], dict]:
    """(per-model statistics in the tasks' order, a summary of how they were made)."""
    tasks = list(bench.tasks)
    if kind in ("fisher", "gram"):
        n = {t: min(bench.cfg.calibration_examples, len(bench.tasks[t].train)) for t in tasks}
        bench.log(f"{method}: {kind} statistics of each task's classifier on {sum(n.values())} training texts")
        return ([task_statistic(bench, kind, t) for t in tasks],
                {"kind": kind, "calibration_examples": n, "labels": "none (expectation over the model's classes)"
                 if kind == "fisher" else "none"})
    if kind == "exp_avg_sq":
        missing = [t for t in tasks if bench.moments.get(t) is None]
        if missing:
            raise MergeError(f"task {missing[0]}: its cached fine-tune has no optimiser second moments; run bench text "
                             f"with {method} among --methods so that it is fine-tuned again with them")
        return [bench.moments[t] for t in tasks], {"kind": kind, "source": "AdamW exp_avg_sq at the end of fine-tuning"}
    if kind == "adamerging":
        return adamerging_coefficients(bench, params)
    raise MergeError(f"bench text cannot provide {kind!r} statistics for method {method}")


def adamerging_coefficients(bench: "TextBench", params: dict) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """Per task, {tensor: λ (1 value)} minimising the entropy of every task's head on the merged
    encoder over that task's unlabeled calibration texts."""
    from ..procedures.adamerging_fit import fit_coefficients, prediction_entropy
    from ..methods.registry import get_method

    p = get_method("adamerging").parse_params(params)
    tasks = list(bench.tasks)
    names = [n for n, v in bench.base.items() if v.is_floating_point()]
    base = {n: bench.base[n].float() for n in names}
    # per tensor, the task vectors stacked [T, ...]: one tensordot per tensor and step
    taus = {n: torch.stack([bench.finetuned[t][n].float() - base[n] for t in tasks]) for n in names}
    data = [calibration_batches(bench, t) for t in tasks]
    count = len(tasks) * (1 if p.granularity == "task" else len(names))
    bench.log(f"adamerging: fitting {count} coefficients ({p.steps} steps, {p.granularity})")

    def task_entropy(i: int, step: int, params: dict[str, torch.Tensor]) -> torch.Tensor:
        # the library's fitting loop, with each task's own head on the merged encoder
        batch = data[i][step % len(data[i])]
        logits = torch.func.functional_call(bench.classifiers[tasks[i]], {"encoder." + n: v for n, v in params.items()},
                                            args=(batch["input_ids"], batch["attention_mask"]), strict=False)
        return prediction_entropy(logits)

    frozen = [q for c in bench.classifiers.values() for q in c.parameters() if q.requires_grad]
    for q in frozen:
        q.requires_grad_(False)
    try:
        for c in bench.classifiers.values():
            c.eval()
        lam, losses = fit_coefficients(base, taus, p, task_entropy)
    finally:
        for q in frozen:
            q.requires_grad_(True)
    out = [{n: (lam[i] if p.granularity == "task" else lam[i, j]).reshape(1).clone() for j, n in enumerate(names)}
           for i in range(len(tasks))]
    per_task = lam if p.granularity == "task" else lam.mean(dim=1)
    info = {"kind": "adamerging", "steps": p.steps, "granularity": p.granularity,
            "entropy_first_steps": sum(losses[:10]) / max(1, len(losses[:10])),
            "entropy_last_steps": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "mean_coefficient": {t: round(float(per_task[i]), 4) for i, t in enumerate(tasks)}}
    return out, info


# -- OPCM: continual merging through the library ------------------------------------------------------

def continual(bench: "TextBench", method: str, params: dict, order: list[str]) -> tuple[dict, float]:
    """(merged encoder, seconds): the tasks' models added one at a time in `order` with
    api.merge (the first) and api.continual_merge (each later one), in a temporary folder."""
    from safetensors.torch import save_file

    from ..api import continual_merge, merge
    from ..checkpoint.sources import open_source

    with tempfile.TemporaryDirectory(prefix="modalmerge-bench-opcm-") as tmp:
        root = Path(tmp)
        base = root / "base"
        base.mkdir()
        save_file({k: v.contiguous() for k, v in bench.base.items()}, str(base / "model.safetensors"))
        bench.encoder.config.to_json_file(str(base / "config.json"))
        models = {t: bench.folders[t] / "encoder.safetensors" for t in order}
        t0 = time.perf_counter()
        prev = root / "step-1"
        merge({"method": method, "base": str(base), "params": params,
               "models": [{"path": str(models[order[0]]), "name": order[0]}]}, prev)
        for k, t in enumerate(order[1:], 2):
            out = root / f"step-{k}"
            continual_merge(prev, models[t], out, name=t)
            shutil.rmtree(prev)
            prev = out
        seconds = time.perf_counter() - t0
        src = open_source(prev)
        state = {n: src.read(n).clone() for n in src.names()}
        del src
    return state, seconds


# -- metrics_weighted: checkpoints of one run ---------------------------------------------------------

def checkpoint_steps(total: int, k: int) -> list[int]:
    """k steps evenly spread over a run of `total` optimiser steps, the last one included."""
    k = min(k, total)
    return sorted({max(1, round(total * (i + 1) / k)) for i in range(k)})


def _load_checkpoints(folder: Path, steps: list[int]) -> tuple[dict[int, dict], dict] | None:
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("steps") != steps:
            return None
        return {s: load_file(str(folder / f"step-{s}.safetensors")) for s in steps}, meta
    except (OSError, ValueError, KeyError):
        return None


def _save_checkpoints(folder: Path, states: dict[int, dict], meta: dict) -> None:
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        for s, sd in states.items():
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / f"step-{s}.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    write_cache_entry(folder, fill)


AVERAGES = [  # (label, metrics_weighted params); p = 0 is the plain average
    ("uniform average", {"metric": "loss", "p": 0.0}),
    ("loss-weighted", {"metric": "loss", "p": 1.0}),
    ("loss-weighted", {"metric": "loss", "p": 2.0}),
    ("step-weighted", {"metric": "step", "p": 1.0}),
]


def checkpoint_study(bench: "TextBench") -> dict:
    """One task fine-tuned again (same seed and settings as its model in the table) keeping
    `checkpoints` classifiers (encoder + head) along the run; each checkpoint's validation loss
    weights it in metrics_weighted. Test accuracy of the last checkpoint and of each average."""
    from ..api import merge_state_dicts
    from ..methods.metrics_weighted import MetricsWeightedParams, metric_weights
    from ..procedures.search.tune import tune

    cfg = bench.cfg
    task = CHECKPOINT_TASK if CHECKPOINT_TASK in bench.tasks else next(iter(bench.tasks))
    d = bench.tasks[task]
    seed = bench.task_seed(task)
    steps = checkpoint_steps(training_steps(len(d.train), cfg), cfg.checkpoints)
    folder = bench.cache / f"{cache_key(bench.model_id, task, d.train, cfg, seed)}-checkpoints"
    hit = _load_checkpoints(folder, steps)
    if hit is None:
        bench.log(f"metrics_weighted: fine-tuning {task} again, keeping checkpoints at steps "
                  f"{', '.join(map(str, steps))}")
        states: dict[int, dict] = {}

        def keep(step: int, model: torch.nn.Module) -> None:
            if step in steps:
                states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        t0 = time.perf_counter()
        bench.encoder.load_state_dict(bench.base)
        fine_tune(bench.encoder, bench.tokenizer, d.train, d.num_labels, cfg, seed, on_step=keep)
        meta = {"task": task, "seed": seed, "steps": steps, "seconds": round(time.perf_counter() - t0, 1)}
        _save_checkpoints(folder, states, meta)
        cached = False
    else:
        states, meta = hit
        cached = True
        bench.log(f"metrics_weighted: checkpoints of {task} from the cache ({folder})")
    clf = Classifier(bench.encoder, d.num_labels)

    def evaluate(state: dict) -> dict[str, float]:
        clf.load_state_dict(state)
        bench.evals += 2
        return {"val_loss": mean_loss(clf, bench.val[task]), "val": accuracy(clf, bench.val[task]),
                "test": accuracy(clf, bench.test[task])}

    checkpoints = [{"step": s, **evaluate(states[s])} for s in steps]
    last = states[steps[-1]]
    individual_diff = max(float((last["encoder." + k] - v).abs().max()) for k, v in bench.finetuned[task].items())
    names = [f"step-{s}" for s in steps]
    model_params = [{"loss": c["val_loss"], "step": float(c["step"])} for c in checkpoints]
    rows = [{"label": "last checkpoint", "params": {}, "weights": [0.0] * (len(steps) - 1) + [1.0],
             "val": checkpoints[-1]["val"], "test": checkpoints[-1]["test"], "merge_seconds": None}]

    def average(values: dict) -> dict[str, float]:
        """One of AVERAGES merged and scored (its test accuracy too: the table shows every row)."""
        params = AVERAGES[values["average"]][1]
        t0 = time.perf_counter()
        merged = merge_state_dicts("metrics_weighted", dict(zip(names, (states[s] for s in steps))), params=params,
                                   model_params=model_params, seed=cfg.seed)
        secs = time.perf_counter() - t0
        return {**evaluate(merged), "merge_seconds": secs}

    # the choice on validation accuracy goes through the search's study loop (grid order, first best)
    result = tune({"average": {"search": list(range(len(AVERAGES)))}}, average, ["val:max"], sampler="grid",
                  stop_on_error=True)
    for trial in result.ordered():
        label, params = AVERAGES[trial["params"]["average"]]
        p = MetricsWeightedParams(**params)
        values = [c["val_loss"] if p.metric == "loss" else float(c["step"]) for c in checkpoints]
        r = trial["metrics"]
        rows.append({"label": label, "params": params, "weights": metric_weights(p, values, [1.0] * len(values)),
                     "val": r["val"], "test": r["test"], "merge_seconds": round(r["merge_seconds"], 3)})
    chosen = rows[1 + result.order.index(result.best["number"])]
    return {"task": task, "seed": seed, "steps": steps, "cached": cached, "fine_tune_seconds": meta.get("seconds"),
            "checkpoints": checkpoints, "rows": rows,
            "chosen_on_validation": {"label": chosen["label"], "params": chosen["params"], "test": chosen["test"]},
            "individual_test": bench_individual(bench, task),
            "last_checkpoint_max_abs_difference_from_individual": individual_diff}


def bench_individual(bench: "TextBench", task: str) -> float:
    """The task's model in the table (test accuracy), for comparison with its checkpoints."""
    bench.encoder.load_state_dict(bench.finetuned[task])
    bench.evals += 1
    return accuracy(bench.classifiers[task], bench.test[task])


def _weights(w: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in w)


def checkpoint_markdown(section: dict) -> str:
    """The metrics_weighted section: checkpoints, then the averages, test accuracy in %."""
    t = section["task"]
    lines = [f"Checkpoint averaging (metrics_weighted), {t}: one fine-tuning run (seed {section['seed']}), "
             f"{len(section['steps'])} checkpoints; weights from each checkpoint's validation loss or step.", "",
             "| checkpoint (step) | val loss | val acc | test acc |", "|---:|---:|---:|---:|"]
    for c in section["checkpoints"]:
        lines.append(f"| {c['step']} | {c['val_loss']:.3f} | {100 * c['val']:.1f} | {100 * c['test']:.1f} |")
    lines += ["", "| model | p | weights (by step) | val acc | test acc | merge s |", "|---|---:|---|---:|---:|---:|"]
    for r in section["rows"]:
        p = "" if not r["params"] else f"{r['params']['p']:g}"
        secs = "" if r["merge_seconds"] is None else f"{r['merge_seconds']:.1f}"
        lines.append(f"| {r['label']} | {p} | {_weights(r['weights'])} | {100 * r['val']:.1f} | "
                     f"{100 * r['test']:.1f} | {secs} |")
    c = section["chosen_on_validation"]
    diff = section["last_checkpoint_max_abs_difference_from_individual"]
    lines += ["", f"Chosen on validation: {c['label']} (p = {c['params']['p']:g}), test {100 * c['test']:.1f}; "
                  f"{t}'s model in the table: test {100 * section['individual_test']:.1f} (the last checkpoint's "
                  f"largest weight difference from it: {diff:.3g}).", ""]
    return "\n".join(lines)
