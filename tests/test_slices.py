"""Layer stacking (issue 13, item 2): mergekit's `slices:` and `passthrough`, against dense
references of mergekit 0.1.5's arithmetic written here (mergekit itself is not needed: see
tests/test_mergekit_conformance.py for the comparison with a real mergekit run).

mergekit's plan (plan.py): output block o of a slice is block start + (o − offset) of each source,
merged across the slice's sources; the embeddings are merged over the first slice's sources, the
final norm and LM head over the last slice's; a gradient runs over each slice's own blocks; the
output config's num_hidden_layers is the sum of the slice lengths.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import load_sd, perturbed
from modalmerge import api
from modalmerge.engine.recipe import parse_recipe
from modalmerge.errors import MergeError

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def tiny_llama4(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> dict[str, Path]:
    """Three 4-layer tiny Llamas (A, B, C: one base and two perturbations of it), float32."""
    root = tmp_path_factory.mktemp("slices")
    a = tiny_llama4()
    paths = {"A": root / "A", "B": root / "B", "C": root / "C"}
    a.save_pretrained(paths["A"])
    perturbed(a, 21, 0.05).save_pretrained(paths["B"])
    perturbed(a, 22, 0.05).save_pretrained(paths["C"])
    return paths


def sd(folder) -> dict[str, torch.Tensor]:
    return load_sd(folder)


def stacked(pieces: list[tuple[dict, int, int]]) -> dict[str, torch.Tensor]:
    """A dense frankenmerge: blocks [a, b) of each state dict in turn, renumbered; embeddings from
    the first, the rest from the last."""
    out: dict[str, torch.Tensor] = {}
    first, last = pieces[0][0], pieces[-1][0]
    out.update({k: v for k, v in first.items() if "embed_tokens" in k})
    o = 0
    for model, a, b in pieces:
        for i in range(a, b):
            for k, v in model.items():
                m = LAYER.match(k)
                if m and int(m.group(1)) == i:
                    out[f"model.layers.{o + i - a}.{m.group(2)}"] = v
        o += b - a
    out.update({k: v for k, v in last.items() if not LAYER.match(k) and "embed_tokens" not in k})
    return out


def merge_yaml(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    api.merge(recipe, out)
    return sd(out)


def frankenmerge(stack) -> dict:
    return {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(stack["A"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(stack["B"]), "layer_range": [2, 4]}]},
    ]}


def test_passthrough_frankenmerge(stack, tmp_path):
    before = {k: (p.stat().st_mtime_ns, p.stat().st_size) for k, p in stack.items()}
    out = merge_yaml(frankenmerge(stack), tmp_path / "out")
    A, B = sd(stack["A"]), sd(stack["B"])
    ref = stacked([(A, 0, 3), (B, 2, 4)])
    assert set(out) == set(ref)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], B["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(out["lm_head.weight"], B["lm_head.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], A["model.embed_tokens.weight"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert (tmp_path / "out" / "mergekit_config.yml").exists()
    # the output loads and runs as the model its config says
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert len(model.model.layers) == 5
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()
    assert before == {k: (p.stat().st_mtime_ns, p.stat().st_size) for k, p in stack.items()}  # inputs untouched


def test_layer_types_cut_with_the_layers(stack, tmp_path):
    cfg_path = stack["A"] / "config.json"
    config = json.loads(cfg_path.read_text())
    src = tmp_path / "A"
    src.mkdir()
    for f in stack["A"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config["layer_types"] = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    (src / "config.json").write_text(json.dumps(config))
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(src), "layer_range": [1, 3]}]},
        {"sources": [{"model": str(stack["B"]), "layer_range": [0, 1]}]},
    ]}
    api.merge(recipe, tmp_path / "out")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["num_hidden_layers"] == 3
    assert out["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]


def mk_linear(tensors, weights):
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *[1] * tensors[0].dim())
    return (torch.stack(tensors) * w).sum(0) / w.sum()


def test_linear_across_the_sources_of_each_slice(stack, tmp_path):
    A, B, C = (sd(stack[k]) for k in "ABC")
    recipe = {"merge_method": "linear", "dtype": "float32", "slices": [
        {"sources": [{"model": str(stack["A"]), "layer_range": [0, 2], "parameters": {"weight": 0.7}},
                     {"model": str(stack["B"]), "layer_range": [1, 3], "parameters": {"weight": 0.3}}]},
        {"sources": [{"model": str(stack["C"]), "layer_range": [3, 4], "parameters": {"weight": 0.7}},
                     {"model": str(stack["A"]), "layer_range": [0, 1], "parameters": {"weight": 0.3}}]},
    ]}
    out = merge_yaml(recipe, tmp_path / "out")
    slot0 = stacked([(A, 0, 2), (C, 3, 4)])
    slot1 = stacked([(B, 1, 3), (A, 0, 1)])
    assert set(out) == set(slot0)
    for k in slot0:
        torch.testing.assert_close(out[k], mk_linear([slot0[k], slot1[k]], [0.7, 0.3]), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


def mk_ties(base, models, weights, density):
    deltas = [m - base for m in models]
    kept = []
    for d in deltas:
        k = max(1, int(density * d.numel()))
        thr = d.abs().flatten().kthvalue(d.numel() - k + 1).values if k < d.numel() else -1
        kept.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)))
    w = torch.tensor(weights).view(-1, *[1] * base.dim())
    stacked_ = torch.stack(kept) * w
    sign = torch.where(stacked_.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stacked_) == sign) & (stacked_ != 0)
    total = (stacked_ * agree).sum(0)
    div = (w * agree).sum(0)
    return base + torch.where(div == 0, torch.zeros_like(total), total / div.clamp(min=1e-8))


def test_ties_with_a_base_in_each_slice(stack, tmp_path):
    A, B, C = (sd(stack[k]) for k in "ABC")
    recipe = {"merge_method": "ties", "base_model": str(stack["A"]), "dtype": "float32",
              "parameters": {"density": 1.0},
              "slices": [{"sources": [{"model": str(stack["A"]), "layer_range": [0, 2]},
                                      {"model": str(stack["B"]), "layer_range": [0, 2], "parameters": {"weight": 0.6}},
                                      {"model": str(stack["C"]), "layer_range": [0, 2], "parameters": {"weight": 0.4}}]},
                         {"sources": [{"model": str(stack["A"]), "layer_range": [1, 4]},
                                      {"model": str(stack["B"]), "layer_range": [1, 4], "parameters": {"weight": 0.6}},
                                      {"model": str(stack["C"]), "layer_range": [1, 4], "parameters": {"weight": 0.4}}]}]}
    out = merge_yaml(recipe, tmp_path / "out")
    base = stacked([(A, 0, 2), (A, 1, 4)])
    ms = [stacked([(X, 0, 2), (X, 1, 4)]) for X in (B, C)]
    assert set(out) == set(base)
    for k in base:
        ref = mk_ties(base[k], [m[k] for m in ms], [0.6, 0.4], 1.0)
        torch.testing.assert_close(out[k], ref, rtol=0, atol=1e-6, msg=k)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 5


def test_passthrough_scale_with_a_filter_list(stack, tmp_path):
    recipe = frankenmerge(stack)
    recipe["parameters"] = {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}
    recipe["slices"][1]["sources"][0]["parameters"] = {"scale": [{"filter": "down_proj", "value": 0.5}]}
    out = merge_yaml(recipe, tmp_path / "out")
    A, B = sd(stack["A"]), sd(stack["B"])
    ref = stacked([(A, 0, 3), (B, 2, 4)])
    for k in ref:
        factor = 0.0 if "o_proj" in k else 1.0
        m = LAYER.match(k)
        if m and int(m.group(1)) >= 3 and "down_proj" in k:
            factor = 0.5  # the source's own filter first; the top-level list where it matches nothing
        torch.testing.assert_close(out[k], ref[k] * factor, rtol=0, atol=0, msg=k)


def test_gradient_runs_over_each_slice(stack, tmp_path):
    """Gradients run within each slice from its first block to its last (mergekit's t = i/(n−1)); a
    one-block slice sits at t = 1; embeddings and norm/head at t = 0 of the first/last slice."""
    A, B = sd(stack["A"]), sd(stack["B"])
    recipe = {"merge_method": "linear", "dtype": "float32",
              "slices": [{"sources": [{"model": str(stack["A"]), "layer_range": [0, 3],
                                       "parameters": {"weight": [1.0, 0.0]}},
                                      {"model": str(stack["B"]), "layer_range": [0, 3],
                                       "parameters": {"weight": [0.0, 1.0]}}]},
                         {"sources": [{"model": str(stack["A"]), "layer_range": [3, 4]},
                                      {"model": str(stack["B"]), "layer_range": [3, 4]}]}]}
    out = merge_yaml(recipe, tmp_path / "w")
    for k in out:
        m = LAYER.match(k)
        layer = int(m.group(1)) if m else (0 if "embed" in k else 3)
        wa, wb = {0: (1.0, 0.0), 1: (0.5, 0.5), 2: (0.0, 1.0), 3: (1.0, 1.0)}[layer]  # the last slice: none given
        torch.testing.assert_close(out[k], mk_linear([A[k], B[k]], [wa, wb]), rtol=0, atol=1e-6, msg=k)
    recipe = {"merge_method": "slerp", "base_model": str(stack["A"]), "dtype": "float32",
              "parameters": {"t": [0.0, 1.0]},
              "slices": [{"sources": [{"model": str(stack["A"]), "layer_range": [0, 3]},
                                      {"model": str(stack["B"]), "layer_range": [0, 3]}]},
                         {"sources": [{"model": str(stack["A"]), "layer_range": [3, 4]},
                                      {"model": str(stack["B"]), "layer_range": [3, 4]}]}]}
    out = merge_yaml(recipe, tmp_path / "out")
    for k in out:
        m = LAYER.match(k)
        layer = int(m.group(1)) if m else None
        t = {None: 0.0, 0: 0.0, 1: 0.5, 2: 1.0, 3: 1.0}[layer]
        if t == 0.0:
            torch.testing.assert_close(out[k], A[k], rtol=0, atol=1e-6, msg=k)
        elif t == 1.0:
            torch.testing.assert_close(out[k], B[k], rtol=0, atol=1e-6, msg=k)


def test_native_slices_recipe(stack, tmp_path):
    recipe = {"method": "passthrough", "slices": [
        {"sources": [{"path": str(stack["A"]), "layers": [0, 3]}]},
        {"sources": [{"path": str(stack["B"]), "layers": [2, 4], "params": {"scale": 2.0}}]},
    ]}
    out = merge_yaml(recipe, tmp_path / "out")
    A, B = sd(stack["A"]), sd(stack["B"])
    ref = stacked([(A, 0, 3), (B, 2, 4)])
    for k in ref:
        m = LAYER.match(k)
        factor = 2.0 if (m and int(m.group(1)) >= 3) or not (m or "embed" in k) else 1.0
        torch.testing.assert_close(out[k], ref[k] * factor, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("slices, fragment", [
    ([{"sources": [{"layer_range": [0, 2]}]}], r"slices\[0\]\.sources\[0\] has no `model`"),
    ([{"sources": [{"model": "A", "layer_range": [2, 2]}]}], r"slices\[0\]\.sources\[0\]\.layer_range \[2, 2\] is empty"),
    ([{"sources": [{"model": "A", "layer_range": [0]}]}], r"slices\[0\]\.sources\[0\]\.layer_range must be"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 3]}]}],
     r"slices\[0\]: its sources cover different numbers of layers"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}], "residual_weight": 0.5}], "residual_weight"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2], "extra": 1}]}], "unknown field 'extra'"),
    ([], "slices"),
])
def test_bad_slices_are_one_line_errors(slices, fragment):
    with pytest.raises(MergeError, match=fragment) as e:
        recipe = parse_recipe({"merge_method": "linear", "slices": slices})
        api.plan(recipe)
    assert "\n" not in str(e.value)


def test_errors_that_need_the_models(stack, tmp_path):
    def fails(recipe, fragment):
        with pytest.raises(MergeError, match=fragment) as e:
            api.merge(recipe, tmp_path / "never")
        assert "\n" not in str(e.value) and not (tmp_path / "never").exists()

    fails({"merge_method": "passthrough", "slices": [{"sources": [{"model": str(stack["A"]), "layer_range": [2, 6]}]}]},
          r"slices\[0\]\.sources\[0\]: layer range \[2, 6\] .* past its 4 layers")
    fails({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(stack["A"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(stack["A"]), "layer_range": [0, 2]}, {"model": str(stack["B"]), "layer_range": [0, 2]}]}]},
        "different numbers of sources")
    fails({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(stack["A"]), "layer_range": [0, 2]}, {"model": str(stack["B"]), "layer_range": [0, 2]}]}]},
        "at most 1 model")
    fails({"merge_method": "linear", "modules": {"text": {}}}, "modules")
    fails({"merge_method": "linear", "models": [{"model": str(stack["A"])}],
           "slices": [{"sources": [{"model": str(stack["A"]), "layer_range": [0, 2]}]}]}, "not both")


def test_each_slice_its_own_parameters(stack, tmp_path):
    """A slice's `parameters` hold for its own blocks (lambda 0.5 in the second slice, the recipe's
    0.8 in the first); the LM head and final norm take the last slice's, the embeddings the first's."""
    A, B, C = (sd(stack[k]) for k in "ABC")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(stack["A"]), "dtype": "float32",
              "parameters": {"lambda": 0.8, "weight": 1.0},
              "slices": [{"sources": [{"model": str(stack["A"]), "layer_range": [0, 2]},
                                      {"model": str(stack["B"]), "layer_range": [0, 2]},
                                      {"model": str(stack["C"]), "layer_range": [0, 2], "parameters": {"weight": 0.5}}]},
                         {"sources": [{"model": str(stack["A"]), "layer_range": [2, 4]},
                                      {"model": str(stack["B"]), "layer_range": [2, 4]},
                                      {"model": str(stack["C"]), "layer_range": [2, 4], "parameters": {"weight": 0.5}}],
                          "parameters": {"lambda": 0.5}}]}
    out = merge_yaml(recipe, tmp_path / "out")
    for k in out:
        m = LAYER.match(k)
        lam = 0.5 if (m and int(m.group(1)) >= 2) or not (m or "embed" in k) else 0.8
        ref = A[k] + lam * ((B[k] - A[k]) + 0.5 * (C[k] - A[k]))
        torch.testing.assert_close(out[k], ref, rtol=0, atol=1e-6, msg=k)
    # a parameter the method takes for the whole merge cannot be given to one source
    recipe["slices"][0]["sources"][1]["parameters"] = {"lambda": 0.1}
    with pytest.raises(MergeError, match=r"slices\[0\]: model '.*B': parameter 'lambda' cannot be set per model"):
        api.plan(recipe)


def test_a_base_must_be_among_the_sources_of_a_slice(stack):
    def recipe(method):
        return {"merge_method": method, "base_model": str(stack["C"]), "slices": [
            {"sources": [{"model": str(stack["A"]), "layer_range": [0, 2]},
                         {"model": str(stack["B"]), "layer_range": [0, 2]}]}]}

    for method in ("slerp", "ties"):
        with pytest.raises(MergeError, match=r"slices\[0\]: its base model .* is not among its sources"):
            parse_recipe(recipe(method))
    # linear averages its inputs and ignores a base that is not one of them, as mergekit does
    r = parse_recipe(recipe("linear"))
    assert [s.path for s in r.slices[0].sources] == [str(stack["A"]), str(stack["B"])]


def test_no_output_inside_a_later_slice_model(stack):
    """Every slice's models are inputs: the output may not be one of them or lie inside one."""
    with pytest.raises(MergeError) as e:
        api.merge(frankenmerge(stack), stack["B"] / "out")
    assert "\n" not in str(e.value) and not (stack["B"] / "out").exists()


def test_a_slices_recipe_without_a_method():
    with pytest.raises(MergeError, match="'merge_method' is missing"):
        parse_recipe({"slices": [{"sources": [{"model": "A", "layer_range": [0, 2]}]}]})
