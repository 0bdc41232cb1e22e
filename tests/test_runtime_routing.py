"""The routed runtime's own paths against the folder's materialised per-task weights: task
scalars other than 1 (EMR's rescalers), token ids looked up inside route() (an embedding builds
only the rows it looks up), weights kept for the context (cache=True), and the modules' own
forwards put back afterwards."""

from __future__ import annotations

import pytest
import torch

from conftest import perturbed, tiny_llama
from modalmerge.api import merge
from modalmerge.runtime import TEXT, load_composed
from test_runtime import Reference, soft_inputs

torch.set_num_threads(1)
TASKS = ("vision", "audio", "math")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three fine-tunes of one tiny Llama composed by MMER (unit scalars) and EMR (rescalers)."""
    root = tmp_path_factory.mktemp("routing")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    for i, name in enumerate(TASKS):
        perturbed(base, 60 + i, 0.03).save_pretrained(root / name)
    models = [{"path": str(root / n), "name": n} for n in TASKS]
    for method in ("mmer", "emr"):
        merge({"method": method, "base": str(root / "base"), "models": models}, root / method, exact_stats=True)
    return root


def reference_weights(composed, keys) -> dict:
    """{group id: {tensor: weights}} from the folder's own materialisation: a task's model, the
    stored text weights, or the mean of some tasks' models (θ_0 + mean of c_t ⊙ τ*)."""
    d = composed.folder
    out = {}
    for gid, key in keys.items():
        kind, what = key
        if kind == "task":
            out[gid] = {n: d.read(composed.tasks[what], n) for n in d.tensors}
        elif kind == "text":
            out[gid] = {n: d.text.read(n) for n in d.tensors}
        else:
            out[gid] = {n: torch.stack([d.read(composed.tasks[i], n).float() for i in what]).mean(0)
                        for n in d.tensors}
    return out


def routed_and_reference(composed, group_ids, keys, text_mask="all", **inputs):
    with torch.no_grad():
        with composed.route(group_ids, text_mask=text_mask):
            got = composed.llm(**inputs).logits
        plain = composed.llm(**inputs).logits
        ref = Reference(composed.llm, reference_weights(composed, keys), group_ids)
        try:
            want = composed.llm(**inputs).logits
        finally:
            ref.remove()
    return got, want, plain


@pytest.mark.parametrize("method", ["mmer", "emr"])
def test_route_matches_the_folders_task_models(folders, method):
    from transformers import AutoModelForCausalLM

    composed = load_composed(folders / method, AutoModelForCausalLM)
    if method == "emr":  # EMR's rescalers: the coefficients are λ_t m_t, not bare masks
        assert any(abs(s - 1.0) > 1e-3 for s in composed.scalars.values())
    group_ids = torch.tensor([[-1, 0, 0, -1, 1, 1, -1], [2, 2, -1, 0, -1, 2, 1]])
    tasks = {i: ("task", i) for i in range(len(TASKS))}
    # soft tokens, m̄ over all tasks (the stored weights) and over the two present in a prompt
    got, want, plain = routed_and_reference(composed, group_ids, {TEXT: ("text", None), **tasks},
                                            inputs_embeds=soft_inputs())
    assert (got - want).abs().max() < 1e-4
    assert (plain - want).abs().max() > 1e-3
    pair = torch.tensor([[-1, 0, 0, -1, 2, 2, -1]])
    got, want, _ = routed_and_reference(composed, pair, {TEXT: ("mean", (0, 2)), **tasks}, text_mask="present",
                                        inputs_embeds=soft_inputs(2, 1))
    assert (got - want).abs().max() < 1e-4
    # token ids: the embedding table's looked-up rows on each group's weights
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7]])
    got, want, _ = routed_and_reference(composed, group_ids, {TEXT: ("text", None), **tasks}, input_ids=ids)
    assert (got - want).abs().max() < 1e-4
    assert "model.embed_tokens" not in composed.last_unrouted


def test_cached_weights_and_forwards_put_back(folders):
    from transformers import AutoModelForCausalLM

    composed = load_composed(folders / "mmer", AutoModelForCausalLM)
    group_ids = torch.tensor([[-1, 0, 0, -1, 1, 1, -1]])
    x = soft_inputs(4, 1)
    # a module's own instance-level forward (as accelerate's hooks set one) survives the context
    norm = composed.llm.model.norm
    own = norm.forward
    norm.forward = own
    with torch.no_grad():
        with composed.route(group_ids):
            once = composed.llm(inputs_embeds=x).logits
        with composed.route(group_ids, cache=True):
            first = composed.llm(inputs_embeds=x).logits
            again = composed.llm(inputs_embeds=x).logits
        plain = composed.llm(inputs_embeds=x).logits
    assert torch.equal(first, again) and torch.allclose(first, once, atol=1e-6)
    assert not torch.allclose(plain, once, atol=1e-4)
    assert norm.__dict__["forward"] is own
    routed = [m for m in composed.llm.modules() if m is not norm and "forward" in m.__dict__]
    assert routed == []
