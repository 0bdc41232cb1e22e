"""Conformance with mergekit 0.1.5 itself (issue 13, item 7): every recipe of tests/mergekit_recipes.py
is merged by mergekit (in its own environment, all recipes in one subprocess: tests/mergekit_reference.py)
and by modalmerge, on the same tiny float32 models, and the outputs must agree: every tensor to 1e-5
(embedding and LM-head rows matched by token, since mergekit's union order follows Python's hash
seed), the tokenizer's vocabulary as a set of tokens, the chat template, config.json's
num_hidden_layers and vocab_size, and mergekit_config.yml. extract-lora is compared through what
matters, the weights that PEFT's merge of each adapter gives (SVD factors differ in sign).

Run with mergekit set up (README, "## Test"):
    MODALMERGE_MERGEKIT_PYTHON=.mergekit-venv/bin/python python -m pytest tests/test_mergekit_conformance.py -v
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_sd
from mergekit_recipes import NOT_COMPARED, RECIPES, build_models, resolve
from mergekit_reference import MergekitFailed, requires_mergekit, run_mergekit
from modalmerge import api
from modalmerge.methods.registry import METHODS

TOLERANCE = 1e-5
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
LORA_RANK = 4


def build_lora_pair(root: Path) -> tuple[Path, Path]:
    """A 2-layer Llama base and a fine-tune = base + a rank-LORA_RANK delta on every linear layer and on
    the embeddings and head, + 1e-4 noise (so that the kept singular values are well apart from the
    rest), and a changed final norm."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    tuned = {}
    for name, value in base.state_dict().items():
        value = value.detach().clone()
        if value.dim() == 2:
            rows, cols = value.shape
            signal = torch.randn(rows, LORA_RANK, generator=g) @ torch.randn(LORA_RANK, cols, generator=g)
            value += 0.02 * signal / LORA_RANK ** 0.5 + 1e-4 * torch.randn(value.shape, generator=g)
        tuned[name] = value
    tuned["model.norm.weight"] += 0.01
    (root / "ft").mkdir()
    (root / "ft" / "config.json").write_bytes((root / "base" / "config.json").read_bytes())
    save_file({k: v.contiguous() for k, v in tuned.items()}, root / "ft" / "model.safetensors")
    return root / "ft", root / "base"


EXTRACT_VARIANTS = {"linear_layers": [], "embeddings_as_lora": ["--embed-lora"]}


@pytest.fixture(scope="module")
def mergekit_outputs(tmp_path_factory):
    """The models, every recipe's YAML file and mergekit's output for it, made once: {name: error or None}."""
    root = tmp_path_factory.mktemp("mergekit-conformance")
    paths = build_models(root / "models")
    lora_model, lora_base = build_lora_pair(root / "models")
    (root / "recipes").mkdir()
    jobs, names = [], []
    for name, recipe in RECIPES.items():
        config = root / "recipes" / f"{name}.yaml"
        config.write_text(yaml.safe_dump(resolve(recipe, paths), sort_keys=False))
        jobs.append({"kind": "yaml", "config": config, "out": root / "mergekit" / name,
                     "options": {"lora_merge_cache": str(root / "lora-merge-cache")}})
        names.append(name)
    for variant, args in EXTRACT_VARIANTS.items():
        jobs.append({"kind": "extract_lora", "model": lora_model, "base": lora_base,
                     "out": root / "mergekit" / f"extract_lora_{variant}", "rank": LORA_RANK, "args": args})
        names.append(f"extract_lora_{variant}")
    errors = run_mergekit(jobs, check=False)
    return {"root": root, "lora": (lora_model, lora_base), "errors": dict(zip(names, errors))}


def mergekit_output(outputs, name: str) -> Path:
    error = outputs["errors"][name]
    if error is not None:
        pytest.fail(f"mergekit 0.1.5 failed on {name}: {error}")
    return outputs["root"] / "mergekit" / name


# ------------------------------------------------------------------------------ comparisons


def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer

    if not (folder / "tokenizer_config.json").exists():
        return None
    return AutoTokenizer.from_pretrained(str(folder))


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def tensor_differences(mk: Path, mm: Path, mk_vocab: dict | None, mm_vocab: dict | None) -> dict[str, float]:
    """{tensor: max |mergekit − modalmerge|}; vocabulary tensors row by row of the same token (rows past the
    vocabulary, padding, by position). Names or shapes that differ are assertion failures."""
    a, b = load_sd(mk), load_sd(mm)
    assert sorted(a) == sorted(b), f"tensor names differ: only mergekit {sorted(set(a) - set(b))[:5]}, " \
                                   f"only modalmerge {sorted(set(b) - set(a))[:5]}"
    out = {}
    for name in sorted(a):
        x, y = a[name].float(), b[name].float()
        assert x.shape == y.shape, f"{name}: shape {list(x.shape)} (mergekit) vs {list(y.shape)} (modalmerge)"
        if name in VOCAB_TENSORS and mk_vocab is not None:
            tokens = sorted(mk_vocab)
            x = torch.cat([x[[mk_vocab[t] for t in tokens]], x[len(mk_vocab):]])
            y = torch.cat([y[[mm_vocab[t] for t in tokens]], y[len(mm_vocab):]])
        out[name] = (x - y).abs().max().item() if x.numel() else 0.0
    return out


def assert_same_output(mk: Path, mm: Path):
    mk_tok, mm_tok = tokenizer_of(mk), tokenizer_of(mm)
    assert (mk_tok is None) == (mm_tok is None), \
        f"tokenizer written by {'mergekit' if mm_tok is None else 'modalmerge'} only"
    mk_vocab = mm_vocab = None
    if mk_tok is not None:
        mk_vocab, mm_vocab = mk_tok.get_vocab(), mm_tok.get_vocab()
        assert set(mk_vocab) == set(mm_vocab), \
            f"vocabularies differ: only mergekit {sorted(set(mk_vocab) - set(mm_vocab))}, " \
            f"only modalmerge {sorted(set(mm_vocab) - set(mk_vocab))}"
        assert mk_tok.chat_template == mm_tok.chat_template, \
            f"chat templates differ: {mk_tok.chat_template!r} (mergekit) vs {mm_tok.chat_template!r} (modalmerge)"
    mk_cfg, mm_cfg = config_of(mk), config_of(mm)
    for key in ("num_hidden_layers", "vocab_size"):
        assert mk_cfg.get(key) == mm_cfg.get(key), f"config {key}: {mk_cfg.get(key)} (mergekit) vs {mm_cfg.get(key)}"
    diffs = tensor_differences(mk, mm, mk_vocab, mm_vocab)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOLERANCE, f"{worst} differs from mergekit's by {diffs[worst]:.3g} (> {TOLERANCE}); " \
        f"{sum(d > TOLERANCE for d in diffs.values())} of {len(diffs)} tensors over"
    assert (mm / "mergekit_config.yml").read_text() == (mk / "mergekit_config.yml").read_text()


# ------------------------------------------------------------------------------ tests


@requires_mergekit
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_matches_mergekit(mergekit_outputs, name, tmp_path):
    mk = mergekit_output(mergekit_outputs, name)
    mm = tmp_path / name
    api.merge(mergekit_outputs["root"] / "recipes" / f"{name}.yaml", mm)
    assert_same_output(mk, mm)


@pytest.mark.parametrize("name", list(NOT_COMPARED))
def test_not_compared(name):
    pytest.skip(f"{name}: {NOT_COMPARED[name]}")


def peft_merged(adapter: Path, base: Path) -> dict[str, torch.Tensor]:
    """The base with the adapter merged in by PEFT (its modules_to_save in place)."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def lora_layout(adapter: Path) -> tuple[dict[str, int], set[str]]:
    """{module: rank} of the adapter's LoRA factors, and its modules_to_save."""
    from safetensors import safe_open

    ranks = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            for suffix in (".lora_A.weight", ".lora_embedding_A"):
                if key.endswith(suffix):
                    ranks[key.removeprefix("base_model.model.").removesuffix(suffix)] = f.get_slice(key).get_shape()[0]
    saved = json.loads((adapter / "adapter_config.json").read_text()).get("modules_to_save") or []
    return ranks, set(saved)


@requires_mergekit
@pytest.mark.parametrize("variant", list(EXTRACT_VARIANTS))
def test_extract_lora_matches_mergekit(mergekit_outputs, variant, tmp_path):
    """The same ranks, LoRA targets and modules saved whole, and PEFT's merge of either adapter gives the
    same weights (so B·A·scale of every tensor matches, whatever the SVD's signs)."""
    mk = mergekit_output(mergekit_outputs, f"extract_lora_{variant}")
    model, base = mergekit_outputs["lora"]
    mm = tmp_path / "adapter"
    api.extract_lora(model, base, mm, rank=LORA_RANK, embeddings=bool(EXTRACT_VARIANTS[variant]))
    mk_ranks, mk_saved = lora_layout(mk)
    mm_ranks, mm_saved = lora_layout(mm)
    assert mm_ranks == mk_ranks
    # mergekit also saves modules whole that did not change (here the layer norms); modalmerge leaves them
    # out: the same merged weights, which the comparison below checks
    assert {m.rsplit(".", 1)[-1] for m in mm_saved} <= {m.rsplit(".", 1)[-1] for m in mk_saved}
    a, b = peft_merged(mk, base), peft_merged(mm, base)
    assert sorted(a) == sorted(b)
    diffs = {name: (a[name] - b[name]).abs().max().item() for name in a}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOLERANCE, f"{worst}: PEFT's merges of the two adapters differ by {diffs[worst]:.3g}"


def test_every_method_both_tools_have_is_in_the_catalog():
    mapped = {name for method in METHODS.values() for name in method.mergekit_names}
    assert mapped - {recipe["merge_method"] for recipe in RECIPES.values()} == set()


def test_a_set_but_unusable_interpreter_fails_not_skips(monkeypatch, tmp_path):
    """CI sets MODALMERGE_MERGEKIT_PYTHON: an interpreter that is not there, or one without mergekit,
    must fail the tests."""
    job = {"kind": "yaml", "config": tmp_path / "r.yaml", "out": tmp_path / "out"}
    monkeypatch.setenv("MODALMERGE_MERGEKIT_PYTHON", str(tmp_path / "no-such-venv" / "bin" / "python"))
    with pytest.raises(MergekitFailed, match="cannot be run"):
        run_mergekit([job])
    if importlib.util.find_spec("mergekit") is None:  # this environment has none, as the README sets it up
        monkeypatch.setenv("MODALMERGE_MERGEKIT_PYTHON", sys.executable)
        monkeypatch.delenv("PYTHONPATH", raising=False)
        with pytest.raises(MergekitFailed, match="has no mergekit"):
            run_mergekit([job])
