"""nuslerp, multislerp and karcher: mergekit 0.1.5's spherical methods.

The `mk_*` functions restate mergekit's maths (merge_methods/nuslerp.py, multislerp.py,
karcher.py) in float32 torch, as mergekit computes them; modalmerge's engine must give the same
tensors (to 1e-6), natively and from mergekit recipes. Small cases are checked by hand too.
tests/test_mergekit_conformance.py compares whole merges with mergekit itself.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from conftest import finetunes, load_sd, random_state_dict
from modalmerge import merge, merge_state_dicts
from modalmerge.engine.recipe import parse_recipe
from modalmerge.errors import MergeError

# ---------------------------------------------------------------- mergekit 0.1.5's maths


def mk_nuslerp(weights, v0, v1, base=None, row_wise=False, flatten=True, eps=1e-8):
    """nuslerp_merge_method: t = w1 / Σw (0.5 for Σw ≈ 0); task vectors when there is a base."""
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is not None:
        return base + mk_nuslerp(weights, v0 - base, v1 - base, None, row_wise, flatten, eps)
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def mk_multislerp(tensors, weights, base=None, normalize_weights=True, eps=1e-8):
    """multislerp: tangent-space mean at the normalised weighted mean, exp map, mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    x = torch.stack(tensors)
    if base is not None:
        x = x - base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor(weights, dtype=x.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        assert len(tensors) == 2
        out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
        return out if base is None else out + base
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    v = (tangent * w.view(-1, 1)).sum(0)
    vn = torch.norm(v) + eps
    out = (mean * torch.cos(vn) + v * (torch.sin(vn) / vn)) * (norms.squeeze(-1) * w).sum()
    out = out.view(x.shape[1:])
    return out if base is None else out + base


def mk_karcher(tensors, max_iter=10, tol=1e-5):
    """karcher_merge_tensors with mergekit's uniform alphas 1/N."""
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0 else x / n for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    u = [units[i] for i in valid]
    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    mn = torch.linalg.vector_norm(mean)
    mean = u[0].clone() if mn.item() < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            dot = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if tn.item() < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if un.item() > tol:
            mean = mean / un
    return sum(al * n for al, n in zip(alphas, norms)) * mean


# ---------------------------------------------------------------- helpers


def assert_close(out, ref, what, tol=1e-6):
    assert set(out) == set(ref), what
    for name in ref:
        diff = (out[name] - ref[name]).abs().max().item()
        assert diff <= tol, f"{what}: {name} differs from the reference by {diff}"


def one_line_error(fn, *fragments):
    with pytest.raises(MergeError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
R = math.sqrt(0.5)


@pytest.fixture(scope="module")
def sds():
    base = random_state_dict(0)
    return base, finetunes(base, 3, scale=0.3)


# ---------------------------------------------------------------- small cases by hand


def test_hand_checked_two_orthogonal_vectors():
    def two(method, a, b, weights=None, **params):
        return merge_state_dicts(method, [{"v": a}, {"v": b}], params=params, weights=weights)["v"]

    # a quarter turn between e1 and e2: t = w1 / (w0 + w1) walks along the arc
    assert torch.allclose(two("nuslerp", E1, E2), torch.tensor([R, R]), atol=1e-7)
    t = 3 / 4
    got = two("nuslerp", E1, E2, weights=[1.0, 3.0])
    assert torch.allclose(got, torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]), atol=1e-7)
    # weights that sum to 0 interpolate half way; colinear vectors interpolate linearly
    assert torch.allclose(two("nuslerp", E1, E2, weights=[1.0, -1.0]), torch.tensor([R, R]), atol=1e-7)
    assert torch.allclose(two("nuslerp", E1, 2 * E1, weights=[3.0, 1.0]), torch.tensor([1.25, 0.0]), atol=1e-7)
    # multislerp and karcher: the arc's midpoint, scaled by the mean norm (2·e1 and 4·e2: 3)
    for method in ("multislerp", "karcher"):
        assert torch.allclose(two(method, E1, E2), torch.tensor([R, R]), atol=1e-6), method
        assert torch.allclose(two(method, 2 * E1, 4 * E2), torch.tensor([3 * R, 3 * R]), atol=1e-6), method
    # opposite vectors with equal weights: multislerp falls back to the weighted sum
    assert torch.equal(two("multislerp", E1, -E1), torch.zeros(2))
    # karcher of zero tensors is zero
    assert torch.equal(two("karcher", torch.zeros(2), torch.zeros(2)), torch.zeros(2))


def test_hand_checked_task_vectors_and_rows():
    base = {"w": torch.tensor([[1.0, 1.0], [2.0, 2.0]])}
    # rows of the task vectors: (e1, e2) in row 0 and (e2, −e1) in row 1, both orthogonal pairs
    a = {"w": base["w"] + torch.stack([E1, E2])}
    b = {"w": base["w"] + torch.stack([E2, -E1])}
    got = merge_state_dicts("nuslerp", [a, b], base=base, params={"nuslerp_flatten": False})["w"]
    want = base["w"] + torch.tensor([[R, R], [-R, R]])
    assert torch.allclose(got, want, atol=1e-6)
    # a single multislerp / karcher input is returned as it is
    for method in ("multislerp", "karcher"):
        assert torch.equal(merge_state_dicts(method, [a])["w"], a["w"])


# ---------------------------------------------------------------- the engine against the references


@pytest.mark.parametrize("flags", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                                   {"nuslerp_row_wise": True}])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_reference(sds, flags, with_base):
    base, fts = sds
    weights = [0.7, 0.4]
    ref = {n: mk_nuslerp(weights, fts[0][n], fts[1][n], base[n] if with_base else None,
                         row_wise=flags.get("nuslerp_row_wise", False), flatten=flags.get("nuslerp_flatten", True))
           for n in base}
    # small chunks: row vectors are merged in blocks of rows, other layouts whole
    for chunk_elems in (1 << 20, 16):
        out = merge_state_dicts("nuslerp", fts[:2], base=base if with_base else None, params=flags,
                                weights=weights, chunk_elems=chunk_elems)
        assert_close(out, ref, f"nuslerp {flags} base={with_base} chunk_elems={chunk_elems}")


@pytest.mark.parametrize("params", [{}, {"normalize_weights": False}, {"eps": 1e-4}])
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_matches_reference(sds, params, with_base):
    base, fts = sds
    weights = [0.5, 0.3, 0.2] if params.get("normalize_weights", True) else [0.5, 0.3, 0.2]
    ref = {n: mk_multislerp([m[n] for m in fts], weights, base[n] if with_base else None, **params) for n in base}
    out = merge_state_dicts("multislerp", fts, base=base if with_base else None, params=params, weights=weights,
                            chunk_elems=16)
    assert_close(out, ref, f"multislerp {params} base={with_base}")


@pytest.mark.parametrize("params", [{}, {"max_iter": 0}, {"max_iter": 2, "tol": 1e-3}])
def test_karcher_matches_reference(sds, params):
    base, fts = sds
    models = [base] + fts  # four inputs, the base among them as mergekit averages it
    ref = {n: mk_karcher([m[n] for m in models], **params) for n in base}
    out = merge_state_dicts("karcher", models, params=params, chunk_elems=16)
    assert_close(out, ref, f"karcher {params}")


# ---------------------------------------------------------------- mergekit recipes


def mergekit_recipe(method, base, models, parameters=None):
    data = {"merge_method": method, "dtype": "float32", "models": models}
    if base is not None:
        data["base_model"] = base
    if parameters:
        data["parameters"] = parameters
    return data


def test_recipe_translation():
    r = parse_recipe(mergekit_recipe("nuslerp", "B", [{"model": "B"}, {"model": "A", "parameters": {"weight": 0.3}},
                                                       {"model": "C", "parameters": {"weight": 0.7}}],
                                     {"nuslerp_flatten": False}))
    assert r.method == "nuslerp" and r.base == "B" and r.params == {"nuslerp_flatten": False}
    assert [(m.path, m.weight) for m in r.models] == [("A", 0.3), ("C", 0.7)]
    r = parse_recipe(mergekit_recipe("multislerp", None, [{"model": "A"}, {"model": "C"}],
                                     {"weight": 0.5, "normalize_weights": False, "eps": 1e-6}))
    assert r.method == "multislerp" and r.base is None
    assert r.params == {"normalize_weights": False, "eps": 1e-6} and [m.weight for m in r.models] == [0.5, 0.5]
    # karcher averages mergekit's base_model with the models, appended after them as in mergekit
    r = parse_recipe(mergekit_recipe("karcher", "B", [{"model": "A"}, {"model": "C"}], {"max_iter": 4}))
    assert r.method == "karcher" and r.base is None and [m.path for m in r.models] == ["A", "C", "B"]


def test_mergekit_recipes_on_model_folders(llama_family, tmp_path):
    paths = {k: str(v) for k, v in llama_family.items()}
    sd = {k: load_sd(v) for k, v in paths.items()}
    cases = {
        "nuslerp": (mergekit_recipe("nuslerp", paths["base"], [{"model": paths["ft0"], "parameters": {"weight": 0.7}},
                                                                {"model": paths["ft1"], "parameters": {"weight": 0.3}}]),
                    lambda n: mk_nuslerp([0.7, 0.3], sd["ft0"][n], sd["ft1"][n], sd["base"][n])),
        "nuslerp_rows": (mergekit_recipe("nuslerp", None, [{"model": paths["ft0"]}, {"model": paths["ft2"]}],
                                         {"weight": 1.0, "nuslerp_flatten": False}),
                         lambda n: mk_nuslerp([1.0, 1.0], sd["ft0"][n], sd["ft2"][n], flatten=False)),
        "multislerp": (mergekit_recipe("multislerp", paths["base"],
                                       [{"model": paths[f"ft{i}"], "parameters": {"weight": w}}
                                        for i, w in enumerate([0.5, 0.3, 0.2])]),
                       lambda n: mk_multislerp([sd[f"ft{i}"][n] for i in range(3)], [0.5, 0.3, 0.2], sd["base"][n])),
        "karcher": (mergekit_recipe("karcher", paths["base"], [{"model": paths[f"ft{i}"]} for i in range(3)],
                                    {"max_iter": 5}),
                    lambda n: mk_karcher([sd[k][n] for k in ("ft0", "ft1", "ft2", "base")], max_iter=5)),
    }
    for name, (data, reference) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        merge(path, tmp_path / f"out_{name}")
        out = load_sd(tmp_path / f"out_{name}")
        assert_close(out, {n: reference(n) for n in sd["base"]}, name)


# ---------------------------------------------------------------- errors


def test_bad_values_are_one_line_errors(sds):
    base, fts = sds

    def run(method, params=None, n=2, with_base=False, weights=None):
        return lambda: merge_state_dicts(method, fts[:n], base=base if with_base else None, params=params,
                                         weights=weights)

    one_line_error(run("nuslerp", {"nuslerp_flatten": "yes"}), "nuslerp_flatten")
    one_line_error(run("nuslerp", {"t": 0.3}), "t")
    one_line_error(run("nuslerp", n=3), "nuslerp")
    one_line_error(run("multislerp", {"eps": 0}), "eps")
    one_line_error(run("multislerp", {"normalize_weights": 1}), "normalize_weights")
    one_line_error(run("multislerp", weights=[1.0, -1.0]), "sum to 0")
    one_line_error(run("karcher", {"max_iter": -1}), "max_iter")
    one_line_error(run("karcher", {"max_iter": 2.5}), "max_iter")
    one_line_error(run("karcher", {"tol": 0}), "tol")
    one_line_error(run("karcher", weights=[0.5, 1.0]), "weight")
    one_line_error(run("karcher", with_base=True), "karcher")
    # three tensors whose directions cancel: multislerp's mean has no direction
    cancel = [{"v": E1}, {"v": -E1}, {"v": torch.zeros(2)}]
    one_line_error(lambda: merge_state_dicts("multislerp", cancel), "'v'", "cancel")


def test_bad_mergekit_recipes_are_one_line_errors(llama_family, tmp_path):
    paths = {k: str(v) for k, v in llama_family.items()}

    def run(data):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return lambda: merge(path, tmp_path / "out")

    # an unknown parameter, mergekit's `normalize` (not multislerp's `normalize_weights`), a weight karcher
    # has no use for (mergekit ignores all three silently), a shared parameter given per model
    one_line_error(run(mergekit_recipe("karcher", None, [{"model": paths["ft0"]}], {"eps": 1e-6})), "eps")
    one_line_error(run(mergekit_recipe("multislerp", None, [{"model": paths["ft0"]}], {"normalize": True})),
                   "normalize")
    one_line_error(run(mergekit_recipe("karcher", paths["base"], [{"model": paths["ft0"],
                                                                   "parameters": {"weight": 0.5}}])), "weight")
    one_line_error(run(mergekit_recipe("nuslerp", None, [{"model": paths["ft0"]},
                                                         {"model": paths["ft1"],
                                                          "parameters": {"nuslerp_flatten": False}}])),
                   "nuslerp_flatten")
    one_line_error(run(mergekit_recipe("nuslerp", paths["base"], [{"model": paths["ft0"]}])), "nuslerp")
    assert not (tmp_path / "out").exists()
