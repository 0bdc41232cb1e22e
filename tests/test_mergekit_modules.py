"""mergekit's `modules:` recipes (engine/modules.py): a VLM's text decoder, vision tower and projector,
each merged with its own models or slices and parameters, in one merge.

Tiny Qwen3-VL and Mistral3 models built here (both in mergekit 0.1.5's architectures, with the tensor
names transformers 5 writes): a dense reference of mergekit's semantics written out by hand, the
same recipes against mergekit itself (when MODALMERGE_MERGEKIT_PYTHON is set), the config's layer
counts, the errors, and --dry-run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_sd
from mergekit_reference import requires_mergekit, run_mergekit
from modalmerge import api, cli
from modalmerge.errors import MergeError

T = "model.language_model."


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    """base, m1, m2: a Qwen3-VL with 4 text layers, 3 vision blocks and 3 deepstack mergers."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    root = tmp_path_factory.mktemp("qwen3vl")
    torch.manual_seed(0)
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                         rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           patch_size=2, spatial_merge_size=2, temporal_patch_size=1, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 1, 2]))
    base = Qwen3VLForConditionalGeneration(cfg)
    base.save_pretrained(root / "base")
    state = base.state_dict()
    for name in ("m1", "m2"):
        model = Qwen3VLForConditionalGeneration(cfg)
        model.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in state.items()})
        model.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> Path:
    """base, m1: a Mistral3 (mergekit's modules with a weight prefix: `language_model.`, `vision_tower.`)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    root = tmp_path_factory.mktemp("mistral3")
    torch.manual_seed(1)
    cfg = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=64),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, head_dim=8, patch_size=4, image_size=16),
        spatial_merge_size=2)
    base = Mistral3ForConditionalGeneration(cfg)
    base.save_pretrained(root / "base")
    m1 = Mistral3ForConditionalGeneration(cfg)
    m1.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()})
    m1.save_pretrained(root / "m1")
    return root


def _task_arithmetic_recipe(root: Path) -> dict:
    """Two modules as slices and models, the third models; gradients, a filter list, the global weight."""
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "parameters": {"weight": 0.3},
        "modules": {
            "text_decoder": {"slices": [
                {"sources": [{"model": str(root / "m1"), "layer_range": [0, 2], "parameters": {"weight": [0.1, 0.9]}},
                             {"model": str(root / "m2"), "layer_range": [1, 3]},
                             {"model": str(root / "base"), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(root / "m1"), "layer_range": [3, 4]},
                             {"model": str(root / "m2"), "layer_range": [3, 4]},
                             {"model": str(root / "base"), "layer_range": [3, 4]}]}]},
            "vision_tower": {
                "models": [{"model": str(root / "m1"), "parameters": {"weight": [{"filter": "attn", "value": 0.5}]}},
                           {"model": str(root / "m2")}],
                "parameters": {"weight": [1.0, 0.0]}},
            "multi_modal_projector": {"models": [{"model": str(root / "m2")}]},
        },
    }


def _ties_recipe(root: Path) -> dict:
    """TIES with a density per model, per module and per slice gradient; `normalize` set in one module;
    module filter lists that fall back to the recipe's; a vision tower cut from 3 blocks to 2."""
    m1, m2, base = str(root / "m1"), str(root / "m2"), str(root / "base")
    return {
        "merge_method": "ties",
        "base_model": base,
        "parameters": {"density": 0.5, "weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.6}]},
        "modules": {
            "text_decoder": {
                "models": [{"model": m1, "parameters": {"density": 0.9}}, {"model": m2}],
                "parameters": {"normalize": False, "weight": [{"filter": "self_attn", "value": 1.2}]}},
            "vision_tower": {
                "slices": [
                    {"sources": [{"model": m1, "layer_range": [0, 1]}, {"model": m2, "layer_range": [0, 1]},
                                 {"model": base, "layer_range": [0, 1]}]},
                    {"sources": [{"model": m1, "layer_range": [2, 3]}, {"model": m2, "layer_range": [2, 3]},
                                 {"model": base, "layer_range": [2, 3]}]}],
                "parameters": {"density": [0.3, 0.9]}},
            "multi_modal_projector": {"models": [{"model": m1}, {"model": m2}],
                                      "parameters": {"density": [{"filter": "deepstack", "value": 0.7}]}},
        },
    }


def _linear_recipe(root: Path) -> dict:
    """Mistral3, linear: the text decoder cut to one layer taken from two models' different layers."""
    m1, base = str(root / "m1"), str(root / "base")
    return {
        "merge_method": "linear",
        "modules": {
            "text_decoder": {"slices": [{"sources": [
                {"model": m1, "layer_range": [0, 1], "parameters": {"weight": 0.3}},
                {"model": base, "layer_range": [2, 3], "parameters": {"weight": 0.7}}]}]},
            "vision_tower": {"models": [{"model": m1, "parameters": {"weight": 1.0}},
                                        {"model": base, "parameters": {"weight": 3.0}}]},
            "multi_modal_projector": {"models": [{"model": m1, "parameters": {"weight": 1.0}},
                                                 {"model": base, "parameters": {"weight": 1.0}}]},
        },
    }


def _gradient_recipe(root: Path) -> dict:
    """A plain `models:` recipe with a gradient: mergekit runs it over each module's own layers."""
    return {"merge_method": "task_arithmetic", "base_model": str(root / "base"),
            "models": [{"model": str(root / "m1"), "parameters": {"weight": [1.0, 0.0]}},
                       {"model": str(root / "m2"), "parameters": {"weight": 0.5}}]}


def _write(tmp: Path, name: str, recipe: dict) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# ------------------------------------------------------------------ (a) a dense reference of mergekit's semantics

def _reference(root: Path) -> dict[str, torch.Tensor]:
    """_task_arithmetic_recipe as mergekit 0.1.5 computes it, written out tensor by tensor:
    base + Σ wᵢ·(mᵢ − base), each module's weights at its own layers (t = i/(n−1), 0 off the layers)
    and from its own scopes."""
    sd = {k: load_sd(root / k) for k in ("base", "m1", "m2")}
    base, m1, m2 = sd["base"], sd["m1"], sd["m2"]
    out: dict[str, torch.Tensor] = {}

    def merged(b: str, terms: list[tuple[float, dict, str]]) -> torch.Tensor:
        return base[b] + sum(w * (model[n] - base[b]) for w, model, n in terms)

    for name in base:
        if name.startswith(T) or name.startswith("lm_head."):
            if f"{T}layers." not in name:
                # embeddings from the first slice (t = 0: m1's own gradient gives 0.1), norm and head from the last
                w1 = 0.1 if "embed_tokens" in name else 0.3
                out[name] = merged(name, [(w1, m1, name), (0.3, m2, name)])
                continue
            layer = int(name[len(f"{T}layers."):].split(".")[0])
            rest = name[len(f"{T}layers.{layer}."):]
            if layer == 3:  # output layer 2, the second slice's only block
                out[f"{T}layers.2.{rest}"] = merged(name, [(0.3, m1, name), (0.3, m2, name)])
            elif layer < 2:  # slice 1: m1's and the base's layers 0-1, m2's 1-2; m1's gradient at t = layer
                out[name] = merged(name, [(0.1 + 0.8 * layer, m1, name), (0.3, m2, f"{T}layers.{layer + 1}.{rest}")])
        elif name.startswith("model.visual.merger.") or name.startswith("model.visual.deepstack_merger_list."):
            out[name] = merged(name, [(0.3, m2, name)])  # the recipe's weight; the base added by mergekit
        else:  # vision tower: the module's gradient over its 3 blocks, m1's filter on `attn` first
            block = int(name.split(".")[3]) if name.startswith("model.visual.blocks.") else 0
            w = 1.0 - block / 2
            out[name] = merged(name, [(0.5 if "attn" in name else w, m1, name), (w, m2, name)])
    return out


def test_modules_dense_reference(qwen, tmp_path):
    out = tmp_path / "out"
    api.merge(_write(tmp_path, "ta", _task_arithmetic_recipe(qwen)), out)
    got, want = load_sd(out), _reference(qwen)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)
    config = _config(out)
    # mergekit: a module given as slices sets its layer count; one given as models leaves it
    assert config["text_config"]["num_hidden_layers"] == 3
    assert config["vision_config"]["depth"] == 3


def test_native_modules_match_the_mergekit_form(qwen, tmp_path):
    """The native `modules:` field: each module a small recipe of its own (models, base, params over the
    recipe's)."""
    m1, m2, base = str(qwen / "m1"), str(qwen / "m2"), str(qwen / "base")
    native = {"method": "task_arithmetic", "base": base, "params": {"lambda": 1.0}, "modules": {
        "text_decoder": {"models": [{"path": m1, "weight": 0.5}, m2], "params": {"lambda": 0.5}},
        "vision_tower": {"models": [{"path": m1, "weight": {"layers": [1.0, 0.0]}}]},
        "multi_modal_projector": {"models": [m2], "base": m1}}}
    mergekit = {"merge_method": "task_arithmetic", "base_model": base, "modules": {
        "text_decoder": {"models": [{"model": m1, "parameters": {"weight": 0.25}},
                                    {"model": m2, "parameters": {"weight": 0.5}}]},
        "vision_tower": {"models": [{"model": m1, "parameters": {"weight": [1.0, 0.0]}}]},
        "multi_modal_projector": {"models": [{"model": m2}], "parameters": {"weight": 1.0}}}}
    api.merge(native, tmp_path / "native")
    api.merge(mergekit, tmp_path / "mergekit")
    a, b = load_sd(tmp_path / "native"), load_sd(tmp_path / "mergekit")
    assert sorted(a) == sorted(b)
    for name in a:
        if name.startswith("model.visual.merger.") or name.startswith("model.visual.deepstack_merger_list."):
            continue  # the native projector merges m2 onto m1, a base the mergekit form cannot give a module
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    sd = {k: load_sd(qwen / k) for k in ("m1", "m2")}
    name = "model.visual.merger.linear_fc1.weight"
    torch.testing.assert_close(a[name], sd["m2"][name], atol=1e-6, rtol=0)  # m1 + 1.0 · (m2 − m1)


def test_a_gradient_runs_over_each_modules_layers(qwen, tmp_path):
    """`models:` on a model with modules: text layer i of 4 at t = i/3, vision block and deepstack merger
    i of 3 at t = i/2, as mergekit normalises such a recipe into one module each."""
    api.merge(_gradient_recipe(qwen), tmp_path / "out")
    got = load_sd(tmp_path / "out")
    sd = {k: load_sd(qwen / k) for k in ("base", "m1", "m2")}
    for name, t in [(f"{T}layers.1.mlp.up_proj.weight", 1 / 3), ("model.visual.blocks.1.attn.qkv.weight", 0.5),
                    ("model.visual.deepstack_merger_list.2.linear_fc1.weight", 1.0),
                    ("model.visual.merger.linear_fc1.weight", 0.0), (f"{T}embed_tokens.weight", 0.0)]:
        want = sd["base"][name] + (1 - t) * (sd["m1"][name] - sd["base"][name]) + \
            0.5 * (sd["m2"][name] - sd["base"][name])
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=0, msg=name)


# ------------------------------------------------------------------ (b) against mergekit itself

@pytest.fixture(scope="module")
def mergekit_outputs(qwen, mistral, tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit_modules")
    recipes = {"task_arithmetic": _task_arithmetic_recipe(qwen), "ties": _ties_recipe(qwen),
               "linear_mistral3": _linear_recipe(mistral), "models_gradient": _gradient_recipe(qwen)}
    jobs = [{"kind": "yaml", "config": _write(root, name, recipe), "out": root / f"mk_{name}"}
            for name, recipe in recipes.items()]
    run_mergekit(jobs)
    return root, recipes


@requires_mergekit
@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "linear_mistral3", "models_gradient"])
def test_modules_against_mergekit(mergekit_outputs, name, tmp_path):
    root, recipes = mergekit_outputs
    mm = tmp_path / "mm"
    api.merge(root / f"{name}.yaml", mm)
    ours, theirs = load_sd(mm), load_sd(root / f"mk_{name}")
    assert sorted(ours) == sorted(theirs)
    for tensor in theirs:
        torch.testing.assert_close(ours[tensor], theirs[tensor], atol=1e-5, rtol=0, msg=tensor)
    for sub in ("text_config", "vision_config"):
        for key in ("num_hidden_layers", "depth"):
            assert _config(mm)[sub].get(key) == _config(root / f"mk_{name}")[sub].get(key), (sub, key)


def test_layer_counts_of_sliced_modules(qwen, mistral, tmp_path):
    """Without mergekit at hand: the counts mergekit writes (a slices module's sum of slice lengths)."""
    api.merge(_ties_recipe(qwen), tmp_path / "ties")
    assert _config(tmp_path / "ties")["text_config"]["num_hidden_layers"] == 4  # `models`: left as it is
    assert _config(tmp_path / "ties")["vision_config"]["depth"] == 2
    assert "model.visual.blocks.1.attn.qkv.weight" in load_sd(tmp_path / "ties")
    assert "model.visual.blocks.2.attn.qkv.weight" not in load_sd(tmp_path / "ties")
    api.merge(_linear_recipe(mistral), tmp_path / "linear")
    assert _config(tmp_path / "linear")["text_config"]["num_hidden_layers"] == 1
    assert _config(tmp_path / "linear")["vision_config"]["num_hidden_layers"] == 2


# ------------------------------------------------------------------ (c) bad inputs: one error line each

def _one_line_error(recipe: dict, *match: str) -> str:
    with pytest.raises(MergeError) as info:
        api.plan(recipe)
    message = str(info.value)
    assert "\n" not in message
    for part in match:
        assert part in message, message
    return message


def test_unknown_module(qwen):
    recipe = _task_arithmetic_recipe(qwen)
    recipe["modules"]["audio_tower"] = recipe["modules"].pop("multi_modal_projector")
    _one_line_error(recipe, "audio_tower", "text_decoder, multi_modal_projector, vision_tower")


def test_module_without_models(qwen):
    recipe = _task_arithmetic_recipe(qwen)
    recipe["modules"]["vision_tower"] = {"parameters": {"weight": 0.5}}
    _one_line_error(recipe, "modules.vision_tower", "`models` or `slices`")


@pytest.mark.parametrize("field", ["merge_method", "base_model", "dtype"])
def test_module_field_not_applied(qwen, field):
    recipe = _task_arithmetic_recipe(qwen)
    recipe["modules"]["multi_modal_projector"][field] = "ties" if field == "merge_method" else "x"
    _one_line_error(recipe, "modules.multi_modal_projector", repr(field), "not applied")


def test_module_left_out(qwen):
    """mergekit writes no tensor of a module the recipe leaves out; here that is refused."""
    recipe = _task_arithmetic_recipe(qwen)
    del recipe["modules"]["vision_tower"]
    _one_line_error(recipe, "'vision_tower'", "left out")


def test_modules_with_models_at_the_top(qwen):
    recipe = _task_arithmetic_recipe(qwen)
    recipe["models"] = [{"model": str(qwen / "m1")}]
    _one_line_error(recipe, "exactly one of `models`, `slices` and `modules`")


def test_modules_of_a_model_without_modules(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "llama")
    recipe = {"merge_method": "linear", "modules": {"default": {"models": [
        {"model": str(tmp_path / "llama"), "parameters": {"weight": 1.0}}]}}}
    _one_line_error(recipe, "model type 'llama'", "no modules", "mistral3, qwen3_vl")


def test_module_error_names_its_module(qwen):
    recipe = _ties_recipe(qwen)
    recipe["modules"]["vision_tower"]["slices"][1]["sources"][0]["layer_range"] = [2, 4]
    _one_line_error(recipe, "modules.vision_tower", "different numbers of layers")


# ------------------------------------------------------------------ (d) --dry-run shows the modules

def test_dry_run_shows_the_modules(qwen, tmp_path, capsys):
    assert cli.main(["merge", str(_write(tmp_path, "ta", _task_arithmetic_recipe(qwen))), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "module      text_decoder: 36 of 36 tensors merged, 3 layers; models m1, m2; base base" in printed
    assert "module      vision_tower: 39 of 39 tensors merged, 3 layers" in printed
    assert "module      multi_modal_projector: 24 of 24 tensors merged, 3 layers; models m2" in printed
    assert "tensors     99 (99 merged, 0 copied)" in printed
    assert not (tmp_path / "out").exists()
