"""The routed runtime against a materialised routed reference: every merged module computes
y[t] = f(x[t]; W_g(t)) with each group's full weights built by a dense reference in the test."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from modalmerge.api import merge
from modalmerge.errors import MergeError
from modalmerge.runtime import TEXT, load_composed
from test_mmer import dense_mmer
from tiny_mllm import build_family, recipe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama_composed(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    fam = build_family(root / "models")
    tasks = ("vision", "audio", "video", "math")
    merge(recipe(fam, tasks), root / "out", exact_stats=True)
    ref = dense_mmer(fam["base_sd"], [fam["llm"][t] for t in tasks])
    return root / "out", fam, tasks, ref


def group_weights(base, shared, masks, key):
    """The full weights of one key: ("task", i) or ("mean", tasks)."""
    kind, what = key
    out = {}
    for n in shared:
        coef = masks[what][n].float() if kind == "task" else torch.stack([masks[i][n].float() for i in what]).mean(0)
        out[n] = base[n] + coef * shared[n]
    return out


class Reference:
    """Hooks that recompute each merged module per group with materialised weights."""

    def __init__(self, model, weights_by_group, group_ids, prefix=""):
        self.model, self.w, self.g = model, weights_by_group, group_ids
        self.inside = False
        self.handles = []
        params = dict(model.named_parameters())
        for mod_name, module in model.named_modules():
            attrs = {a: f"{prefix}{mod_name}.{a}" for a, _ in module.named_parameters(recurse=False)
                     if f"{prefix}{mod_name}.{a}" in next(iter(weights_by_group.values()))}
            if attrs and all(f"{mod_name}.{a}" in params for a in attrs):
                self.handles.append(module.register_forward_hook(self.hook(attrs)))

    def hook(self, attrs):
        def fn(module, args, output):
            if self.inside:
                return None
            x = args[0]
            b, s = self.g.shape
            lead = x.shape if not torch.is_floating_point(x) else x.shape[:-1]
            if len(lead) != 2 or lead[1] != s:
                return self.run(module, attrs, x, TEXT)
            if lead[0] != b:
                x = x.expand((b,) + tuple(x.shape[1:]))
            out = torch.empty((b, s) + tuple(output.shape[2:]), dtype=output.dtype)
            for gid in torch.unique(self.g).tolist():
                sel = self.g == gid
                out[sel] = self.run(module, attrs, x[sel], gid)
            return out
        return fn

    def run(self, module, attrs, x, gid):
        self.inside = True
        try:
            params = {a: self.w[gid][n] for a, n in attrs.items()}
            return torch.func.functional_call(module, params, (x,))
        finally:
            self.inside = False

    def remove(self):
        for h in self.handles:
            h.remove()


def soft_inputs(seed=0, b=2, s=7, d=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, d, generator=g) * 0.5


def test_route_matches_materialised_reference_llama(llama_composed):
    from transformers import AutoModelForCausalLM

    folder, fam, tasks, (shared, masks) = llama_composed
    composed = load_composed(folder, AutoModelForCausalLM)
    assert composed.tasks == list(tasks)
    group_ids = torch.tensor([[-1, 0, 0, -1, 1, 1, -1], [2, 2, -1, 0, -1, 3, 3]])
    x = soft_inputs()
    base = fam["base_sd"]
    all_tasks = tuple(range(len(tasks)))
    for text_mask in ("all", "present"):
        present = tuple(sorted(set(group_ids.unique().tolist()) - {-1}))
        text_key = ("mean", all_tasks if text_mask == "all" else present)
        weights = {TEXT: group_weights(base, shared, masks, text_key)}
        for i in range(len(tasks)):
            weights[i] = group_weights(base, shared, masks, ("task", i))
        with torch.no_grad():
            with composed.route(group_ids, text_mask=text_mask):
                got = composed.llm(inputs_embeds=x).logits
            plain = composed.llm(inputs_embeds=x).logits
            ref = Reference(composed.llm, weights, group_ids)
            try:
                want = composed.llm(inputs_embeds=x).logits
            finally:
                ref.remove()
        assert (got - want).abs().max() < 1e-4, text_mask
        assert (plain - want).abs().max() > 1e-3  # the routing changes the answer
    # the stored weights are untouched after the contexts
    after = dict(composed.llm.named_parameters())
    text = composed.folder.text
    assert all(torch.equal(after[n].detach(), text.read(n)) for n in composed.folder.tensors if n in after)


def test_single_group_patches_weights_and_restores(llama_composed):
    from transformers import AutoModelForCausalLM

    folder, fam, tasks, (shared, masks) = llama_composed
    composed = load_composed(folder, AutoModelForCausalLM)
    x = soft_inputs(1)
    # audio tokens and text with m̄ over the modalities present: everything runs on W_audio
    group_ids = torch.tensor([[-1, 1, 1, -1, -1, 1, -1]] * 2)
    w_audio = group_weights(fam["base_sd"], shared, masks, ("task", 1))
    with torch.no_grad():
        with composed.route(group_ids, text_mask="present"):
            got = composed.llm(inputs_embeds=x).logits
        ref = Reference(composed.llm, {TEXT: w_audio, 1: w_audio}, group_ids)
        want = composed.llm(inputs_embeds=x).logits
        ref.remove()
        with composed.task("audio"):
            whole = composed.llm(inputs_embeds=x).logits
    assert (got - want).abs().max() < 1e-4
    assert (whole - want).abs().max() < 1e-4
    after = dict(composed.llm.named_parameters())
    assert all(torch.equal(after[n].detach(), composed.folder.text.read(n)) for n in composed.folder.tensors
               if n in after)


def test_text_only_route_is_plain_model(llama_composed):
    from transformers import AutoModelForCausalLM

    folder, *_ = llama_composed
    composed = load_composed(folder, AutoModelForCausalLM)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        plain = composed.llm(input_ids=ids).logits
        with composed.route(torch.full((1, 3), TEXT)):
            got = composed.llm(input_ids=ids).logits
    assert torch.equal(plain, got)


def test_route_errors(llama_composed):
    from transformers import AutoModelForCausalLM

    folder, *_ = llama_composed
    composed = load_composed(folder, AutoModelForCausalLM)
    with pytest.raises(MergeError, match="not a task"):
        with composed.route(torch.tensor([[0, 9]])):
            pass
    with pytest.raises(MergeError, match="text_mask"):
        with composed.route(torch.tensor([[0, 1]]), text_mask="some"):
            pass
    assert set(composed.modality_tensors("vision")) == set(llama_composed[1]["mm"]["vision"])
    assert composed.modality_tensors("math") == {}


def _tiny_bert(seed):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32)
    return BertModel(cfg).eval()


def test_route_bert_inputs_embeds(tmp_path):
    """A BERT-style encoder LLM (the benchmark's), multimodal models with recipe-named parts."""
    from conftest import perturbed
    from transformers import BertModel

    base = _tiny_bert(0)
    base.save_pretrained(tmp_path / "base")
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    llms = []
    for i, name in enumerate(("image", "sound")):
        ft = {k: v.detach().clone() for k, v in perturbed(base, 40 + i, 0.03).state_dict().items()}
        llms.append(ft)
        g = torch.Generator().manual_seed(i)
        mm = {"enc.0.weight": torch.randn(16, 8, generator=g), "proj.weight": torch.randn(32, 16, generator=g)}
        folder = tmp_path / name
        folder.mkdir()
        save_file({**{f"text_model.{k}": v.contiguous() for k, v in ft.items()}, **mm}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(cfg))
    r = {"method": "mmer", "base": str(tmp_path / "base"),
         "models": [{"path": str(tmp_path / n), "name": n} for n in ("image", "sound")],
         "parts": {"llm": "text_model.*", "encoder": "enc.*", "projector": "proj.*"},
         "params": {"base_params": {"density": 0.5}}}
    merge(r, tmp_path / "out", exact_stats=True)
    shared, masks = dense_mmer({k: v for k, v in base_sd.items() if v.is_floating_point()},
                               [{k: v for k, v in m.items() if v.is_floating_point()} for m in llms], density=0.5)
    composed = load_composed(tmp_path / "out", BertModel)
    assert json.loads((tmp_path / "out" / "decoupled" / "manifest.json").read_text())["tasks"][0]["modality"]["encoder"] \
        == ["enc.0.weight"]
    group_ids = torch.tensor([[-1, 0, 0, 1, 1, -1], [-1, 1, -1, 0, -1, -1]])
    x = soft_inputs(3, 2, 6)
    weights = {TEXT: group_weights(base_sd, shared, masks, ("mean", (0, 1)))}
    weights.update({i: group_weights(base_sd, shared, masks, ("task", i)) for i in range(2)})
    with torch.no_grad():
        with composed.route(group_ids):
            got = composed.llm(inputs_embeds=x).last_hidden_state
        ref = Reference(composed.llm, weights, group_ids)
        want = composed.llm(inputs_embeds=x).last_hidden_state
        ref.remove()
    assert (got - want).abs().max() < 1e-4
    assert "pooler.dense" in composed.last_unrouted  # the pooler sees [batch, hidden]: text weights
