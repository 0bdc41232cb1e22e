"""Per-tensor parameter values: name filters and per-layer schedules (methods/schedules.py).

mergekit 0.1.5 (config.py evaluate_setting, parameter_resolver.py, plan.py) resolves a value per
tensor: a filter list's first entry whose `filter` is a substring of the name (no filter or "*":
every tensor), a gradient at t = layer/(L−1) (t = 1 for one layer, 0 outside the blocks), and
a model's value that resolves to nothing falls back to the global one, then the default. Here:
the resolution table by hand, merges through the engine against dense references written here,
the mergekit and native recipe forms, one-line errors, and a fuzz of the parser.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import load_sd
from modalmerge import merge, merge_state_dicts
from modalmerge.checkpoint.sources import StateDictSource
from modalmerge.engine.recipe import parse_recipe
from modalmerge.errors import MergeError
from modalmerge.methods import schedules
from modalmerge.procedures.run import plan_merge

ATTN = "model.layers.{}.self_attn.q_proj.weight"
MLP = "model.layers.{}.mlp.up_proj.weight"
NORM = "model.layers.{}.input_layernorm.weight"
OUTSIDE = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
NUM_LAYERS = 3


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,), "lm_head.weight": (16, 8)}
    for i in range(NUM_LAYERS):
        shapes.update({ATTN.format(i): (8, 8), MLP.format(i): (12, 8), NORM.format(i): (8,)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


BASE = state_dict(0)
FTS = [{k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(50 + i)) for k, v in BASE.items()}
       for i in range(2)]


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


def mk_value(setting, name: str):
    """mergekit's evaluate_setting, restated: None where nothing matches."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for cond in setting:
            if cond.get("filter") in (None, "*") or cond["filter"] in name:
                return mk_value(cond["value"], name)
        return None
    if isinstance(setting, list):
        layer = layer_of(name)
        t = 0.0 if layer is None else (layer / (NUM_LAYERS - 1) if NUM_LAYERS > 1 else 1.0)
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (scaled - i0)) * setting[i0] + (scaled - i0) * setting[i1]
    return setting


def mk_resolve(name: str, *settings, default=None):
    """mergekit's resolve_parameter: the first source that gives a value, else the default."""
    for s in settings:
        if s is not None:
            v = mk_value(s, name)
            if v is not None:
                return v
    return default


# ---------------------------------------------------------------- the resolution table


FILTERS = {"filters": [{"filter": "self_attn", "value": 0.5},
                       {"filter": "mlp", "value": {"layers": [0.0, 1.0]}},
                       {"filter": "q_proj", "value": 0.9}]}   # shadowed by self_attn: first match wins


@pytest.mark.parametrize("name, layer, expected", [
    (ATTN.format(0), 0, 0.5),
    (ATTN.format(2), 2, 0.5),
    (MLP.format(0), 0, 0.0),
    (MLP.format(1), 1, 0.5),            # gradient inside a filter: t = 1/2
    (MLP.format(2), 2, 1.0),
    (NORM.format(1), 1, None),          # no entry matches: absent
    ("model.embed_tokens.weight", None, None),
])
def test_resolution_table(name, layer, expected):
    got = schedules.resolve({"density": FILTERS, "lambda": 2.0}, layer, NUM_LAYERS, name)
    assert got.get("density") == (pytest.approx(expected) if expected is not None else None)
    assert got["lambda"] == 2.0
    assert ("density" in got) == (expected is not None)


def test_catch_all_star_and_gradient_ends():
    star = {"filters": [{"filter": "mlp", "value": 1.0}, {"filter": "*", "value": 0.2}, {"value": 0.7}]}
    assert schedules.resolve({"x": star}, 0, 3, NORM.format(0)) == {"x": 0.2}
    assert schedules.resolve({"x": star}, None, 3, "") == {"x": 0.2}   # "*" matches even without a name
    # mergekit's t: the first value outside the blocks, the last for a single block
    assert schedules.value_at([0.1, 0.9], None, 4) == 0.1
    assert schedules.value_at([0.1, 0.9], 0, 1) == 0.9
    assert schedules.value_at([0.0, 1.0, 0.0], 1, 5) == pytest.approx(0.5)
    # bools and strings are picked, not interpolated (values[int(t·(n−1))])
    assert [schedules.value_at([True, False], i, 3) for i in range(3)] == [True, True, False]
    assert [schedules.value_at(["a", "b", "c"], i, 4) for i in range(4)] == ["a", "a", "b", "c"]


def test_fallback_concatenates_in_precedence_order():
    model = {"filters": [{"filter": "mlp", "value": 0.1}]}
    assert schedules.with_fallback(model, 0.4) == {"filters": [{"filter": "mlp", "value": 0.1}, {"value": 0.4}]}
    glob = {"filters": [{"filter": "self_attn", "value": 0.3}]}
    both = schedules.with_fallback(model, glob)
    for name in (MLP.format(0), ATTN.format(0), NORM.format(0)):
        assert schedules.resolve({"d": both}, 0, 3, name).get("d") == mk_resolve(
            name, [{"filter": "mlp", "value": 0.1}], [{"filter": "self_attn", "value": 0.3}])
    assert schedules.with_fallback(0.2, glob) == 0.2 and schedules.with_fallback({"layers": [1, 2]}, 3) == {"layers": [1, 2]}


def plan_of(recipe: dict):
    names = [m["path"] for m in recipe["models"]]
    pre = {n: StateDictSource(FTS[i], n) for i, n in enumerate(names)}
    if recipe.get("base"):
        pre[recipe["base"]] = StateDictSource(BASE, "base")
    return plan_merge(parse_recipe(recipe), preloaded=pre)


def test_precedence_model_then_recipe_then_default():
    """A model's filter list that matches nothing leaves the recipe's value, then the default."""
    plan = plan_of({"method": "ties", "base": "b", "params": {
        "scope": "tensor", "density": {"filters": [{"filter": "self_attn", "value": 0.6}]}},
        "models": [{"path": "a0", "params": {"density": {"filters": [{"filter": "mlp", "value": 0.1}]}}},
                   {"path": "a1"}]})
    assert plan.scheduled
    by_name = {t.name: t.info for t in plan.merged}
    default = plan.method.params.model_fields["density"].default
    for name, info in by_name.items():
        params, per_model = plan.params_for(info)
        shared = 0.6 if "self_attn" in name else default
        assert params.density == pytest.approx(shared), name
        assert per_model[0].get("density", params.density) == pytest.approx(0.1 if "mlp" in name else shared), name
        assert "density" not in per_model[1]
    # one resolution per distinct (layer, matched filters), not per tensor
    assert len(plan._by_key) == len({(i.layer, "self_attn" in n, "mlp" in n) for n, i in by_name.items()})


def test_without_per_tensor_values_the_plan_is_unchanged():
    plan = plan_of({"method": "ties", "base": "b", "params": {"scope": "tensor", "density": 0.4},
                    "models": [{"path": "a0"}, {"path": "a1"}]})
    assert not plan.scheduled
    info = plan.merged[0].info
    assert plan.params_for(info) == (plan.params, plan.model_params) and plan.weights_for(info) is plan.weights
    assert not plan._by_key


# ---------------------------------------------------------------- merges against dense references


def ta_reference(weights, lam, normalize=False):
    """mergekit task_arithmetic per tensor: base + λ·Σ w_i τ_i (÷ Σ w_i when normalised)."""
    out = {}
    for n in BASE:
        w = [mk_resolve(n, wi, default=1.0) for wi in weights]
        mixed = sum(wi * (ft[n] - BASE[n]) for wi, ft in zip(w, FTS))
        if normalize:
            mixed = mixed / sum(w)
        out[n] = BASE[n] + mk_resolve(n, lam, default=1.0) * mixed
    return out


def assert_close(out, ref, what):
    for n in ref:
        diff = (out[n] - ref[n]).abs().max().item()
        assert diff <= 1e-5, f"{what}: {n} differs by {diff}"


def save(tmp_path, sd, name):
    from safetensors.torch import save_file

    folder = tmp_path / name
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    return str(folder)


@pytest.fixture
def folders(tmp_path):
    return {"base": save(tmp_path, BASE, "base"), "ft0": save(tmp_path, FTS[0], "ft0"),
            "ft1": save(tmp_path, FTS[1], "ft1")}


def run_yaml(tmp_path, data):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    merge(path, tmp_path / "out")
    return load_sd(tmp_path / "out")


def test_mergekit_task_arithmetic_filters(folders, tmp_path):
    lam = [{"filter": "self_attn", "value": [0.5, 1.5]}, {"filter": "mlp", "value": 0.8}]  # rest: default 1
    w0 = [{"filter": "mlp", "value": 0.3}, {"filter": "layers.1", "value": -0.4}]  # falls back to the global
    glob_w = [{"filter": "self_attn", "value": [1.0, 2.0]}, {"value": 0.7}]
    out = run_yaml(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": folders["base"],
        "models": [{"model": folders["ft0"], "parameters": {"weight": w0}}, {"model": folders["ft1"]}],
        "parameters": {"lambda": lam, "weight": glob_w}, "dtype": "float32"})
    ref = ta_reference([w0 + glob_w, glob_w], lam)
    assert_close(out, ref, "task_arithmetic with filters")


def test_native_filters_and_weights(tmp_path):
    weight0 = {"filters": [{"filter": "mlp", "value": {"layers": [0.2, 0.6]}}, {"value": 0.5}]}
    lam = {"filters": [{"filter": "norm", "value": 0.0}, {"value": {"layers": [1.0, 0.5]}}]}
    out = merge_state_dicts("task_arithmetic", FTS, base=BASE, params={"lambda": lam, "normalize": True},
                            weights=[weight0, 1.5])
    ref = ta_reference([[{"filter": "mlp", "value": [0.2, 0.6]}, {"value": 0.5}], 1.5],
                       [{"filter": "norm", "value": 0.0}, {"value": [1.0, 0.5]}], normalize=True)
    assert_close(out, ref, "native task_arithmetic with filters")


def mk_ties(base, fts, weights, densities):
    """mergekit ties per tensor: keep max(1, int(d·n)) largest, elect the sign (ties to +),
    divide by the weights of the agreeing models."""
    deltas = []
    for ft, d, w in zip(fts, densities, weights):
        t = ft - base
        if d < 1:
            k = max(1, int(d * t.numel()))
            mask = torch.zeros(t.numel())
            mask[torch.argsort(t.abs().reshape(-1), descending=True)[:k]] = 1
            t = t * mask.reshape_as(t)
        deltas.append(t * w)
    deltas = torch.stack(deltas)
    sign = (deltas.sum(0) >= 0).float() * 2 - 1
    agree = (deltas.sign() == sign).float()
    w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    div = (w * agree).sum(0)
    div[div == 0] = 1
    return base + (deltas * agree).sum(0) / div


def test_mergekit_ties_density_filters(folders, tmp_path):
    d_glob = [{"filter": "mlp", "value": [0.2, 0.9]}, {"filter": "self_attn", "value": 0.5}]  # rest: default 1
    d1 = [{"filter": "self_attn", "value": 0.3}]
    out = run_yaml(tmp_path, {
        "merge_method": "ties", "base_model": folders["base"],
        "models": [{"model": folders["ft0"], "parameters": {"weight": 0.7}},
                   {"model": folders["ft1"], "parameters": {"weight": 1.2, "density": d1}}],
        "parameters": {"density": d_glob}, "dtype": "float32"})
    ref = {n: mk_ties(BASE[n], [f[n] for f in FTS], [0.7, 1.2],
                      [mk_resolve(n, d_glob, default=1.0), mk_resolve(n, d1, d_glob, default=1.0)]) for n in BASE}
    assert_close(out, ref, "ties with density filters")


def test_statistics_pass_sees_per_tensor_params():
    """Global TIES: the statistics pass, then λ per tensor; the same as scaling one plain merge."""
    lam = {"filters": [{"filter": "mlp", "value": 0.25}, {"value": {"layers": [1.0, 3.0]}}]}
    plain = merge_state_dicts("ties", FTS, base=BASE, params={"density": 0.4, "scope": "global"}, exact_stats=True)
    out = merge_state_dicts("ties", FTS, base=BASE, params={"density": 0.4, "scope": "global", "lambda": lam},
                            exact_stats=True)
    ref = {n: BASE[n] + mk_resolve(n, [{"filter": "mlp", "value": 0.25}, {"value": [1.0, 3.0]}]) * (plain[n] - BASE[n])
           for n in BASE}
    assert_close(out, ref, "global ties, lambda per tensor")
    with pytest.raises(MergeError, match="density.*varies by tensor"):
        merge_state_dicts("ties", FTS, base=BASE, params={
            "scope": "global", "density": {"filters": [{"filter": "mlp", "value": 0.2}, {"value": 0.4}]}})


def test_filtered_merge_equals_merges_of_each_part():
    """Seeded DARE with a filtered density and scope: each part as its own plain merge."""
    density = {"filters": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}]}
    out = merge_state_dicts("dare_ties", FTS, base=BASE, params={"density": density}, seed=3)
    mlp = merge_state_dicts("dare_ties", FTS, base=BASE, params={"density": 0.3}, include=["*mlp*"], seed=3)
    rest = merge_state_dicts("dare_ties", FTS, base=BASE, params={"density": 0.8}, exclude=["*mlp*"], seed=3)
    assert_close(out, {n: (mlp if "mlp" in n else rest)[n] for n in BASE}, "dare_ties with a filtered density")
    # a value that changes which whole-model statistics are needed is refused, before any work
    scope = {"filters": [{"filter": "self_attn", "value": "tensor"}, {"value": "global"}]}
    with pytest.raises(MergeError, match="whole-model statistics"):
        merge_state_dicts("ties", FTS, base=BASE, params={"density": 0.5, "scope": scope})


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("value, fragment", [
    ({"filters": [0.5]}, "filters[0] is 0.5, not a mapping"),
    ({"filters": [{"filter": "mlp", "value": 0.5, "when": 1}]}, "unknown key 'when'"),
    ({"filters": [{"filter": 3, "value": 0.5}]}, "`filter` must be a string"),
    ({"filters": [{"filter": "mlp"}]}, "has no `value`"),
    ({"filters": []}, "non-empty list"),
    ({"filters": [{"value": {"filters": [{"value": 1}]}}]}, "do not nest"),
    ({"filters": [{"value": {"layers": []}}]}, "`layers` must be a non-empty list"),
    ({"layers": [0.1], "filters": []}, "exactly one key"),
    ({"filters": [{"filter": "nothing-matches", "value": 1.5}, {"value": 0.5}]}, "density"),  # deep, unmatched
    ({"filters": [{"value": {"layers": [0.5, 2.0]}}]}, "density"),
])
def test_bad_filter_lists_are_one_line_errors(value, fragment):
    with pytest.raises(MergeError) as e:
        plan_of({"method": "ties", "base": "b", "params": {"scope": "tensor", "density": value},
                 "models": [{"path": "a0"}, {"path": "a1"}]})
    msg = str(e.value)
    assert "\n" not in msg and fragment in msg and "density" in msg, msg


def test_bad_weights_and_mergekit_entries():
    with pytest.raises(MergeError, match="`weight` must be a number"):
        plan_of({"method": "task_arithmetic", "base": "b", "models": [
            {"path": "a0", "weight": {"filters": [{"value": "heavy"}]}}, {"path": "a1"}]})
    with pytest.raises(MergeError, match="weights sum to 0 at tensor"):
        plan_of({"method": "linear", "params": {"normalize": True}, "models": [
            {"path": "a0", "weight": {"filters": [{"filter": "mlp", "value": -1.0}]}}, {"path": "a1"}]})
    for bad in ([{"filter": "mlp"}], [{"filter": ["mlp"], "value": 1}], [{"value": [[1]]}], [{"value": None}],
                [{"filter": "mlp", "value": 1}, 0.5], []):
        with pytest.raises(MergeError, match="density"):
            parse_recipe({"merge_method": "ties", "base_model": "b", "models": ["a"],
                          "parameters": {"density": bad}})
    one = parse_recipe({"merge_method": "ties", "base_model": "b", "models": ["a"],
                        "parameters": {"density": {"filter": "mlp", "value": [0.1, 0.2]}}})
    assert one.models[0].params["density"] == {"filters": [{"filter": "mlp", "value": {"layers": [0.1, 0.2]}}]}
    # a shared parameter's list falls back to mergekit's default (lambda 1), not the native one
    r = parse_recipe({"merge_method": "ties", "base_model": "b", "models": ["a"],
                      "parameters": {"lambda": [{"filter": "mlp", "value": 0.5}]}})
    assert r.params["lambda"] == {"filters": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}


def test_cli_error_is_one_line(folders, tmp_path, capsys):
    from conftest import cli_fails

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": folders["base"], "models": [
        folders["ft0"], folders["ft1"]], "params": {"lambda": {"filters": [{"filtre": "mlp", "value": 1}]}}}))
    cli_fails(capsys, ["merge", str(recipe), "-o", str(tmp_path / "o")], tmp_path / "o", "lambda", "filtre")


# ---------------------------------------------------------------- fuzz

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=4))
keys = st.sampled_from(["filter", "value", "layers", "filters", "x"])
nested = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=3)), max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=nested, mergekit=st.booleans(), per_model=st.booleans())
def test_fuzz_parser_raises_only_merge_error(value, mergekit, per_model):
    where = "parameters" if mergekit else "params"
    if mergekit:
        data = {"merge_method": "ties", "base_model": "b", "models": [
            {"model": "a0", "parameters": {"density": value}} if per_model else {"model": "a0"}, {"model": "a1"}]}
        if not per_model:
            data[where] = {"density": value}
    else:
        data = {"method": "ties", "base": "b", "params": {"scope": "tensor"},
                "models": [{"path": "a0", "params": {"density": value} if per_model else {}}, {"path": "a1"}]}
        if not per_model:
            data["params"]["density"] = value
    try:
        recipe = parse_recipe(data)
        pre = {"a0": StateDictSource(FTS[0], "a0"), "a1": StateDictSource(FTS[1], "a1"), "b": StateDictSource(BASE, "b")}
        plan = plan_merge(recipe, preloaded=pre)
    except MergeError as e:
        assert "\n" not in str(e)
        return
    for t in plan.merged:  # a plan that passed resolves every tensor
        plan.params_for(t.info)
