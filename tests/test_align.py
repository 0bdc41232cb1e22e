"""Git Re-Basin weight matching: the aligned model computes the same function, moves closer to
the reference, recovers a known permutation, and can then be merged."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import load_sd, tiny_llama
from modalmerge.api import merge
from modalmerge.cli import main
from modalmerge.engine.align import align_folders, mlp_spec, permuted, weight_matching
from modalmerge.errors import MergeError
from modalmerge.ops import best_permutation


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 12), torch.nn.ReLU(),
                               torch.nn.Linear(12, 3))


def _save_mlp(m, folder):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, folder / "model.safetensors")


def _cos(a: dict, b: dict) -> float:
    x = torch.cat([a[n].reshape(-1) for n in sorted(a)])
    y = torch.cat([b[n].reshape(-1) for n in sorted(a)])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def test_best_permutation_hand_computed():
    cost = torch.tensor([[1.0, 5.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    assert best_permutation(cost).tolist() == [1, 0, 2]


def test_mlp_recovers_known_permutation_and_keeps_function(tmp_path):
    a = _mlp(0)
    sd = a.state_dict()
    p0, p1 = torch.randperm(16, generator=torch.Generator().manual_seed(1)), torch.randperm(
        12, generator=torch.Generator().manual_seed(2))
    shuffled = {"0.weight": sd["0.weight"][p0], "0.bias": sd["0.bias"][p0],
                "2.weight": sd["2.weight"][p1][:, p0], "2.bias": sd["2.bias"][p1],
                "4.weight": sd["4.weight"][:, p1], "4.bias": sd["4.bias"]}
    b = _mlp(0)
    b.load_state_dict(shuffled)
    x = torch.randn(20, 6)
    assert torch.allclose(a(x), b(x), atol=1e-5)   # the shuffle itself keeps the function
    _save_mlp(a, tmp_path / "a")
    _save_mlp(b, tmp_path / "b")
    align_folders(tmp_path / "b", tmp_path / "a", tmp_path / "out")
    out = load_sd(tmp_path / "out")
    for n in sd:
        assert torch.equal(out[n], sd[n]), n
    meta = json.loads((tmp_path / "out" / "alignment.json").read_text())
    assert set(meta["permutations"]) == {"hidden0", "hidden1"}


def test_independent_mlps_function_preserved_and_closer(tmp_path):
    a, b = _mlp(0), _mlp(7)
    _save_mlp(a, tmp_path / "a")
    _save_mlp(b, tmp_path / "b")
    assert main(["align", str(tmp_path / "b"), "--to", str(tmp_path / "a"), "-o", str(tmp_path / "out")]) == 0
    c = _mlp(0)
    c.load_state_dict(load_sd(tmp_path / "out"))
    x = torch.randn(50, 6)
    assert torch.allclose(b(x), c(x), atol=1e-5)
    ref = {k: v.detach() for k, v in a.state_dict().items()}
    assert _cos(load_sd(tmp_path / "out"), ref) > _cos({k: v.detach() for k, v in b.state_dict().items()}, ref)
    # then a merge of the aligned model with the reference
    merge({"method": "linear", "models": [str(tmp_path / "a"), str(tmp_path / "out")]}, tmp_path / "merged")
    assert set(load_sd(tmp_path / "merged")) == set(ref)


def test_coordinate_descent_objective_never_drops():
    a = {k: v.detach() for k, v in _mlp(0).state_dict().items()}
    b = {k: v.detach() for k, v in _mlp(3).state_dict().items()}
    spec = mlp_spec({k: tuple(v.shape) for k, v in a.items()})
    perms = weight_matching(a, b, spec)
    aligned = permuted(b, spec, perms)
    dot = lambda x: sum(float((x[n] * a[n]).sum()) for n in a)
    assert dot(aligned) >= dot(b)
    assert weight_matching(a, aligned, spec)["hidden0"].tolist() == list(range(16))  # a fixed point


def test_llama_function_preserved_and_closer(tmp_path):
    ref, model = tiny_llama(0), tiny_llama(1)
    ref.save_pretrained(tmp_path / "ref")
    model.save_pretrained(tmp_path / "model")
    perms = align_folders(tmp_path / "model", tmp_path / "ref", tmp_path / "out")
    assert {"mlp0", "mlp1", "heads0", "heads1"} <= set(perms)
    assert any((p != torch.arange(p.numel())).any() for p in perms.values())
    from transformers import AutoModelForCausalLM
    aligned = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, aligned(ids).logits, atol=1e-5)
    r = load_sd(tmp_path / "ref")
    assert _cos(load_sd(tmp_path / "out"), r) > _cos(load_sd(tmp_path / "model"), r)
    merge({"method": "linear", "models": [str(tmp_path / "ref"), str(tmp_path / "out")]}, tmp_path / "merged")
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")


def test_bert_function_preserved(tmp_path):
    from transformers import BertConfig, BertModel
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    ref = BertModel(cfg).eval()
    torch.manual_seed(1)
    model = BertModel(cfg).eval()
    ref.save_pretrained(tmp_path / "ref")
    model.save_pretrained(tmp_path / "model")
    perms = align_folders(tmp_path / "model", tmp_path / "ref", tmp_path / "out")
    assert {"mlp0", "heads1"} <= set(perms)
    aligned = BertModel.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).last_hidden_state, aligned(ids).last_hidden_state, atol=1e-5)
    r = load_sd(tmp_path / "ref")
    assert _cos(load_sd(tmp_path / "out"), r) > _cos(load_sd(tmp_path / "model"), r)


def test_align_errors(tmp_path):
    _save_mlp(_mlp(0), tmp_path / "a")
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    _save_mlp(other, tmp_path / "b")
    with pytest.raises(MergeError, match="shaped differently"):
        align_folders(tmp_path / "b", tmp_path / "a", tmp_path / "out")
    assert main(["align", str(tmp_path / "b"), "--to", str(tmp_path / "a"), "-o", str(tmp_path / "o")]) == 1
