"""linear, task arithmetic and TIES against dense references written here."""

import pytest
import torch

from conftest import finetunes, random_state_dict
from modalmerge import merge_state_dicts


def dense_ties(base, models, density, aggregate="mean", lam=1.0, scope="global", weights=None):
    names = list(base)
    T = len(models)
    weights = weights or [1.0] * T
    deltas = {n: torch.stack([m[n] - base[n] for m in models]) for n in names}
    if scope == "global":
        thresholds = []
        for t in range(T):
            allv = torch.cat([deltas[n][t].reshape(-1).abs() for n in names])
            k = int(density * allv.numel())
            thresholds.append(torch.sort(allv, descending=True).values[k - 1])
        for n in names:
            for t in range(T):
                deltas[n][t][deltas[n][t].abs() < thresholds[t]] = 0
    else:
        for n in names:
            for t in range(T):
                d = deltas[n][t].reshape(-1)
                k = int(density * d.numel())
                keep = torch.zeros_like(d, dtype=torch.bool)
                if k > 0:
                    keep[torch.sort(d.abs(), descending=True).indices[:k]] = True
                deltas[n][t] = (d * keep).reshape(deltas[n][t].shape)
    out = {}
    w = torch.tensor(weights)
    for n in names:
        x = deltas[n] * w.reshape((-1,) + (1,) * (deltas[n].dim() - 1))
        s = x.sum(0)
        total = x.sum()
        gamma = torch.sign(s)
        gamma[gamma == 0] = 1.0 if total >= 0 else -1.0
        agree = (torch.sign(x) == gamma) & (x != 0)
        if aggregate == "sum":
            merged = (x * agree).sum(0)
        elif aggregate == "max":
            merged = (x.abs() * agree).amax(0) * gamma
        else:
            wsum = (agree * w.reshape((-1,) + (1,) * (x.dim() - 1))).sum(0)
            merged = (x * agree).sum(0) / torch.where(wsum == 0, torch.ones_like(wsum), wsum)
        out[n] = base[n] + lam * merged
    return out


def test_linear_is_normalised_weighted_average():
    base = random_state_dict(0)
    models = finetunes(base, 3)
    out = merge_state_dicts("linear", models, weights=[1.0, 2.0, 1.0])
    for n in base:
        ref = (models[0][n] + 2 * models[1][n] + models[2][n]) / 4
        assert torch.allclose(out[n], ref, atol=1e-6)


def test_task_arithmetic_default_lambda():
    base = random_state_dict(0)
    models = finetunes(base, 2)
    out = merge_state_dicts("task_arithmetic", models, base=base)
    for n in base:
        ref = base[n] + 0.3 * ((models[0][n] - base[n]) + (models[1][n] - base[n]))
        assert torch.allclose(out[n], ref, atol=1e-6)


@pytest.mark.parametrize("aggregate", ["mean", "sum", "max"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_matches_dense_reference(aggregate, scope):
    base = random_state_dict(1)
    models = finetunes(base, 3)
    params = {"density": 0.3, "aggregate": aggregate, "scope": scope, "lambda": 0.7}
    out = merge_state_dicts("ties", models, base=base, params=params, exact_stats=True)
    ref = dense_ties(base, models, 0.3, aggregate, 0.7, scope)
    for n in base:
        assert torch.allclose(out[n], ref[n], atol=1e-6), n


def test_ties_weighted_and_chunked_equals_whole():
    base = random_state_dict(2, {"big.weight": (64, 48), "b.bias": (48,)})
    models = finetunes(base, 3)
    kw = dict(base=base, params={"density": 0.5}, weights=[0.5, 1.0, 2.0], exact_stats=True)
    whole = merge_state_dicts("ties", models, **kw)
    chunked = merge_state_dicts("ties", models, chunk_elems=256, **kw)
    ref = dense_ties(base, models, 0.5, weights=[0.5, 1.0, 2.0])
    for n in base:
        assert torch.equal(whole[n], chunked[n])
        assert torch.allclose(whole[n], ref[n], atol=1e-6)


def test_ties_sampled_global_threshold_keeps_the_right_fraction():
    from modalmerge.engine import executor

    base = random_state_dict(3, {"a": (4096, 2048), "b": (2048, 2048)})
    models = finetunes(base, 2)
    for t in models:
        t["b"] = base["b"] + 3 * (t["b"] - base["b"])  # tensors of different scales
    # this 12.6M-parameter model is sampled (stride > 1): check each task's kept fraction
    assert 12 * 2**20 // executor.SAMPLE_TARGET > 1
    from modalmerge.engine.executor import Executor
    from modalmerge.api import parse_recipe
    from modalmerge.checkpoint.sources import StateDictSource
    from modalmerge.engine.plan import build_plan
    from modalmerge.methods.statistics import TaskMagnitudes

    recipe = parse_recipe({"method": "ties", "base": "b", "models": ["m0", "m1"]})
    plan = build_plan(recipe, StateDictSource(base), [StateDictSource(m, f"m{i}") for i, m in enumerate(models)])
    stats = Executor(plan, progress=False).statistics()
    for t, thr in enumerate(stats.get(TaskMagnitudes).thresholds):
        allv = torch.cat([(models[t][n] - base[n]).reshape(-1).abs() for n in base])
        kept = float((allv >= thr).float().mean())
        assert abs(kept - 0.2) < 1e-3


def test_exact_ties_in_a_chunk_follow_the_whole_tensor_total():
    # element (0, 0) ties exactly (+1 and -1); the tensor's total is negative, decided by rows
    # far from the first chunk: the chunked merge must revisit the first chunk and pick -1
    base = {"w": torch.zeros(64, 8)}
    a = torch.zeros(64, 8)
    b = torch.zeros(64, 8)
    a[0, 0], b[0, 0] = 1.0, -1.0
    a[40:, :] = -0.5
    models = [{"w": a}, {"w": b}]
    params = {"density": 1.0}
    whole = merge_state_dicts("ties", models, base=base, params=params)
    chunked = merge_state_dicts("ties", models, base=base, params=params, chunk_elems=64)
    assert whole["w"][0, 0] == -1.0
    assert torch.equal(whole["w"], chunked["w"])


def test_ties_tensor_scope_chunked_equals_whole():
    # a per-tensor threshold over a tensor merged in row blocks: each model's whole-tensor
    # statistic is computed first, so the blocks trim exactly as the whole tensor does
    base = random_state_dict(5, {"big.weight": (96, 40), "b.bias": (40,)})
    models = finetunes(base, 3)
    kw = dict(base=base, params={"density": 0.3, "scope": "tensor"}, model_params=[{}, {"density": 0.6}, {}])
    whole = merge_state_dicts("ties", models, **kw)
    chunked = merge_state_dicts("ties", models, chunk_elems=320, **kw)
    for n in base:
        assert torch.equal(whole[n], chunked[n]), n
