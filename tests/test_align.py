"""Git Re-Basin weight matching: the aligned model computes the same function, moves closer to
the reference, recovers a known permutation, and can then be merged."""

import json
import shutil
import re

import pytest
import torch
from safetensors.torch import save_file

from conftest import load_sd, tiny_llama
from modalmerge.api import merge
from modalmerge.cli import main
from modalmerge.procedures.align import (align_folders, mlp_spec, objective, permuted, spec_for,
                                     weight_matching)
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


def test_align_errors(tmp_path):
    _save_mlp(_mlp(0), tmp_path / "a")
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    _save_mlp(other, tmp_path / "b")
    with pytest.raises(MergeError, match="shaped differently"):
        align_folders(tmp_path / "b", tmp_path / "a", tmp_path / "out")
    assert main(["align", str(tmp_path / "b"), "--to", str(tmp_path / "a"), "-o", str(tmp_path / "o")]) == 1


# --- transformers: a random permutation of every kind (the residual stream included) keeps the function ---

def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
               vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw}))


def _decoder(name):
    import transformers as T
    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return {"qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**small)),
            "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**small, head_dim=8)),
            "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**small, head_dim=8)),
            "llama-score": lambda: T.LlamaForSequenceClassification(T.LlamaConfig(**small, pad_token_id=0))}[name]()


def _encoder(cls_name, emb=32):
    import transformers as T
    family = cls_name.split("For")[0].replace("Model", "")
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=64,
              max_position_embeddings=40)
    if family == "Electra":
        kw["embedding_size"] = emb
    return getattr(T, cls_name)(getattr(T, f"{family}Config")(**kw))


CASES = {
    "llama-gqa-untied": lambda: _llama(),
    "llama-gqa-tied-biases": lambda: _llama(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "llama-mha": lambda: _llama(num_attention_heads=4, num_key_value_heads=4),
    **{n: (lambda n=n: _decoder(n)) for n in ("qwen2", "qwen3", "gemma2", "llama-score")},
    **{c: (lambda c=c: _encoder(c)) for c in (
        "BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification",
        "BertForTokenClassification", "BertForQuestionAnswering", "BertForMultipleChoice", "RobertaForMaskedLM",
        "RobertaForSequenceClassification", "RobertaForMultipleChoice", "RobertaForTokenClassification",
        "ElectraForPreTraining", "ElectraForSequenceClassification", "ElectraForMultipleChoice",
        "ElectraForTokenClassification")},
    "ElectraForMaskedLM-projected": lambda: _encoder("ElectraForMaskedLM", emb=16),
    "ElectraForMaskedLM-tied-to-residual": lambda: _encoder("ElectraForMaskedLM", emb=32),
}


def _build(case, seed=0):
    torch.manual_seed(seed)
    m = CASES[case]().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # every parameter random, norms included, so a norm left unpermuted would show
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m


def _outputs(model, case):
    g = torch.Generator().manual_seed(5)
    if "MultipleChoice" in case:
        ids = torch.randint(1, 64, (2, 3, 10), generator=g)
    else:
        ids = torch.randint(1, 64 if case[0].isupper() else 96, (2, 10), generator=g)
    kw = {} if case[0].isupper() else {"use_cache": False}
    with torch.no_grad():
        out = model(ids, **kw)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _spec(folder, residual=True):
    cfg = json.loads((folder / "config.json").read_text())
    sd = load_sd(folder)
    return spec_for({n: tuple(v.shape) for n, v in sd.items()}, cfg, residual), sd


def _random_perms(spec, seed):
    """A random permutation of every kind; a nested child keeps each unit inside its parent's group."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):   # never the identity, so that every kind is exercised
        p = torch.randperm(n, generator=g)
        return p.roll(1) if n > 1 and torch.equal(p, torch.arange(n)) else p

    perms = {p: draw(n) for p, n in spec.sizes.items()}
    for parent, (child, r) in spec.inner.items():
        perms[child] = torch.cat([h * r + draw(r) for h in perms[parent].tolist()])
    return perms


def _save_permuted(src, dst, spec, sd, perms):
    shutil.copytree(src, dst)
    save_file(permuted(sd, spec, perms), dst / "model.safetensors", metadata={"format": "pt"})


def _load(case, folder):
    model = type(CASES[case]())
    return model.from_pretrained(folder).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_permutation_of_every_kind_keeps_function(tmp_path, case):
    model = _build(case)
    model.save_pretrained(tmp_path / "a")
    spec, sd = _spec(tmp_path / "a")
    kinds = {re.sub(r"\d+$", "", p) for p in spec.sizes}
    assert {"residual", "mlp", "heads"} <= kinds
    if "gqa" in case or case in ("qwen2", "qwen3", "gemma2", "llama-score"):
        assert "qheads" in kinds and spec.inner
    if case == "ElectraForMaskedLM-projected":
        assert "embedding" in kinds
    perms = _random_perms(spec, 3)
    assert all((p != torch.arange(p.numel())).any() for p in perms.values())
    _save_permuted(tmp_path / "a", tmp_path / "b", spec, sd, perms)
    before, after = _outputs(model, case), _outputs(_load(case, tmp_path / "b"), case)
    assert set(before) == set(after) and before
    for k in before:
        if k == "last_hidden_state":   # a bare encoder's output is the residual stream: it comes out permuted
            before[k] = before[k][..., perms["residual"]]
        assert torch.allclose(before[k], after[k], atol=1e-5), k


def test_a_wrong_residual_permutation_is_caught(tmp_path):
    # the check above has teeth: leaving the final norm out of the residual permutation changes the logits
    model = _build("llama-gqa-untied")
    model.save_pretrained(tmp_path / "a")
    spec, sd = _spec(tmp_path / "a")
    perms = _random_perms(spec, 3)
    out = permuted(sd, spec, perms)
    out["model.norm.weight"] = sd["model.norm.weight"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    save_file(out, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    before = _outputs(model, "llama")["logits"]
    assert not torch.allclose(before, _outputs(_load("llama-gqa-untied", tmp_path / "b"), "llama")["logits"],
                              atol=1e-3)


@pytest.mark.parametrize("case", ["llama-gqa-untied", "llama-gqa-tied-biases", "qwen2", "BertForMaskedLM",
                                  "ElectraForMaskedLM-projected"])
def test_align_recovers_a_permuted_copy(tmp_path, case):
    model = _build(case)
    model.save_pretrained(tmp_path / "ref")
    spec, ref = _spec(tmp_path / "ref")
    perms = _random_perms(spec, 11)
    _save_permuted(tmp_path / "ref", tmp_path / "shuffled", spec, ref, perms)
    found = align_folders(tmp_path / "shuffled", tmp_path / "ref", tmp_path / "out")
    assert set(found) == set(perms)
    out = load_sd(tmp_path / "out")
    assert set(out) == set(ref)
    for n in ref:
        assert torch.equal(out[n], ref[n]), n
    # the objective reaches its maximum Σ‖W_ref‖² (Cauchy–Schwarz: a permuted copy cannot score higher)
    best = sum(float((v.double() ** 2).sum()) for v in ref.values())
    ident = {p: torch.arange(n) for p, n in spec.sizes.items()}
    assert objective(ref, out, spec, ident, list(ref)) == pytest.approx(best, rel=1e-9)
    shuffled = load_sd(tmp_path / "shuffled")
    assert objective(ref, shuffled, spec, ident, list(ref)) < best * 0.99
    meta = json.loads((tmp_path / "out" / "alignment.json").read_text())
    assert meta["residual"] is True and meta["moved_units"]["residual"] > 0


def test_llama_gqa_independent_models(tmp_path):
    ref, model = _build("llama-gqa-tied-biases", 0), _build("llama-gqa-tied-biases", 1)
    ref.save_pretrained(tmp_path / "ref")
    model.save_pretrained(tmp_path / "model")
    assert main(["align", str(tmp_path / "model"), "--to", str(tmp_path / "ref"), "-o", str(tmp_path / "out")]) == 0
    perms = {p: torch.tensor(v) for p, v in json.loads((tmp_path / "out" / "alignment.json").read_text())[
        "permutations"].items()}
    assert (perms["residual"] != torch.arange(32)).any()
    for i in (0, 1):   # every q head stays in the group of the KV head it was trained with
        assert (perms[f"qheads{i}"] // 4).tolist() == perms[f"heads{i}"].repeat_interleave(4).tolist()
    before = _outputs(model, "llama")["logits"]
    assert torch.allclose(before, _outputs(_load("llama-gqa-tied-biases", tmp_path / "out"), "llama")["logits"],
                          atol=1e-5)
    spec, r = _spec(tmp_path / "ref")
    m = load_sd(tmp_path / "model")
    ident = {p: torch.arange(n) for p, n in spec.sizes.items()}
    assert objective(r, load_sd(tmp_path / "out"), spec, ident) > objective(r, m, spec, ident)


def test_bert_independent_models_with_and_without_residual(tmp_path):
    from transformers import BertModel
    ref, model = _build("BertModel", 0), _build("BertModel", 1)
    ref.save_pretrained(tmp_path / "ref")
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
    r = load_sd(tmp_path / "ref")
    for flag, out in (([], tmp_path / "out"), (["--no-residual"], tmp_path / "out_nr")):
        assert main(["align", str(tmp_path / "model"), "--to", str(tmp_path / "ref"), "-o", str(out), *flag]) == 0
        meta = json.loads((out / "alignment.json").read_text())
        assert meta["residual"] is (not flag) and ("residual" in meta["permutations"]) is (not flag)
        with torch.no_grad():
            got = BertModel.from_pretrained(out).eval()(ids)
        hidden = want.last_hidden_state
        if not flag:
            hidden = hidden[..., torch.tensor(meta["permutations"]["residual"])]
        assert torch.allclose(hidden, got.last_hidden_state, atol=1e-5)
        assert torch.allclose(want.pooler_output, got.pooler_output, atol=1e-5)
        assert _cos(load_sd(out), r) > _cos(load_sd(tmp_path / "model"), r)
    # without the residual stream the embeddings stay as they were
    assert torch.equal(load_sd(tmp_path / "out_nr")["embeddings.word_embeddings.weight"],
                       load_sd(tmp_path / "model")["embeddings.word_embeddings.weight"])
    # and the residual stream moves the aligned model closer still
    assert _cos(load_sd(tmp_path / "out"), r) > _cos(load_sd(tmp_path / "out_nr"), r)


def test_align_help_documents_no_residual(capsys):
    with pytest.raises(SystemExit):
        main(["align", "--help"])
    assert "--no-residual" in capsys.readouterr().out


def _shapes(case):
    return {n: tuple(v.shape) for n, v in CASES[case]().state_dict().items()}


def test_inconsistent_shapes_are_a_merge_error():
    llama = {"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 32}
    shapes = _shapes("llama-gqa-untied")
    down = next(n for n in shapes if n.endswith("layers.0.mlp.down_proj.weight"))
    shapes[down] = (shapes[down][0], shapes[down][1] + 8)  # one more hidden unit than gate/up have
    with pytest.raises(MergeError, match=r"cannot align tensor '.*down_proj.weight'.*config.json"):
        spec_for(shapes, llama)


def test_residual_spec_errors():
    bert = {"model_type": "bert", "num_attention_heads": 4, "hidden_size": 32}
    # a head the spec does not know, reading a hidden-size space: refused, unless the residual stream stays
    shapes = {**_shapes("BertForMaskedLM"), "extra_head.weight": (5, 32)}
    with pytest.raises(MergeError, match="'extra_head.weight'.*--no-residual"):
        spec_for(shapes, bert)
    assert "residual" not in spec_for(shapes, bert, residual=False).sizes
    # ELECTRA's own embedding space is guarded the same way
    electra = {**bert, "model_type": "electra"}
    shapes = {**_shapes("ElectraForMaskedLM-projected"), "extra.weight": (3, 16)}
    with pytest.raises(MergeError, match="'extra.weight'"):
        spec_for(shapes, electra)
    # classifier.weight reads the pooler or the sequence output: config.json's architectures decides
    shapes = _shapes("BertForTokenClassification")
    with pytest.raises(MergeError, match="classifier.weight"):
        spec_for(shapes, bert)
    spec = spec_for(shapes, {**bert, "architectures": ["BertForTokenClassification"]})
    assert ("residual", 1, 1) in spec.by_name["classifier.weight"]
    # fused projections (Phi-3's layout) are not a llama layout
    llama = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32}
    fused = {"model.layers.0.self_attn.qkv_proj.weight": (64, 32), "model.layers.0.self_attn.o_proj.weight": (32, 32),
             "model.layers.0.mlp.gate_up_proj.weight": (128, 32), "model.layers.0.mlp.down_proj.weight": (32, 64)}
    for residual in (True, False):
        with pytest.raises(MergeError, match="fused"):
            spec_for(fused, llama, residual)
    with pytest.raises(MergeError, match="no permutation spec for model type 'phi3'"):
        spec_for(fused, {**llama, "model_type": "phi3"})
    # an unknown tensor with a hidden-size axis in a llama checkpoint
    shapes = {**_shapes("llama-gqa-untied"), "model.extra.weight": (32, 7)}
    with pytest.raises(MergeError, match="'model.extra.weight'"):
        spec_for(shapes, {**llama, "num_attention_heads": 8})


def test_every_permutation_family_of_the_architecture_specs_has_rules():
    # which model types align permutes is data in engine/architectures.py; the rules live in align.py
    from modalmerge.procedures.align import PERMUTATION_RULES
    from modalmerge.engine.architectures import SPECS

    assert {s.permutation for s in SPECS if s.permutation} == set(PERMUTATION_RULES)
