"""`modalmerge bench text`: merge sentence classifiers fine-tuned from one encoder (TIES / TALL protocol).

One model per task: the pretrained encoder (all-MiniLM-L6-v2 by default) fully fine-tuned with a
task head (mean pooling + linear). The encoders are merged through `merge_state_dicts` (the
streaming engine); each task keeps its own head. Decoupled methods (TALL, EMR, MMER) serve each
task with its own reconstructed encoder. Every method is evaluated at its no-validation default
and with its main hyperparameter chosen on the validation splits (a grid run through the search's
study loop, procedures/search/tune.py); test accuracy is reported.
Fine-tuned models are cached, so a re-run only merges and evaluates.

Methods that need more than the fine-tuned models (calibration statistics, the optimiser's second
moments, continual merging, checkpoints of one run) get what they need from bench/text_methods.py;
the classifier, its fine-tuning and evaluation, which both use, are in bench/text_classifier.py.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import MergeError
from . import sentconv, text_methods, write_cache_entry
from .text_classifier import (Classifier, TextBenchConfig, accuracy, batches, cache_key, default_cache,
                              default_model_path, fine_tune, load_encoder, model_identity)

# A method's default row is its own defaults; `grid` lists the settings tried on validation (the
# main hyperparameter); `per_task` names a per-model parameter that decoupled methods choose for
# each task on that task's validation split (TALL's λ_t, as in the paper).
GRIDS: dict[str, dict[str, Any]] = {
    "linear": {},
    "task_arithmetic": {"grid": {"lambda": [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]}},
    "ties": {"grid": {"density": [0.1, 0.2, 0.5], "lambda": [0.8, 1.0, 1.5]}},
    "dare_linear": {"grid": {"lambda": [0.2, 0.3, 0.5, 0.7, 1.0]}},
    "dare_ties": {"grid": {"lambda": [0.7, 1.0, 1.5]}},
    "della": {"grid": {"lambda": [0.7, 1.0, 1.5]}},
    "della_linear": {"grid": {"lambda": [0.2, 0.3, 0.5, 0.7, 1.0]}},
    "breadcrumbs": {"grid": {"lambda": [0.2, 0.3, 0.4, 0.5, 0.7, 1.0]}},
    "model_stock": {},
    "slerp": {},
    "tall": {"per_task": {"lambda": [0.2, 0.3, 0.4, 0.5, 0.6]}},
    "consensus": {"grid": {"alpha": [0.2, 0.3, 0.4, 0.5, 0.7, 1.0]}},
    "emr": {},
    "neuromerging": {"grid": {"lambda1": [0.0, 1.0], "lambda2": [1.0, 1.5, 2.0, 3.0]}},
    "mmer": {"per_task": {"lambda": [0.6, 0.8, 1.0, 1.2]}},
    # data-aware (statistics from each task's own training texts) and continual merging
    "fisher": {"grid": {"normalize_fisher": [False, True]}},
    "regmean": {"grid": {"alpha": [0.1, 0.5, 0.9, 0.95]}},
    "ota": {"grid": {"density": [0.1, 0.2, 0.5, 1.0]}},
    "opcm": {"grid": {"alpha": [0.3, 0.5, 0.7, 0.9]}},
    "adamerging": {},  # unsupervised; its defaults are the paper's
}
# Tried after the table above, at their defaults, when the registry has them and they accept the inputs.
# quick mode (CI, ~2 minutes with fine-tuning on 2 cores): the methods the papers' ordering is about
QUICK_METHODS = ["task_arithmetic", "ties", "tall", "emr", "neuromerging", "mmer"]
# quick mode's "default" row of a method whose defaults cost minutes (said in the row's params)
QUICK_DEFAULTS: dict[str, dict[str, Any]] = {"adamerging": {"steps": 50}}
# the validation choice: a later setting must beat the best so far by more than this (ties: the first)
TIE = 1e-12


# AdamW's second moments of the encoder's parameters at the end of fine-tuning (OTA's input). Entries
# cached before they were kept lack this file: they are fine-tuned again (same seed, so the same
# model on the same machine) only when a method that needs the moments is run; the key stays v1.
MOMENTS_FILE = "optimizer_exp_avg_sq.safetensors"


def _save(folder: Path, model: Classifier, meta: dict, moments: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, str(tmp / "encoder.safetensors"))
        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(tmp / "head.safetensors"))
        if moments:
            save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp / MOMENTS_FILE))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    write_cache_entry(folder, fill)


def _load(folder: Path) -> tuple[dict, dict, dict, dict | None] | None:
    """(encoder, head, meta, second moments or None) of a cache entry, or None."""
    from safetensors.torch import load_file

    try:
        moments = load_file(str(folder / MOMENTS_FILE)) if (folder / MOMENTS_FILE).is_file() else None
        return (load_file(str(folder / "encoder.safetensors")), load_file(str(folder / "head.safetensors")),
                json.loads((folder / "meta.json").read_text()), moments)
    except (OSError, ValueError, KeyError):
        return None


# -- decoupled reconstruction ----------------------------------------------------------------------

def decoupled_task_state(merged: dict[str, torch.Tensor], sink, task: str) -> dict[str, torch.Tensor]:
    """Task's own model from a decoupled merge: θ_text + (c_t − c̄) ⊙ shared, c_t = scalar_t · mask_t."""
    from ..ops import unpack_bits

    manifest = sink.manifest
    tasks = [(t["name"], float(t.get("scalar", 1.0))) for t in manifest["tasks"]]
    names = [n for n, _ in tasks]
    if task not in names:
        raise MergeError(f"decoupled merge has no task {task!r}; its tasks are {', '.join(names)}")
    i = names.index(task)
    key = manifest.get("mask_key", "{task}::{tensor}")
    out = dict(merged)
    for name in manifest["tensors"]:
        shape = merged[name].shape
        c = torch.stack([s * unpack_bits(sink.masks[key.format(task=n, tensor=name)], shape).to(torch.float32)
                         for n, s in tasks])
        value = merged[name].to(torch.float32) + (c[i] - c.mean(dim=0)) * sink.shared[name].to(torch.float32)
        out[name] = value.to(merged[name].dtype)
    return out


# -- the benchmark ---------------------------------------------------------------------------------

class TextBench:
    def __init__(self, cfg: TextBenchConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.model_path = cfg.model or default_model_path()
        self.cache = Path(cfg.cache) if cfg.cache else default_cache()
        self.evals = 0
        # data-aware methods' per-model statistics, computed once per run, with their cost and summary
        self._statistics: dict[tuple[str, str], list[dict[str, torch.Tensor]]] = {}
        self.data_seconds: dict[str, float] = {}
        self.data_info: dict[str, list[dict]] = {}

    # data ------------------------------------------------------------------------------------
    def load_data(self) -> None:
        cfg = self.cfg
        folder = sentconv.sentconv_dir(cfg.data_dir or sentconv.default_data_dir())
        self.data_folder = folder
        self.checksums = sentconv.check_files(folder, cfg.tasks)
        self.tasks: dict[str, sentconv.TaskData] = {}
        self.splits: dict[str, dict] = {}
        for t in cfg.tasks:
            d = sentconv.load_task(folder, t, cfg.seed)
            train = sentconv.subsample(d.train, cfg.train_examples, cfg.seed, f"{t}/train")
            val = sentconv.subsample(d.val, cfg.val_examples, cfg.seed, f"{t}/val-eval")
            test = sentconv.subsample(d.test, cfg.test_examples, cfg.seed, f"{t}/test-eval")
            self.tasks[t] = sentconv.TaskData(t, d.num_labels, train, val, test, d.provenance)
            self.splits[t] = {"available": d.sizes(), "used": {"train": len(train), "val": len(val),
                                                               "test": len(test)},
                              "num_labels": d.num_labels, "provenance": d.provenance}

    # models ----------------------------------------------------------------------------------
    def prepare_models(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.encoder, self.tokenizer = load_encoder(self.model_path)
        self.base = {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
        self.model_id = model_identity(self.model_path)
        self.val = {t: batches(self.tokenizer, d.val, cfg.max_length, 128, sort=True) for t, d in self.tasks.items()}
        self.test = {t: batches(self.tokenizer, d.test, cfg.max_length, 128, sort=True) for t, d in self.tasks.items()}
        self.finetuned: dict[str, dict[str, torch.Tensor]] = {}
        self.heads: dict[str, dict[str, torch.Tensor]] = {}
        self.moments: dict[str, dict[str, torch.Tensor] | None] = {}
        self.folders: dict[str, Path] = {}
        self.training: dict[str, dict] = {}
        need_moments = self.needs_moments()
        for t, d in self.tasks.items():
            seed = self.task_seed(t)
            folder = self.cache / cache_key(self.model_id, t, d.train, cfg, seed)
            self.folders[t] = folder
            hit = _load(folder) if folder.is_dir() else None
            refit = hit is not None and hit[3] is None and need_moments
            if hit is None or refit:
                why = " (again: its cached model has no optimiser second moments, which ota needs)" if refit else ""
                self.log(f"fine-tuning {t} on {len(d.train)} examples ({cfg.epochs} epoch(s), lr {cfg.lr}){why}")
                s = time.perf_counter()
                self.encoder.load_state_dict(self.base)
                moments: dict[str, torch.Tensor] = {}
                model = fine_tune(self.encoder, self.tokenizer, d.train, d.num_labels, cfg, seed, moments=moments)
                meta = {"task": t, "seconds": round(time.perf_counter() - s, 1), "seed": seed,
                        "train_examples": len(d.train), "epochs": cfg.epochs, "lr": cfg.lr, "model": self.model_path}
                enc = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
                head = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
                if refit:
                    # the moments must belong to the encoder that is merged: the entry is replaced whole;
                    # say how far the new fine-tune is from the one it replaces (0 when reproducible)
                    diff = max(float((enc[k] - v).abs().max()) for k, v in hit[0].items())
                    meta["replaced_cached_model"] = {"reason": "no optimiser second moments",
                                                     "max_abs_weight_difference": diff}
                    self.log(f"{t}: largest weight difference from the cached fine-tune it replaces: {diff:.3g}")
                _save(folder, model, meta, moments)
                meta["cached"] = False
            else:
                enc, head, meta, moments = hit
                meta["cached"] = True
                self.log(f"{t}: fine-tuned model from the cache ({folder})")
            self.finetuned[t], self.heads[t], self.moments[t], self.training[t] = enc, head, moments, meta
        self.encoder.load_state_dict(self.base)
        self.classifiers = {t: Classifier(self.encoder, self.tasks[t].num_labels) for t in self.tasks}
        for t, c in self.classifiers.items():
            c.head.load_state_dict(self.heads[t])
        self.prepare_seconds = time.perf_counter() - t0

    def task_seed(self, task: str) -> int:
        return self.cfg.seed * 100 + list(self.tasks).index(task)

    def needs_moments(self) -> bool:
        from ..methods.registry import METHODS

        return any("exp_avg_sq" in METHODS[m].data(METHODS[m].parse_params({})) for m in self.methods())

    def _eval(self, state: dict[str, torch.Tensor], task: str, split: str) -> float:
        self.encoder.load_state_dict(state)
        self.evals += 1
        return accuracy(self.classifiers[task], (self.val if split == "val" else self.test)[task])

    def eval_all(self, states: dict[str, dict[str, torch.Tensor]] | dict[str, torch.Tensor], split: str) -> dict[str, float]:
        """Accuracy per task; `states` is one state dict for all tasks or {task: state dict}."""
        per_task = isinstance(next(iter(states.values())), dict)
        return {t: self._eval(states[t] if per_task else states, t, split) for t in self.tasks}

    # merging ---------------------------------------------------------------------------------
    def merge(self, method: str, params: dict, model_params: list[dict] | None = None,
              order: list[str] | None = None):
        """(states for evaluation, seconds): one state dict, or {task: state} for a decoupled method.

        A data-aware method gets its per-model statistics (computed once, not counted in the
        seconds); a sequential one (OPCM) adds the models one at a time in `order` (default: the
        tasks' order)."""
        from ..api import merge_state_dicts
        from ..methods.registry import get_method

        m = get_method(method)
        if m.sequential:
            return text_methods.continual(self, method, params, order or list(self.tasks))
        data = {kind: self.statistics(kind, method, params) for kind in m.data(m.parse_params(params))}
        decoupled = m.decoupled
        t0 = time.perf_counter()
        # a method that takes no base (SLERP) merges the fine-tuned models alone
        base = None if m.base == "forbidden" else self.base
        result = merge_state_dicts(method, dict(self.finetuned), base=base, params=params,
                                   model_params=model_params, seed=self.cfg.seed, return_decoupled=decoupled,
                                   data=data or None)
        seconds = time.perf_counter() - t0
        if decoupled:
            merged, sink = result
            return {t: decoupled_task_state(merged, sink, t) for t in self.tasks}, seconds
        return result, seconds

    def statistics(self, kind: str, method: str, params: dict) -> list[dict[str, torch.Tensor]]:
        """Per-model statistics of one kind, in the tasks' order, computed once per run (AdaMerging's
        coefficients once per setting); their cost goes to self.data_seconds[method]."""
        key = (kind, json.dumps(params, sort_keys=True) if kind == "adamerging" else "")
        if key not in self._statistics:
            t0 = time.perf_counter()
            stats, info = text_methods.statistics(self, kind, method, params)
            self.data_seconds[method] = self.data_seconds.get(method, 0.0) + time.perf_counter() - t0
            if info not in self.data_info.setdefault(method, []):
                self.data_info[method].append(info)
            if kind == "exp_avg_sq":  # kept by the fine-tunes already: nothing to compute again
                return stats
            self._statistics[key] = stats
        return self._statistics[key]

    def distance(self, states) -> float:
        """L2 distance of the merged encoder from the base (mean over tasks for per-task models)."""
        def one(sd):
            return float(sum(float((sd[k].float() - v.float()).pow(2).sum()) for k, v in self.base.items()) ** 0.5)
        if isinstance(next(iter(states.values())), dict):
            return sum(one(sd) for sd in states.values()) / len(states)
        return one(states)

    def methods(self) -> list[str]:
        from ..methods.registry import METHODS

        if self.cfg.methods:
            names = self.cfg.methods
        elif self.cfg.quick:
            names = [m for m in QUICK_METHODS if m in METHODS]
        else:
            names = [m for m in METHODS if m in GRIDS] + [m for m in METHODS if m not in GRIDS]
        usable = []
        for name in names:
            if name not in METHODS:
                raise MergeError(f"unknown method {name!r}; `modalmerge methods` lists them: {', '.join(METHODS)}")
            m = METHODS[name]
            n = len(self.tasks)
            if n < m.min_models or (m.max_models is not None and n > m.max_models):
                if self.cfg.methods:
                    raise MergeError(f"method {name} cannot merge {n} fine-tuned models; choose another method "
                                     "or number of tasks")
                continue
            usable.append(name)
        return usable

    def _shrink(self, values: list) -> list:
        """Quick mode tries the ends and the middle of each list only."""
        if not self.cfg.quick or len(values) <= 2:
            return list(values)
        return [values[0], values[len(values) // 2]] if len(values) > 3 else [values[0], values[-1]]

    def tune(self, name: str, grid: dict[str, list]):
        """Every setting of the grid merged and scored on the validation splits, through the
        search's study loop (procedures/search/tune.py, grid sampler: grid order, first best)."""
        from ..procedures.search.tune import tune

        def score(params: dict) -> dict[str, float]:
            states, secs = self.merge(name, params)
            val = self.eval_all(states, "val")
            return {"val_avg": sum(val.values()) / len(val), **{f"val/{t}": a for t, a in val.items()},
                    "merge_seconds": secs}

        return tune({k: {"search": v} for k, v in grid.items()}, score, ["val_avg:max"], sampler="grid",
                    tolerance=TIE, stop_on_error=True)

    def run_method(self, name: str) -> dict:
        """Default row, and the validation-chosen row, of one method."""
        spec = GRIDS.get(name, {})
        out: dict[str, Any] = {"method": name}
        params = dict(QUICK_DEFAULTS.get(name, {})) if self.cfg.quick else {}
        states, secs = self.merge(name, params)
        default = {"params": params, "test": self.eval_all(states, "test"), "merge_seconds": round(secs, 3),
                   "distance_from_base": self.distance(states)}
        out["default"] = default
        if not self.cfg.tune or not (spec.get("grid") or spec.get("per_task")):
            return out
        if "grid" in spec:
            result = self.tune(name, {k: self._shrink(v) for k, v in spec["grid"].items()})
            chosen = result.best["params"]
            states, secs = self.merge(name, chosen)
        else:
            (key, values), = spec["per_task"].items()
            from ..methods.registry import METHODS
            if key not in getattr(METHODS[name].params, "per_model", ()):
                return out
            # one trial per value, every task's validation accuracy recorded; each task takes its own best
            result = self.tune(name, {key: self._shrink(values)})
            per_task = {t: result.best_by(f"val/{t}", tolerance=TIE)["params"][key] for t in self.tasks}
            chosen = {key: per_task}
            states, secs = self.merge(name, {}, model_params=[{key: per_task[t]} for t in self.tasks])
        tried = [{"params": r["params"], "val": {t: r["metrics"][f"val/{t}"] for t in self.tasks},
                  "val_avg": r["metrics"]["val_avg"], "merge_seconds": round(r["metrics"]["merge_seconds"], 3)}
                 for r in result.ordered()]
        out["tuned"] = {"params": chosen, "test": self.eval_all(states, "test"), "merge_seconds": round(secs, 3),
                        "distance_from_base": self.distance(states)}
        out["grid"] = tried
        return out

    def run_method_all(self, name: str) -> dict:
        """run_method, plus what only some methods have: the seconds spent on statistics, and for a
        sequential method the same merge with the tasks added in the reverse order."""
        from ..methods.registry import METHODS

        out = self.run_method(name)
        if METHODS[name].sequential:
            order = list(reversed(self.tasks))
            states, secs = self.merge(name, {}, order=order)
            out["default"]["order"] = list(self.tasks)
            out["reversed_order"] = {"order": order, "params": {}, "test": self.eval_all(states, "test"),
                                     "merge_seconds": round(secs, 3), "distance_from_base": self.distance(states)}
        if name in self.data_seconds:
            out["statistics_seconds"] = round(self.data_seconds[name], 1)
            out["statistics"] = self.data_info[name]
        self._statistics.clear()  # another method does not use them: free the memory
        return out

    def run(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        started = time.perf_counter()
        self.load_data()
        self.prepare_models()
        self.log(f"models ready in {self.prepare_seconds:.0f} s; evaluating")
        individual = {t: self._eval(self.finetuned[t], t, "test") for t in self.tasks}
        individual_val = {t: self._eval(self.finetuned[t], t, "val") for t in self.tasks}
        base_heads = self.eval_all(self.base, "test")
        results = []
        skipped = {}
        checkpoint_averaging = None
        for name in self.methods():
            s = time.perf_counter()
            try:
                if name == "metrics_weighted":
                    # checkpoints of one run, not a merge of the tasks' models: its own section
                    checkpoint_averaging = text_methods.checkpoint_study(self)
                else:
                    r = self.run_method_all(name)
            except MergeError as e:
                skipped[name] = str(e)
                self.log(f"{name}: skipped ({e})")
                continue
            if name == "metrics_weighted":
                self.log(text_methods.checkpoint_markdown(checkpoint_averaging)
                         + f"[{time.perf_counter() - s:.0f} s]")
                continue
            r["seconds_total"] = round(time.perf_counter() - s, 1)
            results.append(r)
            d = r["default"]["test"]
            msg = f"{name}: default avg {100 * sum(d.values()) / len(d):.1f}"
            if "tuned" in r:
                tt = r["tuned"]["test"]
                msg += f", tuned avg {100 * sum(tt.values()) / len(tt):.1f} ({r['tuned']['params']})"
            self.log(msg + f" [{r['seconds_total']:.0f} s]")
        return {
            "benchmark": "text",
            "seed": cfg.seed,
            "config": asdict(cfg),
            "model": self.model_path,
            "data": {"folder": str(self.data_folder), "checksums": self.checksums, "splits": self.splits,
                     "source": sentconv.SOURCE},
            "tasks": list(self.tasks),
            "training": self.training,
            "individual": individual,
            "individual_distance_from_base": {t: self.distance(self.finetuned[t]) for t in self.tasks},
            "individual_val": individual_val,
            "base_with_heads": base_heads,
            "methods": results,
            **({"checkpoint_averaging": checkpoint_averaging} if checkpoint_averaging is not None else {}),
            "skipped": skipped,
            "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "python": platform.python_version(), "machine": platform.machine()},
            "evaluations": self.evals,
            "seconds": round(time.perf_counter() - started, 1),
        }


def run_text_bench(cfg: TextBenchConfig, log: Callable[[str], None] = print) -> dict:
    return TextBench(cfg, log).run()
