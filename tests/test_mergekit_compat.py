"""mergekit recipes give mergekit's tensors (to 1e-5 in float32).

The `mk_*` functions below restate mergekit 0.1.5's maths (merge_methods/linear.py,
generalized_task_arithmetic.py, sparsify.py, model_stock.py, slerp.py) line by line; the
recipes are mergekit YAML files on tiny Llama models, merged by modalmerge. With mergekit set
up (tests/mergekit_reference.py), the references are also checked against mergekit itself
(tests/test_mergekit_conformance.py compares whole merges).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml

from conftest import load_sd, run_mergekit_yaml as run_yaml
from mergekit_reference import requires_mergekit, run_mergekit
from modalmerge import merge_state_dicts
from modalmerge.engine.recipe import method_params_from_mergekit, parse_recipe
from modalmerge.errors import MergeError, Note
from modalmerge.methods.registry import METHODS

# ---------------------------------------------------------------- mergekit 0.1.5's maths


def mk_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """sparsify.magnitude: exactly k = max(1, int(density·n)) largest |t| kept (argsort selection)."""
    if density >= 1:
        return t
    if density <= 0:
        return torch.zeros_like(t)
    k = max(1, int(density * t.numel()))
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.argsort(t.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return t * mask.reshape_as(t)


def mk_rescale_l1(t: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """sparsify.rescaled_masked_tensor with RescaleNorm.l1."""
    before, after = t.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def mk_magnitude_outliers(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """sparsify.magnitude_outliers (breadcrumbs): over the whole tensor, drop the gamma·n largest
    and the smallest, keep int(density·n)."""
    if density >= 1:
        return t
    n = t.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    idx = torch.sort(t.abs().reshape(-1).float()).indices
    mask = torch.zeros(n, dtype=t.dtype)
    mask[idx[n_bot:n_bot + target]] = 1
    return t * mask.reshape_as(t)


def mk_gta(base, models, weights, *, consensus: bool, normalize: bool, lam: float = 1.0,
           sparsify=None) -> torch.Tensor:
    """GeneralizedTaskArithmeticMerge.merge_group: weights inside, sum-consensus with ties → +1,
    divisor = Σ weights of the agreeing models (zero → 1)."""
    deltas = torch.stack([(sparsify(i, m - base) if sparsify else m - base) for i, m in enumerate(models)])
    w = torch.tensor(weights, dtype=deltas.dtype).reshape((-1,) + (1,) * base.dim())
    deltas = deltas * w
    if consensus:
        majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        mask = (deltas.sign() == majority).to(deltas.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def mk_linear(tensors, weights, normalize: bool = True) -> torch.Tensor:
    """linear_merge (the base model, when given, is one of the inputs)."""
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out = out + t * w
    return out / sum(weights) if normalize else out


def mk_model_stock(base, models, filter_wise: bool = False) -> torch.Tensor:
    """model_stock_merge_method."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [m.unsqueeze(0) if base.dim() == 1 else m for m in models]
    else:
        w0, ws = base.reshape(-1), [m.reshape(-1) for m in models]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def mk_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """slerp over the whole tensor (v0 = the base)."""
    a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
    na, nb = a.norm(), b.norm()
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        ca, cb = 1 - t, t
    else:
        theta = torch.acos(dot)
        ca, cb = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    return (ca * a + cb * b).reshape(v0.shape).to(v0.dtype)


# ---------------------------------------------------------------- helpers


def assert_close(out, ref, what):
    for name in ref:
        diff = (out[name] - ref[name]).abs().max().item()
        assert diff <= 1e-5, f"{what}: {name} differs from mergekit by {diff}"


def needs(method: str):
    if not any(method in m.mergekit_names for m in METHODS.values()):
        pytest.skip(f"mergekit method {method} has no modalmerge counterpart in this registry yet")


@pytest.fixture(scope="module")
def family(llama_family):
    sds = {k: load_sd(v) for k, v in llama_family.items()}
    return llama_family, sds


# ---------------------------------------------------------------- linear, task arithmetic, TIES


def test_linear_averages_the_base_too(family, tmp_path):
    paths, sd = family
    out = run_yaml(tmp_path, {
        "merge_method": "linear", "base_model": str(paths["base"]),
        "models": [{"model": str(paths["ft0"]), "parameters": {"weight": 0.6}},
                   {"model": str(paths["ft1"]), "parameters": {"weight": 0.3}}],
        "parameters": {"weight": 0.1},  # the default of every input, so the base's weight
        "dtype": "float32",
    })
    ref = {n: mk_linear([sd["ft0"][n], sd["ft1"][n], sd["base"][n]], [0.6, 0.3, 0.1]) for n in sd["base"]}
    assert_close(out, ref, "linear")


def test_linear_unnormalised(family, tmp_path):
    paths, sd = family
    out = run_yaml(tmp_path, {
        "merge_method": "linear",
        "models": [{"model": str(paths[f"ft{i}"]), "parameters": {"weight": w}} for i, w in enumerate([0.5, 0.25, 0.5])],
        "parameters": {"normalize": False}, "dtype": "float32",
    })
    ref = {n: mk_linear([sd[f"ft{i}"][n] for i in range(3)], [0.5, 0.25, 0.5], normalize=False) for n in sd["base"]}
    assert_close(out, ref, "linear normalize=false")


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(family, tmp_path, normalize):
    paths, sd = family
    weights = [0.7, -0.3, 0.5]
    out = run_yaml(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": str(paths["base"]),
        "models": [{"model": str(paths["base"])}]  # a listed base is no task vector
        + [{"model": str(paths[f"ft{i}"]), "parameters": {"weight": w}} for i, w in enumerate(weights)],
        "parameters": {"lambda": 0.8, "normalize": normalize}, "dtype": "float32",
    })
    ref = {n: mk_gta(sd["base"][n], [sd[f"ft{i}"][n] for i in range(3)], weights, consensus=False,
                     normalize=normalize, lam=0.8) for n in sd["base"]}
    assert_close(out, ref, "task_arithmetic")


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_per_tensor_density_and_weights(family, tmp_path, normalize):
    paths, sd = family
    weights, densities = [0.7, 0.3, 1.0], [0.5, None, 0.01]  # 0.01 of a 32-entry norm: mergekit keeps 1
    models = []
    for i, (w, d) in enumerate(zip(weights, densities)):
        p = {"weight": w}
        if d is not None:
            p["density"] = d
        models.append({"model": str(paths[f"ft{i}"]), "parameters": p})
    out = run_yaml(tmp_path, {
        "merge_method": "ties", "base_model": str(paths["base"]), "models": models,
        "parameters": {"density": 0.3, "lambda": 0.9, "normalize": normalize, "int8_mask": True},
        "dtype": "float32",
    })
    dens = [0.5, 0.3, 0.01]
    ref = {n: mk_gta(sd["base"][n], [sd[f"ft{i}"][n] for i in range(3)], weights, consensus=True,
                     normalize=normalize, lam=0.9, sparsify=lambda i, d: mk_magnitude(d, dens[i]))
           for n in sd["base"]}
    assert_close(out, ref, f"ties normalize={normalize}")


def test_ties_zero_sum_elects_plus_and_keeps_one_entry():
    # entry 0: the weighted deltas sum to exactly 0; mergekit elects + there (the tensor's total is −1)
    base = {"w": torch.zeros(2)}
    models = [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([-1.0, 1.0])}]
    params = method_params_from_mergekit("ties", {"normalize": True, "lambda": 1.0, "density": 1.0})
    out = merge_state_dicts("ties", models, base, params)
    assert out["w"].tolist() == [1.0, -2.0]
    # density 0.1 of 2 entries: int(0.2) = 0, but mergekit keeps each model's largest one
    models = [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([-1.0, 0.5])}]
    params = method_params_from_mergekit("ties", {"normalize": True, "density": 0.1})
    assert merge_state_dicts("ties", models, base, params)["w"].tolist() == [-1.0, -2.0]
    native = merge_state_dicts("ties", models, base, {"density": 0.1, "scope": "tensor"})
    assert native["w"].tolist() == [0.0, 0.0]


def test_recipe_translation_and_errors(tmp_path):
    r = parse_recipe({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 2}}],
                      "parameters": {"density": 0.4, "normalize": False}, "dtype": "bfloat16"})
    assert r.method == "ties" and r.base == "b" and r.dtype == "bfloat16"
    assert r.params == {"aggregate": "sum", "scope": "tensor", "tie": "positive", "keep_min": 1, "lambda": 1.0,
                        "density": 1.0}
    assert r.models[0].weight == 2 and r.models[0].params == {"density": 0.4}
    # a gradient becomes a per-layer schedule; a filter list a native one (tests/test_param_filters.py)
    a = [{"model": "a", "parameters": {"weight": 1}}]
    r = parse_recipe({"merge_method": "ties", "base_model": "b", "models": a, "parameters": {"lambda": [0.1, 0.5]}})
    assert r.params["lambda"] == {"layers": [0.1, 0.5]}
    r = parse_recipe({"merge_method": "ties", "base_model": "b", "models": a,
                      "parameters": {"density": [{"filter": "mlp", "value": 0.1}, {"value": 0.5}]}})
    assert r.models[0].params["density"] == {"filters": [{"filter": "mlp", "value": 0.1}, {"value": 0.5}]}
    with pytest.raises(MergeError, match="rescale"):
        parse_recipe({"merge_method": "ties", "base_model": "b", "models": a, "parameters": {"rescale": True}})
    with pytest.raises(MergeError, match="slices"):
        parse_recipe({"merge_method": "linear", "slices": []})
    # mergekit stops when an input of these methods has no weight; we use 1.0 and say so
    for method in ("ties", "task_arithmetic", "linear", "nuslerp", "multislerp", "della", "breadcrumbs_ties"):
        with pytest.warns(Note, match=f"mergekit's {method} requires a `weight` for every input .* 'a', 'c'"):
            r = parse_recipe({"merge_method": method, "base_model": "b", "models": ["a", "c"]})
        assert all(m.weight == 1.0 for m in r.models)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # given at the top level: every model's, and no note
        r = parse_recipe({"merge_method": "ties", "base_model": "b", "models": ["a"], "parameters": {"weight": 0.5}})
    assert r.models[0].weight == 0.5  # a top-level weight is every model's


# ---------------------------------------------------------------- methods other helpers add


def test_breadcrumbs(family, tmp_path):
    needs("breadcrumbs")
    paths, sd = family
    out = run_yaml(tmp_path, {
        "merge_method": "breadcrumbs", "base_model": str(paths["base"]),
        "models": [{"model": str(paths[f"ft{i}"]), "parameters": {"weight": 1.0}} for i in range(3)],
        "parameters": {"density": 0.5, "gamma": 0.05, "lambda": 0.7}, "dtype": "float32",
    })
    ref = {n: mk_gta(sd["base"][n], [sd[f"ft{i}"][n] for i in range(3)], [1.0] * 3, consensus=False,
                     normalize=False, lam=0.7, sparsify=lambda i, d: mk_magnitude_outliers(d, 0.5, 0.05))
           for n in sd["base"]}
    assert_close(out, ref, "breadcrumbs")


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_without_drops(family, tmp_path, method):
    # mergekit's DARE draws its masks from torch's global generator: only density 1 compares exactly
    needs(method)
    paths, sd = family
    weights = [0.5, 0.3, 0.2]
    out = run_yaml(tmp_path, {
        "merge_method": method, "base_model": str(paths["base"]),
        "models": [{"model": str(paths[f"ft{i}"]), "parameters": {"weight": w}} for i, w in enumerate(weights)],
        "parameters": {"density": 1.0, "lambda": 1.2}, "dtype": "float32",
    })
    ref = {n: mk_gta(sd["base"][n], [sd[f"ft{i}"][n] for i in range(3)], weights,
                     consensus=method == "dare_ties", normalize=False, lam=1.2) for n in sd["base"]}
    assert_close(out, ref, method)


def test_model_stock(family, tmp_path):
    needs("model_stock")
    paths, sd = family
    out = run_yaml(tmp_path, {
        "merge_method": "model_stock", "base_model": str(paths["base"]),
        "models": [{"model": str(paths[f"ft{i}"])} for i in range(3)], "dtype": "float32",
    })
    ref = {n: mk_model_stock(sd["base"][n], [sd[f"ft{i}"][n] for i in range(3)]) for n in sd["base"]}
    assert_close(out, ref, "model_stock")


def test_slerp(family, tmp_path):
    needs("slerp")
    paths, sd = family
    out = run_yaml(tmp_path, {
        "merge_method": "slerp", "base_model": str(paths["base"]),
        "models": [{"model": str(paths["base"])}, {"model": str(paths["ft0"])}],
        "parameters": {"t": 0.3}, "dtype": "float32",
    })
    ref = {n: mk_slerp(0.3, sd["base"][n], sd["ft0"][n]) for n in sd["base"]}
    assert_close(out, ref, "slerp")


# ---------------------------------------------------------------- the references against mergekit itself


@requires_mergekit
def test_references_match_mergekit(family, tmp_path):
    """The mk_* restatements above against mergekit 0.1.5 itself (its own environment: README, "## Test"),
    on the same recipes, all in one mergekit run."""
    paths, sd = family
    fts = [sd[f"ft{i}"] for i in range(3)]
    w, d = [0.7, -0.2, 0.5], [0.3, 0.05, 1.0]

    def models(**per):
        return [{"model": str(paths[f"ft{i}"]), "parameters": {k: v[i] for k, v in per.items()}} for i in range(3)]

    base = {"base_model": str(paths["base"]), "dtype": "float32"}
    cases = {
        "linear": ({"merge_method": "linear", "dtype": "float32", "models": models(weight=[0.7, 0.2, 0.5])},
                   lambda n: mk_linear([m[n] for m in fts], [0.7, 0.2, 0.5])),
        "task_arithmetic": ({"merge_method": "task_arithmetic", **base, "models": models(weight=w),
                             "parameters": {"lambda": 0.8}},
                            lambda n: mk_gta(sd["base"][n], [m[n] for m in fts], w, consensus=False, normalize=False,
                                             lam=0.8)),
        "ties": ({"merge_method": "ties", **base, "models": models(weight=w, density=d), "parameters": {"lambda": 0.8}},
                 lambda n: mk_gta(sd["base"][n], [m[n] for m in fts], w, consensus=True, normalize=True, lam=0.8,
                                  sparsify=lambda i, x: mk_magnitude(x, d[i]))),
        "breadcrumbs": ({"merge_method": "breadcrumbs", **base, "models": models(weight=w, density=d),
                         "parameters": {"gamma": 0.02}},
                        lambda n: mk_gta(sd["base"][n], [m[n] for m in fts], w, consensus=False, normalize=False,
                                         sparsify=lambda i, x: mk_magnitude_outliers(x, d[i], 0.02))),
        "model_stock": ({"merge_method": "model_stock", **base, "models": [{"model": str(paths[f"ft{i}"])}
                                                                          for i in range(3)]},
                        lambda n: mk_model_stock(sd["base"][n], [m[n] for m in fts])),
        "slerp": ({"merge_method": "slerp", **base, "models": [{"model": str(paths["base"])},
                                                               {"model": str(paths["ft0"])}], "parameters": {"t": 0.3}},
                  lambda n: mk_slerp(0.3, sd["base"][n], sd["ft0"][n])),
    }
    jobs = []
    for name, (recipe, _) in cases.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(recipe, sort_keys=False))
        jobs.append({"kind": "yaml", "config": config, "out": tmp_path / name,
                     "options": {"copy_tokenizer": False, "write_model_card": False}})
    run_mergekit(jobs)
    for name, (_, reference) in cases.items():
        assert_close(load_sd(tmp_path / name), {n: reference(n) for n in sd["base"]}, f"mergekit's {name}")
