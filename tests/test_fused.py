"""The fused C kernels (ops/fused.py; ops/kernels.c, built at install into the extension
modalmerge.ops.ckernels) of TIES and task arithmetic against the eager ones."""

from contextlib import contextmanager

import pytest
import torch

from modalmerge import ops
from modalmerge.api import merge_state_dicts
from modalmerge.engine import executor


def _models(seed=0, shape=(96, 80), n=3, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(shape, generator=g).to(dtype), "v": torch.randn(shape[0] * 50, generator=g).to(dtype)}
    models = []
    for t in range(n):
        m = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        if t == 1:  # exact zero sums: model 1 cancels model 0 on a patch, so the tie rule matters
            d0 = models[0]["w"].float() - base["w"].float()
            m["w"][:8] = (base["w"][:8].float() - d0[:8]).to(dtype)
        models.append(m)
    return base, models


@pytest.fixture
def kernels():
    """The built extension; skipped where it was installed without a C compiler (the eager
    kernels run there, see test_without_the_extension_the_eager_kernels_run)."""
    if ops.fused.ckernels is None:
        pytest.skip(ops.fused.note())


@pytest.fixture
def threads():
    """threads(n): a context in which the kernels split large blocks over n threads, as the
    streaming executor's passes do."""
    @contextmanager
    def use(n: int):
        with ops.threads.KernelThreads(n) as pool, ops.threads.threads_in_use(pool):
            yield
    return use


def _merge(method, base, models, monkeypatch, compiled: bool, **kw):
    monkeypatch.setenv("MODALMERGE_FUSED", "1" if compiled else "0")
    monkeypatch.setattr(executor, "FUSED_MIN_BLOCK", 64)
    return merge_state_dicts(method, models, base=base, **kw)


CASES = [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "aggregate": "sum", "lambda": 0.7}),
    ("ties", {"density": 0.5, "aggregate": "max"}),
    ("ties", {"density": 1.0}),
    ("ties", {"density": 0.3, "tie": "positive"}),
    ("ties", {"density": 0.3, "scope": "tensor"}),
    ("ties", {"density": 0.0001, "scope": "tensor", "keep_min": 3}),
    ("task_arithmetic", {"lambda": 0.6}),
]


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("method,params", CASES)
def test_fused_equals_eager(method, params, monkeypatch):
    base, models = _models(dtype=torch.float32 if params.get("density") == 1.0 else torch.bfloat16)
    before = [{k: v.clone() for k, v in sd.items()} for sd in [base] + models]
    kw = dict(params=params, weights=[1.0, 0.5, 2.0])
    eager = _merge(method, base, models, monkeypatch, False, **kw)
    fused = _merge(method, base, models, monkeypatch, True, **kw)
    for sd, kept in zip([base] + models, before):  # the caller's tensors are never written to
        assert all(torch.equal(sd[k], kept[k]) for k in sd)
    for name in base:
        assert fused[name].dtype == eager[name].dtype
        assert torch.allclose(fused[name].float(), eager[name].float(), atol=1e-6, rtol=0), name
    # in row blocks the fused kernels give the same bits as on the whole tensor
    chunked = _merge(method, base, models, monkeypatch, True, chunk_elems=96 * 16, **kw)
    for name in base:
        assert torch.equal(chunked[name], fused[name]), name


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_tensor_thresholds_equal_sorting(dtype, monkeypatch):
    from modalmerge.ops.trimmed_merge import fused_tensor_thresholds

    monkeypatch.setenv("MODALMERGE_FUSED", "1")
    g = torch.Generator().manual_seed(5)
    n = 20_000
    base = torch.randn(n, generator=g).to(dtype)
    # small deltas (bfloat16: differences that are bfloat16 values, the first level decides),
    # and deltas larger than the weights (many differences with low bits: the second level)
    models = [(base.float() + s * torch.randn(n, generator=g)).to(dtype) for s in (0.01, 0.05, 3.0)]
    deltas = [(m.float() - base.float()).abs() for m in models]
    with_low_bits = [float(((d.view(torch.int32) & 0xFFFF) != 0).float().mean()) for d in deltas]
    if dtype == torch.bfloat16:
        assert with_low_bits[0] < 0.01 and with_low_bits[2] > 0.2
    densities = [0.2, 0.01, 0.5]
    expect = [float(d.sort(descending=True).values[int(k * n) - 1]) for d, k in zip(deltas, densities)]
    assert fused_tensor_thresholds(base, models, densities, 0) == expect


@pytest.mark.usefixtures("kernels")


def test_fused_ties_uses_the_tensor_total_for_exact_ties(monkeypatch):
    # sums that are exactly 0 take the sign of the tensor's total, also when the fused kernel
    # sees the tensor in row blocks (the engine re-runs blocks decided by a provisional sign)
    shape = (64, 64)
    base = {"w": torch.zeros(shape)}
    a, b = torch.zeros(shape), torch.zeros(shape)
    a[0, 0], b[0, 0] = 1.0, -1.0
    a[40:, :] = -0.5
    models = [{"w": a}, {"w": b}]
    for chunk in (None, 64 * 8):
        kw = dict(params={"density": 1.0}, **({"chunk_elems": chunk} if chunk else {}))
        out = _merge("ties", base, models, monkeypatch, True, **kw)
        assert out["w"][0, 0] == -1.0
        assert torch.equal(out["w"], _merge("ties", base, models, monkeypatch, False, **kw)["w"])


@pytest.mark.usefixtures("kernels")


def test_fused_kernels_do_not_depend_on_the_thread_count(monkeypatch):
    base, models = _models(seed=2, shape=(256, 64))
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(_merge("ties", base, models, monkeypatch, True, params={"density": 0.2}))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in base)


def test_without_the_extension_the_eager_kernels_run(monkeypatch):
    base, models = _models(seed=3)
    eager = _merge("ties", base, models, monkeypatch, False, params={"density": 0.3}, chunk_elems=96 * 16)
    monkeypatch.setattr(ops.fused, "ckernels", None)  # as installed without a C compiler
    assert not ops.fused.usable()
    assert ops.fused.note().startswith("eager torch (the C extension modalmerge.ops.ckernels ")
    with pytest.raises(ops.fused.FusedUnavailable, match="modalmerge.ops.ckernels"):
        ops.fused.weighted_delta_sum(torch.zeros(4), [torch.ones(4)], torch.ones(1))
    fallback = _merge("ties", base, models, monkeypatch, True, params={"density": 0.3}, chunk_elems=96 * 16)
    assert all(torch.equal(fallback[k], eager[k]) for k in base)
    ta = _merge("task_arithmetic", base, models, monkeypatch, True, params={"lambda": 0.5})
    monkeypatch.setenv("MODALMERGE_FUSED", "0")
    assert all(torch.equal(ta[k], merge_state_dicts("task_arithmetic", models, base=base,
                                                     params={"lambda": 0.5})[k]) for k in base)


@pytest.mark.usefixtures("kernels")
def test_fused_switch(monkeypatch):
    monkeypatch.setenv("MODALMERGE_FUSED", "0")
    assert not ops.fused.usable()
    assert ops.fused.note() == "eager torch (the fused kernels are off: MODALMERGE_FUSED=0)"
    with pytest.raises(ops.fused.FusedUnavailable):
        ops.fused.weighted_delta_sum(torch.zeros(4), [torch.ones(4)], torch.ones(1))
    monkeypatch.setenv("MODALMERGE_FUSED", "1")
    assert ops.fused.usable()
    assert ops.fused.note().startswith("fused C kernels (modalmerge.ops.ckernels, ")


# -- the kernels one by one, against the same arithmetic written in torch ----------------------

def _trimmed(m, b, thr, w):
    d = m.float() - b
    return torch.where(d.abs() >= thr, d, 0.0) * w


def _reference(base, models, thr, w, aggregate):
    b = base.float()
    total = _trimmed(models[0], b, thr[0], w[0])
    for t in range(1, len(models)):
        total = total + _trimmed(models[t], b, thr[t], w[t])
    gamma = torch.sign(total)
    gamma = torch.where(gamma == 0, -1.0, gamma)  # tie sign -1
    kept, count = torch.zeros_like(b), torch.zeros_like(b)
    for t in range(len(models)):
        a = torch.clamp_min(_trimmed(models[t], b, thr[t], w[t]) * gamma, 0.0)
        kept = torch.maximum(kept, a) if aggregate == "max" else kept + a
        count = count + torch.where(a > 0, w[t], 0.0)
    merged = gamma * kept / torch.where(count == 0, 1.0, count) if aggregate == "mean" else gamma * kept
    delta_sum = (models[0].float() - b) * w[0]
    for t in range(1, len(models)):
        delta_sum = delta_sum + (models[t].float() - b) * w[t]
    return total, merged, delta_sum


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_models", [1, 3, 8, 11])  # more than 8: the models go in groups, carried
@pytest.mark.parametrize("thread_count", [1, 2])
def test_kernels_equal_torch(dtype, n_models, thread_count, threads, monkeypatch):
    # 150,001 elements: two threads split them (ops.fused.PARALLEL_MIN), here into 16 pieces of
    # 10,000 elements, the last one short
    monkeypatch.setattr(ops.fused, "PIECE", 10_000)
    g = torch.Generator().manual_seed(n_models)
    n = 150_001
    base = torch.randn(n, generator=g).to(dtype)
    models = [(base.float() + 0.02 * torch.randn(n, generator=g)).to(dtype) for _ in range(n_models)]
    models[0][:100] = base[:100]  # exact zeros: the tie sign decides
    thr = torch.rand(n_models, generator=g) * 0.02
    w = torch.rand(n_models, generator=g) + 0.5
    with threads(thread_count):
        total = ops.fused.trimmed_total(base, models, thr, w)
        got = {a: ops.fused.disjoint_merge(base, models, thr, w, total, -1.0, a) for a in ("mean", "sum", "max")}
        delta_sum = ops.fused.weighted_delta_sum(base, models, w)
    for aggregate in ("mean", "sum", "max"):
        want_total, want_merged, want_delta_sum = _reference(base, models, thr, w, aggregate)
        # the same operations in the same order: the same bits
        assert torch.equal(total, want_total)
        assert torch.equal(got[aggregate], want_merged), aggregate
        assert torch.equal(delta_sum, want_delta_sum)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_keys_and_counts_equal_torch(dtype, threads, monkeypatch):
    monkeypatch.setattr(ops.fused, "PIECE", 10_000)  # many pieces, counted by two threads
    with threads(2):
        _keys_and_counts_equal_torch(dtype)


def _keys_and_counts_equal_torch(dtype):
    g = torch.Generator().manual_seed(7)
    n = 150_001
    base = torch.randn(n, generator=g).to(dtype)
    model = (base.float() + 0.05 * torch.randn(n, generator=g)).to(dtype)
    bits = (model.float() - base.float()).abs().view(torch.int32)
    want = ((bits >> 16) << 1) | ((bits & 0xFFFF) != 0).int()
    cuts = [0, int(want.min()), int(want.median()), int(want.max()), int(want.max()) + 1, 1 << 16]
    keys, counts = ops.fused.magnitude_keys(base, model, cuts)
    assert keys.dtype == torch.int16 and torch.equal(keys.int() & 0xFFFF, want)  # unsigned 16-bit keys
    assert counts == ops.fused.count_at_least(keys, cuts) == [int((want >= c).sum()) for c in cuts]
    assert ops.fused.magnitude_keys(base, model)[1] == [] and ops.fused.count_at_least(keys, []) == []
    high = int(torch.mode(bits >> 16).values)  # the fullest bin of the top 15 bits
    inside = bits[(bits >> 16) == high] & 0xFFFF
    assert torch.equal(ops.fused.boundary_low_counts(base, model, high), torch.bincount(inside, minlength=1 << 16))


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tensor_thresholds_from_a_misleading_guess_equal_sorting(dtype, monkeypatch):
    # the search starts from a sampled guess of the k-th key; a wrong guess costs rounds, not exactness
    from modalmerge.ops import trimmed_merge

    g = torch.Generator().manual_seed(8)
    n = 300_000
    base = torch.randn(n, generator=g).to(dtype)
    models = [(base.float() + s * torch.randn(n, generator=g)).to(dtype) for s in (0.01, 0.05, 3.0, 0.02)]
    densities = [0.2, 0.01, 0.5, 0.999]
    deltas = [(m.float() - base.float()).abs() for m in models]
    expect = [float(d.sort(descending=True).values[int(k * n) - 1]) for d, k in zip(deltas, densities)]
    assert trimmed_merge.fused_tensor_thresholds(base, models, densities, 0) == expect
    for guess in [[1], [65000, 65536], [2, 3], []]:  # all above, all below, nonsense, no guess
        monkeypatch.setattr(ops.sparsify, "sample_cuts", lambda *a: guess)
        assert trimmed_merge.fused_tensor_thresholds(base, models, densities, 0) == expect


def test_inputs_of_mixed_dtypes_take_the_eager_kernels(monkeypatch):
    base, models = _models(seed=4)
    base32 = {k: v.float() for k, v in base.items()}  # a float32 base under bfloat16 fine-tunes
    with pytest.raises(ops.fused.FusedUnavailable):
        ops.fused.trimmed_total(base32["w"], [m["w"] for m in models], torch.zeros(3), torch.ones(3))
    kw = dict(params={"density": 0.3}, weights=[1.0, 0.5, 2.0])
    fused = _merge("ties", base32, models, monkeypatch, True, **kw)
    eager = _merge("ties", base32, models, monkeypatch, False, **kw)
    assert all(torch.equal(fused[k], eager[k]) for k in base)
