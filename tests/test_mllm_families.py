"""MMER over every multimodal-LLM family of transformers whose layout is towers + projectors + a
language model, with no `parts:` in the recipe (issue 15, item 1): the parts are found by building
the family's class on the meta device (engine/family_parts.py).

Per family, a tiny config built here: a plain text LLM as the base (the family's text config, as
a causal LM), and two fine-tunes of the multimodal model whose language model is the base plus
small deltas (their towers and projectors differ). Composed with mmer, then
- each task extracts back to its original checkpoint: the same tensor names, the towers and
  projectors bit for bit, the language model equal to θ_0 + m_t ⊙ τ* of a dense reference;
- a routed forward of a mixed prompt (text, task 0 and task 1 tokens) equals the reference that
  runs every merged module with each group's materialised weights (tests/test_runtime.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from modalmerge.api import merge
from modalmerge.checkpoint.decoupled import DecoupledFolder
from modalmerge.cli import main
from modalmerge.engine.family_parts import discover
from modalmerge.runtime import TEXT, load_composed
from test_mmer import dense_mmer
from test_runtime import Reference, group_weights

torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")

HIDDEN = 32
TEXT_SIZES = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128)
# every sub-config is shrunk by these keys where it has them
SIZES = dict(TEXT_SIZES, d_model=HIDDEN, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
             num_layers=2, num_heads=4, depth=2, embed_dim=HIDDEN, out_hidden_size=HIDDEN, projection_dim=HIDDEN,
             text_hidden_size=HIDDEN, num_local_experts=2, num_experts=2, num_experts_per_tok=1,
             moe_intermediate_size=32, intermediate_size_mlp=64, vision_output_dim=HIDDEN, projector_input_dim=HIDDEN,
             projector_output_dim=HIDDEN, hidden_dim=HIDDEN, dim_head=8, encoder_hidden_size=HIDDEN, num_blocks=2,
             ext_pw_out_channel=HIDDEN, depthwise_separable_out_channel=HIDDEN, nemo_conv_channels=HIDDEN,
             emb_dim=HIDDEN, enc_emb_dim=HIDDEN, enc_dim=HIDDEN, enc_attention_channels=8, enc_se_channels=8,
             upsample_initial_channel=HIDDEN, num_embeds=64)

# family → (config overrides beyond SIZES, base text model type where the family's text config has
# no causal LM of its own: its LLM is that model's under another class)
FAMILIES: dict[str, tuple[dict, str | None]] = {
    "llava": ({}, None),
    "llava_next": ({}, None),
    "llava_onevision": ({}, None),
    "qwen2_vl": ({"text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2]}}}, "qwen2"),
    "qwen2_5_vl": ({"text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2]}}}, "qwen2"),
    "qwen2_audio": ({}, None),
    "gemma3": ({}, None),
    "mistral3": ({}, None),
    "internvl": ({}, None),
    "aya_vision": ({}, None),
    "paligemma": ({}, None),
    "voxtral": ({}, None),
    "granite_speech": ({}, None),
    "qwen3_vl": ({"text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2]}}}, "qwen3"),
    "glm4v": ({}, "glm4"),
    "idefics3": ({}, None),
    "smolvlm": ({}, None),
    "phi4_multimodal": ({"pad_token_id": 0}, "phi3"),
    "qwen2_5_omni": ({"token2wav_config": {"bigvgan_config": {
        "upsample_rates": [2, 2], "upsample_kernel_sizes": [4, 4], "resblock_kernel_sizes": [3],
        "resblock_dilation_sizes": [[1, 3, 5]]}}}, "qwen2"),
    "llama4": ({}, None),
}


def _overrides(config) -> dict:
    out = {}
    for key, value in vars(config).items():
        if isinstance(value, transformers.PretrainedConfig):
            out[key] = _overrides(value)
        elif key in SIZES and isinstance(value, int) and not isinstance(value, bool):
            out[key] = SIZES[key]
    return out


def _update(into: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict) and k != "rope_parameters":
            _update(into[k], v)
        else:
            into[k] = v
    return into


def text_config_of(config):
    for holder in (config, getattr(config, "thinker_config", None)):
        if holder is not None and getattr(holder, "text_config", None) is not None:
            return holder.text_config
    return config  # Phi-4-multimodal: the text model's fields are the config's own


def tiny_config(family: str):
    """The family's config with every size shrunk; the head untied wherever the family allows."""
    from transformers import AutoConfig

    extra, _ = FAMILIES[family]
    fields = _update(_overrides(AutoConfig.for_model(family)), extra)
    config = AutoConfig.for_model(family, **fields)
    text = text_config_of(config)
    tie = bool(getattr(text, "tie_word_embeddings", False)) if family in ("gemma3", "paligemma", "aya_vision") else False
    for c in {id(config): config, id(text): text}.values():
        c.tie_word_embeddings = tie
    thinker = getattr(config, "thinker_config", None)
    if thinker is not None:
        thinker.tie_word_embeddings = tie
    return config, tie


def model_class(family: str):
    from transformers.models.auto import modeling_auto as auto

    for mapping in ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
                    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        name = getattr(auto, mapping).get(family)
        if name:
            return getattr(transformers, name)
    raise AssertionError(family)


def base_llm(family: str, config, tie: bool):
    """The plain text LLM the family's language model is: its text config as a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    text = text_config_of(config)
    _, substitute = FAMILIES[family]
    if substitute is None:
        fields = {k: v for k, v in text.to_dict().items() if k not in ("model_type", "transformers_version")}
        cfg = AutoConfig.for_model(text.model_type, **_update(fields, {"tie_word_embeddings": tie}))
    else:
        cfg = AutoConfig.for_model(substitute, **TEXT_SIZES, pad_token_id=0, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def language_model(model):
    """(decoder, head) modules of a multimodal model, by transformers' own accessors."""
    owner = getattr(model, "thinker", model)
    decoder = owner.get_decoder()
    head = owner.get_output_embeddings()
    if decoder.get_output_embeddings() is not None:  # Llama 4: a causal LM inside
        head, decoder = decoder.get_output_embeddings(), decoder.model
    return decoder, head


def read_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def build(family: str, root):
    """Save the base LLM and two fine-tunes; return paths, the base's state and the fine-tunes'
    language models under the base's names."""
    config, tie = tiny_config(family)
    base = base_llm(family, config, tie)
    base.save_pretrained(root / "base")
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    inner = base.model  # every causal LM of these families keeps its decoder there
    prefix = next(n for n, m in base.named_modules() if m is inner) + "."
    head_name = next(n for n, m in base.named_modules() if m is base.get_output_embeddings()) + "."
    saved_base = read_all(root / "base")
    out = {"base": root / "base", "base_sd": saved_base, "llm": [], "saved": [], "paths": []}
    cls = model_class(family)
    for i in (1, 2):
        torch.manual_seed(i)  # towers and projectors differ between the two
        model = cls(config)
        g = torch.Generator().manual_seed(100 + i)
        tuned = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in base_sd.items()}
        decoder, head = language_model(model)
        missing = decoder.load_state_dict({k[len(prefix):]: v for k, v in tuned.items() if k.startswith(prefix)},
                                          strict=False).missing_keys
        assert all(k.startswith("embed_tokens_extend.") for k in missing), missing[:3]  # Phi-4-mm's towers
        if not tie:
            head.load_state_dict({k[len(head_name):]: v for k, v in tuned.items() if k.startswith(head_name)})
        if tie:
            tuned = {k: v for k, v in tuned.items() if not k.startswith(head_name)} | \
                    {k: tuned[prefix + "embed_tokens.weight"] for k in base_sd if k.startswith(head_name)}
        path = root / f"ft{i}"
        model.save_pretrained(path)
        out["llm"].append({k: tuned[k] for k in saved_base})  # a tied head is not saved: not merged
        out["saved"].append(read_all(path))
        out["paths"].append(path)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def composed(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    built = build(family, root)
    recipe = {"method": "mmer", "base": str(built["base"]),
              "models": [{"path": str(p), "name": f"task{i}"} for i, p in enumerate(built["paths"])]}
    merge(recipe, root / "out", exact_stats=True)
    reference = dense_mmer(built["base_sd"], built["llm"])
    return family, root, built, reference


def test_parts_are_discovered(composed):
    family, root, built, _ = composed
    layout = discover(built["paths"][0])
    assert layout is not None and layout.source == "discovered" and layout.multimodal, family
    assert layout.of_kind("llm") and layout.of_kind("encoder") and layout.of_kind("projector")
    d = DecoupledFolder(root / "out")
    assert sorted(d.tensors) == sorted(built["base_sd"])  # the whole language model is merged
    for t, saved in enumerate(built["saved"]):
        entry = d.task_entry(f"task{t}")
        assert entry["modality"]["encoder"] and entry["modality"]["projector"], family
        kept = [n for k, v in entry["modality"].items() if k != "dir" for n in v]
        own = d.llm_names(f"task{t}")
        llm = [own.get(n, n) for n in d.tensors]
        # every tensor of the checkpoint is either the language model's or kept with the modality
        assert sorted(kept + llm) == sorted(saved), family


def test_extract_gives_back_each_original(composed, tmp_path):
    family, root, built, (shared, masks) = composed
    d = DecoupledFolder(root / "out")
    base = built["base_sd"]
    for t, (saved, tuned) in enumerate(zip(built["saved"], built["llm"])):
        task = f"task{t}"
        assert main(["extract", str(root / "out"), "--modality", task, "--output", str(tmp_path / task),
                     "--no-progress"]) == 0
        got = read_all(tmp_path / task)
        assert set(got) == set(saved), (family, sorted(set(got) ^ set(saved))[:4])
        own = d.llm_names(task)
        llm_names = {own.get(n, n) for n in d.tensors}
        for name, value in saved.items():
            if name not in llm_names:
                assert torch.equal(got[name], value), (family, name)
        for n in d.tensors:
            # the name it maps to holds that base tensor's fine-tune in the original ...
            assert torch.allclose(saved[own.get(n, n)], tuned[n]), (family, n)
            # ... and its reconstruction θ_0 + m_t ⊙ τ* in the extracted model
            want = base[n] + masks[t][n].float() * shared[n]
            assert torch.allclose(got[own.get(n, n)], want, atol=1e-6), (family, n)
        cfg = json.loads((tmp_path / task / "config.json").read_text())
        assert cfg["model_type"] == family


def test_routed_forward_matches_materialised_groups(composed):
    from transformers import AutoModelForCausalLM

    family, root, built, (shared, masks) = composed
    model = load_composed(root / "out", AutoModelForCausalLM)
    group_ids = torch.tensor([[TEXT, 0, 0, TEXT, 1, 1, 0]])
    x = torch.randn(1, 7, HIDDEN, generator=torch.Generator().manual_seed(3)) * 0.5
    base = built["base_sd"]
    weights = {TEXT: group_weights(base, shared, masks, ("mean", (0, 1)))}
    weights.update({i: group_weights(base, shared, masks, ("task", i)) for i in (0, 1)})
    with torch.no_grad():
        with model.route(group_ids):
            got = model.llm(inputs_embeds=x).logits
        plain = model.llm(inputs_embeds=x).logits
        ref = Reference(model.llm, weights, group_ids)
        try:
            want = model.llm(inputs_embeds=x).logits
        finally:
            ref.remove()
    assert (got - want).abs().max() < 1e-4, family
    assert (plain - want).abs().max() > 1e-6, family  # the routing changes the answer


@pytest.mark.parametrize("composed", ["idefics3", "qwen2_vl", "phi4_multimodal", "llama4"], indirect=True)
def test_inspect_names_the_parts_it_found(composed, capsys):
    family, root, built, _ = composed
    assert main(["inspect", str(built["paths"][0]), "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["source"] == "discovered" and report["model_type"] == family
    kinds = {p["kind"] for p in report["parts"] if p["tensors"]}
    assert {"llm", "encoder", "projector", "head"} <= kinds, (family, kinds)
    assert report["unplaced_tensors"] == 0
    assert sum(p["tensors"] for p in report["parts"]) == len(built["saved"][0])
    assert main(["inspect", str(built["paths"][0])]) == 0
    text = capsys.readouterr().out
    assert "found from its config" in text and "language model" in text


@pytest.mark.parametrize("composed", ["idefics3"], indirect=True)
def test_recipe_parts_and_errors_name_the_layout_seen(composed, tmp_path):
    """`parts:` written by hand still works for a `model.text_model.*` layout (the prefix is
    replaced by the base's, the top-level lm_head the base holds stays with the LLM), and a model
    whose LLM is not the base's gets an error naming the prefix it has."""
    from modalmerge.errors import MergeError

    family, root, built, (shared, masks) = composed
    recipe = {"method": "mmer", "base": str(built["base"]),
              "models": [{"path": str(p), "name": f"task{i}"} for i, p in enumerate(built["paths"])],
              "parts": {"llm": "model.text_model.*", "encoder": "model.vision_model.*", "projector": "model.connector.*"}}
    merge(recipe, tmp_path / "out", exact_stats=True)
    d = DecoupledFolder(tmp_path / "out")
    assert sorted(d.tensors) == sorted(built["base_sd"])
    assert d.llm_names("task0")["model.norm.weight"] == "model.text_model.norm.weight"  # not `norm.weight`
    for n in d.tensors:
        assert torch.allclose(d.read("task1", n), built["base_sd"][n] + masks[1][n].float() * shared[n], atol=1e-6)
    # a base whose names are not the model's LLM: the error names the layout the model has
    from transformers import AutoConfig, AutoModelForCausalLM
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=128)
                                     ).save_pretrained(tmp_path / "gpt2")
    recipe = {"method": "mmer", "base": str(tmp_path / "gpt2"),
              "models": [{"path": str(built["paths"][0]), "name": "task0"}]}
    with pytest.raises(MergeError, match=r"model\.text_model\.\*"):
        merge(recipe, tmp_path / "bad")


def test_custom_code_is_never_built_the_spec_decides(tmp_path, capsys):
    """A config with auto_map is not instantiated: the parts come from the spec table."""
    from tiny_mllm import build_family

    fam = build_family(tmp_path / "models")
    cfg = json.loads((fam["paths"]["audio"] / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_x.X"}
    (fam["paths"]["audio"] / "config.json").write_text(json.dumps(cfg))
    assert discover(fam["paths"]["audio"]) is None
    assert main(["inspect", str(fam["paths"]["audio"]), "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["source"] == "spec"
    found = {(p["kind"], p["prefix"].split(".")[0]) for p in report["parts"]}
    assert found == {("encoder", "audio_tower"), ("projector", "multi_modal_projector"), ("llm", "language_model")}
    merge({"method": "mmer", "base": str(fam["base"]),
           "models": [{"path": str(fam["paths"][t]), "name": t} for t in ("vision", "audio")]},
          tmp_path / "out", exact_stats=True)
    assert sorted(DecoupledFolder(tmp_path / "out").tensors) == sorted(fam["base_sd"])
