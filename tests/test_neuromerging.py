"""NeuroMerging (spec 8) against a hand-computed case and a per-row dense reference written here."""

import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import finetunes, load_sd, random_state_dict
from modalmerge import merge_state_dicts
from modalmerge.errors import MergeError
from modalmerge.methods.base import Stats, TensorGroup, TensorInfo
from modalmerge.methods.neuron_subspaces import (
    NeuroMergingParams,
    coordinate_coefficients,
    neuromerging_vector,
)
from modalmerge.methods.statistics import TaskMagnitudes


# -- dense reference: global trim by sorting, then a loop over neurons with one SVD each --------

def _elect_mean(x, tie):
    """TIES election + disjoint (weighted) mean of a [T] vector, written out."""
    total = float(x.sum())
    sign = 1.0 if total > 0 else -1.0 if total < 0 else tie
    agree = [t for t in range(len(x)) if x[t] != 0 and (x[t] > 0) == (sign > 0)]
    return float(sum(x[t] for t in agree) / len(agree)) if agree else 0.0


def ref_trim(base, models, density):
    """Global per-task top-k trim (exact, by sorting) and σ = max removed L1 fraction."""
    names = list(base)
    deltas = {n: torch.stack([m[n] - base[n] for m in models]).double() for n in names}
    if density >= 1:
        return deltas, 0.0
    sigma = 0.0
    for t in range(len(models)):
        allv = torch.cat([deltas[n][t].reshape(-1).abs() for n in names])
        k = int(density * allv.numel())
        thr = torch.sort(allv, descending=True).values[k - 1]
        sigma = max(sigma, float(allv[allv < thr].sum() / allv.sum()))
        for n in names:
            deltas[n][t][deltas[n][t].abs() < thr] = 0
    return deltas, sigma


def ref_neuron_rows(x, w, energy=1.0, flips=None):
    """x [T, rows, d], w [rows, d] → (parallel, orthogonal) merged rows, one SVD per row.

    `flips[row]` ([r] of ±1) flips singular vector pairs (U_j, V_j) before the election.
    """
    T, rows, d = x.shape
    s = torch.zeros(T, rows, dtype=torch.float64)
    for r in range(rows):
        ww = float(w[r] @ w[r])
        for t in range(T):
            s[t, r] = float(x[t, r] @ w[r]) / ww if ww > 0 else 0.0
    tie = 1.0 if float(s.sum()) >= 0 else -1.0
    par = torch.zeros(rows, d, dtype=torch.float64)
    orth = torch.zeros(rows, d, dtype=torch.float64)
    for r in range(rows):
        par[r] = _elect_mean(s[:, r], tie) * w[r]
        perp = x[:, r] - s[:, r, None] * w[r][None]                         # [T, d]
        _, S, Vh = torch.linalg.svd(perp, full_matrices=False)
        if flips is not None:
            Vh = Vh * flips[r][:, None]
        C = perp @ Vh.T                                                      # [T, r] = U S
        energy_sq = S ** 2
        for j in range(len(S)):
            if energy < 1 and float(energy_sq[:j].sum()) >= energy * float(energy_sq.sum()):
                break
            orth[r] += _elect_mean(C[:, j], 1.0) * Vh[j]
    return par, orth


def dense_neuromerging(base, models, density=0.2, lambda1=0.0, lambda2=None, energy=1.0, columns=()):
    deltas, sigma = ref_trim(base, models, density)
    lam2 = lambda2 if lambda2 is not None else 1.0 / (1.0 - sigma)
    out = {}
    for n, x in deltas.items():
        b = base[n].double()
        if b.dim() <= 1:
            tie = 1.0 if float(x.sum()) >= 0 else -1.0
            merged = torch.tensor([_elect_mean(x[:, i], tie) for i in range(x.shape[1])], dtype=torch.float64)
            out[n] = (b + lam2 * merged).float()
            continue
        dim = 1 if n in columns else 0
        w = b.movedim(dim, 0).reshape(b.shape[dim], -1)
        xr = x.movedim(dim + 1, 1).reshape(x.shape[0], b.shape[dim], -1)
        par, orth = ref_neuron_rows(xr, w, energy)
        tau = (lambda1 * par + lam2 * orth).reshape(b.movedim(dim, 0).shape).movedim(0, dim)
        out[n] = (b + tau).float()
    return out, sigma


def _close(a, b, atol=1e-5):
    return torch.allclose(a, b, atol=atol, rtol=1e-5)


# -- tests -------------------------------------------------------------------------------------

def test_hand_computed_two_tasks_one_neuron():
    # w = (2, 0, 0); τ1 = 1·w + (0, 4, 6), τ2 = −0.5·w + (0, −3, 8).
    # Parallel: s = (1, −0.5), sum > 0 → s̄ = 1 → (2, 0, 0).
    # Orthogonal: τ⊥ = U S Vᵀ with U = [[.6, .8], [.8, −.6]], S = (10, 5), V = (e3, e2):
    # C = U S = [[6, 4], [8, −3]]; column 1 → mean(6, 8) = 7, column 2 → + wins → 4;
    # merged = 7·e3 + 4·e2 = (0, 4, 7) (plain sum would be (0, 1, 14)).
    # Bias: τ1 = (1, −2), τ2 = (3, 1) → signs (+, −) → (2, −2).
    base = {"w": torch.tensor([[2.0, 0.0, 0.0]]), "b": torch.tensor([0.5, 0.5])}
    m1 = {"w": torch.tensor([[4.0, 4.0, 6.0]]), "b": torch.tensor([1.5, -1.5])}
    m2 = {"w": torch.tensor([[1.0, -3.0, 8.0]]), "b": torch.tensor([3.5, 1.5])}
    out = merge_state_dicts("neuromerging", [m1, m2], base=base, params={"density": 1.0, "lambda1": 1.0})
    assert torch.allclose(out["w"], torch.tensor([[2.0 + 2.0, 4.0, 7.0]]), atol=1e-5)
    assert torch.allclose(out["b"], torch.tensor([2.5, -1.5]), atol=1e-6)
    # defaults: λ1 = 0 drops the parallel part; density 1 trims nothing, so λ2 = 1/(1 − 0) = 1
    out = merge_state_dicts("neuromerging", [m1, m2], base=base, params={"density": 1.0})
    assert torch.allclose(out["w"], torch.tensor([[2.0, 4.0, 7.0]]), atol=1e-5)
    out = merge_state_dicts("neuromerging", [m1, m2], base=base, params={"density": 1.0, "lambda2": 0.5})
    assert torch.allclose(out["w"], torch.tensor([[2.0, 2.0, 3.5]]), atol=1e-5)
    assert torch.allclose(out["b"], torch.tensor([1.5, -0.5]), atol=1e-6)


def test_sigma_of_one_is_a_clear_error():
    group = TensorGroup(TensorInfo("w", (2, 2)), torch.zeros(2, 2), torch.ones(1, 2, 2), ["a"], torch.ones(1), [{}])

    class AllRemoved:
        thresholds = [float("inf")]

        def removed_l1_fraction(self):
            return [1.0]

    with pytest.raises(MergeError, match="raise `density` or set `lambda2`"):
        neuromerging_vector(group, NeuroMergingParams(), Stats({TaskMagnitudes: AllRemoved()}))


def test_params_and_defaults():
    p = NeuroMergingParams()
    assert (p.density, p.lambda1, p.lambda2, p.energy_threshold) == (0.2, 0.0, None, 1.0)
    for bad in ({"energy_threshold": 0.0}, {"energy_threshold": 1.5}, {"density": 0}, {"lamda2": 1}):
        with pytest.raises(MergeError):
            merge_state_dicts("neuromerging", [{"a": torch.ones(2, 2)}], base={"a": torch.zeros(2, 2)}, params=bad)


@pytest.mark.parametrize("lambda1,energy", [(0.7, 1.0), (0.0, 0.6)])
def test_matches_dense_reference(lambda1, energy):
    base = random_state_dict(5)
    models = finetunes(base, 4)
    params = {"density": 0.3, "lambda1": lambda1, "lambda2": 1.3, "energy_threshold": energy}
    out = merge_state_dicts("neuromerging", models, base=base, params=params, exact_stats=True)
    ref, _ = dense_neuromerging(base, models, 0.3, lambda1, 1.3, energy)
    for n in base:
        assert _close(out[n], ref[n]), n


def test_default_lambda2_is_one_over_one_minus_sigma():
    from modalmerge.checkpoint.sources import StateDictSource
    from modalmerge.engine.executor import Executor
    from modalmerge.engine.plan import build_plan
    from modalmerge.engine.recipe import parse_recipe

    base = random_state_dict(6, {"a.weight": (64, 32), "b.weight": (32, 32), "b.bias": (32,)})
    models = finetunes(base, 3)
    for n in ("b.weight", "b.bias"):   # tasks of different spread, so σ differs per task
        models[2][n] = base[n] + 4 * (models[2][n] - base[n])
    out = merge_state_dicts("neuromerging", models, base=base, exact_stats=True)
    ref, sigma = dense_neuromerging(base, models)
    # the engine's σ: the L1 mass below each exact threshold, read off the |τ| histogram (the
    # boundary bin is interpolated: an error of about one value's share of ‖τ‖₁, here ~3e-4)
    recipe = parse_recipe({"method": "neuromerging", "base": "b", "models": ["m0", "m1", "m2"]})
    plan = build_plan(recipe, StateDictSource(base), [StateDictSource(m, f"m{i}") for i, m in enumerate(models)])
    stats = Executor(plan, exact_stats=True, progress=False).statistics()
    engine_sigma = max(stats.get(TaskMagnitudes).removed_l1_fraction())
    assert 0.3 < sigma < 0.9 and abs(engine_sigma - sigma) < 1e-3
    explicit = merge_state_dicts("neuromerging", models, base=base, exact_stats=True,
                                 params={"lambda2": 1 / (1 - engine_sigma)})
    for n in base:
        assert torch.equal(out[n], explicit[n]), n
        assert _close(out[n], ref[n], atol=3e-3), n


def test_orthogonal_part_is_orthogonal_to_the_pretrained_neuron():
    base = random_state_dict(7)
    models = finetunes(base, 3)
    out = merge_state_dicts("neuromerging", models, base=base, params={"density": 0.5, "lambda2": 1.0})
    for n in ("embed.weight", "layers.0.linear.weight", "head.weight"):
        orth = out[n] - base[n]
        cos = (orth * base[n]).sum(-1) / (orth.norm(dim=-1) * base[n].norm(dim=-1))
        assert float(cos.abs().max()) < 1e-5, n
    # and λ1 adds exactly the parallel part, which lies along w
    both = merge_state_dicts("neuromerging", models, base=base, params={"density": 0.5, "lambda2": 1.0, "lambda1": 1.0})
    par = both["head.weight"] - out["head.weight"]
    ratio = par / base["head.weight"]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4)


def test_zero_norm_rows_all_zero_rows_and_rank_deficient_stacks_give_no_nan():
    base = random_state_dict(8, {"embed.weight": (6, 5), "lin.weight": (4, 2)})
    base["embed.weight"][0] = 0.0                       # padding embedding: ‖w‖ = 0
    models = finetunes(base, 3)
    models[0]["embed.weight"][2] = base["embed.weight"][2]   # all-zero rows of τ (every task)
    models[1]["embed.weight"][2] = base["embed.weight"][2]
    models[2]["embed.weight"][2] = base["embed.weight"][2]
    # rank-deficient: τ3 = τ1 + τ2 on row 3, and T = 3 > d = 2 for lin.weight
    models[2]["embed.weight"][3] = models[0]["embed.weight"][3] + models[1]["embed.weight"][3] - base["embed.weight"][3]
    params = {"density": 1.0, "lambda1": 1.0}
    out = merge_state_dicts("neuromerging", models, base=base, params=params)
    ref, _ = dense_neuromerging(base, models, 1.0, 1.0, None)
    for n in base:
        assert torch.isfinite(out[n]).all()
        assert _close(out[n], ref[n]), n
    assert torch.equal(out["embed.weight"][2], base["embed.weight"][2])
    # a zero-norm row: s_t = 0, so all of τ is orthogonal and TIES-like in its own basis
    tau0 = torch.stack([m["embed.weight"][0] for m in models])
    par, orth = ref_neuron_rows(tau0[:, None].double(), torch.zeros(1, 5, dtype=torch.float64))
    assert float(par.abs().max()) == 0 and torch.allclose(out["embed.weight"][0], orth[0].float(), atol=1e-5)
    # everything trimmed away in a tensor (density keeps only the largest values elsewhere)
    small = {k: v.clone() for k, v in base.items()}
    tiny = [{k: v + (1e-4 if k == "lin.weight" else 1.0) * torch.randn(v.shape) for k, v in base.items()}
            for _ in range(2)]
    out = merge_state_dicts("neuromerging", tiny, base=small, params={"density": 0.3}, exact_stats=True)
    assert torch.equal(out["lin.weight"], base["lin.weight"])
    assert all(torch.isfinite(v).all() for v in out.values())


def test_chunked_equals_whole_with_weights():
    base = random_state_dict(9, {"big.weight": (64, 24), "b.bias": (600,), "conv.weight": (32, 3, 2, 2)})
    models = finetunes(base, 3)
    kw = dict(base=base, params={"density": 0.4, "lambda1": 0.5}, weights=[0.5, 1.0, 2.0], exact_stats=True)
    whole = merge_state_dicts("neuromerging", models, **kw)
    chunked = merge_state_dicts("neuromerging", models, chunk_elems=256, **kw)  # 8 + 3 + 2 chunks
    for n in base:
        assert torch.equal(whole[n], chunked[n]), n
    # weights scale each trimmed τ_t and make the disjoint means weighted (as TIES)
    plain = merge_state_dicts("neuromerging", models, **{**kw, "weights": None})
    ref, _ = dense_neuromerging(base, models, 0.4, 0.5, None)
    for n in base:
        assert torch.allclose(plain[n], ref[n], atol=2e-3 * float(ref[n].abs().max())), n


def test_column_neurons_transpose_and_are_not_chunked(tmp_path):
    # CLIP's visual.proj is used as x @ W: its neurons are columns (architecture spec)
    base = random_state_dict(10, {"visual.proj": (12, 6), "ln.weight": (12,)})
    models = finetunes(base, 3)
    paths = {}
    for name, sd in [("base", base)] + [(f"m{i}", m) for i, m in enumerate(models)]:
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "clip"}))
        paths[name] = str(tmp_path / name)
    from modalmerge import merge

    recipe = {"method": "neuromerging", "base": paths["base"], "models": [paths[f"m{i}"] for i in range(3)],
              "params": {"density": 1.0, "lambda1": 0.5}}
    merge(recipe, tmp_path / "out", chunk_elems=16)
    out = load_sd(tmp_path / "out")
    ref, _ = dense_neuromerging(base, models, 1.0, 0.5, None, columns={"visual.proj"})
    assert _close(out["visual.proj"], ref["visual.proj"])
    rows_ref, _ = dense_neuromerging(base, models, 1.0, 0.5, None)
    assert not _close(out["visual.proj"], rows_ref["visual.proj"])
    # the kernel directly, with TensorInfo.neuron_dim = 1
    info = TensorInfo("visual.proj", (12, 6), "linear", 1)
    group = TensorGroup(info, base["visual.proj"], torch.stack([m["visual.proj"] for m in models]),
                        ["a", "b", "c"], torch.ones(3), [{}] * 3)
    tau = neuromerging_vector(group, NeuroMergingParams(density=1.0, lambda1=0.5), Stats())
    assert _close(base["visual.proj"] + tau, ref["visual.proj"])


def test_singular_vector_signs_do_not_change_the_result():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64)
    _, orth = ref_neuron_rows(x, w)
    for signs in itertools.product([1.0, -1.0], repeat=3):
        flips = torch.tensor(signs, dtype=torch.float64).expand(4, 3)
        assert torch.allclose(ref_neuron_rows(x, w, flips=flips)[1], orth, atol=1e-12)
    # the kernel's coefficients, flipping columns of U, with exact zero-sum ties: U = H/2 (4 × 4
    # Hadamard), σ² = (4, 3, 2, 1). Columns 2–4 of C sum to exactly 0; each is oriented so its
    # first largest coordinate (task 0) is +, + wins, ū = (½, ½, ½, ½), a = U ū = (1, 0, 0, 0).
    h = 0.5 * torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64)
    lam = torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)
    gram = (h * lam) @ h.T
    assert torch.equal(h.sum(0)[1:], torch.zeros(3))
    a = coordinate_coefficients(gram[None], h[None], lam, torch.ones(4), 1.0)
    assert torch.equal(a, torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    for signs in itertools.product([1.0, -1.0], repeat=4):
        flipped = h * torch.tensor(signs, dtype=torch.float64)
        assert torch.equal(coordinate_coefficients(gram[None], flipped[None], lam, torch.ones(4), 1.0), a)


def test_energy_threshold_reduces_rank():
    base = random_state_dict(12, {"w": (5, 16)})
    models = finetunes(base, 4)
    full = merge_state_dicts("neuromerging", models, base=base, params={"density": 1.0})
    low = merge_state_dicts("neuromerging", models, base=base, params={"density": 1.0, "energy_threshold": 1e-6})
    assert not _close(full["w"], low["w"])
    # with only the leading direction kept, each neuron's merged part is along its top V_1
    x = torch.stack([m["w"] - base["w"] for m in models]).double()
    w = base["w"].double()
    for r in range(5):
        s = (x[:, r] @ w[r]) / (w[r] @ w[r])
        perp = x[:, r] - s[:, None] * w[r]
        v1 = torch.linalg.svd(perp, full_matrices=False).Vh[0]
        d = (low["w"][r] - base["w"][r]).double()
        assert float((d - (d @ v1) * v1).norm()) < 1e-5 * float(d.norm())
    ref, _ = dense_neuromerging(base, models, 1.0, 0.0, None, energy=1e-6)
    assert _close(low["w"], ref["w"])
