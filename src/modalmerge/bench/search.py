"""`modalmerge bench search`: how fast a search runs its trials with 1, 2 and 4 workers, and the
memory its workers hold.

The inputs are a Llama-shaped causal LM built here (a random base and fine-tunes that perturb
it, float32, with a word-level tokenizer) and a validation text; the recipe searches task
arithmetic's λ. Each worker count runs the same number of trials (random sampler, no pruning, so
every trial does the same work) on a local Ray instance, plus one row in this process (the
default for --workers 1). For each: the time until every worker is ready (Ray and each worker's
TrialContext), trials per minute once they run, and, while the workers still hold their
contexts, each worker process's RSS, USS and PSS (psutil). The inputs are read per trial with
positioned reads from the operating system's page cache, which every process on the machine
shares: a worker holds its model skeleton and the evaluation data, never a copy of the inputs,
so the workers' summed PSS is compared against the inputs' size × workers.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from ..procedures.search.procedure import search
from ..procedures.search.ray_runner import RayRunner
from ..procedures.search.runners import LocalRunner
from ..procedures.search.trial import PruneRule, SearchSpec, TrialResult
from ..units import human_bytes
from . import write_cache_entry


@dataclass(frozen=True)
class SearchShape:
    """The benchmark's model and workload."""

    hidden: int = 512
    layers: int = 8
    intermediate: int = 1408
    vocab: int = 8192
    models: int = 2          # fine-tunes besides the base
    lines: int = 8           # validation lines
    words: int = 32          # words per line
    trials: int = 16         # per worker count

    def key(self) -> str:
        return f"h{self.hidden}-l{self.layers}-i{self.intermediate}-v{self.vocab}-m{self.models}"


QUICK = SearchShape(hidden=64, layers=2, intermediate=128, vocab=512, models=2, lines=4, words=16, trials=4)
WORKERS = (1, 2, 4)


def build_inputs(shape: SearchShape, cache: Path) -> Path:
    """The base, the fine-tunes, the validation text and the recipe, built once into the cache."""
    folder = cache / f"search-{shape.key()}"
    if (folder / "recipe.yaml").exists():
        return folder

    def fill(tmp: Path) -> None:
        import torch
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(shape.vocab - 4)]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                            eos_token="</s>", pad_token="<pad>")
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                             num_hidden_layers=shape.layers, num_attention_heads=max(1, shape.hidden // 64),
                             num_key_value_heads=max(1, shape.hidden // 128), vocab_size=shape.vocab,
                             max_position_embeddings=max(64, shape.words + 8), tie_word_embeddings=False)
        base = LlamaForCausalLM(config).eval()
        names = ["base"] + [f"ft{i}" for i in range(shape.models)]
        for i, name in enumerate(names):
            model = base
            if i:
                g = torch.Generator().manual_seed(i)
                model = LlamaForCausalLM(config).eval()
                with torch.no_grad():
                    for p, q in zip(model.parameters(), base.parameters()):
                        p.copy_(q + 0.02 * torch.randn(q.shape, generator=g))
            model.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
        g = torch.Generator().manual_seed(0)
        lines = [" ".join(f"w{int(i)}" for i in torch.randint(0, shape.vocab - 4, (shape.words,), generator=g))
                 for _ in range(shape.lines)]
        (tmp / "valid.txt").write_text("\n".join(lines) + "\n")
        recipe = {"method": "task_arithmetic", "base": "base", "models": [{"path": n} for n in names[1:]],
                  "params": {"lambda": {"search": {"uniform": [0.2, 1.2]}}}}
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    write_cache_entry(folder, fill)
    return folder


def input_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*/*.safetensors"))


def process_memory(pids: list[int]) -> list[dict[str, int]]:
    """RSS, USS and PSS of each process (bytes)."""
    import psutil

    out = []
    for pid in pids:
        m = psutil.Process(pid).memory_full_info()
        out.append({"pid": pid, "rss": m.rss, "uss": m.uss, "pss": m.pss})
    return out


class MeasuredRunner:
    """A runner around another that times its phases and, before it closes, measures the memory of
    its worker processes (they still hold their contexts then)."""

    def __init__(self, inner, pids: Callable[[], list[int]]):
        self.inner, self.pids = inner, pids
        self.capacity = inner.capacity
        self.ready_s = 0.0
        self.first_submit: float | None = None
        self.last_result = 0.0
        self.results: list[TrialResult] = []
        self.memory: list[dict[str, int]] = []

    def start(self, spec: SearchSpec) -> None:
        t = time.perf_counter()
        self.inner.start(spec)
        self.ready_s = time.perf_counter() - t

    def submit(self, number: int, params: dict[str, Any], prune: PruneRule | None = None) -> None:
        if self.first_submit is None:
            self.first_submit = time.perf_counter()
        self.inner.submit(number, params, prune)

    def wait_any(self) -> tuple[int, TrialResult]:
        number, result = self.inner.wait_any()
        self.last_result = time.perf_counter()
        self.results.append(result)
        return number, result

    def close(self) -> None:
        try:
            if not self.memory and self.results:
                self.memory = process_memory(self.pids())
        finally:
            self.inner.close()


def run_search_bench(shape: SearchShape, cache: Path, workers: tuple[int, ...] = WORKERS,
                     threads: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Each row: a search of shape.trials trials with that many workers (see the module docstring);
    each search's output (the best merge) goes to a temporary folder, removed after its row."""
    import tempfile

    folder = build_inputs(shape, cache)
    rows = []
    for label, count in [("in process", 1)] + [("ray", w) for w in workers]:
        if label == "in process":
            runner = MeasuredRunner(LocalRunner(), lambda: [os.getpid()])
        else:
            ray_runner = RayRunner(count, None, threads)
            runner = MeasuredRunner(ray_runner, ray_runner.worker_pids)
        log(f"{label}, {count} worker(s): {shape.trials} trials ...")
        with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
            search(folder / "recipe.yaml", [f"perplexity:{folder / 'valid.txt'}"], Path(tmp) / "out",
                   trials=shape.trials, sampler="random", prune=False, runner=runner, threads=threads)
        trial_s = runner.last_result - (runner.first_submit or runner.last_result)
        ok = sum(r.status == "ok" for r in runner.results)
        pss = sum(m["pss"] for m in runner.memory)
        rows.append({"runner": label, "workers": count, "trials": len(runner.results), "ok": ok,
                     "ready_s": round(runner.ready_s, 2), "trials_s": round(trial_s, 2),
                     "trials_per_minute": round(60 * len(runner.results) / trial_s, 1) if trial_s else None,
                     "mean_trial_s": round(sum(r.seconds for r in runner.results) / max(1, len(runner.results)), 3),
                     "workers_pss": pss, "workers_rss": sum(m["rss"] for m in runner.memory),
                     "per_worker": runner.memory,
                     "nodes": sorted({r.node for r in runner.results}),
                     "worker_ids": sorted({r.worker for r in runner.results})})
        log(table_row(rows[-1], input_bytes(folder)))
    return {"shape": asdict(shape), "inputs_bytes": input_bytes(folder), "cpus": os.cpu_count(), "rows": rows}


def table_row(row: dict[str, Any], inputs: int) -> str:
    pss = row["workers_pss"]
    per = [human_bytes(m["pss"]) for m in row["per_worker"]]
    return (f"| {row['runner']} | {row['workers']} | {row['trials']} ({row['ok']} ok) | {row['ready_s']:.1f} | "
            f"{row['trials_per_minute']} | {row['mean_trial_s']:.2f} | {human_bytes(pss)} ({', '.join(per)}) | "
            f"{human_bytes(inputs * row['workers'])} |")


def markdown(result: dict[str, Any]) -> str:
    s = result["shape"]
    lines = [f"Inputs: a Llama-shaped base and {s['models']} fine-tunes (hidden {s['hidden']}, {s['layers']} layers, "
             f"MLP {s['intermediate']}, vocabulary {s['vocab']}, float32): {human_bytes(result['inputs_bytes'])} "
             f"of safetensors; {s['trials']} trials per row (task arithmetic's λ, random sampler, no pruning), "
             f"perplexity on {s['lines']} lines of {s['words']} words; {result['cpus']} CPU cores.", "",
             "| runner | workers | trials | ready (s) | trials / min | mean trial (s) | workers' PSS (each) | "
             "inputs × workers |", "|---|---|---|---|---|---|---|---|"]
    lines += [table_row(r, result["inputs_bytes"]) for r in result["rows"]]
    return "\n".join(lines) + "\n"
