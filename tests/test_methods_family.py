"""DARE, DELLA, Breadcrumbs, Model Stock and SLERP against hand cases and dense references."""

import math

import pytest
import torch

from conftest import finetunes, random_state_dict
from modalmerge import merge_state_dicts
from modalmerge.engine.recipe import parse_recipe
from modalmerge.errors import MergeError
from modalmerge.methods.base import TensorGroup, TensorInfo

SHAPES = {"w": (24, 10), "b": (30,), "e": (9, 7)}


def family(seed=0, n=3, shapes=SHAPES):
    base = random_state_dict(seed, shapes)
    return base, finetunes(base, n, seed=50 + seed)


def uniform(name, shape, t, seed=0):
    """The engine's seeded uniforms for model t over a whole tensor (the random source under test
    is chunk-invariance, checked separately; the references use the whole-tensor draw)."""
    g = TensorGroup(TensorInfo(name, tuple(shape)), None, torch.zeros((1,) + tuple(shape)), [], torch.ones(1), [],
                    seed=seed)
    return g.uniform(t)


def dense_elect(x, weights, aggregate="mean"):
    """TIES election and disjoint merge of a weighted stack x [T, ...] (spec 0)."""
    w = torch.tensor(weights).reshape((-1,) + (1,) * (x.dim() - 1))
    gamma = torch.sign(x.sum(0))
    gamma[gamma == 0] = 1.0 if x.sum() >= 0 else -1.0
    agree = (torch.sign(x) == gamma) & (x != 0)
    if aggregate == "sum":
        return (x * agree).sum(0)
    if aggregate == "max":
        return (x.abs() * agree).amax(0) * gamma
    den = (agree * w).sum(0)
    return (x * agree).sum(0) / torch.where(den == 0, torch.ones_like(den), den)


def l1_rescaled(pruned, tau):
    before, after = tau.abs().sum(), pruned.abs().sum()
    return pruned if before < 1e-7 or after < 1e-7 else pruned * (before / after)


def dense_dare(base, models, density, rescale="inverse", seed=0):
    out = {}
    for n in base:
        taus = []
        for t, m in enumerate(models):
            tau = m[n] - base[n]
            if density < 1:
                pruned = tau * (uniform(n, tau.shape, t, seed) < density)
                tau = pruned / density if rescale == "inverse" else l1_rescaled(pruned, tau) if rescale == "l1" else pruned
            taus.append(tau)
        out[n] = torch.stack(taus)
    return out


def assert_close(out, ref, atol=1e-6):
    assert set(out) == set(ref)
    for n in ref:
        assert torch.allclose(out[n], ref[n], atol=atol), (n, (out[n] - ref[n]).abs().max())


def assert_equal(a, b):
    for n in a:
        assert torch.equal(a[n], b[n]), n


# -- DARE ---------------------------------------------------------------------------------------

def test_dare_hand_case_density_one_is_task_arithmetic():
    base = {"x": torch.zeros(2)}
    models = [{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, -4.0])}]
    out = merge_state_dicts("dare_linear", models, base=base, params={"density": 1.0, "lambda": 0.5})
    assert torch.allclose(out["x"], torch.tensor([2.0, -1.0]))


def test_dare_survivors_are_rescaled_by_inverse_density_and_kept_at_the_right_rate():
    base = {"x": torch.zeros(200, 100)}
    tau = torch.randn(200, 100, generator=torch.Generator().manual_seed(0))
    out = merge_state_dicts("dare_linear", [{"x": tau}], base=base, params={"density": 0.3, "lambda": 1.0})["x"]
    kept = out != 0
    assert torch.allclose(out[kept], tau[kept] / 0.3, atol=1e-6)
    assert abs(kept.float().mean().item() - 0.3) < 0.02


def test_dare_l1_rescale_keeps_each_tensors_l1_norm():
    base, models = family(1, n=1)
    out = merge_state_dicts("dare_linear", models, base=base,
                            params={"density": 0.4, "rescale": "l1", "lambda": 1.0}, chunk_elems=64)
    for n in base:
        tau = models[0][n] - base[n]
        delta = out[n] - base[n]
        assert math.isclose(delta.abs().sum().item(), tau.abs().sum().item(), rel_tol=1e-5)
        assert (delta == 0).any()


@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
@pytest.mark.parametrize("normalize", [False, True])
def test_dare_linear_matches_dense_reference(rescale, normalize):
    base, models = family(2)
    weights = [0.5, 1.0, 2.0]
    params = {"density": 0.6, "rescale": rescale, "lambda": 0.7, "normalize": normalize}
    out = merge_state_dicts("dare_linear", models, base=base, params=params, weights=weights, seed=3)
    dared = dense_dare(base, models, 0.6, rescale, seed=3)
    w = torch.tensor(weights) / (sum(weights) if normalize else 1.0)
    ref = {n: base[n] + 0.7 * (dared[n] * w.reshape((-1,) + (1,) * base[n].dim())).sum(0) for n in base}
    assert_close(out, ref)


def test_dare_default_parameters():
    base, models = family(3, n=2)
    out = merge_state_dicts("dare_linear", models, base=base)
    dared = dense_dare(base, models, 0.5)
    assert_close(out, {n: base[n] + 0.3 * dared[n].sum(0) for n in base})


def test_dare_is_the_same_under_any_chunking_and_changes_with_the_seed():
    base, models = family(4, shapes={"w": (64, 40), "b": (300,)})
    for method in ("dare_linear", "dare_ties"):
        runs = [merge_state_dicts(method, models, base=base, params={"density": 0.5}, chunk_elems=c)
                for c in (1 << 22, 1000, 200, 40)]  # w: whole, 24-, 8-row blocks; b: whole, 200, 40
        for run in runs[1:]:
            assert_equal(runs[0], run)
        other = merge_state_dicts(method, models, base=base, params={"density": 0.5}, seed=1)
        assert not torch.equal(runs[0]["w"], other["w"])


def test_dare_ties_hand_case():
    base = {"x": torch.zeros(3)}
    models = [{"x": torch.tensor([1.0, -2.0, 0.5])}, {"x": torch.tensor([-3.0, 1.0, 0.5])}]
    out = merge_state_dicts("dare_ties", models, base=base, params={"density": 1.0})
    # sums [-2, -1, 1] elect [-, -, +]; the agreeing values' means
    assert torch.allclose(out["x"], torch.tensor([-3.0, -2.0, 0.5]))


@pytest.mark.parametrize("aggregate", ["mean", "sum", "max"])
def test_dare_ties_matches_dense_reference_and_chunks(aggregate):
    base, models = family(5)
    weights = [1.0, 0.5, 2.0]
    params = {"density": 0.5, "aggregate": aggregate, "lambda": 0.8}
    out = merge_state_dicts("dare_ties", models, base=base, params=params, weights=weights)
    chunked = merge_state_dicts("dare_ties", models, base=base, params=params, weights=weights, chunk_elems=40)
    dared = dense_dare(base, models, 0.5)
    w = torch.tensor(weights)
    ref = {n: base[n] + 0.8 * dense_elect(dared[n] * w.reshape((-1,) + (1,) * base[n].dim()), weights, aggregate)
           for n in base}
    assert_close(out, ref)
    assert_equal(out, chunked)


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_dare_ties_with_trim_trims_first_then_drops(scope):
    base, models = family(6)
    params = {"density": 0.7, "trim": True, "trim_density": 0.4, "scope": scope}
    out = merge_state_dicts("dare_ties", models, base=base, params=params, exact_stats=True)
    chunked = merge_state_dicts("dare_ties", models, base=base, params=params, exact_stats=True, chunk_elems=40)
    names = list(base)
    taus = {n: [m[n] - base[n] for m in models] for n in names}
    for t in range(len(models)):
        if scope == "global":
            allv = torch.cat([taus[n][t].reshape(-1).abs() for n in names])
            thr = torch.sort(allv, descending=True).values[int(0.4 * allv.numel()) - 1]
            for n in names:
                taus[n][t] = taus[n][t] * (taus[n][t].abs() >= thr)
        else:
            for n in names:
                flat = taus[n][t].reshape(-1)
                keep = torch.zeros_like(flat, dtype=torch.bool)
                keep[torch.sort(flat.abs(), descending=True).indices[:int(0.4 * flat.numel())]] = True
                taus[n][t] = (flat * keep).reshape(taus[n][t].shape)
    ref = {}
    for n in names:
        x = torch.stack([tau * (uniform(n, tau.shape, t) < 0.7) / 0.7 for t, tau in enumerate(taus[n])])
        ref[n] = base[n] + dense_elect(x, [1.0] * 3)
    assert_close(out, ref)
    assert_equal(out, chunked)


def test_dare_validation_errors():
    base, models = family(7, n=2)
    for bad in ({"density": 0.0}, {"density": 1.5}, {"rescale": "l2"}, {"drop_rate": 0.5}):
        with pytest.raises(MergeError):
            merge_state_dicts("dare_linear", models, base=base, params=bad)
    with pytest.raises(MergeError, match="base"):
        merge_state_dicts("dare_ties", models)


# -- DELLA --------------------------------------------------------------------------------------

def dense_magprune(tau, u, density, eps, rescale="inverse"):
    rows = tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)
    urows = u.reshape(rows.shape)
    n = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).float()
    r = ranks / (n - 1) if n > 1 else torch.full_like(rows, 0.5)
    p = (density - eps) + 2 * eps * r
    pruned = rows * (urows < p)
    if rescale == "inverse":
        pruned = pruned / p
    elif rescale == "l1":
        pruned = l1_rescaled(pruned, rows)
    return pruned.reshape(tau.shape)


def dense_della(base, models, density, eps, rescale="inverse", weights=None, aggregate="mean", lam=1.0,
                linear=False, normalize=False):
    weights = weights or [1.0] * len(models)
    w = torch.tensor(weights)
    out = {}
    for n in base:
        x = torch.stack([dense_magprune(m[n] - base[n], uniform(n, base[n].shape, t), density, eps, rescale)
                         for t, m in enumerate(models)])
        x = x * w.reshape((-1,) + (1,) * base[n].dim())
        if linear:
            merged = x.sum(0) / (w.sum() if normalize else 1.0)
        else:
            merged = dense_elect(x, weights, aggregate)
        out[n] = base[n] + lam * merged
    return out


def test_della_hand_case_keep_probabilities_follow_the_rank():
    # every row ranks [0.1, 0.2, 0.3] as r = 0, 0.5, 1: keep probabilities 0.35, 0.5, 0.65
    rows = 4000
    tau = torch.tensor([0.3, 0.1, 0.2]).repeat(rows, 1)
    out = merge_state_dicts("della", [{"x": tau}], base={"x": torch.zeros(rows, 3)})["x"]
    p = torch.tensor([0.65, 0.35, 0.5])
    kept = out != 0
    assert torch.allclose(out[kept], (tau / p)[kept], atol=1e-6)
    assert torch.allclose(kept.float().mean(0), p, atol=0.03)


@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
@pytest.mark.parametrize("aggregate", ["mean", "sum"])
def test_della_matches_dense_reference_and_chunks(rescale, aggregate):
    base, models = family(8)
    weights = [1.0, 2.0, 0.5]
    params = {"density": 0.4, "epsilon": 0.2, "rescale": rescale, "aggregate": aggregate, "lambda": 0.9}
    out = merge_state_dicts("della", models, base=base, params=params, weights=weights)
    chunked = merge_state_dicts("della", models, base=base, params=params, weights=weights, chunk_elems=30)
    assert_close(out, dense_della(base, models, 0.4, 0.2, rescale, weights, aggregate, 0.9))
    assert_equal(out, chunked)


def test_della_defaults_and_della_linear():
    base, models = family(9)
    assert_close(merge_state_dicts("della", models, base=base), dense_della(base, models, 0.5, 0.15))
    out = merge_state_dicts("della_linear", models, base=base, params={"normalize": True}, weights=[1, 2, 3])
    assert_close(out, dense_della(base, models, 0.5, 0.15, weights=[1.0, 2.0, 3.0], lam=0.3, linear=True,
                                  normalize=True))


def test_della_per_model_density():
    base, models = family(10, n=2)
    out = merge_state_dicts("della", models, base=base, params={"epsilon": 0.1},
                            model_params=[{"density": 0.3}, {"density": 0.8}])
    ref = {}
    for n in base:
        x = torch.stack([dense_magprune(m[n] - base[n], uniform(n, base[n].shape, t), d, 0.1)
                         for t, (m, d) in enumerate(zip(models, (0.3, 0.8)))])
        ref[n] = base[n] + dense_elect(x, [1.0, 1.0])
    assert_close(out, ref)


@pytest.mark.parametrize("params,model_params", [
    ({"density": 0.9, "epsilon": 0.15}, None),
    ({"density": 0.9}, None),
    ({}, [{"density": 0.1}, {}]),
    ({"density": 0.1, "epsilon": 0.15}, None),
    ({"density": 0.5, "epsilon": 0.5}, None),
    ({"epsilon": 0.2}, [{"density": 0.85}, {}]),
])
def test_della_rejects_density_plus_minus_epsilon_outside_unit_interval(params, model_params):
    base, models = family(11, n=2)
    with pytest.raises(MergeError, match="epsilon"):
        merge_state_dicts("della", models, base=base, params=params, model_params=model_params)


def test_della_density_one_keeps_everything():
    base, models = family(12, n=2)
    out = merge_state_dicts("della", models, base=base, params={"density": 1.0})
    ref = {n: base[n] + dense_elect(torch.stack([m[n] - base[n] for m in models]), [1.0, 1.0]) for n in base}
    assert_close(out, ref)


# -- Breadcrumbs --------------------------------------------------------------------------------

def dense_band(tau, keep, top, per_row=True):
    rows = tau.reshape(tau.shape[0], -1) if per_row and tau.dim() >= 2 else tau.reshape(1, -1)
    n = rows.shape[1]
    n_keep = int(keep * n)
    n_top = min(int(top * n), n - n_keep)
    order = torch.sort(rows.abs(), dim=1, descending=True).indices
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask.scatter_(1, order[:, n_top:n_top + n_keep], True)
    return (rows * mask).reshape(tau.shape)


def test_breadcrumbs_hand_case():
    tau = torch.tensor([[10.0, -9.0, 1.0, 2.0, -3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    out = merge_state_dicts("breadcrumbs", [{"x": tau}], base={"x": torch.zeros(1, 10)})["x"]
    # drop the largest (10), keep the next two (-9, 8), times the default lambda 0.4
    expected = torch.zeros(1, 10)
    expected[0, 1], expected[0, 9] = -9.0 * 0.4, 8.0 * 0.4
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("keep,top", [(0.2, 0.1), (0.5, 0.0), (0.8, 0.5), (0.0, 0.1)])
def test_breadcrumbs_matches_dense_reference_per_row_and_chunks(keep, top):
    base, models = family(13)
    weights = [1.0, -0.5, 2.0]
    params = {"keep_fraction": keep, "top_remove_fraction": top, "lambda": 0.6}
    out = merge_state_dicts("breadcrumbs", models, base=base, params=params, weights=weights)
    chunked = merge_state_dicts("breadcrumbs", models, base=base, params=params, weights=weights, chunk_elems=20)
    ref = {n: base[n] + 0.6 * sum(w * dense_band(m[n] - base[n], keep, top) for w, m in zip(weights, models))
           for n in base}
    assert_close(out, ref)
    assert_equal(out, chunked)


def test_breadcrumbs_tensor_scope_and_per_model_fractions():
    base, models = family(14, n=2)
    out = merge_state_dicts("breadcrumbs", models, base=base, params={"scope": "tensor", "normalize": True},
                            model_params=[{"keep_fraction": 0.3}, {"top_remove_fraction": 0.05}])
    fractions = [(0.3, 0.1), (0.2, 0.05)]
    ref = {n: base[n] + 0.4 * sum(dense_band(m[n] - base[n], k, g, per_row=False)
                                  for m, (k, g) in zip(models, fractions)) / 2 for n in base}
    assert_close(out, ref)


def test_breadcrumbs_from_mergekit_recipe_maps_density_and_gamma():
    recipe = parse_recipe({
        "merge_method": "breadcrumbs", "base_model": "B",
        "models": [{"model": "B"}, {"model": "M1", "parameters": {"weight": 0.5, "density": 0.3, "gamma": 0.02}},
                   {"model": "M2", "parameters": {"weight": 0.5}}],
        "parameters": {"lambda": 0.9},
    })
    assert recipe.method == "breadcrumbs" and recipe.base == "B"
    assert recipe.params == {"scope": "tensor", "normalize": False, "lambda": 0.9, "keep_fraction": 1.0,
                             "top_remove_fraction": 0.01}
    assert recipe.models[0].params == {"keep_fraction": 0.3, "top_remove_fraction": 0.02}


def test_breadcrumbs_validation():
    base, models = family(15, n=2)
    for bad in ({"keep_fraction": 1.2}, {"top_remove_fraction": -0.1}, {"scope": "column"}, {"alpha": 0.4}):
        with pytest.raises(MergeError):
            merge_state_dicts("breadcrumbs", models, base=base, params=bad)


# -- Model Stock --------------------------------------------------------------------------------

def test_model_stock_hand_cases():
    base = {"x": torch.zeros(2)}
    s3 = math.sqrt(3)
    # cos 0.5: t = 2·0.5 / 1.5 = 2/3; mean = [0.75, √3/4]
    out = merge_state_dicts("model_stock", [{"x": torch.tensor([1.0, 0.0])}, {"x": torch.tensor([0.5, s3 / 2])}],
                            base=base)["x"]
    assert torch.allclose(out, torch.tensor([0.5, s3 / 6]), atol=1e-6)
    # orthogonal: t = 0, the base
    out = merge_state_dicts("model_stock", [{"x": torch.tensor([1.0, 0.0])}, {"x": torch.tensor([0.0, 3.0])}],
                            base=base)["x"]
    assert torch.allclose(out, torch.zeros(2))
    # parallel: t = 1, the mean
    out = merge_state_dicts("model_stock", [{"x": torch.tensor([1.0, 1.0])}, {"x": torch.tensor([2.0, 2.0])}],
                            base=base)["x"]
    assert torch.allclose(out, torch.tensor([1.5, 1.5]))


def test_model_stock_zero_task_vector_counts_as_cosine_zero():
    base = {"x": torch.tensor([1.0, 2.0])}
    out = merge_state_dicts("model_stock", [{"x": base["x"].clone()}, {"x": torch.tensor([3.0, 2.0])},
                                            {"x": torch.tensor([4.0, 2.0])}], base=base)["x"]
    # pairwise cosines 0, 0, 1: mean 1/3, t = 3·(1/3) / (1 + 2/3) = 0.6; mean of the models [8/3, 2]
    assert torch.allclose(out, 0.6 * torch.tensor([8 / 3, 2.0]) + 0.4 * base["x"], atol=1e-6)


def dense_model_stock(base, models, filter_wise=False):
    out = {}
    N = len(models)
    for n in base:
        taus = [(m[n] - base[n]).double() for m in models]
        if filter_wise and base[n].dim() >= 2:
            taus = [t.reshape(t.shape[0], -1) for t in taus]
        else:
            taus = [t.reshape(1, -1) for t in taus]
        cos = []
        for i in range(N):
            for j in range(i + 1, N):
                cos.append(torch.nn.functional.cosine_similarity(taus[i], taus[j], dim=1, eps=0))
        c = torch.stack(cos).mean(0)
        t = (N * c / (1 + (N - 1) * c)).float()
        t = t.reshape((-1,) + (1,) * (base[n].dim() - 1)) if filter_wise and base[n].dim() >= 2 else t.reshape(())
        mean = sum(m[n] for m in models) / N
        out[n] = t * mean + (1 - t) * base[n]
    return out


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_dense_reference(filter_wise):
    base, models = family(16, n=3)
    # correlated fine-tunes, as in the paper's setting (positive cosines)
    shared = finetunes(base, 1, seed=99)[0]
    models = [{n: m[n] + shared[n] - base[n] for n in base} for m in models]
    params = {"filter_wise": filter_wise}
    out = merge_state_dicts("model_stock", models, base=base, params=params)
    assert_close(out, dense_model_stock(base, models, filter_wise), atol=1e-5)
    chunked = merge_state_dicts("model_stock", models, base=base, params=params, chunk_elems=20)
    assert_equal(out, chunked)


def test_model_stock_errors():
    base = {"x": torch.zeros(2)}
    with pytest.raises(MergeError, match="at least 2"):
        merge_state_dicts("model_stock", [{"x": torch.ones(2)}], base=base)
    with pytest.raises(MergeError, match="cancel"):
        merge_state_dicts("model_stock", [{"x": torch.ones(2)}, {"x": -torch.ones(2)}], base=base)
    with pytest.raises(MergeError, match="base"):
        merge_state_dicts("model_stock", [{"x": torch.ones(2)}, {"x": torch.ones(2)}])


# -- SLERP --------------------------------------------------------------------------------------

def dense_slerp(a, b, t):
    out = {}
    for n in a:
        v0, v1 = a[n].double(), b[n].double()
        dot = float((v0 / v0.norm() * v1 / v1.norm()).sum())
        if abs(dot) > 0.9995:
            r = (1 - t) * v0 + t * v1
        else:
            w = math.acos(dot)
            r = (math.sin((1 - t) * w) * v0 + math.sin(t * w) * v1) / math.sin(w)
        out[n] = r.float()
    return out


def test_slerp_hand_cases():
    a, b = {"x": torch.tensor([1.0, 0.0])}, {"x": torch.tensor([0.0, 1.0])}
    out = merge_state_dicts("slerp", [a, b])["x"]
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    out = merge_state_dicts("slerp", [a, b], params={"t": 1 / 3})["x"]
    assert torch.allclose(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    # colinear: linear interpolation
    out = merge_state_dicts("slerp", [a, {"x": torch.tensor([3.0, 0.0])}], params={"t": 0.25})["x"]
    assert torch.allclose(out, torch.tensor([1.5, 0.0]))
    # an all-zero tensor has no direction: linear interpolation
    out = merge_state_dicts("slerp", [{"x": torch.zeros(2)}, b])["x"]
    assert torch.allclose(out, torch.tensor([0.0, 0.5]))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_dense_reference(t):
    base, models = family(17, n=2, shapes={"w": (24, 10), "b": (30,)})
    a = models[0]
    b = {"w": random_state_dict(5, {"w": (24, 10)})["w"], "b": models[1]["b"]}  # one far, one near-colinear
    out = merge_state_dicts("slerp", [a, b], params={"t": t}, chunk_elems=16)
    assert_close(out, dense_slerp(a, b, t), atol=1e-5)


def test_slerp_contract_errors():
    base, models = family(18, n=3)
    with pytest.raises(MergeError, match="at most 2"):
        merge_state_dicts("slerp", models)
    with pytest.raises(MergeError, match="at least 2"):
        merge_state_dicts("slerp", models[:1])
    with pytest.raises(MergeError, match="no base"):
        merge_state_dicts("slerp", models[:2], base=base)
    with pytest.raises(MergeError):
        merge_state_dicts("slerp", models[:2], params={"t": 1.5})


def test_slerp_from_mergekit_recipe_uses_base_model_as_first_endpoint():
    recipe = parse_recipe({"merge_method": "slerp", "base_model": "A", "models": [{"model": "B"}, {"model": "A"}],
                           "parameters": {"t": 0.3}})
    assert recipe.base is None and [m.path for m in recipe.models] == ["A", "B"] and recipe.params == {"t": 0.3}
    recipe = parse_recipe({"merge_method": "slerp", "base_model": "A", "models": [{"model": "B"}],
                           "parameters": {"t": 0.3}})
    assert [m.path for m in recipe.models] == ["A", "B"]
    # a gradient of t is a per-layer schedule
    recipe = parse_recipe({"merge_method": "slerp", "base_model": "A", "models": [{"model": "A"}, {"model": "B"}],
                           "parameters": {"t": [0, 0.5, 1]}})
    assert recipe.params == {"t": {"layers": [0, 0.5, 1]}}


# -- mergekit recipes for DARE and DELLA ----------------------------------------------------------

def test_dare_and_della_mergekit_recipes_keep_mergekit_semantics():
    common = {"base_model": "B", "models": [{"model": "B"}, {"model": "M", "parameters": {"weight": 1.0,
                                                                                      "density": 0.5}}]}
    r = parse_recipe({"merge_method": "dare_ties", **common})
    assert r.params == {"aggregate": "sum", "tie": "positive", "lambda": 1.0, "density": 1.0, "rescale": "l1"}
    r = parse_recipe({"merge_method": "dare_linear", "parameters": {"rescale": False, "normalize": True}, **common})
    assert r.params == {"normalize": True, "lambda": 1.0, "density": 1.0, "rescale": "none"}
    r = parse_recipe({"merge_method": "della", **common})
    assert r.params == {"aggregate": "mean", "tie": "positive", "lambda": 1.0, "density": 1.0, "epsilon": 0.15,
                        "rescale": "l1"}
    assert r.models[0].params == {"density": 0.5}
    r = parse_recipe({"merge_method": "model_stock", **common})
    assert r.method == "model_stock" and r.params == {"filter_wise": False}


def test_mergekit_dare_ties_recipe_merges_like_mergekit():
    """dare_ties with mergekit's defaults: L1 rescale per tensor, weighted disjoint sum, lambda 1."""
    base, models = family(19, n=2)
    from modalmerge.checkpoint.sources import StateDictSource
    from modalmerge.engine.executor import Executor
    from modalmerge.engine.plan import build_plan
    from modalmerge.engine.sinks import DictSink

    recipe = parse_recipe({"merge_method": "dare_ties", "base_model": "B",
                           "models": [{"model": "M0", "parameters": {"weight": 0.7, "density": 0.5}},
                                      {"model": "M1", "parameters": {"weight": 0.3, "density": 0.5}}]})
    plan = build_plan(recipe, StateDictSource(base, "B"), [StateDictSource(m, f"M{i}") for i, m in enumerate(models)])
    sink = DictSink(plan)
    Executor(plan, progress=False).run(sink)
    dared = dense_dare(base, models, 0.5, "l1")
    ref = {n: base[n] + dense_elect(dared[n] * torch.tensor([0.7, 0.3]).reshape((-1,) + (1,) * base[n].dim()),
                                    [0.7, 0.3], "sum") for n in base}
    assert_close(sink.tensors, ref)


def test_cli_mergekit_slerp_and_dare_ties_recipes_on_a_tiny_llama(llama_family, tmp_path):
    import yaml

    from conftest import load_sd
    from modalmerge.cli import main

    a, b = str(llama_family["base"]), str(llama_family["ft1"])
    recipe = tmp_path / "slerp.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": a,
                                      "models": [{"model": a}, {"model": b}], "parameters": {"t": 0.4}}))
    out = tmp_path / "slerp"
    assert main(["merge", str(recipe), "-o", str(out), "--no-progress"]) == 0
    assert_close(load_sd(out), dense_slerp(load_sd(a), load_sd(b), 0.4), atol=1e-5)

    recipe = tmp_path / "dare.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "dare_ties", "base_model": a, "parameters": {"normalize": True},
        "models": [{"model": str(llama_family[f"ft{i}"]), "parameters": {"weight": 1.0, "density": 0.3}}
                   for i in range(2)]}))
    out = tmp_path / "dare"
    assert main(["merge", str(recipe), "-o", str(out), "--no-progress"]) == 0
    base, merged = load_sd(a), load_sd(out)
    fts = [load_sd(llama_family[f"ft{i}"]) for i in range(2)]
    dared = dense_dare(base, fts, 0.3, "l1")
    assert_close(merged, {n: base[n] + dense_elect(dared[n], [1.0, 1.0]) for n in base}, atol=1e-5)


def test_the_registry_refuses_two_methods_under_one_name():
    import dataclasses

    from modalmerge.methods.registry import METHODS, table

    ties = METHODS["ties"]
    with pytest.raises(ValueError, match="two merge methods are named 'ties'"):
        table([ties, dataclasses.replace(ties)])
    with pytest.raises(ValueError, match="mergekit name 'ties' is claimed by 'ties' and 'other'"):
        table([ties, dataclasses.replace(ties, name="other")])
    assert list(table(METHODS.values())) == list(METHODS)
