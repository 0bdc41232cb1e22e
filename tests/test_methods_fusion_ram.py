"""Arcee Fusion, RAM and RAM+ (tensor-local): mergekit 0.1.5's `arcee_fusion`, `ram`, `ramplus_tl`.

The `mk_*` functions restate mergekit's arithmetic (merge_methods/arcee_fusion.py, ram.py) densely
(arcee_fusion's quartiles by a full sort, as mergekit takes them for tensors of up to 10^6
entries); the hand cases are worked out on paper; the engine (in-memory state dicts, and mergekit
YAML recipes on tiny Llama folders) must give the same tensors. tests/test_mergekit_conformance.py
checks against mergekit itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, finetunes, load_sd, random_state_dict, run_mergekit_yaml as run_yaml
from modalmerge import merge_state_dicts
from modalmerge.engine.recipe import parse_recipe
from modalmerge.errors import MergeError
from modalmerge.methods.arcee_fusion import quartiles

# ---------------------------------------------------------------- mergekit 0.1.5's maths


def mk_arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """importance = |Δ| · row KL(softmax(model) + 1e-8 ‖ softmax(base) + 1e-8); keep Δ where
    importance ≥ median + 1.5 IQR, the quantiles sorted[long(q · (n − 1))]."""
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    imp = (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    srt = torch.sort(imp.reshape(-1)).values
    q1, med, q3 = srt[(torch.tensor([0.25, 0.5, 0.75]) * (srt.numel() - 1)).long()]
    return base + (model - base) * (imp >= med + 1.5 * (q3 - q1)).float()


def mk_ram(base: torch.Tensor, models: list[torch.Tensor], epsilon: float = 1e-5,
           unique_scale: list[float] | None = None) -> torch.Tensor:
    """Σ_t τ_t·1{|τ_t| > ε} · (scale_t where one model counts, else 1 / count)."""
    tv = torch.stack([m - base for m in models])
    counts = tv.abs() > epsilon
    c = counts.sum(dim=0)
    scale = torch.tensor(unique_scale or [1.0] * len(models)).reshape((-1,) + (1,) * base.dim())
    per_entry = torch.where(c == 1, scale, 1.0 / c.clamp(min=1).float())
    return base + (tv * counts * per_entry).sum(dim=0)


def mk_ramplus_scales(base, models, epsilon=1e-5, r=0.1, alpha=0.2) -> list[float]:
    """λ_t = 1 + r · clamp(shared_t / max(unique_t, ε), 0, α), counted over the whole tensor."""
    tv = torch.stack([m - base for m in models])
    counts = tv.abs() > epsilon
    c = counts.sum(dim=0)
    out = []
    for t in range(len(models)):
        shared = int((counts[t] & (c > 1)).sum())
        unique = int((counts[t] & (c == 1)).sum())
        rho = shared / max(unique, epsilon)
        out.append(1 + r * min(max(rho, 0.0), alpha))
    return out


def mk_ramplus(base, models, epsilon=1e-5, r=0.1, alpha=0.2) -> torch.Tensor:
    return mk_ram(base, models, epsilon, mk_ramplus_scales(base, models, epsilon, r, alpha))


# ---------------------------------------------------------------- helpers


def sd(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"w": x}


@pytest.fixture(scope="module")
def family(llama_family):
    return llama_family, {k: load_sd(v) for k, v in llama_family.items()}


def state_dicts(seed: int, n: int, scale: float = 0.1):
    base = random_state_dict(seed)
    return base, finetunes(base, n, scale=scale, seed=seed + 50)


# ---------------------------------------------------------------- Arcee Fusion


def test_arcee_fusion_hand_cases():
    # 1-D: one KL for the whole vector, so the order of |Δ| decides. |Δ| sorted .1 … .7, 5;
    # n − 1 = 7: Q1 = sorted[1] = .2, median = sorted[3] = .4, Q3 = sorted[5] = .6 → fence 1.0·KL
    base = torch.zeros(8)
    model = torch.tensor([0.1, -0.2, 0.3, -0.4, 0.5, 0.6, -0.7, 5.0])
    out = merge_state_dicts("arcee_fusion", [sd(model)], sd(base))["w"]
    assert out.tolist() == [0.0] * 7 + [5.0]
    # rows: row 1 moves by a constant, which leaves its softmax (so its KL, so its importance) 0;
    # sorted importance 0, 0, 0, 0, k, 2k, 3.5k, 4k: Q1 = median = 0, Q3 = 2k → fence 3k
    base = torch.zeros(2, 4)
    model = torch.tensor([[1.0, 2.0, 3.5, 4.0], [3.0, 3.0, 3.0, 3.0]])
    out = merge_state_dicts("arcee_fusion", [sd(model)], sd(base))["w"]
    assert out.tolist() == [[0.0, 0.0, 3.5, 4.0], [0.0, 0.0, 0.0, 0.0]]
    # the model equal to the base: importance 0 everywhere, fence 0, the base
    assert torch.equal(merge_state_dicts("arcee_fusion", [sd(model)], sd(model))["w"], model)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 101, 1000, 4097])
def test_arcee_fusion_quartiles_are_floor_index_quantiles(n):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n))
    expected = torch.quantile(values, torch.tensor([0.25, 0.5, 0.75]), interpolation="lower")
    assert torch.stack(quartiles(values.reshape(1, -1))).tolist() == expected.tolist()
    srt = torch.sort(values).values  # mergekit's form, exact below 2^24 entries
    assert torch.stack(quartiles(values)).tolist() == srt[(torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long()].tolist()


def test_arcee_fusion_quartiles_exact_beyond_mergekits_sample():
    # mergekit samples 10^6 entries (at random) above 10^6; here the quantiles stay exact
    n = 1_000_003
    values = torch.randn(n, generator=torch.Generator().manual_seed(1))
    srt = torch.sort(values).values
    last = n - 1
    assert torch.stack(quartiles(values)).tolist() == [srt[last // 4].item(), srt[last // 2].item(),
                                                       srt[3 * last // 4].item()]


def test_arcee_fusion_matches_reference():
    base, (model,) = state_dicts(3, 1)
    ref = {n: mk_arcee_fusion(base[n], model[n]) for n in base}
    # never cut into row blocks, whatever the chunk size: the quartiles need the whole tensor
    for chunk in (16, 1 << 22):
        out = merge_state_dicts("arcee_fusion", [model], base, chunk_elems=chunk)
        assert_close(out, ref, f"arcee_fusion (chunk {chunk})", tol=0.0)
    assert any(not torch.equal(ref[n], model[n]) and not torch.equal(ref[n], base[n]) for n in base)


def test_arcee_fusion_recipe(family, tmp_path):
    paths, sds = family
    # mergekit counts the base among the inputs: `models` may list it
    out = run_yaml(tmp_path, {"merge_method": "arcee_fusion", "base_model": str(paths["base"]),
                              "models": [{"model": str(paths["base"])}, {"model": str(paths["ft1"])}],
                              "dtype": "float32"})
    ref = {n: mk_arcee_fusion(sds["base"][n], sds["ft1"][n]) for n in sds["base"]}
    assert_close(out, ref, "arcee_fusion", tol=0.0)


def test_arcee_fusion_errors(family, tmp_path):
    paths, _ = family
    base, models = state_dicts(4, 2)
    with pytest.raises(MergeError, match="at most 1 model"):
        merge_state_dicts("arcee_fusion", models, base)
    with pytest.raises(MergeError, match="base"):
        merge_state_dicts("arcee_fusion", models[:1], None)
    with pytest.raises(MergeError, match="unknown parameter params.t; its parameters are: none"):
        merge_state_dicts("arcee_fusion", models[:1], base, {"t": 0.5})
    with pytest.raises(MergeError, match="`weight` is not used"):
        merge_state_dicts("arcee_fusion", models[:1], base, weights=[0.5])
    with pytest.raises(MergeError, match="at most 1 model"):  # mergekit: exactly two inputs
        run_yaml(tmp_path, {"merge_method": "arcee_fusion", "base_model": str(paths["base"]),
                            "models": [{"model": str(paths["ft0"])}, {"model": str(paths["ft1"])}]})
    with pytest.raises(MergeError) as e:
        merge_state_dicts("arcee_fusion", models[:1], base, {"t": 0.5})
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- RAM


def test_ram_hand_cases():
    base = torch.zeros(2, 3)
    t1 = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.0, -1.0]])
    t2 = torch.tensor([[3.0, 0.0, 0.0], [0.5, 4.0, 1.0]])
    # counts [[2, 0, 1], [2, 1, 2]]: means where two count, the one change kept whole where one does
    out = merge_state_dicts("ram", [sd(t1), sd(t2)], sd(base))["w"]
    assert out.tolist() == [[2.0, 0.0, 2.0], [0.5, 4.0, 0.0]]
    # epsilon 0.75 drops the 0.5s: (1, 0) counts nobody, the rest as before
    out = merge_state_dicts("ram", [sd(t1), sd(t2)], sd(base), {"epsilon": 0.75})["w"]
    assert out.tolist() == [[2.0, 0.0, 2.0], [0.0, 4.0, 0.0]]
    # a change of exactly epsilon does not count (|τ| > ε)
    out = merge_state_dicts("ram", [sd(t1), sd(t2)], sd(base), {"epsilon": 0.5})["w"]
    assert out.tolist() == [[2.0, 0.0, 2.0], [0.0, 4.0, 0.0]]


@pytest.mark.parametrize("epsilon", [1e-5, 0.05, 0.2])
def test_ram_matches_reference_in_row_blocks(epsilon):
    base, models = state_dicts(5, 3)
    ref = {n: mk_ram(base[n], [m[n] for m in models], epsilon) for n in base}
    for chunk in (16, 1 << 22):  # elementwise: row blocks give the whole tensor's result
        out = merge_state_dicts("ram", models, base, {"epsilon": epsilon}, chunk_elems=chunk)
        assert_close(out, ref, f"ram (chunk {chunk})")


def test_ram_recipe(family, tmp_path):
    paths, sds = family
    out = run_yaml(tmp_path, {"merge_method": "ram", "base_model": str(paths["base"]),
                              "models": [{"model": str(paths[f"ft{i}"])} for i in range(3)],
                              "parameters": {"epsilon": 0.02}, "dtype": "float32"})
    ref = {n: mk_ram(sds["base"][n], [sds[f"ft{i}"][n] for i in range(3)], 0.02) for n in sds["base"]}
    assert_close(out, ref, "ram")


def test_ram_translation_and_errors(family, tmp_path):
    paths, _ = family
    # mergekit's ram takes `epsilon` once for the merge (della takes it per model)
    r = parse_recipe({"merge_method": "ram", "base_model": "b", "models": ["a", "c"],
                      "parameters": {"epsilon": 0.01}})
    assert r.method == "ram" and r.params == {"epsilon": 0.01} and all(m.params == {} for m in r.models)
    r = parse_recipe({"merge_method": "della", "base_model": "b", "models": ["a"], "parameters": {"epsilon": 0.1}})
    assert r.models[0].params == {"epsilon": 0.1}
    base, models = state_dicts(6, 2)
    with pytest.raises(MergeError, match=r"params\.epsilon: Input should be a valid number"):
        merge_state_dicts("ram", models, base, {"epsilon": "0.1"})
    with pytest.raises(MergeError, match="unknown parameter params.r; its parameters are: epsilon"):
        merge_state_dicts("ram", models, base, {"r": 0.1})
    with pytest.raises(MergeError, match="`weight` is not used"):
        merge_state_dicts("ram", models, base, weights=[1.0, 0.5])
    with pytest.raises(MergeError, match="base"):
        merge_state_dicts("ram", models, None)
    # a per-model epsilon (which mergekit would ignore) is refused, not ignored
    with pytest.raises(MergeError, match="parameter 'epsilon' cannot be set per model"):
        run_yaml(tmp_path, {"merge_method": "ram", "base_model": str(paths["base"]),
                            "models": [{"model": str(paths["ft0"]), "parameters": {"epsilon": 0.1}}]})
    with pytest.raises(MergeError, match="`weight` is not used"):
        run_yaml(tmp_path, {"merge_method": "ram", "base_model": str(paths["base"]),
                            "models": [str(paths["ft0"]), str(paths["ft1"])], "parameters": {"weight": 0.5}})


# ---------------------------------------------------------------- RAM+ (tensor-local)


def test_ramplus_hand_cases():
    base = torch.zeros(2, 3)
    t1 = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.0, -1.0]])
    t2 = torch.tensor([[3.0, 5.0, 0.0], [0.5, 4.0, 1.0]])
    # counts [[2, 1, 1], [2, 1, 2]]; τ1: 3 shared, 1 unique → ρ 3; τ2: 3 shared, 2 unique → ρ 1.5
    # r 0.5, alpha 2: λ1 = 1 + 0.5·2 = 2, λ2 = 1 + 0.5·1.5 = 1.75 on the unique entries
    out = merge_state_dicts("ramplus_tl", [sd(t1), sd(t2)], sd(base), {"r": 0.5, "alpha": 2.0})["w"]
    assert out.tolist() == [[2.0, 8.75, 4.0], [0.5, 7.0, 0.0]]
    # defaults r 0.1, alpha 0.2: both ρ capped at 0.2 → λ = 1.02
    out = merge_state_dicts("ramplus_tl", [sd(t1), sd(t2)], sd(base))["w"]
    assert (out - torch.tensor([[2.0, 5.1, 2.04], [0.5, 4.08, 0.0]])).abs().max().item() <= 1e-6
    # an unchanged model (no shared, no unique entries) gets ρ 0, λ 1, and changes nothing
    out = merge_state_dicts("ramplus_tl", [sd(t2), sd(base)], sd(base), {"r": 0.5, "alpha": 2.0})["w"]
    assert out.tolist() == t2.tolist()
    # a model with no unique entry: ρ = shared / epsilon, capped at alpha
    assert mk_ramplus_scales(base, [t1, t1], r=0.5, alpha=2.0) == [2.0, 2.0]


@pytest.mark.parametrize("epsilon,r,alpha", [(1e-5, 0.1, 0.2), (0.05, 0.5, 1.5), (0.15, 1.0, 10.0), (0.05, 0.3, -0.5)])
def test_ramplus_matches_reference(epsilon, r, alpha):
    base, models = state_dicts(7, 3)
    ref = {n: mk_ramplus(base[n], [m[n] for m in models], epsilon, r, alpha) for n in base}
    params = {"epsilon": epsilon, "r": r, "alpha": alpha}
    # never cut into row blocks: the counts are over the whole tensor
    for chunk in (16, 1 << 22):
        out = merge_state_dicts("ramplus_tl", models, base, params, chunk_elems=chunk)
        assert_close(out, ref, f"ramplus_tl {params} (chunk {chunk})")


def test_ramplus_column_blocks_give_the_whole_tensors_result(monkeypatch):
    """The kernel's passes over column blocks (bounded temporaries) change nothing, bit for bit."""
    import modalmerge.methods.ram as ram_module

    base, models = state_dicts(7, 3)
    params = {"epsilon": 0.05, "r": 0.5, "alpha": 1.5}
    whole = merge_state_dicts("ramplus_tl", models, base, params)
    monkeypatch.setattr(ram_module, "_BLOCK", 5)  # does not divide the tensors' sizes
    blocked = merge_state_dicts("ramplus_tl", models, base, params)
    assert all(torch.equal(whole[n], blocked[n]) for n in whole)


def test_ramplus_recipe(family, tmp_path):
    paths, sds = family
    out = run_yaml(tmp_path, {"merge_method": "ramplus_tl", "base_model": str(paths["base"]),
                              "models": [{"model": str(paths[f"ft{i}"])} for i in range(3)],
                              "parameters": {"epsilon": 0.015, "r": 0.5, "alpha": 0.4}, "dtype": "float32"})
    ref = {n: mk_ramplus(sds["base"][n], [sds[f"ft{i}"][n] for i in range(3)], 0.015, 0.5, 0.4)
           for n in sds["base"]}
    assert_close(out, ref, "ramplus_tl")


def test_ramplus_translation_and_errors():
    r = parse_recipe({"merge_method": "ramplus_tl", "base_model": "b", "models": ["a", "c"],
                      "parameters": {"epsilon": 0.01, "r": 0.3, "alpha": 0.5}})
    assert r.method == "ramplus_tl" and r.params == {"epsilon": 0.01, "r": 0.3, "alpha": 0.5}
    assert all(m.params == {} for m in r.models)
    base, models = state_dicts(8, 2)
    # epsilon also floors the unique count: 0 would give NaN for an unchanged tensor
    with pytest.raises(MergeError, match=r"params\.epsilon: Input should be greater than 0"):
        merge_state_dicts("ramplus_tl", models, base, {"epsilon": 0.0})
    with pytest.raises(MergeError, match=r"params\.alpha: Input should be a valid number"):
        merge_state_dicts("ramplus_tl", models, base, {"alpha": True})
    with pytest.raises(MergeError, match="unknown parameter params.lambda; its parameters are: alpha, epsilon, r"):
        merge_state_dicts("ramplus_tl", models, base, {"lambda": 1.0})
    with pytest.raises(MergeError, match="parameter 'r' cannot be set per model"):
        merge_state_dicts("ramplus_tl", models, base, model_params=[{"r": 0.2}, {}])
