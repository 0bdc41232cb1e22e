"""`bench speed --mergekit`: native recipes back to mergekit's (bench/mergekit_recipe.py), the table's
mergekit columns, the output comparison, and the subprocess path with a stand-in `mergekit` package
(the suite never needs mergekit itself)."""

import json
import re
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import save_file

from modalmerge.bench.mergekit_recipe import merge_meaning, to_mergekit
from modalmerge.bench.speed import max_abs_difference, method_of, recipe_for, table
from modalmerge.cli import main
from modalmerge.engine.recipe import parse_recipe
from modalmerge.methods.registry import METHODS, get_method

BASE, MODELS = "/m/base", ["/m/ft0", "/m/ft1", "/m/ft2"]


def native(method, params=None, models=MODELS, base=BASE, weights=None, model_params=None, dtype="bfloat16"):
    weights, model_params = weights or [1.0] * len(models), model_params or [{}] * len(models)
    entries = [{"path": p, "weight": weights[i], "params": model_params[i]} for i, p in enumerate(models)]
    r = {"method": method, "models": entries, "params": params or {}, "dtype": dtype}
    if base is not None:
        r["base"] = base
    return r


def round_trip(recipe):
    """native → mergekit YAML text → parse_recipe: the same merge."""
    mk, why = to_mergekit(recipe)
    assert mk is not None, why
    back = parse_recipe(yaml.safe_load(yaml.safe_dump(mk, sort_keys=False)))
    assert back.source_format == "mergekit"
    method = get_method(recipe["method"])
    form = next(f for f in method.mergekit if f.name == mk["merge_method"])
    assert merge_meaning(back, method, form) == merge_meaning(parse_recipe(recipe), method, form)
    return mk


def test_task_arithmetic_lambda_and_weights():
    mk = round_trip(native("task_arithmetic", {"lambda": 0.3}, weights=[0.7, -0.3, 0.5]))
    assert mk["merge_method"] == "task_arithmetic" and mk["base_model"] == BASE
    assert mk["parameters"] == {"lambda": 0.3}
    assert [m["parameters"]["weight"] for m in mk["models"]] == [0.7, -0.3, 0.5]
    # modalmerge computes in float32 and writes the recipe's dtype: mergekit's dtype + out_dtype
    assert (mk["dtype"], mk["out_dtype"]) == ("float32", "bfloat16")
    assert "out_dtype" not in round_trip(native("task_arithmetic", dtype="float32"))


def test_ties_as_mergekit_runs_it_with_per_model_densities():
    mergekit_ties = {"scope": "tensor", "keep_min": 1, "tie": "positive"}
    mk = round_trip(native("ties", {**mergekit_ties, "density": 0.4, "lambda": 0.9, "aggregate": "sum"},
                           model_params=[{"density": 0.5}, {}, {"density": 0.1}]))
    # the form's own settings are implied by the name; the native density default (0.2) is written
    # because mergekit's (1.0) differs
    assert mk["parameters"] == {"density": 0.4, "normalize": False, "lambda": 0.9}
    assert [m["parameters"] for m in mk["models"]] == [{"weight": 1.0, "density": 0.5}, {"weight": 1.0},
                                                      {"weight": 1.0, "density": 0.1}]
    assert round_trip(native("ties", mergekit_ties))["parameters"] == {"density": 0.2}


def test_native_settings_mergekit_has_no_form_for_are_named():
    mk, why = to_mergekit(native("ties"))   # native TIES: a global threshold, ties to the tensor's sign
    assert mk is None
    assert "scope='global' (mergekit's ties: 'tensor')" in why and "tie=" in why and "keep_min=0" in why
    mk, why = to_mergekit(native("ties", {"scope": "tensor", "keep_min": 1, "tie": "positive", "aggregate": "max"}))
    assert mk is None and "aggregate='max'" in why
    assert to_mergekit(native("neuromerging")) == (None, "neuromerging has no mergekit form")
    mk, why = to_mergekit({**native("task_arithmetic"), "include": ["*.mlp.*"]})
    assert mk is None and "include" in why
    r = native("task_arithmetic")
    r["models"][1]["optimizer_state"] = "/m/ft1/optimizer.pt"
    mk, why = to_mergekit(r)
    assert mk is None and why == "model 'ft1': `optimizer_state` has no mergekit equivalent here"


def test_linear_slerp_and_model_stock_bases():
    # linear: mergekit would average a base_model with the models; the native base is not averaged
    mk = round_trip(native("linear", {"normalize": False}, weights=[0.5, 0.3, 0.2]))
    assert "base_model" not in mk and mk["parameters"] == {"normalize": False}
    assert "base_model" not in round_trip(native("linear", base=None))
    # slerp: mergekit's base_model is the t = 0 end, the first native model
    mk = round_trip(native("slerp", {"t": 0.3}, models=MODELS[:2], base=None))
    assert mk["base_model"] == MODELS[0] and [m["model"] for m in mk["models"]] == MODELS[:2]
    assert all(m["parameters"] == {} for m in mk["models"])   # slerp takes no weights
    assert round_trip(native("model_stock"))["base_model"] == BASE


def test_renamed_and_rescaled_parameters():
    mk = round_trip(native("breadcrumbs", {"scope": "tensor", "keep_fraction": 0.6, "top_remove_fraction": 0.05}))
    assert mk["parameters"]["density"] == 0.6 and mk["parameters"]["gamma"] == 0.05
    mk = round_trip(native("dare_ties", {"density": 0.5, "rescale": "l1", "tie": "positive"}))
    assert mk["parameters"]["rescale"] is True and mk["parameters"]["normalize"] is True
    mk, why = to_mergekit(native("dare_linear", {"density": 0.5}))   # native rescale: 1/density
    assert mk is None and "rescale='inverse'" in why


def test_every_registered_mergekit_form_round_trips():
    """For each form of each method (the methods added later included): a plain mergekit recipe →
    native → back to mergekit → native again means the same merge."""
    for method in METHODS.values():
        for form in method.mergekit:
            models = [{"model": p, "parameters": {"weight": 1.0} if method.weighted else {}} for p in MODELS[:2]]
            to_mk = {native: mk for mk, native in form.per_model_renames.items()}
            # a parameter without a default (nearswap's t) is given, as mergekit asks too
            required = {to_mk.get(f.alias or k, f.alias or k): 0.5 for k, f in method.params.model_fields.items()
                        if f.is_required()}
            first = parse_recipe({"merge_method": form.name, "base_model": BASE, "models": models,
                                  "parameters": required, "dtype": "float32", "out_dtype": "bfloat16"})
            mk, why = to_mergekit(first)
            assert mk is not None, f"{form.name}: {why}"
            assert mk["merge_method"] in method.mergekit_names
            back = parse_recipe(mk)
            assert merge_meaning(back, method, form) == merge_meaning(first, method, form), form.name


def test_the_running_mergekits_parameters_decide_what_is_written():
    # a required parameter is written even at its native default; one mergekit lacks is left out
    # where that changes nothing, and is the reason where it does
    mk, _ = to_mergekit(native("slerp", models=MODELS[:2], base=None), {"slerp": {"t": True}})
    assert mk["parameters"] == {"t": 0.5}
    known = {"task_arithmetic": {"weight": True, "lambda": False}}
    mk, _ = to_mergekit(native("task_arithmetic", {"lambda": 0.5}), known)
    assert mk["parameters"] == {"lambda": 0.5}
    mk, why = to_mergekit(native("task_arithmetic", {"normalize": True}), known)
    assert mk is None and "takes no normalize" in why
    assert to_mergekit(native("linear"), {"ties": {}}) == (None, "this mergekit has no method 'linear'")


def result_with(mergekit_note):
    runs = [{"seconds": 1.0, "peak_rss": 10 ** 9, "returncode": 0, "cpu_seconds": 1.0}]
    row = {"seconds": 2.0, "x_floor": 2.0, "x_overlapped_floor": 2.0, "cpu_seconds": 2.5,
           "peak_rss_bytes": 5 * 10 ** 8, "target_x_floor": None, "runs": runs}
    result = {"shape": {"parameters": 1e6, "hidden": 8, "layers": 1, "vocab": 8, "intermediate": 32, "models": 2},
              "repeats": 1, "threads": 2, "cpus": 2,
              "results": [{**row, "name": "floor", "seconds": 1.0, "x_floor": 1.0},
                          {**row, "name": "task_arithmetic", "target_x_floor": 1.3},
                          {**row, "name": "neuromerging"}]}
    if mergekit_note is not None:
        result["mergekit"] = {"version": "0.1.5"}
        result["results"][1]["mergekit"] = mergekit_note
        result["results"][2]["mergekit"] = {"none": "neuromerging has no mergekit form"}
    return result


def test_table_with_and_without_mergekit():
    plain = table(result_with(None))
    assert "mergekit" not in plain and "| task_arithmetic | 2.00 | 2.00 | 2.00 | ≤ 1.3× | 2.5 | 0.50 |" in plain
    text = table(result_with({"seconds": 9.0, "peak_rss_bytes": 2.5e9, "x_faster": 4.5, "max_abs_diff": 0.0078125}))
    lines = text.splitlines()
    assert lines[0].endswith("; mergekit 0.1.5")
    assert "| mergekit wall (s) | mergekit peak RSS (GB) | × faster | max \\|Δ\\| |" in lines[2]
    cells = [len(re.findall(r"(?<!\\)\|", line)) for line in lines[2:5]]
    assert cells == [12, 12, 12]
    assert "| floor | 1.00 | 1.00 | 2.00 |  | 2.5 | 0.50 |  |  |  |  |" in text
    assert "| 2.5 | 0.50 | 9.00 | 2.50 | 4.5 | 7.8e-03 |" in text
    assert "| neuromerging | 2.00 | 2.00 | 2.00 |  | 2.5 | 0.50 | — | — | — | — |" in text
    assert "- neuromerging: no mergekit run: neuromerging has no mergekit form" in text
    failed = table(result_with({"recipe": {}, "failed": "mergekit failed (exit 1):\nboom"}))
    assert "| ≤ 1.3× | 2.5 | 0.50 | — | — | — | — |" in failed
    assert "- task_arithmetic: mergekit failed: mergekit failed (exit 1): / boom" in failed
    exact = table(result_with({"seconds": 9.0, "peak_rss_bytes": 2.5e9, "x_faster": 4.5, "max_abs_diff": 0.0}))
    assert "| 4.5 | 0 |" in exact


def test_outputs_are_compared_tensor_by_tensor(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    x = {"w": torch.ones(4, 4, dtype=torch.bfloat16), "n": torch.zeros(3), "e": torch.zeros(0)}
    save_file(x, a / "model.safetensors")
    # mergekit writes shards with other names: the tensors are matched by name across files
    save_file({"w": x["w"].clone().index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(1.5,
              dtype=torch.bfloat16))}, b / "model-00001-of-00002.safetensors")
    save_file({"n": x["n"], "e": x["e"]}, b / "model-00002-of-00002.safetensors")
    d = max_abs_difference(a, b)
    assert d["max_abs_diff"] == 0.5 and d["max_abs_diff_tensor"] == "w" and d["differing_fraction"] == 1 / 19
    save_file({"n": x["n"]}, b / "model-00002-of-00002.safetensors")
    d = max_abs_difference(a, b)
    assert d["max_abs_diff"] == float("inf") and "names differ (1: e)" in d["diff_note"]


FAKE_REGISTRY = '''
class P:
    def __init__(self, name, required):
        self.name, self.required = name, required
class Spec:
    def __init__(self, name, params):
        self.name, self.parameters = name, [P(n, r) for n, r in params]
class M:
    def __init__(self, name, params):
        self.spec = Spec(name, params)
def registered_methods():
    return [M("task_arithmetic", [("weight", True), ("lambda", False), ("normalize", False)]),
            M("linear", [("weight", True), ("normalize", False)])]
'''

# the stand-in run_yaml: checks the flags the benchmark passes and merges the mergekit recipe with
# modalmerge (which reads mergekit recipes), so the outputs agree
FAKE_RUN_YAML = '''
import os, sys
config, out, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
assert flags[:4] == ["--no-copy-tokenizer", "--quiet", "--num-threads", "1"], flags
assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
if "--fail" in flags:
    sys.exit("mergekit stand-in: failing as asked")
from modalmerge.cli import main
sys.exit(main(["merge", config, "--output", out, "--no-progress"]))
'''


@pytest.fixture
def fake_mergekit(tmp_path):
    root = tmp_path / "fake-site"
    for sub, text in [("mergekit/__init__.py", ""), ("mergekit/scripts/__init__.py", ""),
                      ("mergekit/scripts/run_yaml.py", FAKE_RUN_YAML), ("mergekit/merge_methods/__init__.py", ""),
                      ("mergekit/merge_methods/registry.py", FAKE_REGISTRY)]:
        (root / sub).parent.mkdir(parents=True, exist_ok=True)
        (root / sub).write_text(textwrap.dedent(text))
    return root


def test_bench_speed_runs_mergekit_next_to_each_row(tmp_path, fake_mergekit, capsys):
    out = tmp_path / "r.json"
    args = ["bench", "speed", "--hidden", "32", "--layers", "1", "--vocab", "64", "--models", "2", "--repeats", "1",
            "--threads", "1", "--cache", str(tmp_path / "cache"), "--mergekit", str(fake_mergekit)]
    assert main(args + ["--methods", "task_arithmetic", "ties:scope=tensor,keep_min=1,tie=positive",
                        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mergekit"]["version"] is None and result["mergekit"]["path"] == str(fake_mergekit)
    ta, ties = result["results"][2], result["results"][3]
    assert ta["mergekit"]["max_abs_diff"] == 0 and ta["mergekit"]["seconds"] > 0
    assert ta["mergekit"]["x_faster"] == pytest.approx(ta["mergekit"]["seconds"] / ta["seconds"])
    assert ta["mergekit"]["recipe"]["parameters"] == {"lambda": 0.3}
    assert ties["mergekit"] == {"none": "this mergekit has no method 'ties'"}
    text = capsys.readouterr().out
    assert "| 0 |" in text and "- ties:scope=tensor,keep_min=1,tie=positive: no mergekit run: " in text

    # a failing mergekit run is reported in its row; the benchmark still finishes
    assert main(args + ["--methods", "linear", "--mergekit-args=--fail", "--out", str(out)]) == 0
    linear = json.loads(out.read_text())["results"][2]
    assert "failing as asked" in linear["mergekit"]["failed"] and linear["seconds"] > 0


def test_bench_speed_mergekit_option_errors(tmp_path, capsys):
    assert main(["bench", "speed", "--quick", "--mergekit", str(tmp_path), "--cache", str(tmp_path / "c")]) == 1
    assert "no `mergekit` package folder there" in capsys.readouterr().err
    assert main(["bench", "speed", "--quick", "--mergekit-args=--async-write", "--cache", str(tmp_path / "c")]) == 1
    assert "--mergekit-args needs --mergekit" in capsys.readouterr().err


def test_rows_given_as_mergekit_recipes(tmp_path):
    folders = {"base": tmp_path / "b", "ft0": tmp_path / "x", "ft1": tmp_path / "y", "ft2": tmp_path / "z"}
    r = recipe_for("ties@mergekit:density=0.2", folders)
    assert r["method"] == "ties" and r["base"] == str(tmp_path / "b") and r["dtype"] == "bfloat16"
    assert r["params"]["scope"] == "tensor" and r["params"]["tie"] == "positive"   # mergekit's TIES
    assert [m["params"] for m in r["models"]] == [{"density": 0.2}] * 3
    mk, why = to_mergekit(r)
    assert why == "" and [m["parameters"] for m in mk["models"]] == [{"weight": 1.0, "density": 0.2}] * 3
    # a method of at most two models merges the first two fine-tunes; slerp's base is its first input
    r = recipe_for("slerp@mergekit:t=0.3", folders)
    assert [m["path"] for m in r["models"]] == [str(tmp_path / "x"), str(tmp_path / "y")] and r["base"] is None
    assert recipe_for("slerp:t=0.3", folders)["models"] == [str(tmp_path / "x"), str(tmp_path / "y")]
    assert method_of("linear@mergekit").name == "linear"
    result = result_with(None)
    result["results"][2]["inputs"] = 1
    assert "| neuromerging (1 model) | 2.00 |" in table(result)
