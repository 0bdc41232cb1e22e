"""PEFT LoRA adapters read as dense models, checked against peft's own merge_and_unload()."""

import json

import pytest
import torch
import yaml

peft = pytest.importorskip("peft")

from conftest import load_sd, tiny_llama  # noqa: E402
from modalmerge.checkpoint.safetensors_io import save_file  # noqa: E402
from modalmerge.checkpoint.sources import PeftSource, open_source  # noqa: E402
from modalmerge.cli import main  # noqa: E402
from modalmerge.errors import MergeError  # noqa: E402


def _randomise_adapter(model, seed: int) -> None:
    """LoRA B starts at zero (a no-op adapter): give every trainable tensor real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _save_pair(base_fn, config, root, seed=1, save_base=None):
    """Save base and adapter; return (base dir, adapter dir, peft's merged state dict)."""
    base_dir, adapter_dir = root / "base", root / "adapter"
    base = base_fn()
    if save_base is None:
        base.save_pretrained(base_dir)
    else:
        save_base(base, base_dir)
    model = peft.get_peft_model(base_fn(), config)
    _randomise_adapter(model, seed)
    model.save_pretrained(adapter_dir)
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return base_dir, adapter_dir, merged


def _check_dense(base_dir, adapter_dir, merged, chunk_rows=(1, 3)):
    base = open_source(base_dir, label="base")
    src = open_source(adapter_dir, label="lora", base=base)
    assert isinstance(src, PeftSource)
    changed = 0
    for name in src.names():
        dense = src.read(name)
        assert dense.dtype == base.meta(name).dtype
        torch.testing.assert_close(dense, merged[name], atol=1e-5, rtol=0, msg=name)
        changed += not torch.equal(dense, base.read(name))
        # flat element ranges (what a chunked merge asks for) agree with the whole tensor
        numel = src.meta(name).numel
        for cut in (1, numel // 3, numel - 1):
            if 0 < cut < numel:
                torch.testing.assert_close(src.read(name, 0, cut), dense.reshape(-1)[:cut], atol=1e-6, rtol=0)
                torch.testing.assert_close(src.read(name, cut, numel), dense.reshape(-1)[cut:], atol=1e-6, rtol=0)
    return changed


def test_llama_lora_with_embedding_rank_alpha_patterns_rslora(tmp_path):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"],
        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=True)
    base_dir, adapter_dir, merged = _save_pair(tiny_llama, config, tmp_path)
    # peft saved the whole (base) embedding next to its LoRA: the delta must still be added on top
    keys = set(load_sd_adapter(adapter_dir))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
    changed = _check_dense(base_dir, adapter_dir, merged)
    # 2 layers × (q, v) + embedding + lm_head
    assert changed == 6


def test_llama_lora_plain_scaling(tmp_path):
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    base_dir, adapter_dir, merged = _save_pair(tiny_llama, config, tmp_path, seed=3)
    assert _check_dense(base_dir, adapter_dir, merged) == 6


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def test_bert_lora_with_biases_embedding_and_classifier(tmp_path):
    # bias="lora_only" saves the trained biases of adapted layers; the classifier is a modules_to_save copy
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["query", "value", "word_embeddings"],
                             modules_to_save=["classifier"], bias="lora_only")
    base_dir, adapter_dir, merged = _save_pair(tiny_bert, config, tmp_path, seed=5)
    # q, v weights and biases in 2 layers, word embeddings, classifier weight and bias
    assert _check_dense(base_dir, adapter_dir, merged) == 11


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_fan_in_fan_out_with_lora_bias(tmp_path):
    # GPT-2's Conv1D stores weights [in, out]: the delta is (B·A)ᵀ; lora_bias adds scale·B.bias
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             lora_bias=True)
    base_dir, adapter_dir, merged = _save_pair(tiny_gpt2, config, tmp_path, seed=7)
    # c_attn and c_fc weight and bias, 2 layers
    assert _check_dense(base_dir, adapter_dir, merged) == 8


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = torch.nn.Conv2d(3, 8, kernel_size=3)
        self.point = torch.nn.Conv2d(8, 6, kernel_size=1)
        self.out = torch.nn.Linear(6, 2)


def _save_state(model, folder):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")


def test_conv_lora_kxk_and_1x1(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["patch", "point", "out"])
    base_dir, adapter_dir, merged = _save_pair(_ConvNet, config, tmp_path, seed=9, save_base=_save_state)
    assert _check_dense(base_dir, adapter_dir, merged) == 3


def load_sd_adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    base_dir, adapter_dir, merged = _save_pair(tiny_llama, config, root, seed=11)
    return base_dir, adapter_dir, merged


def test_cli_merges_an_adapter_as_a_model(llama_adapter, tmp_path):
    base_dir, adapter_dir, merged = llama_adapter
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base_dir),
                                      "models": [{"path": str(adapter_dir), "name": "lora"}],
                                      "params": {"lambda": 0.5}}))
    out = tmp_path / "out"
    assert main(["merge", str(recipe), "-o", str(out), "--no-progress"]) == 0
    result, base = load_sd(out), load_sd(base_dir)
    assert set(result) == set(base)
    for name, value in result.items():
        expected = base[name] + 0.5 * (merged[name] - base[name])
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=0, msg=name)


def test_adapter_base_from_its_config_when_recipe_has_none(llama_adapter, tmp_path):
    # linear takes no base of its own: the adapter's base_model_name_or_path densifies it
    base_dir, adapter_dir, merged = llama_adapter
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    moved = tmp_path / "adapter"
    moved.mkdir()
    (moved / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    (moved / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base_dir)}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "linear", "models": [str(moved), str(base_dir)]}))
    out = tmp_path / "out"
    assert main(["merge", str(recipe), "-o", str(out), "--no-progress"]) == 0
    result, base = load_sd(out), load_sd(base_dir)
    for name, value in result.items():
        torch.testing.assert_close(value, (merged[name] + base[name]) / 2, atol=1e-5, rtol=0, msg=name)


def test_adapter_for_another_base_is_refused(llama_adapter, tmp_path):
    _, adapter_dir, _ = llama_adapter
    other = tmp_path / "other"
    tiny_bert().save_pretrained(other)
    with pytest.raises(MergeError, match="does not have; give the base the adapter was trained on"):
        open_source(adapter_dir, label="lora", base=open_source(other))


@pytest.mark.parametrize("field,value,name", [("use_dora", True, "DoRA"),
                                              ("trainable_token_indices", [1, 2], "trainable_token_indices")])
def test_unsupported_variants_are_refused(llama_adapter, tmp_path, field, value, name):
    base_dir, adapter_dir, _ = llama_adapter
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(MergeError, match=f"{name} adapters are not supported; merge the adapter"):
        open_source(bad, label="lora", base=open_source(base_dir))


def test_inspect_an_adapter_against_its_base(llama_adapter, capsys):
    base_dir, adapter_dir, merged = llama_adapter
    assert main(["inspect", str(adapter_dir), "--base", str(base_dir), "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    base = load_sd(base_dir)
    expected = torch.cat([(merged[k] - base[k]).reshape(-1) for k in base]).double().norm()
    assert out["total"]["norms"]["adapter"] == pytest.approx(float(expected), rel=1e-5)
    # only q/v projections are adapted: embeddings, norms and head have no task vector
    groups = {g["group"]: g["norms"]["adapter"] for g in out["groups"]}
    assert groups["embeddings"] == groups["norms"] == groups["head"] == 0 < groups["layer 0"]
