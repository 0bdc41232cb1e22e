"""`modalmerge search` (issue 14): the search space of a recipe, the study loop on the in-process
runner, resuming a journal, failed and pruned trials, the report files, and the best merge equal
to a plain `modalmerge merge` of its recipe. Tiny Llama and BERT folders with WordLevel
tokenizers, built here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cli_fails, load_sd, perturbed, tiny_llama
from modalmerge.errors import MergeError
from modalmerge.procedures.search.runners import LocalRunner
from modalmerge.procedures.search.space import check_space, parse_space
from modalmerge.procedures.search.trial import Objective, PruneRule, SearchSpec, TrialContext

pytest.importorskip("optuna")
pytest.importorskip("transformers")

WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(100)]


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base, two fine-tunes (each with the tokenizer), a text file of 12 lines."""
    root = tmp_path_factory.mktemp("search-lm")
    base = tiny_llama()
    paths = {"base": root / "base", "ft0": root / "ft0", "ft1": root / "ft1", "text": root / "valid.txt"}
    base.save_pretrained(paths["base"])
    perturbed(base, 1, scale=0.05).save_pretrained(paths["ft0"])
    perturbed(base, 2, scale=0.05).save_pretrained(paths["ft1"])
    for name in ("base", "ft0", "ft1"):
        save_tokenizer(paths[name])
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (10,), generator=g)) for _ in range(12)]
    paths["text"].write_text("\n".join(lines) + "\n")
    return paths


def recipe(lm, **params) -> dict:
    return {"method": "task_arithmetic", "base": str(lm["base"]),
            "models": [{"path": str(lm["ft0"])}, {"path": str(lm["ft1"])}],
            "params": params or {"lambda": {"search": {"uniform": [0.2, 1.2]}}}}


def write_recipe(tmp_path, data, name="recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- the space ---------------------------------------------------------------------------------

def test_space_names_and_concrete_native_and_mergekit():
    native = {"method": "ties", "base": "b", "models": [{"path": "a", "weight": {"search": [0.5, 1.0]}},
                                                         {"path": "c", "weight": {"layers": [0.1, {"search": {
                                                             "int": [1, 3]}}]}}],
              "params": {"density": {"search": {"log_uniform": [0.05, 0.5]}}}}
    space = parse_space(native)
    assert [p.name for p in space.parameters] == ["models[0].weight", "models[1].weight.layers[1]", "params.density"]
    assert [p.kind for p in space.parameters] == ["choice", "int", "log_uniform"]
    filled = space.concrete({"models[0].weight": 1.0, "models[1].weight.layers[1]": 2, "params.density": 0.1})
    assert filled["models"][0]["weight"] == 1.0 and filled["models"][1]["weight"] == {"layers": [0.1, 2]}
    assert filled["params"]["density"] == 0.1
    assert native["params"]["density"] == {"search": {"log_uniform": [0.05, 0.5]}}  # the space is not changed

    mergekit = yaml.safe_load("""
merge_method: {search: [ties, dare_ties]}
base_model: b
models:
  - model: a
    parameters: {weight: {search: {uniform: [0.2, 1.0]}}, density: [{filter: mlp, value: {search: [0.3, 0.6]}},
                                                                     {value: 0.5}]}
parameters: {normalize: true}
""")
    space = parse_space(mergekit)
    assert [p.name for p in space.parameters] == [
        "merge_method", "models[0].parameters.weight", "models[0].parameters.density[0].value"]
    assert space.method_parameter.name == "merge_method"
    with pytest.raises(MergeError, match="grid sampler"):
        space.grid()
    filled = space.concrete({"merge_method": "ties", "models[0].parameters.weight": 0.7,
                             "models[0].parameters.density[0].value": 0.6})
    assert filled["models"][0]["parameters"]["density"][0] == {"filter": "mlp", "value": 0.6}
    with pytest.raises(MergeError, match="no value for"):
        space.concrete({"merge_method": "ties"})
    with pytest.raises(MergeError, match="no parameter of the space"):
        space.concrete({"merge_method": "ties", "models[0].parameters.weight": 1, "x": 1,
                        "models[0].parameters.density[0].value": 0.6})


def test_a_list_valued_choice_goes_through_optuna_as_text_and_comes_back():
    space = parse_space({"method": "linear", "models": ["a", "b"],
                         "params": {"t": {"search": [[0.1, 0.9], {"layers": [0, 1]}]}}})
    p = space.parameters[0]
    assert p.optuna_choices() == ['[0.1, 0.9]', '{"layers": [0, 1]}']
    assert p.decode('{"layers": [0, 1]}') == {"layers": [0, 1]}


@pytest.mark.parametrize("value, message", [
    ({"search": []}, "has no choices"),
    ({"search": {"uniform": [1.0, 0.5]}}, "low bound must be below"),
    ({"search": {"uniform": [0.1]}}, "two numbers"),
    ({"search": {"log_uniform": [0.0, 1.0]}}, "above 0"),
    ({"search": {"int": [1, 2.5]}}, "two integers"),
    ({"search": {"normal": [0, 1]}}, "takes a list of choices"),
    ({"search": [1, 2], "default": 1}, "one key `search`"),
    ({"search": [{"search": [1]}]}, "another search marker"),
])
def test_bad_markers_are_one_line(value, message):
    with pytest.raises(MergeError, match=message) as e:
        parse_space({"method": "linear", "models": ["a", "b"], "params": {"t": value}})
    assert "\n" not in str(e.value)


def test_an_empty_space_is_refused():
    with pytest.raises(MergeError, match="search space is empty"):
        parse_space({"method": "linear", "models": ["a", "b"]})
    with pytest.raises(MergeError, match="choice of names"):
        parse_space({"method": {"search": {"uniform": [0, 1]}}, "models": ["a"]})


LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5))
MARKER_BODIES = st.one_of(
    st.lists(LEAVES, max_size=3),
    st.dictionaries(st.sampled_from(["uniform", "log_uniform", "int", "other"]),
                    st.lists(st.one_of(st.integers(-3, 3), st.floats(-3, 3), st.text(max_size=2)), max_size=3),
                    max_size=2),
    LEAVES)
TREES = st.recursive(
    st.one_of(LEAVES, st.builds(lambda b: {"search": b}, MARKER_BODIES)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["a", "b", "search", "weight", "params"]), inner,
                                            max_size=3)),
    max_leaves=12)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.dictionaries(st.sampled_from(["method", "params", "models", "x"]), TREES, min_size=1, max_size=3))
def test_fuzz_the_marker_parser(data):
    """Any mapping: a space whose probes fill in every marker, or one MergeError line."""
    try:
        space = parse_space(data)
    except MergeError as e:
        assert "\n" not in str(e)
        return
    assert space.parameters
    for values in space.probes()[:3]:
        filled = space.concrete(values)
        for p in space.parameters:
            node = filled
            for part in p.path:
                node = node[part]
            assert node == values[p.name] or (isinstance(node, float) and math.isnan(node))


# -- planning the space -----------------------------------------------------------------------

def spec_for(data: dict, evals=("perplexity:x",), objectives=(Objective("perplexity", "minimize"),)) -> SearchSpec:
    return SearchSpec(recipe_text=yaml.safe_dump(data), recipe_folder=None, evals=tuple(evals),
                      objectives=objectives)


def test_unknown_parameter_and_method_choices_are_checked_before_any_trial(lm):
    from modalmerge.procedures.search.trial import Inputs

    data = recipe(lm, densty={"search": [0.2, 0.4]})
    space = parse_space(data)
    with pytest.raises(MergeError, match="densty") as e:
        check_space(space, Inputs(spec_for(data)).plan)
    assert "\n" not in str(e.value) and "params.densty=0.2" in str(e.value)
    # ties takes a density, task_arithmetic does not: the method choice is checked with each
    data = {**recipe(lm, density={"search": [0.2, 0.4]}), "method": {"search": ["ties", "task_arithmetic"]}}
    with pytest.raises(MergeError, match="method=\"task_arithmetic\".*density"):
        check_space(parse_space(data), Inputs(spec_for(data)).plan)
    # a bound out of the parameter's range: found at the high end
    data = recipe(lm, density={"search": {"uniform": [0.5, 1.5]}})
    data["method"] = "ties"
    with pytest.raises(MergeError, match="params.density=1.5"):
        check_space(parse_space(data), Inputs(spec_for(data)).plan)


def test_unknown_parameter_from_the_cli_is_one_line_and_writes_nothing(lm, tmp_path, capsys):
    path = write_recipe(tmp_path, recipe(lm, densty={"search": [0.2, 0.4]}))
    out = tmp_path / "out"
    cli_fails(capsys, ["search", str(path), "--eval", f"perplexity:{lm['text']}", "-o", str(out), "--trials", "2"],
              out, "densty")


def test_python_evaluator_needs_trust(lm, tmp_path, capsys):
    path = write_recipe(tmp_path, recipe(lm))
    out = tmp_path / "out"
    cli_fails(capsys, ["search", str(path), "--eval", "python:my_evals:score", "-o", str(out)], out,
              "--trust-recipe-code", "my_evals.score")


def test_lm_eval_missing_names_the_extra(lm, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed here")
    path = write_recipe(tmp_path, recipe(lm))
    out = tmp_path / "out"
    cli_fails(capsys, ["search", str(path), "--eval", "lm_eval:hellaswag", "-o", str(out)], out, "modalmerge[lm-eval]")


# -- trials -------------------------------------------------------------------------------------

def test_a_trial_merges_in_memory_and_is_pruned_by_its_rule(lm):
    data = recipe(lm)
    spec = SearchSpec(recipe_text=yaml.safe_dump(data), recipe_folder=None, evals=(f"perplexity:{lm['text']}",),
                      objectives=(Objective("perplexity", "minimize"),), batch_size=4)
    ctx = TrialContext(spec)
    sources = dict(ctx.inputs.sources)
    first = ctx.run({"params.lambda": 0.5})
    assert first.status == "ok", first.error
    assert set(first.metrics) == {"perplexity", "loss"} and sorted(first.intermediate) == [0, 1, 2]
    assert ctx.inputs.sources == sources  # the same open sources serve every trial
    again = ctx.run({"params.lambda": 0.5})
    assert again.metrics == first.metrics
    stopped = ctx.run({"params.lambda": 0.5}, PruneRule("perplexity", {0: 1e-9}, minimize=True))
    assert stopped.status == "pruned" and list(stopped.intermediate) == [0]
    assert PruneRule("accuracy", {1: 0.5}, minimize=False).stops("accuracy", 1, 0.4)
    assert not PruneRule("accuracy", {1: 0.5}, minimize=False).stops("accuracy", 0, 0.1)


def run_search(lm, tmp_path, data=None, name="out", **kw):
    from modalmerge.api import search

    path = write_recipe(tmp_path, data or recipe(lm), name=f"{name}.yaml")
    evals = kw.pop("evals", None) or f"perplexity:{lm['text']}"
    return search(path, evals, tmp_path / name, **kw)


def test_grid_search_end_to_end_and_the_best_merge_equals_a_plain_merge(lm, tmp_path, capsys):
    from modalmerge.cli import main

    data = recipe(lm, **{"lambda": {"search": [0.3, 0.9]}})
    data["models"][1]["weight"] = {"search": [0.5, 1.0]}
    outcome = run_search(lm, tmp_path, data, trials=10, sampler="grid")
    result = outcome.result
    assert len(result.trials) == 4 and all(t["status"] == "ok" for t in result.trials)
    assert sorted((t["params"]["params.lambda"], t["params"]["models[1].weight"]) for t in result.trials) == \
        [(0.3, 0.5), (0.3, 1.0), (0.9, 0.5), (0.9, 1.0)]
    best = min(result.trials, key=lambda t: t["metrics"]["perplexity"])
    assert result.best["number"] == best["number"]
    out = outcome.output
    search = out / "search"
    listing = json.loads((search / "trials.json").read_text())
    assert listing["best"] == best["number"] and len(listing["trials"]) == 4
    assert {"number", "params", "metrics", "seconds", "status", "error", "node", "worker"} <= set(listing["trials"][0])
    assert "| trial | status | perplexity |" in (search / "trials.md").read_text()
    assert (search / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert (search / "journal.log").exists()
    card = (out / "README.md").read_text()
    assert "## Search" in card and f"trial {best['number']}" in card and "params.lambda" in card
    # the same recipe, filled in, through `modalmerge merge`
    concrete = parse_space(data).concrete(best["params"])
    plain = tmp_path / "plain"
    assert main(["merge", str(write_recipe(tmp_path, concrete, "concrete.yaml")), "-o", str(plain)]) == 0
    ours, theirs = load_sd(out), load_sd(plain)
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_and_tpe_search(lm, tmp_path, sampler):
    data = recipe(lm, **{"lambda": {"search": {"uniform": [0.2, 1.2]}}})
    outcome = run_search(lm, tmp_path, data, trials=3, sampler=sampler, seed=1)
    assert len(outcome.result.trials) == 3
    lambdas = [t["params"]["params.lambda"] for t in outcome.result.trials]
    assert len(set(lambdas)) == 3 and all(0.2 <= x <= 1.2 for x in lambdas)
    again = run_search(lm, tmp_path, data, name="again", trials=3, sampler=sampler, seed=1)
    assert [t["params"] for t in again.result.trials] == [t["params"] for t in outcome.result.trials]


class InterruptAfter(LocalRunner):
    """A LocalRunner that is interrupted (Ctrl-C) after `n` results; counts the trials it ran."""

    def __init__(self, n: int | None, ran: list):
        super().__init__()
        self.n, self.ran = n, ran

    def submit(self, number, params, prune=None):
        if self.n is not None and len(self.ran) >= self.n:
            raise KeyboardInterrupt
        self.ran.append(params)
        super().submit(number, params, prune)


def test_an_interrupted_search_resumes_from_its_journal(lm, tmp_path):
    data = recipe(lm)
    first: list = []
    with pytest.raises(KeyboardInterrupt):
        run_search(lm, tmp_path, data, trials=4, sampler="random", runner=InterruptAfter(2, first))
    out = tmp_path / "out"
    assert (out / "search" / "journal.log").exists() and not (out / "model.safetensors").exists()
    second: list = []
    outcome = run_search(lm, tmp_path, data, trials=4, sampler="random", runner=InterruptAfter(None, second))
    assert outcome.result.resumed == 2 and len(second) == 2 and len(outcome.result.trials) == 4
    assert [t["params"] for t in outcome.result.trials[:2]] == first
    assert (out / "model.safetensors").exists()
    # a changed space does not resume that journal; the journal is left as it was
    journal = (out / "search" / "journal.log").read_bytes()
    changed = recipe(lm, **{"lambda": {"search": {"uniform": [0.1, 0.5]}}})
    with pytest.raises(MergeError, match="journal of another search"):
        run_search(lm, tmp_path, changed, trials=4, sampler="random")
    assert (out / "search" / "journal.log").read_bytes() == journal


EVALS = '''
import math
CALLS = []

def score(model, tokenizer):
    CALLS.append(1)
    if len(CALLS) == 2:
        return {"score": float("nan")}
    if len(CALLS) == 3:
        raise RuntimeError("evaluator broke")
    norm = sum(float(p.float().norm()) for p in model.parameters())
    return {"score": norm, "other": -norm}
'''


def test_failing_and_nan_evaluators_mark_the_trial_failed_and_the_search_goes_on(lm, tmp_path, monkeypatch):
    (tmp_path / "search_evals_mod.py").write_text(EVALS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "search_evals_mod", raising=False)
    outcome = run_search(lm, tmp_path, trials=4, sampler="random", evals="python:search_evals_mod:score",
                         objectives="score:max", trust_recipe_code=True)
    statuses = [t["status"] for t in outcome.result.trials]
    assert statuses == ["ok", "failed", "failed", "ok"]
    errors = [t["error"] for t in outcome.result.trials]
    assert "nan" in errors[1] and "evaluator broke" in errors[2] and "\n" not in errors[2]
    assert outcome.result.best["number"] in (0, 3)


def test_two_objectives_give_a_pareto_front(lm, tmp_path, monkeypatch):
    (tmp_path / "search_evals_two.py").write_text(EVALS.replace("len(CALLS) == 2", "False").replace(
        "len(CALLS) == 3", "False"))
    monkeypatch.syspath_prepend(str(tmp_path))
    outcome = run_search(lm, tmp_path, trials=3, sampler="random", evals="python:search_evals_two:score",
                         objectives=["score:max", "other:max"], trust_recipe_code=True)
    result = outcome.result
    assert len(result.objectives) == 2 and result.pareto  # score and -score: every trial is on the front
    assert sorted(result.pareto) == [t["number"] for t in result.trials]
    assert (outcome.search_folder / "search.png").exists()


def test_accuracy_on_a_tiny_bert_classifier(tmp_path):
    """Its files also hold BERT's old `position_ids` buffer, as all-MiniLM-L6-v2's does: an integer
    tensor transformers 5's BertModel no longer has, left out of the trial's model as
    from_pretrained leaves it out (before, every trial failed on it)."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2, pad_token_id=3)
    base = BertForSequenceClassification(cfg).eval()
    paths = {}
    for name, model in (("base", base), ("ft0", perturbed(base, 1, 0.1)), ("ft1", perturbed(base, 2, 0.1))):
        paths[name] = tmp_path / name
        model.save_pretrained(paths[name])
        save_tokenizer(paths[name])
        weights = load_file(paths[name] / "model.safetensors")
        weights["bert.embeddings.position_ids"] = torch.arange(32)[None]
        save_file(weights, paths[name] / "model.safetensors", metadata={"format": "pt"})
    data_file = tmp_path / "valid.tsv"
    data_file.write_text("".join(f"{i % 2}\tw{i} w{i + 1} w{i + 2}\n" for i in range(10)))
    outcome = run_search(paths, tmp_path, recipe(paths), trials=2, sampler="random", evals=f"accuracy:{data_file}")
    assert [t["status"] for t in outcome.result.trials] == ["ok", "ok"]
    assert set(outcome.result.best["metrics"]) == {"accuracy", "loss"}
    assert 0 <= outcome.result.best["metrics"]["accuracy"] <= 1


def test_the_cli_runs_a_search_and_refuses_an_existing_output(lm, tmp_path, capsys):
    from modalmerge.cli import main

    path = write_recipe(tmp_path, recipe(lm))
    out = tmp_path / "out"
    code = main(["search", str(path), "--eval", f"perplexity:{lm['text']}", "-o", str(out), "--trials", "2",
                 "--sampler", "random", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "2 trials" in printed and "best: trial" in printed
    assert (out / "model.safetensors").exists() and (out / "search" / "trials.json").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    cli_fails(capsys, ["search", str(path), "--eval", f"perplexity:{lm['text']}", "-o", str(taken)], None,
              "already exists")
    cli_fails(capsys, ["search", str(path), "--eval", f"perplexity:{lm['text']}", "-o", str(lm["ft0"])], None,
              "inputs are never written")
    cli_fails(capsys, ["search", str(path), "--eval", f"perplexity:{lm['text']}", "-o", str(tmp_path / "g"),
                       "--sampler", "grid"], tmp_path / "g", "grid sampler")


class Recording(LocalRunner):
    """A LocalRunner that keeps the prune rule each trial was sent with."""

    def __init__(self):
        super().__init__()
        self.rules: list = []

    def submit(self, number, params, prune=None):
        self.rules.append(prune)
        super().submit(number, params, prune)


def test_trials_after_the_first_three_carry_the_median_rule(lm, tmp_path):
    import statistics

    runner = Recording()
    outcome = run_search(lm, tmp_path, trials=5, sampler="random", runner=runner, batch_size=4)
    trials = outcome.result.trials
    assert runner.rules[:3] == [None, None, None]
    rule = runner.rules[3]
    assert rule is not None and rule.metric == "perplexity" and rule.minimize
    # the median, at each of the three batches, of the first three (completed) trials' running perplexity
    spec = SearchSpec(recipe_text=yaml.safe_dump(recipe(lm)), recipe_folder=None, evals=(f"perplexity:{lm['text']}",),
                      objectives=(Objective("perplexity", "minimize"),), batch_size=4)
    ctx = TrialContext(spec)
    steps = [ctx.run(t["params"]).intermediate for t in trials[:3]]
    assert rule.thresholds == {s: statistics.median(x[s] for x in steps) for s in (0, 1, 2)}
    assert all(t["status"] in ("ok", "pruned") for t in trials)


def test_no_completed_trial_is_one_line_and_keeps_the_journal(lm, tmp_path, monkeypatch):
    (tmp_path / "search_evals_broken.py").write_text("def score(model, tokenizer):\n    raise ValueError('no')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MergeError, match="no trial completed") as e:
        run_search(lm, tmp_path, trials=2, sampler="random", evals="python:search_evals_broken:score",
                   objectives="score:max", trust_recipe_code=True)
    assert "\n" not in str(e.value)
    search = tmp_path / "out" / "search"
    assert (search / "journal.log").exists() and "ValueError: no" in (search / "trials.md").read_text()
    assert not (tmp_path / "out" / "model.safetensors").exists()
