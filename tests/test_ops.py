import pytest
import torch

from modalmerge import ops


def test_elect_sign_by_mass_and_tie_rule():
    x = torch.tensor([[1.0, -3.0, 2.0, 0.0], [-2.0, 1.0, -2.0, 0.0]])
    # sums: -1, -2, 0, 0 -> tensor total -3 -> ties take -1
    assert ops.elect_sign(x).tolist() == [-1.0, -1.0, -1.0, -1.0]
    y = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])  # sums 0, 2 -> total 2 -> tie +
    assert ops.elect_sign(y).tolist() == [1.0, 1.0]
    assert ops.elect_sign(y, tie_sign=-1.0).tolist() == [-1.0, 1.0]


def test_disjoint_mean_sum_max_by_hand():
    x = torch.tensor([[1.0, -3.0, 0.0], [3.0, 1.0, 0.0], [-1.0, -1.0, 0.0]])
    gamma = torch.tensor([1.0, -1.0, 1.0])
    assert ops.disjoint_merge(x, gamma, "mean").tolist() == [2.0, -2.0, 0.0]
    assert ops.disjoint_merge(x, gamma, "sum").tolist() == [4.0, -4.0, 0.0]
    assert ops.disjoint_merge(x, gamma, "max").tolist() == [3.0, -3.0, 0.0]


def test_weighted_disjoint_mean():
    w = torch.tensor([1.0, 3.0])
    x = torch.tensor([[2.0], [4.0]]) * w[:, None]  # weighted entries 2, 12
    assert ops.disjoint_merge(x, torch.tensor([1.0]), "mean", w).tolist() == [14.0 / 4.0]


def test_keep_top_fraction_exact():
    x = torch.tensor([0.1, -5.0, 3.0, -0.2, 4.0, 1.0, -2.0, 0.5, 0.3, 0.0])
    kept = ops.keep_top_fraction(x, 0.3)
    assert kept.tolist() == [0, -5.0, 3.0, 0, 4.0, 0, 0, 0, 0, 0]
    assert ops.keep_top_fraction(x, 0.05).abs().sum() == 0  # int(0.5) = 0 kept
    assert ops.kth_largest_magnitude(x, 2) == 4.0


def test_radix_select_by_hand():
    # 2.0 and 2.0078125 share the radix select's first-level bin (same top 15 bits), so the
    # second level must tell them apart; -0.0 and 0.0 are the same magnitude
    x = torch.tensor([[2.0, -2.0078125, 0.5, -0.0, 8.0, 0.0],
                      [1.0, 1.0, -1.0, 3.0, 0.25, -3.0]])
    assert ops.kth_largest_magnitudes(x, [2, 3]) == [2.0078125, 1.0]
    assert ops.kth_largest_magnitudes(x, [3, 1]) == [2.0, 3.0]
    assert ops.kth_largest_magnitudes(x, [6, 6]) == [0.0, 0.25]
    with pytest.raises(ValueError):
        ops.kth_largest_magnitudes(x, [7, 1])


def test_kth_by_counting_by_hand():
    # flagged keys: top 15 bits << 1 | (low 16 bits != 0). 2.0 and 2.0078125 share a bin whose
    # edge is 2.0 (low bits zero); 2.0000002 has low bits, so it sorts above the two 2.0s
    x = torch.tensor([2.0, 2.0, 2.0000002, 1.0, 2.0078125])
    bits = x.view(torch.int32)
    keys = ops.sparsify.flagged_keys(x)
    asked, rounds = [], []

    def count_at_least(cuts):
        rounds.append(cuts)
        return [int((keys >= c).sum()) for c in cuts]

    def low_counts(high):
        asked.append(high)
        return torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=1 << 16)

    def select(k, guess=()):
        return ops.sparsify.kth_by_counting(count_at_least, k, low_counts, {p: int((keys >= p).sum()) for p in guess})

    # k = 1, 2: inside the bin, above its edge: the low bits are needed
    assert select(1) == 2.0078125
    assert select(2) == float(x[2])
    assert len(asked) == 2
    # k = 3, 4: among the values equal to the bin's edge: no low bits
    assert select(3) == 2.0
    assert select(4) == 2.0
    assert select(5) == 1.0
    assert len(asked) == 2
    # counts known around the right key leave nothing to count; wrong ones cost rounds, not exactness
    edge = int(keys[0])
    rounds.clear()
    assert select(3, (edge, edge + 1)) == 2.0 and rounds == []
    assert select(3, (0, 1)) == select(3, (65534, 65535)) == 2.0 and rounds


@pytest.mark.parametrize("cuts", [1, 7])
def test_kth_by_counting_equals_sorting(cuts):
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(3000, generator=g), torch.randn(2000, generator=g).bfloat16().float(),
                   torch.zeros(50)])
    keys, bits = ops.sparsify.flagged_keys(x), x.abs().view(torch.int32)
    ordered = x.abs().sort(descending=True).values
    for k in [1, 2, 17, 1000, 2500, 4999, 5050]:
        count = lambda points: [int((keys >= p).sum()) for p in points]  # noqa: E731
        guess = ops.sparsify.sample_cuts(keys[::7], k, x.numel())
        got = ops.sparsify.kth_by_counting(
            count, k, lambda high: torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=1 << 16),
            dict(zip(guess, count(guess))), cuts=cuts)
        assert got == float(ordered[k - 1]), k


@pytest.mark.parametrize("kind", ["normal", "few_values", "tiny_and_huge", "bf16_differences", "long_rows"])
def test_radix_select_equals_sorting(kind):
    g = torch.Generator().manual_seed(3)
    shape = (3, 300_001) if kind == "long_rows" else (4, 5001)  # long rows are selected in a thread pool
    if kind in ("normal", "long_rows"):
        x = torch.randn(shape, generator=g)
    elif kind == "few_values":  # most of a row in one bin: the second level gets it all
        x = torch.randint(-2, 3, shape, generator=g).float()
    elif kind == "tiny_and_huge":  # subnormals to 1e30 in one row
        x = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-42, 31, shape, generator=g)
    else:  # task vectors of bfloat16 checkpoints, as the engine sees them
        base = torch.randn(shape, generator=g).bfloat16()
        x = (base.float() + 0.01 * torch.randn(shape, generator=g)).bfloat16().float() - base.float()
    ks = [1, 17, 2500, 5001][:shape[0]] if kind != "long_rows" else [1, 150_000, 300_001]
    expect = [float(row.abs().sort(descending=True).values[k - 1]) for row, k in zip(x, ks)]
    assert ops.kth_largest_magnitudes(x, ks) == expect
    assert [ops.kth_largest_magnitude(row, k) for row, k in zip(x, ks)] == expect


def test_histogram_threshold_close_to_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * torch.rand(200_000, generator=g)
    counts, mass = ops.magnitude_histogram(x)
    for density in (0.01, 0.2, 0.5, 0.9):
        t = ops.threshold_from_histogram(counts, density)
        kept = float((x.abs() >= t).float().mean())
        assert abs(kept - density) < 1e-3
        exact_removed = float((x.abs() * (x.abs() < t)).sum() / x.abs().sum())
        assert abs(ops.mass_below(mass, t) / float(x.abs().sum()) - exact_removed) < 1e-3
    assert (x.abs() >= ops.threshold_from_histogram(counts, 1.0)).all()


def test_bit_packing_roundtrip_and_size():
    m = torch.rand(5, 13) > 0.5
    packed = ops.pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (65 + 7) // 8
    assert torch.equal(ops.unpack_bits(packed, (5, 13)), m)
    assert ops.pack_bits(torch.tensor([True, False, True])).tolist() == [5]


def test_deterministic_sum_independent_of_threads():
    x = torch.randn(3_000_001)
    torch.set_num_threads(1)
    a = ops.deterministic_sum(x)
    torch.set_num_threads(2)
    b = ops.deterministic_sum(x)
    assert a == b
    assert a == pytest.approx(float(x.double().sum()), rel=1e-9, abs=1e-6)


def test_weighted_sum_order():
    x = torch.randn(3, 4)
    assert torch.allclose(ops.weighted_sum(x, [1.0, 2.0, -1.0]), x[0] + 2 * x[1] - x[2])


def test_gram_matrix_and_sign_conflicts_by_hand():
    from modalmerge.ops.similarity import gram_matrix, sign_conflicts

    x = torch.tensor([[1.0, -2.0, 0.0, 3.0], [2.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 1.0]])
    g = gram_matrix(x)
    assert g.dtype == torch.float64
    assert g.tolist() == [[14.0, 0.0, 2.0], [0.0, 5.0, -2.0], [2.0, -2.0, 2.0]]
    # element 0: +,+,- conflict; 1: -,+ conflict; 2: all zero; 3: +,+ (one zero) agree
    assert sign_conflicts(x) == (2, 3)
    assert sign_conflicts(x[:1]) == (0, 0)
    # sums over chunks add up
    assert sign_conflicts(x[:, :2])[0] + sign_conflicts(x[:, 2:])[0] == 2
