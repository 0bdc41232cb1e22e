"""The search's library entry (procedures/search/tune.py): the study loop on an in-process objective,
as the benchmarks' validation rows use it."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("optuna")

from modalmerge.errors import MergeError  # noqa: E402
from modalmerge.procedures.search.study import choose  # noqa: E402
from modalmerge.procedures.search.tune import tune  # noqa: E402


def test_grid_runs_every_point_in_grid_order_and_picks_the_first_best():
    seen = []
    scores = {(0.1, 0.8): 0.5, (0.1, 1.0): 0.7, (0.5, 0.8): 0.7, (0.5, 1.0): 0.2}

    def objective(values):
        seen.append((values["density"], values["lambda"]))
        return {"val_avg": scores[seen[-1]], "merge_seconds": 0.01}

    space = {"density": {"search": [0.1, 0.5]}, "lambda": {"search": [0.8, 1.0]}}
    result = tune(space, objective, ["val_avg:max"], sampler="grid")
    # every point once; in grid order the first marked value varies slowest, as nested loops would
    grid = [(0.1, 0.8), (0.1, 1.0), (0.5, 0.8), (0.5, 1.0)]
    assert sorted(seen) == grid and len(result.trials) == 4
    assert [t["params"] for t in result.ordered()] == [{"density": d, "lambda": x} for d, x in grid]
    # two settings tie at 0.7: the first in grid order is chosen, as the benchmarks' loops chose
    assert result.best["params"] == {"density": 0.1, "lambda": 1.0}
    assert result.best["metrics"] == {"val_avg": 0.7, "merge_seconds": 0.01}
    assert all(t["status"] == "ok" and t["worker"] == "in-process" for t in result.trials)
    # a later setting better by no more than the tolerance does not replace the first
    scores[(0.5, 0.8)] = 0.7 + 1e-15
    seen.clear()
    assert tune(space, objective, ["val_avg:max"], tolerance=1e-12).best["params"] == {"density": 0.1, "lambda": 1.0}
    assert tune(space, objective, ["val_avg:max"]).best["params"] == {"density": 0.5, "lambda": 0.8}


def test_per_task_choice_from_the_trial_records():
    """TALL's λ_t: one trial per λ records every task's validation accuracy; each task takes its own best."""
    accuracy = {0.2: {"sst2": 0.80, "trec": 0.30}, 0.4: {"sst2": 0.70, "trec": 0.60},
                0.6: {"sst2": 0.80, "trec": 0.60}}

    def objective(values):
        per = accuracy[values["lambda"]]
        return {"val_avg": sum(per.values()) / 2, **{f"val/{t}": a for t, a in per.items()}}

    result = tune({"lambda": {"search": [0.2, 0.4, 0.6]}}, objective, ["val_avg:max"])
    assert len(result.trials) == 3 and result.best["params"] == {"lambda": 0.6}
    # the first best of each task's own metric (text bench's rule) ...
    assert {t: result.best_by(f"val/{t}")["params"]["lambda"] for t in ("sst2", "trec")} == {"sst2": 0.2, "trec": 0.4}
    # ... or, among equal accuracies, the one a preference ranks higher (mllm bench: nearest 0.6)
    near = {t: result.best_by(f"val/{t}", prefer=lambda p: -abs(p["lambda"] - 0.6))["params"]["lambda"]
            for t in ("sst2", "trec")}
    assert near == {"sst2": 0.6, "trec": 0.6}
    assert result.best_by("val/trec", "minimize")["params"] == {"lambda": 0.2}


def test_choices_may_be_whole_settings_and_failed_trials_are_recorded(tmp_path):
    grid = [{"density": 0.2, "lambda": 0.7}, {"density": 0.2, "lambda": 1.0}, {"density": 0.5, "lambda": 1.0}]

    def objective(values):
        setting = values["params"]
        if setting["density"] == 0.5:
            raise MergeError("density 0.5: no")
        return {"score": setting["lambda"]} if setting["lambda"] < 1 else {"score": float("nan")}

    result = tune({"params": {"search": grid}}, objective, ["score:max"], report=tmp_path / "report")
    assert [t["status"] for t in result.ordered()] == ["ok", "failed", "failed"]
    assert result.best["params"] == {"params": grid[0]}
    errors = [t["error"] for t in result.ordered()]
    assert "not a finite number" in errors[1] and errors[2] == "density 0.5: no"
    listing = json.loads((tmp_path / "report" / "trials.json").read_text())
    assert listing["best"] == result.best["number"] and len(listing["trials"]) == 3
    assert (tmp_path / "report" / "trials.md").exists()
    # stop_on_error: the objective's exception reaches the caller as it was raised
    with pytest.raises(MergeError, match="density 0.5"):
        tune({"params": {"search": grid[2:]}}, objective, ["score:max"], stop_on_error=True)


def test_random_and_tpe_with_a_journal_resume(tmp_path):
    journal = tmp_path / "journal.log"
    calls = []

    def objective(values):
        calls.append(values["w"])
        return {"loss": (values["w"] - 0.3) ** 2}

    space = {"w": {"search": {"uniform": [0.0, 1.0]}}}
    first = tune(space, objective, ["loss:min"], sampler="tpe", trials=4, seed=3, journal=journal)
    assert len(first.trials) == 4 and first.best["metrics"]["loss"] == min(t["metrics"]["loss"] for t in first.trials)
    again = tune(space, objective, ["loss:min"], sampler="tpe", trials=6, seed=3, journal=journal)
    assert again.resumed == 4 and len(again.trials) == 6 and len(calls) == 6
    with pytest.raises(MergeError, match="journal of another search"):
        tune(space, objective, ["loss:min"], sampler="random", trials=6, seed=3, journal=journal)
    with pytest.raises(MergeError, match="how many trials"):
        tune(space, objective, ["loss:min"], sampler="random")
    with pytest.raises(MergeError, match="grid sampler needs every searched value to be a choice"):
        tune(space, objective, ["loss:min"])
    with pytest.raises(MergeError, match="NAME:max"):
        tune(space, objective, ["loss"], sampler="random", trials=1)


def test_choose_skips_trials_that_did_not_complete():
    trials = [{"number": 0, "status": "failed", "params": {}, "metrics": {}},
              {"number": 1, "status": "pruned", "params": {}, "metrics": {"m": 9.0}},
              {"number": 2, "status": "ok", "params": {}, "metrics": {"m": 1.0}}]
    assert choose(trials, "m")["number"] == 2
    assert choose(trials[:2], "m") is None


# -- the benchmark tasks as a search's evaluator (bench/text_eval.py) ------------------------------

import test_bench_text  # noqa: E402
from bench_search import check_grid_search_scores  # noqa: E402
from shared_data import DATA, needs_data  # noqa: E402

tiny_bert = test_bench_text.tiny_bert  # the fixture: a tiny BERT folder with MiniLM's tokenizer


@pytest.mark.slow
@needs_data
def test_bench_text_evaluator_scores_as_the_benchmark_s_validation_rows(tiny_bert, tmp_path, monkeypatch):
    """Two fine-tunes as bench text caches them (encoder + head); a search over task arithmetic's λ
    scored by --eval bench-text gives, per trial, the benchmark's own validation accuracies."""
    import torch
    from safetensors.torch import save_file

    from modalmerge.bench.text import TextBench
    from modalmerge.bench.text_classifier import TextBenchConfig, cache_key, load_encoder, model_identity

    monkeypatch.setenv("MODALMERGE_DATA", str(DATA))
    torch.set_num_threads(1)
    cfg = TextBenchConfig.quick_preset(model=str(tiny_bert), data_dir=str(DATA), cache=str(tmp_path / "cache"))
    bench = TextBench(cfg, log=lambda message: None)
    bench.load_data()
    encoder, _ = load_encoder(str(tiny_bert))
    base = encoder.state_dict()
    folders = {}
    for i, (task, data) in enumerate(bench.tasks.items()):  # "fine-tunes": the base moved at random
        gen = torch.Generator().manual_seed(i)
        folder = bench.cache / cache_key(model_identity(str(tiny_bert)), task, data.train, cfg, bench.task_seed(task))
        folder.mkdir(parents=True)
        save_file({k: (v + 0.05 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in base.items()},
                  str(folder / "encoder.safetensors"))
        head = torch.nn.Linear(base["embeddings.word_embeddings.weight"].shape[1], data.num_labels)
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(folder / "head.safetensors"))
        (folder / "meta.json").write_text("{}")
        folders[task] = folder
    bench.prepare_models()  # reads those folders: nothing is fine-tuned
    expected = {x: bench.eval_all(bench.merge("task_arithmetic", {"lambda": x})[0], "val") for x in (0.3, 1.0)}

    spec = "bench-text:" + ",".join(f"{t}={f}" for t, f in folders.items()) + f",val={cfg.val_examples}"
    check_grid_search_scores(tmp_path, str(tiny_bert), {t: str(f / "encoder.safetensors") for t, f in folders.items()},
                             spec, expected)


def test_bench_text_evaluator_bad_specs_are_one_line_errors():
    from modalmerge.bench.text_eval import EVALUATORS
    from modalmerge.procedures.search.evaluators import parse_eval

    for text, message in [("bench-text:", "name a task"), ("bench-text:nope=x", "unknown task 'nope'"),
                          ("bench-text:sst2", "write TASK=FOLDER"), ("bench-text:sst2=x,val=ten", "not a whole")]:
        with pytest.raises(MergeError, match=message):
            parse_eval(text, extra=EVALUATORS)
    with pytest.raises(MergeError, match=r"unknown evaluator 'nope'.*bench-text:\.\.\."):  # the error names it
        parse_eval("nope:x", extra=EVALUATORS)
    with pytest.raises(MergeError, match="unknown evaluator 'bench-text'"):  # not registered: not known
        parse_eval("bench-text:sst2=x")
