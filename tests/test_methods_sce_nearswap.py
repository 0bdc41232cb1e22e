"""SCE, NearSwap and Breadcrumbs-TIES: mergekit 0.1.5's `sce`, `nearswap` and `breadcrumbs_ties`.

The `mk_*` functions restate mergekit's arithmetic (merge_methods/sce.py, nearswap.py,
generalized_task_arithmetic.py with sparsify.magnitude_outliers) densely; the hand cases are
worked out on paper; the engine (in-memory state dicts, and mergekit YAML recipes on tiny Llama
folders) must give the same tensors. tests/test_mergekit_conformance.py checks against
mergekit itself.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, load_sd, run_mergekit_yaml as run_yaml
from test_mergekit_compat import mk_magnitude_outliers
from modalmerge import merge_state_dicts
from modalmerge.engine.recipe import mergekit_form, method_params_from_mergekit, parse_recipe
from modalmerge.errors import MergeError

# ---------------------------------------------------------------- mergekit 0.1.5's maths


def mk_sce(base: torch.Tensor, models: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """sce_merge: variance top-k over the non-zero variances, energy weights (equal below a sum
    of 1e-6), sum-sign election with ties to +, divisor clamped at 1e-6."""
    tv = torch.stack([m - base for m in models])
    if select_topk < 1:
        mask = torch.zeros_like(tv[0])
        if select_topk > 0:
            var = tv.var(dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * select_topk)
            if k > 0:
                mask.view(-1)[torch.topk(var.abs().view(-1), k=k).indices] = 1
        tv = tv * mask
    majority = (tv.sum(dim=0) >= 0).to(tv.dtype) * 2 - 1
    erase = tv.sign() == majority
    energy = tv.square().reshape(len(models), -1).mean(dim=1)
    total = energy.sum().item()
    w = torch.ones_like(energy) / len(models) if abs(total) < 1e-6 else energy / total
    ew = w.reshape((-1,) + (1,) * base.dim()) * erase
    return base + (tv * ew).sum(dim=0) / ew.sum(dim=0).clamp(min=1e-6)


def mk_nearswap(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    w = (t / (base - model).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * model + (1 - w) * base


def mk_rescale_l1(t: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """sparsify.rescaled_masked_tensor with RescaleNorm.l1."""
    before, after = t.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def mk_breadcrumbs_ties(base, models, weights, densities, gamma, *, normalize=False, lam=1.0,
                        rescale=False) -> torch.Tensor:
    """GeneralizedTaskArithmeticMerge(sum consensus, magnitude_outliers)."""
    def prune(delta, density):
        pruned = mk_magnitude_outliers(delta, density, gamma)
        return mk_rescale_l1(delta, pruned) if rescale and density < 1 else pruned

    deltas = torch.stack([prune(m - base, d) for m, d in zip(models, densities)])
    w = torch.tensor(weights, dtype=deltas.dtype).reshape((-1,) + (1,) * base.dim())
    deltas = deltas * w
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    mask = (deltas.sign() == majority).to(deltas.dtype)
    mixed = (deltas * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    return base + mixed * lam


# ---------------------------------------------------------------- helpers


def sd(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"w": x}


def mk_params(name: str, raw: dict) -> dict:
    """A mergekit recipe's top-level parameters (over mergekit's defaults) as native ones."""
    form = mergekit_form(name)[1]
    return method_params_from_mergekit(form, {**form.defaults, **raw})


@pytest.fixture(scope="module")
def family(llama_family):
    return llama_family, {k: load_sd(v) for k, v in llama_family.items()}


def random_case(seed=0, shape=(12, 10), n=3, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


# ---------------------------------------------------------------- NearSwap


def test_nearswap_hand_case():
    base = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    model = torch.tensor([[0.125, 0.5, -1.0], [1.0, 2.0, 0.75]])
    # |a − b| = [[.125, .5, 1], [0, 1, .25]]; w = clamp(.25 / |a − b|) = [[1, .5, .25], [1, .25, 1]]
    out = merge_state_dicts("nearswap", [sd(model)], sd(base), {"t": 0.25})["w"]
    assert out.tolist() == [[0.125, 0.25, -0.25], [1.0, 1.25, 0.75]]
    # t = 0 keeps the base, except where the two are equal
    assert merge_state_dicts("nearswap", [sd(model)], sd(base), {"t": 0.0})["w"].tolist() == base.tolist()


def test_nearswap_matches_reference_in_row_blocks():
    base, models = random_case(1, shape=(64, 16))
    ref = mk_nearswap(base, models[0], 0.07)
    for chunk in (16, 1 << 22):
        out = merge_state_dicts("nearswap", [sd(models[0])], sd(base), {"t": 0.07}, chunk_elems=chunk)["w"]
        assert (out - ref).abs().max().item() <= 1e-7


def test_nearswap_recipe(family, tmp_path):
    paths, sds = family
    out = run_yaml(tmp_path, {"merge_method": "nearswap", "base_model": str(paths["base"]),
                              "models": [{"model": str(paths["base"])}, {"model": str(paths["ft1"])}],
                              "parameters": {"t": 0.01}, "dtype": "float32"})
    ref = {n: mk_nearswap(sds["base"][n], sds["ft1"][n], 0.01) for n in sds["base"]}
    assert_close(out, ref, "nearswap")


def test_nearswap_errors(family, tmp_path):
    paths, _ = family
    base, models = random_case(2)
    with pytest.raises(MergeError, match=r"params\.t: Field required"):
        merge_state_dicts("nearswap", [sd(models[0])], sd(base), {})
    with pytest.raises(MergeError, match=r"params\.t: .*greater than or equal to 0"):
        merge_state_dicts("nearswap", [sd(models[0])], sd(base), {"t": -0.1})
    with pytest.raises(MergeError, match="at most 1 model"):
        merge_state_dicts("nearswap", [sd(m) for m in models[:2]], sd(base), {"t": 0.1})
    with pytest.raises(MergeError, match="base"):
        merge_state_dicts("nearswap", [sd(m) for m in models[:1]], None, {"t": 0.1})
    with pytest.raises(MergeError, match="`weight` is not used"):
        merge_state_dicts("nearswap", [sd(models[0])], sd(base), {"t": 0.1}, weights=[0.5])
    # mergekit's `t` is shared: a per-model one is refused, not ignored
    with pytest.raises(MergeError, match="parameter 't'"):
        run_yaml(tmp_path, {"merge_method": "nearswap", "base_model": str(paths["base"]),
                            "models": [{"model": str(paths["ft0"]), "parameters": {"t": 0.1}}],
                            "parameters": {"t": 0.1}})




# ---------------------------------------------------------------- SCE


def test_sce_hand_cases():
    base = torch.zeros(2, 3)
    t1 = torch.tensor([[1.0, -2.0, 0.0], [2.0, 1.0, 1.0]])
    t2 = torch.tensor([[3.0, 2.0, 0.0], [-1.0, 1.0, 0.0]])
    params = mk_params("sce", {})
    # w = mean τ² / Σ: 11/26, 15/26; sums [[4, 0, 0], [1, 2, 1]] elect + everywhere (0 → +);
    # (0,0): (11·1 + 15·3)/26 ÷ 1 = 28/13; (0,1): only τ2 agrees; (0,2): nothing agrees
    out = merge_state_dicts("sce", [sd(t1), sd(t2)], sd(base), params)["w"]
    expected = torch.tensor([[28 / 13, 2.0, 0.0], [2.0, 1.0, 1.0]])
    assert (out - expected).abs().max().item() <= 1e-6
    # select_topk 0.5: variances [[1, 4, 0], [2.25, 0, .25]], 4 non-zero → the top 2 kept
    out = merge_state_dicts("sce", [sd(t1), sd(t2)], sd(base), mk_params("sce", {"select_topk": 0.5}))["w"]
    assert out.tolist() == [[0.0, 2.0, 0.0], [2.0, 0.0, 0.0]]
    # select_topk 0 keeps nothing: the base
    out = merge_state_dicts("sce", [sd(t1), sd(t2)], sd(base), mk_params("sce", {"select_topk": 0.0}))["w"]
    assert out.tolist() == base.tolist()


def test_sce_tie_rule():
    # entry (0,0) sums to exactly 0 while the tensor's total is −4: mergekit elects +, spec 0 −
    base = torch.zeros(2, 3)
    t1 = torch.tensor([[1.0, -4.0, 0.0], [0.0, 0.0, 0.0]])
    t2 = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mergekit = merge_state_dicts("sce", [sd(t1), sd(t2)], sd(base), mk_params("sce", {}))["w"]
    assert mergekit.tolist() == [[1.0, -4.0, 0.0], [0.0, 0.0, 0.0]]
    native = merge_state_dicts("sce", [sd(t1), sd(t2)], sd(base), {})["w"]
    assert native.tolist() == [[-1.0, -4.0, 0.0], [0.0, 0.0, 0.0]]


def test_sce_small_task_vectors_weigh_equally():
    base = torch.zeros(2, 3)
    ones = torch.ones(2, 3)
    # mean τ² 1 and 9: weights 0.1 and 0.9 → 0.1 + 2.7 = 2.8
    out = merge_state_dicts("sce", [sd(ones), sd(3 * ones)], sd(base), {})["w"]
    assert (out - 2.8).abs().max().item() <= 1e-6
    # scaled by 1e-4 the energies sum to 1e-7 < 1e-6: equal weights, the plain mean
    out = merge_state_dicts("sce", [sd(1e-4 * ones), sd(3e-4 * ones)], sd(base), {})["w"]
    assert (out - 2e-4).abs().max().item() <= 1e-10


@pytest.mark.parametrize("topk", [1.0, 0.3, 0.05, 0.0])
def test_sce_matches_reference(topk):
    base, models = random_case(3)
    ref = mk_sce(base, models, topk)
    out = merge_state_dicts("sce", [sd(m) for m in models], sd(base), mk_params("sce", {"select_topk": topk}),
                            chunk_elems=16)["w"]  # never cut: the top-k and weights need the whole tensor
    assert (out - ref).abs().max().item() <= 1e-6


def test_sce_recipe(family, tmp_path):
    paths, sds = family
    out = run_yaml(tmp_path, {"merge_method": "sce", "base_model": str(paths["base"]),
                              "models": [{"model": str(paths[f"ft{i}"])} for i in range(3)],
                              "parameters": {"select_topk": 0.4, "int8_mask": True}, "dtype": "float32"})
    ref = {n: mk_sce(sds["base"][n], [sds[f"ft{i}"][n] for i in range(3)], 0.4) for n in sds["base"]}
    assert_close(out, ref, "sce")


def test_sce_translation_and_errors(family, tmp_path):
    paths, _ = family
    r = parse_recipe({"merge_method": "sce", "base_model": "b", "models": ["a", "c"],
                      "parameters": {"select_topk": 0.2}})
    assert r.method == "sce" and r.params == {"select_topk": 0.2, "tie": "positive"}
    base, models = random_case(4)
    with pytest.raises(MergeError, match=r"params\.select_topk: .*less than or equal to 1"):
        merge_state_dicts("sce", [sd(m) for m in models], sd(base), {"select_topk": 1.5})
    with pytest.raises(MergeError, match="unknown parameter params.normalize"):
        merge_state_dicts("sce", [sd(m) for m in models], sd(base), mk_params("sce", {"normalize": True}))
    with pytest.raises(MergeError, match="`weight` is not used"):
        merge_state_dicts("sce", [sd(m) for m in models], sd(base), {}, weights=[1.0, 0.5, 1.0])
    with pytest.raises(MergeError, match="base"):
        merge_state_dicts("sce", [sd(m) for m in models], None, {})
    with pytest.raises(MergeError, match="parameter 'density'"):  # sce has no density: refused, not ignored
        run_yaml(tmp_path, {"merge_method": "sce", "base_model": str(paths["base"]),
                            "models": [{"model": str(paths["ft0"]), "parameters": {"density": 0.5}}]})


# ---------------------------------------------------------------- Breadcrumbs-TIES


def test_breadcrumbs_ties_hand_case():
    base = torch.zeros(2, 3)
    # density 0.5, gamma 0.2 of 6 entries: drop the largest |τ| and the 2 smallest, keep 3
    t1 = torch.tensor([[6.0, -1.0, 2.0], [-3.0, 4.0, 0.5]])    # kept: [[0, 0, 2], [-3, 4, 0]]
    t2 = torch.tensor([[-2.0, 5.0, -0.25], [1.0, -3.0, 10.0]])  # kept: [[-2, 5, 0], [0, -3, 0]]
    raw = {"density": 0.5, "gamma": 0.2}
    out = merge_state_dicts("breadcrumbs", [sd(t1), sd(t2)], sd(base), mk_params("breadcrumbs_ties", raw))["w"]
    # sums [[-2, 5, 2], [-3, 1, 0]]: (1,1) elects +, so τ2's −3 is erased
    assert out.tolist() == [[-2.0, 5.0, 2.0], [-3.0, 4.0, 0.0]]
    # weights 1 and 2 inside the election: (1,1) sums 4 − 6 → −; normalize divides by agreeing weights
    out = merge_state_dicts("breadcrumbs", [sd(t1), sd(t2)], sd(base),
                            mk_params("breadcrumbs_ties", {**raw, "normalize": True}), weights=[1.0, 2.0])["w"]
    assert out.tolist() == [[-2.0, 5.0, 2.0], [-3.0, -3.0, 0.0]]


def test_breadcrumbs_rescale_hand_case():
    # keep 3 of 6 (drop the largest and the 2 smallest): [[0, 0, 2], [-3, 4, 0]], L1 9 of 16.5
    t1 = torch.tensor([[6.0, -1.0, 2.0], [-3.0, 4.0, 0.5]])
    base = torch.zeros(2, 3)
    for name in ("breadcrumbs", "breadcrumbs_ties"):
        params = mk_params(name, {"density": 0.5, "gamma": 0.2, "rescale": True})
        out = merge_state_dicts("breadcrumbs", [sd(t1)], sd(base), params)["w"]
        expected = torch.tensor([[0.0, 0.0, 2.0], [-3.0, 4.0, 0.0]]) * (16.5 / 9)
        assert (out - expected).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("normalize,rescale", [(False, False), (True, False), (False, True)])
def test_breadcrumbs_ties_matches_reference(normalize, rescale):
    base, models = random_case(5)
    w, d = [0.7, -0.2, 0.5], [0.3, 0.05, 1.0]
    ref = mk_breadcrumbs_ties(base, models, w, d, 0.02, normalize=normalize, lam=0.8, rescale=rescale)
    params = mk_params("breadcrumbs_ties", {"normalize": normalize, "lambda": 0.8, "gamma": 0.02,
                                            "rescale": rescale})
    out = merge_state_dicts("breadcrumbs", [sd(m) for m in models], sd(base), params, weights=w,
                            model_params=[{"keep_fraction": x} for x in d])["w"]
    assert (out - ref).abs().max().item() <= 1e-6


def test_breadcrumbs_ties_recipe(family, tmp_path):
    paths, sds = family
    weights, densities = [0.6, 1.0, 0.3], [0.5, 0.4, 0.7]
    out = run_yaml(tmp_path, {
        "merge_method": "breadcrumbs_ties", "base_model": str(paths["base"]),
        "models": [{"model": str(paths[f"ft{i}"]), "parameters": {"weight": w, "density": d}}
                   for i, (w, d) in enumerate(zip(weights, densities))],
        "parameters": {"gamma": 0.05, "lambda": 0.9, "normalize": True}, "dtype": "float32"})
    ref = {n: mk_breadcrumbs_ties(sds["base"][n], [sds[f"ft{i}"][n] for i in range(3)], weights, densities, 0.05,
                                  normalize=True, lam=0.9) for n in sds["base"]}
    assert_close(out, ref, "breadcrumbs_ties", tol=1e-5)


def test_breadcrumbs_elect_native_rows_in_blocks():
    # the paper's per-row ranking with the election: row blocks give the whole tensor's result
    base, models = random_case(6, shape=(64, 16))
    params = {"elect": True, "keep_fraction": 0.4, "top_remove_fraction": 0.1, "lambda": 1.0}
    whole = merge_state_dicts("breadcrumbs", [sd(m) for m in models], sd(base), params)["w"]
    blocks = merge_state_dicts("breadcrumbs", [sd(m) for m in models], sd(base), params, chunk_elems=64)["w"]
    assert torch.equal(whole, blocks)
    # per row, the native band equals mergekit's outlier pruning of that row
    rows = torch.stack([mk_breadcrumbs_ties(base[r], [m[r] for m in models], [1.0] * 3, [0.4] * 3, 0.1,
                                            normalize=True)[None] for r in range(64)]).reshape(64, 16)
    assert (whole - rows).abs().max().item() <= 1e-6


def test_breadcrumbs_ties_errors():
    r = parse_recipe({"merge_method": "breadcrumbs_ties", "base_model": "b", "models": ["a"],
                      "parameters": {"density": 0.3}})
    assert r.method == "breadcrumbs" and r.params["elect"] is True and r.params["aggregate"] == "sum"
    assert r.params["tie"] == "positive" and r.params["scope"] == "tensor"
    r = parse_recipe({"merge_method": "breadcrumbs_ties", "base_model": "b", "models": ["a"],
                      "parameters": {"rescale": True}})
    assert r.params["rescale"] == "l1"  # mergekit matches the L1 norm
    base, models = random_case(7)
    inputs = [sd(m) for m in models]
    with pytest.raises(MergeError, match="normalize is not used with elect"):
        merge_state_dicts("breadcrumbs", inputs, sd(base), {"elect": True, "normalize": True})
    with pytest.raises(MergeError, match="aggregate is used only with elect"):
        merge_state_dicts("breadcrumbs", inputs, sd(base), {"aggregate": "sum"})
    with pytest.raises(MergeError, match=r"params\.aggregate"):
        merge_state_dicts("breadcrumbs", inputs, sd(base), {"elect": True, "aggregate": "max"})
