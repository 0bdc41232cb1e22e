"""The mergekit 0.1.5 recipes that modalmerge must merge to mergekit's own output, and the tiny models
they run on (tests/test_mergekit_conformance.py runs each through both tools and compares).

RECIPES is a plain dict: name -> a mergekit YAML recipe as a mapping, where "@name" (anywhere in a
string) stands for the folder of the built model `name` (see MODELS). To cover a new feature, add an
entry; to record one that cannot be compared, add it to NOT_COMPARED with the reason.

Models (float32, built by build_models, all with a tokenizer):
- base, ft0, ft1, ft2: a 4-layer Llama (hidden 64, vocabulary 256) and three fine-tunes of it
  (base + small random deltas); adapter: a PEFT LoRA on base (q_proj, v_proj, B non-zero).
- tok_base, tok_same, tok_added, tok_other: 1-layer Llamas with tiny word-level vocabularies: a base,
  a fine-tune of the same vocabulary (chat template 1), one that added tokens (template 1), and one of
  another vocabulary (template 2).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from tiny_vocab import BASE_WORDS, OTHER_WORDS, TEMPLATE_1, TEMPLATE_2, save_model, save_tokenizer

LLAMA_MODELS = ("base", "ft0", "ft1", "ft2")
TOKENIZER_MODELS = ("tok_base", "tok_same", "tok_added", "tok_other")
MODELS = LLAMA_MODELS + ("adapter",) + TOKENIZER_MODELS

LLAMA_WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(253)]


# ------------------------------------------------------------------------------ models


def build_llama_family(root: Path) -> dict[str, Path]:
    """base, three fine-tunes (base + 0.02·N(0,1) per parameter, seeds 10..12) and a LoRA adapter on base."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(LLAMA_WORDS), max_position_embeddings=64,
                      tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).eval()
    original = {k: v.detach().clone() for k, v in base.state_dict().items()}
    paths = {}
    for i, name in enumerate(LLAMA_MODELS):
        if i:
            g = torch.Generator().manual_seed(9 + i)
            with torch.no_grad():
                for key, p in base.named_parameters():
                    p.copy_(original[key] + 0.02 * torch.randn(p.shape, generator=g))
        paths[name] = root / name
        base.save_pretrained(paths[name])
        save_tokenizer(paths[name], LLAMA_WORDS)
    base.load_state_dict(original)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    paths["adapter"] = root / "adapter"
    lora.save_pretrained(paths["adapter"])
    return paths


def build_tokenizer_family(root: Path) -> dict[str, Path]:
    specs = {"tok_base": (BASE_WORDS, (), None, 0), "tok_same": (BASE_WORDS, (), TEMPLATE_1, 1),
             "tok_added": (BASE_WORDS, ("<x>", "<y>"), TEMPLATE_1, 2),
             "tok_other": (OTHER_WORDS, ("<y>",), TEMPLATE_2, 3)}
    paths = {}
    for name, (words, added, template, seed) in specs.items():
        folder = root / name
        save_model(folder, len(save_tokenizer(folder, words, added, template)), seed)
        paths[name] = folder
    return paths


def build_models(root: Path) -> dict[str, Path]:
    """Every model of MODELS, in folders under `root`."""
    return {**build_llama_family(root / "llama"), **build_tokenizer_family(root / "tokenizers")}


def resolve(recipe: dict, paths: dict[str, Path]) -> dict:
    """The recipe with each "@name" replaced by that model's folder."""
    def walk(value):
        if isinstance(value, str):
            return re.sub(r"@([A-Za-z0-9_]+)", lambda m: str(paths[m.group(1)]), value)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value
    return walk(copy.deepcopy(recipe))


# ------------------------------------------------------------------------------ recipes


def weighted(weights, **per_model):
    """ft0, ft1, ... with these weights (and per-model values of other parameters)."""
    out = []
    for i, w in enumerate(weights):
        params = {"weight": w, **{k: values[i] for k, values in per_model.items()}}
        out.append({"model": f"@ft{i}", "parameters": params})
    return out


def plain(*names):
    return [{"model": f"@{name}"} for name in names]


def src(model, first, last, **params):
    """A slice source: layers [first, last) of `model`."""
    return {"model": f"@{model}", "layer_range": [first, last], **({"parameters": params} if params else {})}


def tok_model(name, weight):
    return {"model": f"@{name}", "parameters": {"weight": weight}}


BASE = {"base_model": "@base", "dtype": "float32"}
NO_BASE = {"dtype": "float32"}
FTS = ("ft0", "ft1", "ft2")

METHOD_RECIPES = {
    "linear": {"merge_method": "linear", **BASE, "models": weighted([0.5, 0.3, 0.2]), "parameters": {"weight": 0.4}},
    "linear_unnormalized": {"merge_method": "linear", **NO_BASE, "models": weighted([0.5, 0.25, 0.5]),
                            "parameters": {"normalize": False}},
    "task_arithmetic": {"merge_method": "task_arithmetic", **BASE, "models": weighted([0.7, -0.3, 0.5]),
                        "parameters": {"lambda": 0.8}},
    "task_arithmetic_base_listed": {"merge_method": "task_arithmetic", **BASE,
                                    "models": plain("base") + weighted([0.7, 0.3]), "parameters": {"lambda": 0.8}},
    "task_arithmetic_normalized": {"merge_method": "task_arithmetic", **BASE, "models": weighted([0.7, 0.3, 0.5]),
                                   "parameters": {"normalize": True}},
    "ties": {"merge_method": "ties", **BASE, "models": weighted([0.7, 0.3, 1.0], density=[0.5, 0.3, 0.01]),
             "parameters": {"lambda": 0.9}},
    "ties_sum": {"merge_method": "ties", **BASE, "models": weighted([1.0, 1.0, 1.0]),
                 "parameters": {"density": 0.2, "normalize": False, "int8_mask": True}},
    # DARE and DELLA draw their masks at random (below density 1): see NOT_COMPARED
    "dare_ties_density1": {"merge_method": "dare_ties", **BASE, "models": weighted([0.5, 0.3, 0.2]),
                           "parameters": {"density": 1.0, "lambda": 1.2}},
    "dare_linear_density1": {"merge_method": "dare_linear", **BASE, "models": weighted([0.5, 0.3, 0.2]),
                             "parameters": {"density": 1.0}},
    "della_density1": {"merge_method": "della", **BASE, "models": weighted([0.5, 0.3, 0.2]),
                       "parameters": {"density": 1.0, "epsilon": 0.0, "lambda": 0.9}},
    "della_linear_density1": {"merge_method": "della_linear", **BASE, "models": weighted([0.5, 0.3, 0.2]),
                              "parameters": {"density": 1.0, "epsilon": 0.0}},
    "breadcrumbs": {"merge_method": "breadcrumbs", **BASE, "models": weighted([1.0, 1.0, 1.0]),
                    "parameters": {"density": 0.5, "gamma": 0.05}},
    "breadcrumbs_rescale": {"merge_method": "breadcrumbs", **BASE, "models": weighted([0.7, 1.0, 0.4]),
                            "parameters": {"density": 0.3, "gamma": 0.05, "rescale": True}},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", **BASE,
                         "models": weighted([0.7, 1.0, 0.4], density=[0.5, 0.3, 0.8]),
                         "parameters": {"gamma": 0.05, "lambda": 0.9}},
    "breadcrumbs_ties_normalized": {"merge_method": "breadcrumbs_ties", **BASE, "models": weighted([0.7, 1.0, 0.4]),
                                    "parameters": {"density": 0.4, "gamma": 0.02, "normalize": True}},
    "breadcrumbs_ties_rescale": {"merge_method": "breadcrumbs_ties", **BASE, "models": weighted([0.7, 1.0, 0.4]),
                                 "parameters": {"density": 0.3, "gamma": 0.05, "rescale": True, "normalize": True}},
    "model_stock": {"merge_method": "model_stock", **BASE, "models": plain(*FTS)},
    "model_stock_filter_wise": {"merge_method": "model_stock", **BASE, "models": plain(*FTS),
                                "parameters": {"filter_wise": True}},
    "sce": {"merge_method": "sce", **BASE, "models": plain(*FTS)},
    "sce_topk": {"merge_method": "sce", **BASE, "models": plain(*FTS), "parameters": {"select_topk": 0.3}},
    "nearswap": {"merge_method": "nearswap", **BASE, "models": plain("ft1"), "parameters": {"t": 0.01}},
    "slerp": {"merge_method": "slerp", **BASE, "models": plain("base", "ft0"), "parameters": {"t": 0.3}},
    "nuslerp": {"merge_method": "nuslerp", **BASE, "models": weighted([0.7, 0.3])},
    "nuslerp_rows_no_base": {"merge_method": "nuslerp", **NO_BASE, "models": weighted([0.4, 0.6]),
                             "parameters": {"nuslerp_flatten": False}},
    "nuslerp_row_wise": {"merge_method": "nuslerp", **BASE, "models": weighted([1.0, 2.0]),
                         "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
    "nuslerp_filtered": {"merge_method": "nuslerp", **BASE,
                         "models": [{"model": "@ft0", "parameters": {"weight": [0.2, 0.9]}},
                                    {"model": "@ft1", "parameters": {"weight": 0.5}}],
                         "parameters": {"nuslerp_flatten": [{"filter": "mlp", "value": False}, {"value": True}]}},
    "multislerp": {"merge_method": "multislerp", **BASE, "models": weighted([0.5, 0.3, 0.2])},
    "multislerp_no_base": {"merge_method": "multislerp", **NO_BASE, "models": weighted([1.0, 2.0, 1.0]),
                           "parameters": {"eps": 1e-6}},
    "karcher": {"merge_method": "karcher", **BASE, "models": plain(*FTS)},
    "karcher_no_base": {"merge_method": "karcher", **NO_BASE, "models": plain(*FTS),
                        "parameters": {"max_iter": 3, "tol": 1e-6}},
    "arcee_fusion": {"merge_method": "arcee_fusion", **BASE, "models": plain("base", "ft2")},
    "ram": {"merge_method": "ram", **BASE, "models": plain(*FTS), "parameters": {"epsilon": 0.02}},
    "ram_default": {"merge_method": "ram", **BASE, "models": plain("ft0", "ft1")},
    "ramplus_tl": {"merge_method": "ramplus_tl", **BASE, "models": plain(*FTS),
                   "parameters": {"epsilon": 0.015, "r": 0.5, "alpha": 0.4}},
    "ramplus_tl_default": {"merge_method": "ramplus_tl", **BASE, "models": plain(*FTS),
                           "parameters": {"epsilon": 0.03}},
    "passthrough": {"merge_method": "passthrough", **NO_BASE, "models": plain("ft1")},
    # a copy, so that float16 rounds the same float32 values in both tools
    "passthrough_out_dtype": {"merge_method": "passthrough", **NO_BASE, "out_dtype": "float16",
                              "models": plain("ft2")},
}

# Filter lists ([{filter, value}, ...]: the first substring match wins; a model's list that matches
# nothing falls back to the global value) and gradients, also inside filter lists.
FILTER_RECIPES = {
    "filters_ties": {"merge_method": "ties", **BASE, "models": [
        {"model": "@ft0", "parameters": {"weight": 0.7, "density": [{"filter": "mlp", "value": 0.3}]}},
        {"model": "@ft1", "parameters": {"weight": [{"filter": "self_attn", "value": [0.2, 1.0]}]}},
        {"model": "@ft2"}],
        "parameters": {"density": [{"filter": "self_attn", "value": [0.1, 0.6]}, {"filter": "norm", "value": 1.0},
                                   {"value": 0.5}], "weight": 0.5,
                       "lambda": [{"filter": "layers.3", "value": 0.5}, {"filter": "*", "value": [0.9, 1.1]}]}},
    "filters_task_arithmetic": {"merge_method": "task_arithmetic", **BASE, "models": [
        {"model": "@ft0", "parameters": {"weight": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.4}]}},
        {"model": "@ft1", "parameters": {"weight": {"filter": "q_proj", "value": -0.5}}}],
        # mergekit's `weight` is required: a list must give every tensor one (here: the global catch-all)
        "parameters": {"weight": [{"filter": "self_attn", "value": 0.3}, {"value": 0.6}], "normalize": False,
                       "lambda": [{"filter": "embed", "value": 0.0}, {"value": 0.8}]}},
    "filters_linear": {"merge_method": "linear", **BASE, "models": [
        {"model": "@ft0", "parameters": {"weight": [{"filter": "mlp", "value": [1.0, 3.0]}]}},
        {"model": "@ft1", "parameters": {"weight": 2.0}}],
        "parameters": {"weight": [{"filter": "layers.0", "value": 0.5}, {"value": 1.0}]}},
    "filters_slerp": {"merge_method": "slerp", **BASE, "models": plain("base", "ft0"),
                      "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
    "gradient_task_arithmetic": {"merge_method": "task_arithmetic", **BASE, "models": weighted([[0.2, 1.0], 0.5]),
                                 "parameters": {"lambda": [1.0, 0.5, 0.8]}},
}

# Layer stacking (`slices:`) on the 4-layer models: the output's num_hidden_layers is the slices' sum.
SLICE_RECIPES = {
    "slices_passthrough": {"merge_method": "passthrough", **NO_BASE, "slices": [
        {"sources": [src("ft0", 0, 3)]}, {"sources": [src("ft1", 2, 4)]}]},
    "slices_passthrough_scale": {"merge_method": "passthrough", **NO_BASE,
                                 "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]},
                                 "slices": [{"sources": [src("ft0", 0, 2)]},
                                            {"sources": [src("ft1", 1, 4, scale=[{"filter": "mlp", "value": 0.5}])]}]},
    "slices_linear": {"merge_method": "linear", **NO_BASE, "slices": [
        {"sources": [src("ft0", 0, 2, weight=0.7), src("ft1", 1, 3, weight=0.3)]},
        {"sources": [src("ft2", 3, 4, weight=0.7), src("ft0", 0, 1, weight=0.3)]}]},
    "slices_linear_weights": {"merge_method": "linear", **NO_BASE, "parameters": {"weight": 1.0}, "slices": [
        {"sources": [src("ft0", 0, 3, weight=[1.0, 0.2]), src("ft1", 0, 3, weight=[0.0, 0.8])]},
        {"sources": [src("ft0", 3, 4, weight=0.3), src("ft1", 3, 4)], "parameters": {"weight": 0.6}}]},
    "slices_ties": {"merge_method": "ties", **BASE, "parameters": {"density": 0.5}, "slices": [
        {"sources": [src("base", 0, 2), src("ft0", 0, 2, weight=0.6), src("ft1", 0, 2, weight=0.4)]},
        {"sources": [src("base", 1, 4), src("ft0", 1, 4, weight=0.6), src("ft1", 1, 4, weight=0.4, density=0.3)],
         "parameters": {"lambda": 0.8}}]},
    "slices_slerp_gradient": {"merge_method": "slerp", "base_model": "@ft0", "dtype": "float32",
                              "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                                   {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
                              "slices": [{"sources": [src("ft0", 0, 4), src("ft1", 0, 4)]}]},
    "slices_task_arithmetic": {"merge_method": "task_arithmetic", **BASE, "parameters": {"lambda": [0.5, 1.0]},
                               "slices": [
        {"sources": [src("base", 0, 3), src("ft0", 0, 3, weight=0.5), src("ft2", 0, 3, weight=0.5)]},
        {"sources": [src("base", 2, 4), src("ft0", 2, 4, weight=0.5), src("ft2", 2, 4, weight=0.5)]}]},
}

# Model references as mergekit takes them: `model+lora` and the mapping form (mergekit merges the
# adapter into its base with peft first).
REFERENCE_RECIPES = {
    "lora_shorthand": {"merge_method": "linear", **NO_BASE,
                       "models": [{"model": "@base+@adapter", "parameters": {"weight": 0.6}},
                                  {"model": "@ft0", "parameters": {"weight": 0.4}}]},
    "lora_mapping_as_base": {"merge_method": "task_arithmetic", "dtype": "float32",
                             "base_model": {"model": {"path": "@base"}, "lora": {"path": "@adapter"}},
                             "models": weighted([0.5, 0.5])},
}

# Vocabularies and chat templates, on the tokenizer models.
TOKENIZER_RECIPES = {
    "tokenizer_union_linear_base": {"merge_method": "linear", "base_model": "@tok_base", "dtype": "float32",
                                    "tokenizer_source": "union",
                                    "models": [tok_model("tok_base", 0.2), tok_model("tok_added", 0.3),
                                               tok_model("tok_other", 0.5)]},
    # without base_model, mergekit's tokenizer base (and so the template the union keeps) is the first
    # model of a set, in hash order: the template is given
    "tokenizer_union_linear_no_base": {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
                                       "chat_template": TEMPLATE_1,
                                       "models": [tok_model("tok_same", 0.2), tok_model("tok_added", 0.3),
                                                  tok_model("tok_other", 0.5)]},
    "tokenizer_base_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "@tok_base",
                                       "dtype": "float32", "tokenizer_source": "base",
                                       "models": [tok_model("tok_same", 1.0), tok_model("tok_added", 0.5),
                                                  tok_model("tok_other", 0.7)]},
    "tokenizer_union_ties": {"merge_method": "ties", "base_model": "@tok_base", "dtype": "float32",
                             "tokenizer_source": "union", "parameters": {"density": 0.5},
                             "models": [tok_model("tok_added", 1.0), tok_model("tok_other", 0.7)]},
    "tokenizer_model_source": {"merge_method": "linear", "base_model": "@tok_base", "dtype": "float32",
                               "tokenizer_source": "@tok_added",
                               "models": [tok_model("tok_base", 0.5), tok_model("tok_added", 0.5)]},
    "tokenizer_tokens_force_pad": {
        "merge_method": "linear", "dtype": "float32", "chat_template": "auto",
        "tokenizer": {"source": "@tok_added", "pad_to_multiple_of": 8, "tokens": {
            "<z>": {"source": {"kind": "zero"}},
            "<x>": {"source": {"kind": "model_token", "model": "@tok_base", "token": "a"}, "force": True},
            "<y>": {"source": "@tok_other"},
            "c": {"source": {"kind": "model_token", "model": "@tok_added", "token_id": 4}, "force": True}}},
        # tok_same's template is tok_added's: `auto` has a plurality (a tie would follow mergekit's set order)
        "models": [tok_model("tok_base", 1.0), tok_model("tok_same", 0.5), tok_model("tok_added", 1.0),
                   tok_model("tok_other", 2.0)]},
    "tokenizer_chat_template_inline": {"merge_method": "linear", "dtype": "float32", "chat_template": TEMPLATE_2 + " ",
                                       "models": [tok_model("tok_base", 1.0), tok_model("tok_same", 1.0)]},
    # slices: the vocabulary from every model the slices name; the embeddings' missing rows filled from
    # the first slice's models, the head's from the last slice's (one source: zero). No base_model: the
    # template is given (mergekit's tokenizer base is the first of a set, in hash order)
    "tokenizer_slices_passthrough_union": {"merge_method": "passthrough", "dtype": "float32",
                                           "tokenizer_source": "union", "chat_template": TEMPLATE_1,
                                           "slices": [{"sources": [src("tok_base", 0, 1)]},
                                                      {"sources": [src("tok_other", 0, 1)]}]},
    "tokenizer_slices_linear_union_base": {
        "merge_method": "linear", "base_model": "@tok_base", "dtype": "float32", "tokenizer_source": "union",
        "slices": [{"sources": [src("tok_base", 0, 1, weight=0.3), src("tok_added", 0, 1, weight=0.7)]},
                   {"sources": [src("tok_added", 0, 1, weight=0.4), src("tok_other", 0, 1, weight=0.6)]}]},
    "tokenizer_slices_tokens_model_source": {
        "merge_method": "task_arithmetic", "base_model": "@tok_base", "dtype": "float32",
        "tokenizer": {"source": "@tok_other", "pad_to_multiple_of": 4, "tokens": {
            "<x>": {"source": "@tok_added"},
            "<z>": {"source": {"kind": "model_token", "model": "@tok_added", "token": "<y>"}},
            "c": {"source": {"kind": "zero"}, "force": True}}},
        "slices": [{"sources": [src("tok_base", 0, 1), src("tok_added", 0, 1, weight=1.0),
                                src("tok_other", 0, 1, weight=0.5)]},
                   {"sources": [src("tok_base", 0, 1), src("tok_added", 0, 1, weight=0.5),
                                src("tok_other", 0, 1, weight=1.0)]}]},
}

RECIPES: dict[str, dict] = {**METHOD_RECIPES, **FILTER_RECIPES, **SLICE_RECIPES, **REFERENCE_RECIPES,
                            **TOKENIZER_RECIPES}

# Features of mergekit 0.1.5 that modalmerge has but that cannot be compared tensor for tensor.
NOT_COMPARED: dict[str, str] = {
    "dare_ties_random_drops": "below density 1, mergekit's DARE draws its masks from torch's global generator "
                              "(torch.bernoulli), modalmerge from its own seeded one: no common draw to compare; "
                              "density 1 is compared (dare_ties_density1, dare_linear_density1)",
    "della_random_drops": "DELLA's magnitude-ranked drops are torch.bernoulli draws in mergekit (global "
                          "generator) and seeded draws in modalmerge; density 1 is compared (della_density1)",
    "chat_template_named": "mergekit's named chat templates (chatml, llama3, ...) are LGPL-3.0 texts that "
                           "modalmerge does not ship: it refuses the name with a one-line error instead",
}
