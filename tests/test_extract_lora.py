"""`modalmerge extract-lora` (issue 13, item 6): a truncated SVD of each linear layer's task vector
written as a PEFT LoRA adapter; PEFT loads it, and the merged weights are base + B·A."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modalmerge import api
from modalmerge.cli import main
from modalmerge.procedures.extract_lora import choose_rank

transformers = pytest.importorskip("transformers")

RANK2 = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
NOISY = ["model.layers.0.mlp.up_proj.weight"]
NORM = "model.layers.1.input_layernorm.weight"


def _tiny_llama(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fine_tune(base_dir: Path, out_dir: Path, sd: dict, norm: bool = True) -> dict[str, torch.Tensor]:
    """base + a known rank-2 delta on RANK2, full-rank noise on NOISY, and (norm) a changed norm."""
    g = torch.Generator().manual_seed(1)
    ft = {k: v.clone() for k, v in sd.items()}
    for name in RANK2:
        out, inp = ft[name].shape
        ft[name] += 0.1 * torch.randn(out, 2, generator=g) @ torch.randn(2, inp, generator=g)
    for name in NOISY:
        ft[name] += 0.01 * torch.randn(ft[name].shape, generator=g)
    if norm:
        ft[NORM] += 0.5
    out_dir.mkdir()
    for f in ("config.json", "generation_config.json"):
        if (base_dir / f).exists():
            (out_dir / f).write_bytes((base_dir / f).read_bytes())
    save_file({k: v.contiguous() for k, v in ft.items()}, out_dir / "model.safetensors")
    return ft


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    sd = _tiny_llama(root / "base")
    ft = _fine_tune(root / "base", root / "ft", sd)
    return root, sd, ft


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _product(adapter: dict, module: str) -> torch.Tensor:
    a = adapter[f"base_model.model.{module}.lora_A.weight"].double()
    b = adapter[f"base_model.model.{module}.lora_B.weight"].double()
    return b @ a


def test_rank2_deltas_are_reconstructed_exactly(models, tmp_path):
    root, sd, ft = models
    report = api.extract_lora(root / "ft", root / "base", tmp_path / "out", rank=2)
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for name in RANK2:
        delta = (ft[name] - sd[name]).double()
        rel = float((_product(adapter, name[:-len(".weight")]) - delta).norm() / delta.norm())
        assert rel <= 1e-5, (name, rel)
    by_name = {t.name: t for t in report.tensors}
    assert all(by_name[n].kind == "lora" and by_name[n].rank == 2 and by_name[n].error <= 1e-5 for n in RANK2)
    noisy = by_name[NOISY[0]]
    assert noisy.rank == 2 and 0.5 < noisy.error < 1.0  # full-rank noise: rank 2 keeps little of it
    # the changed norm is saved whole, the embeddings and head (unchanged) are not touched
    assert by_name[NORM].kind == "saved"
    assert torch.equal(adapter[f"base_model.model.{NORM}"], ft[NORM])
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2 and cfg["peft_type"] == "LORA"
    assert cfg["modules_to_save"] == ["model.layers.1.input_layernorm"]
    assert cfg["base_model_name_or_path"] == str(root / "base")
    # only the changed layers are targets: full names where other layers of that name are unchanged
    assert sorted(cfg["target_modules"]) == sorted(n[:-len(".weight")] for n in RANK2 + NOISY)
    assert len(adapter) == 2 * 3 + 1


def test_factors_split_the_scale_like_mergekit(models, tmp_path):
    """A = √S·Vᵀ and B = U·√S: the rows of A and the columns of B have equal norms."""
    root, sd, ft = models
    api.extract_lora(root / "ft", root / "base", tmp_path / "out", rank=2)
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    module = "base_model.model." + RANK2[0][:-len(".weight")]
    a, b = adapter[module + ".lora_A.weight"], adapter[module + ".lora_B.weight"]
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), rtol=1e-5, atol=1e-7)
    # mergekit's dense arithmetic (float32 SVD of the task vector)
    delta = ft[RANK2[0]] - sd[RANK2[0]]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    torch.testing.assert_close(b @ a, (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-6)


def test_energy_threshold_picks_ranks():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squared: 9, 4, 1 -> cumulative 9/14, 13/14, 1
    assert choose_rank(s, 8) == 3
    assert choose_rank(s, 2) == 2
    assert choose_rank(s, 8, 0.5) == 1
    assert choose_rank(s, 8, 9 / 14) == 1
    assert choose_rank(s, 8, 0.9) == 2
    assert choose_rank(s, 8, 0.95) == 3
    assert choose_rank(s, 1, 0.95) == 1
    assert choose_rank(torch.zeros(3), 8, 0.9) == 0


def test_energy_ranks_in_the_adapter(models, tmp_path):
    root, sd, ft = models
    report = api.extract_lora(root / "ft", root / "base", tmp_path / "out", rank=6, energy=0.999999)
    by_name = {t.name: t for t in report.tensors}
    assert [by_name[n].rank for n in RANK2] == [2, 2]  # rank-2 deltas: two singular values hold everything
    assert by_name[NOISY[0]].rank == 6  # noise: capped by --rank
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 6
    expected = {n[:-len(".weight")]: 2 for n in RANK2}
    assert cfg["rank_pattern"] == expected and cfg["alpha_pattern"] == expected
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert adapter["base_model.model." + RANK2[0][:-len(".weight")] + ".lora_A.weight"].shape == (2, 32)


@pytest.mark.parametrize("energy", [None, 0.9])
def test_peft_loads_the_adapter_and_merges_to_base_plus_ba(models, tmp_path, energy):
    peft = pytest.importorskip("peft")
    root, sd, ft = models
    api.extract_lora(root / "ft", root / "base", tmp_path / "out", rank=4, energy=energy)
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    base_model = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    merged = peft.PeftModel.from_pretrained(base_model, tmp_path / "out").merge_and_unload().state_dict()
    for name, value in sd.items():
        module = name[:-len(".weight")]
        if f"base_model.model.{module}.lora_A.weight" in adapter:
            want = sd[name].double() + _product(adapter, module)
        elif name == NORM:
            want = ft[NORM].double()
        else:
            want = value.double()
        torch.testing.assert_close(merged[name].double(), want, rtol=0, atol=1e-6, msg=name)
    # the rank-2 layers are the fine-tune's exactly
    for name in RANK2:
        torch.testing.assert_close(merged[name], ft[name], rtol=0, atol=1e-5)


def test_embeddings_as_lora_and_as_modules_to_save(tmp_path):
    peft = pytest.importorskip("peft")
    sd = _tiny_llama(tmp_path / "base")
    g = torch.Generator().manual_seed(2)
    ft = {k: v.clone() for k, v in sd.items()}
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    ft[emb] += 0.1 * torch.randn(100, 1, generator=g) @ torch.randn(1, 32, generator=g)
    ft[head] += 0.1 * torch.randn(100, 1, generator=g) @ torch.randn(1, 32, generator=g)
    ft[RANK2[0]] += 0.1 * torch.randn(32, 1, generator=g) @ torch.randn(1, 32, generator=g)
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "config.json").write_bytes((tmp_path / "base" / "config.json").read_bytes())
    save_file(ft, tmp_path / "ft" / "model.safetensors")

    api.extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "saved", rank=1)
    cfg = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert sorted(cfg["modules_to_save"]) == ["lm_head", "model.embed_tokens"]

    report = api.extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "lora", rank=1, embeddings=True)
    adapter = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert adapter["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (1, 100)
    assert adapter["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 1)
    assert "base_model.model.lm_head.lora_A.weight" in adapter
    assert {t.kind for t in report.tensors} == {"lora", "embedding lora"}
    for folder in ("saved", "lora"):
        base_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
        merged = peft.PeftModel.from_pretrained(base_model, tmp_path / folder).merge_and_unload().state_dict()
        for name in (emb, head, RANK2[0]):
            torch.testing.assert_close(merged[name], ft[name], rtol=0, atol=1e-5, msg=f"{folder} {name}")


def test_bias_deltas_with_lora_bias_or_reported(tmp_path):
    """Every target layer has a bias: lora_B biases; otherwise the changed bias is reported as left out."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "base")
    sd = load_file(tmp_path / "base" / "model.safetensors")
    ft = dict(sd)
    q = "model.layers.0.self_attn.q_proj"
    ft[q + ".weight"] = sd[q + ".weight"] + 0.1 * torch.ones(32, 32)
    ft[q + ".bias"] = sd[q + ".bias"] + 0.3
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "config.json").write_bytes((tmp_path / "base" / "config.json").read_bytes())
    save_file(ft, tmp_path / "ft" / "model.safetensors")
    report = api.extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "out", rank=1)
    assert report.lora_bias
    base_model = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "base")
    merged = peft.PeftModel.from_pretrained(base_model, tmp_path / "out").merge_and_unload().state_dict()
    for n in (q + ".weight", q + ".bias"):
        torch.testing.assert_close(merged[n], ft[n], rtol=0, atol=1e-5)
    # o_proj (no bias) changes too: lora_bias is impossible, the bias delta is reported
    o = "model.layers.0.self_attn.o_proj.weight"
    ft[o] = sd[o] + 0.1 * torch.ones(32, 32)
    save_file(ft, tmp_path / "ft" / "model.safetensors")
    report = api.extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "out2", rank=1)
    assert not report.lora_bias
    assert [t.name for t in report.of_kind("left out")] == [q + ".bias"]
    assert "lora_bias" not in json.dumps([k for k in load_file(tmp_path / "out2" / "adapter_model.safetensors")])


def test_cli_writes_the_adapter_and_leaves_inputs_untouched(models, tmp_path, capsys):
    root, sd, ft = models
    before = {d: _digest(root / d) for d in ("base", "ft")}
    assert main(["extract-lora", str(root / "ft"), "--base", str(root / "base"), "-o", str(tmp_path / "out"),
                 "--rank", "2", "--dtype", "bfloat16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "extracted 3 LoRA layers (rank 2)" in out and "1 modules saved whole" in out
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in adapter.values())
    assert {d: _digest(root / d) for d in ("base", "ft")} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no lock or partial folder left
    # an existing output needs --overwrite
    assert main(["extract-lora", str(root / "ft"), "--base", str(root / "base"), "-o", str(tmp_path / "out"),
                 "--rank", "2", "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["extract-lora", str(root / "ft"), "--base", str(root / "base"), "-o", str(tmp_path / "out"),
                 "--rank", "2", "--no-progress", "--overwrite"]) == 0
    assert load_file(tmp_path / "out" / "adapter_model.safetensors")[
        "base_model.model." + RANK2[0][:-len(".weight")] + ".lora_A.weight"].dtype == torch.float32


def _error(capsys, *argv) -> str:
    assert main(["extract-lora", *argv, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_errors_are_one_line_and_leave_nothing(models, tmp_path, capsys):
    root, sd, ft = models
    ft_, base = str(root / "ft"), str(root / "base")
    out = str(tmp_path / "out")
    assert "does not exist" in _error(capsys, str(tmp_path / "nope"), "--base", base, "-o", out, "--rank", "2")
    assert "does not exist" in _error(capsys, ft_, "--base", str(tmp_path / "nope"), "-o", out, "--rank", "2")
    assert "rank 0" in _error(capsys, ft_, "--base", base, "-o", out, "--rank", "0")
    assert "energy 1.5" in _error(capsys, ft_, "--base", base, "-o", out, "--rank", "2", "--energy", "1.5")
    assert "nothing to extract" in _error(capsys, base, "--base", base, "-o", out, "--rank", "2")
    assert "inputs are never written" in _error(capsys, ft_, "--base", base, "-o", str(root / "ft" / "x"),
                                                "--rank", "2")
    # shapes differ
    other = tmp_path / "other"
    other.mkdir()
    bad = dict(ft)
    bad[RANK2[0]] = torch.zeros(16, 32)
    save_file(bad, other / "model.safetensors")
    err = _error(capsys, str(other), "--base", base, "-o", out, "--rank", "2")
    assert RANK2[0] in err and "[16, 32]" in err
    # names differ
    bad = dict(ft)
    del bad[NORM]
    save_file(bad, other / "model.safetensors")
    assert NORM in _error(capsys, str(other), "--base", base, "-o", out, "--rank", "2")
    assert sorted(os.listdir(tmp_path)) == ["other"]  # no output, partial folder or lock


def test_failure_while_writing_leaves_no_partial_folder(models, tmp_path, monkeypatch):
    from modalmerge.errors import MergeError
    from modalmerge.procedures import extract_lora as module

    root, sd, ft = models

    def broken(*args, **kwargs):
        raise MergeError("disk on fire")

    monkeypatch.setattr(module, "relative_error", broken)
    with pytest.raises(MergeError, match="disk on fire"):
        api.extract_lora(root / "ft", root / "base", tmp_path / "out", rank=2)
    assert os.listdir(tmp_path) == []


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["extract-lora", "--help"])
    text = capsys.readouterr().out
    for flag in ("--base", "--rank", "--energy", "--embeddings", "--dtype", "--device", "--overwrite"):
        assert flag in text


def test_base_as_a_hub_id_from_the_cache(models, tmp_path, monkeypatch):
    """The base may be a hub id (resolved offline from the cache here), as in merge recipes."""
    root, sd, ft = models
    commit = "0" * 40
    repo = tmp_path / "cache" / "models--org--tiny-base"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted((root / "base").iterdir()):
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = api.extract_lora(root / "ft", root / "base", tmp_path / "local", rank=2)
    hub = api.extract_lora(root / "ft", "org/tiny-base", tmp_path / "hub", rank=2)
    assert [(t.name, t.rank) for t in hub.tensors] == [(t.name, t.rank) for t in local.tensors]
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("local", "hub"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "hub" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "org/tiny-base"
    # the output may not go inside the resolved snapshot
    with pytest.raises(Exception, match="inputs are never written"):
        api.extract_lora(root / "ft", "org/tiny-base", snap / "out", rank=2)


def test_gpt2_conv1d_layers_are_factored_transposed(tmp_path):
    """GPT-2's Conv1D weights are [in, out]: PEFT's fan_in_fan_out layers take (B·A)ᵀ."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    sd = load_file(tmp_path / "base" / "model.safetensors")
    ft = dict(sd)
    g = torch.Generator().manual_seed(3)
    for n in ("h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"):
        name = n if n in sd else "transformer." + n
        rows, cols = sd[name].shape
        ft[name] = sd[name] + 0.1 * torch.randn(rows, 1, generator=g) @ torch.randn(1, cols, generator=g)
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "config.json").write_bytes((tmp_path / "base" / "config.json").read_bytes())
    save_file(ft, tmp_path / "ft" / "model.safetensors")
    report = api.extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "out", rank=1)
    assert all(t.error < 1e-5 for t in report.of_kind("lora")) and len(report.of_kind("lora")) == 2
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    base_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    merged = peft.PeftModel.from_pretrained(base_model, tmp_path / "out").merge_and_unload().state_dict()
    for t in report.of_kind("lora"):
        key = t.name if t.name in merged else "transformer." + t.name
        torch.testing.assert_close(merged[key], ft[t.name], rtol=0, atol=1e-5)
