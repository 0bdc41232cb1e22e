"""ops.trimmed_merge (one operation that chooses C or torch), the kernels' typed statistics and
election state, and the rule that methods do not import each other."""

import ast
from pathlib import Path

import pytest
import torch

from modalmerge import ops
from modalmerge.methods.base import ElectionState, Statistic, Stats
from modalmerge.methods.sign_election import TiesParams
from modalmerge.methods.statistics import ExactThresholds, MagnitudeResult, TaskMagnitudes
from modalmerge.ops.trimmed_merge import Inputs, OwnTopK, tensor_thresholds, trimmed_merge, weighted_delta_sum

METHODS = Path(__file__).parent.parent / "src" / "modalmerge" / "methods"


def _inputs(n=20_000, t=3, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    models = [(base.float() + 0.05 * torch.randn(n, generator=g)).to(dtype) for _ in range(t)]
    models[1][:50] = (2 * base[:50].float() - models[0][:50].float()).to(dtype)  # exact zero sums
    return base, models


@pytest.mark.parametrize("thresholds", [None, [0.01, 0.02, 0.0], OwnTopK([0.2, 0.5, 0.1], 0)])
@pytest.mark.parametrize("aggregate", ["mean", "sum", "max"])
def test_c_and_torch_give_the_same_tensors_and_ask_the_tie_rule_once(thresholds, aggregate):
    base, models = _inputs()
    kept = [base.clone()] + [m.clone() for m in models]
    weights = torch.tensor([1.0, 0.5, 2.0])
    out, asked = {}, {}
    for c_kernels in (True, False):
        calls = []

        def rule(total):
            calls.append(float(total.sum()))
            return -1.0

        inputs = Inputs(base, models, (100, 200), c_kernels)
        out[c_kernels] = trimmed_merge(inputs, thresholds, weights, aggregate, rule)
        asked[c_kernels] = len(calls)
    assert asked == {True: 1, False: 1}
    for a, b in zip(out[True], out[False]):
        assert a.shape == (100, 200) and torch.allclose(a, b, atol=1e-6, rtol=0)
    assert all(torch.equal(x, y) for x, y in zip([base] + models, kept))  # inputs are read-only


def test_a_float32_stack_is_read_only_and_gives_the_stored_inputs_answer():
    base, models = _inputs(dtype=torch.float32)
    stack = torch.stack(models)
    before = stack.clone()
    w = torch.tensor([1.0, -0.5, 2.0])
    stored = Inputs(base, models, (20_000,))
    stacked = Inputs(base, stack, (20_000,))
    assert torch.equal(weighted_delta_sum(stored, w), weighted_delta_sum(stacked, w))
    assert tensor_thresholds(stored, [0.2, 0.3, 1.0], 0) == tensor_thresholds(stacked, [0.2, 0.3, 1.0], 0)
    got = trimmed_merge(stacked, [0.01] * 3, w, "mean", 1.0)
    want = trimmed_merge(stored, [0.01] * 3, w, "mean", 1.0)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(stack, before)


def test_election_state_exact_provisional_and_known_totals():
    total = torch.tensor([0.0, -1.0, -2.0])
    merged = torch.tensor([1.0, -1.0, -2.0])  # the zero sum at 0 kept something: the tie sign decided it
    exact = ElectionState(exact=True)
    assert exact.tie_sign(total) == -1.0 and exact.partials == {"elect": -3.0}
    block = ElectionState(exact=False)
    assert block.tie_sign(total) == 1.0  # provisional +
    block.settle(total, merged)
    assert block.provisional
    known = ElectionState(exact=False, totals={"elect": -5.0})
    assert known.tie_sign(total) == -1.0
    known.settle(total, merged)
    assert not known.provisional


def test_stats_are_typed_by_the_statistic_that_gives_them():
    class Counts(Statistic[list[float]]):
        name = "counts"

    stats = Stats()
    stats.put(Counts(), [1.0, 2.0])
    assert stats.get(Counts) == [1.0, 2.0] and Counts in stats and TaskMagnitudes not in stats
    with pytest.raises(KeyError, match="TaskMagnitudes"):
        stats.get(TaskMagnitudes)
    # an exact-statistics refinement gives its original's result
    counts = [torch.zeros(ops.sparsify.HIST_BINS, dtype=torch.float64)]
    counts[0][100] = 10
    approx = MagnitudeResult(counts, [c.clone() for c in counts], TiesParams(density=0.5), "density", [{}])
    stats.put(ExactThresholds("magnitudes", approx), approx)
    assert stats.get(TaskMagnitudes) is approx
    assert stats.summaries() == {"counts": None, "magnitudes": None}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.add(node.module)
    return out


def test_methods_do_not_import_each_other():
    method_files = {p.stem for p in METHODS.glob("*.py") if "= Method(" in p.read_text()}
    assert {"ties", "dare", "tall", "neuromerging", "mmer", "task_arithmetic", "consensus"} <= method_files
    for stem in sorted(method_files):
        assert not _imports(METHODS / f"{stem}.py") & method_files, stem
