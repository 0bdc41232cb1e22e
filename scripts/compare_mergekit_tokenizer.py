"""Tokenizer merges, modalmerge against mergekit 0.1.5 on the same tiny models: the output
vocabularies (as sets of tokens: mergekit's union order follows Python's hash seed), the
embedding and LM-head rows compared by token, the other tensors, config.json's vocab_size and
the chat template. Prints the max |difference| per recipe.

    pip install --no-deps --target /tmp/mksite mergekit==0.1.5 immutables
    python scripts/compare_mergekit_tokenizer.py --mergekit-path /tmp/mksite
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

BASE_WORDS = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e"]
OTHER_WORDS = ["<unk>", "<s>", "</s>", "a", "c", "b", "f"]
TEMPLATE_1 = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
TEMPLATE_2 = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def build_models(root: Path) -> dict[str, str]:
    """A base, a fine-tune of the same vocabulary, one that added tokens, one of another vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specs = {"base": (BASE_WORDS, (), None, 0), "ft_same": (BASE_WORDS, (), TEMPLATE_1, 1),
             "ft_added": (BASE_WORDS, ("<x>", "<y>"), TEMPLATE_1, 2),
             "ft_other": (OTHER_WORDS, ("<y>",), TEMPLATE_2, 3)}
    paths = {}
    for name, (words, added, template, seed) in specs.items():
        folder = root / name
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        if added:
            fast.add_tokens(list(added))
        if template:
            fast.chat_template = template
        fast.save_pretrained(folder)
        torch.manual_seed(seed)
        cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=len(fast), max_position_embeddings=32,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape))
        model.save_pretrained(folder)
        paths[name] = str(folder)
    return paths


def recipes(p: dict[str, str]) -> dict[str, dict]:
    def m(name, w):
        return {"model": p[name], "parameters": {"weight": w}}
    return {
        "union, linear, base": {"merge_method": "linear", "base_model": p["base"], "dtype": "float32",
                                "tokenizer_source": "union",
                                "models": [m("base", 0.2), m("ft_added", 0.3), m("ft_other", 0.5)]},
        # without base_model mergekit's tokenizer base (and so the template the union keeps) is the first
        # model of a set, in hash order: the template is given
        "union, linear, no base": {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
                                   "chat_template": TEMPLATE_1,
                                   "models": [m("ft_same", 0.2), m("ft_added", 0.3), m("ft_other", 0.5)]},
        "base, task_arithmetic": {"merge_method": "task_arithmetic", "base_model": p["base"], "dtype": "float32",
                                  "tokenizer_source": "base",
                                  "models": [m("ft_same", 1.0), m("ft_added", 0.5), m("ft_other", 0.7)]},
        "union, ties": {"merge_method": "ties", "base_model": p["base"], "dtype": "float32",
                        "tokenizer_source": "union", "parameters": {"density": 0.5},
                        "models": [m("ft_added", 1.0), m("ft_other", 0.7)]},
        "model source, tokens, pad": {
            "merge_method": "linear", "dtype": "float32", "chat_template": "auto",
            "tokenizer": {"source": p["ft_added"], "pad_to_multiple_of": 8, "tokens": {
                "<z>": {"source": {"kind": "zero"}},
                "<x>": {"source": {"kind": "model_token", "model": p["base"], "token": "a"}, "force": True},
                "<y>": {"source": p["ft_other"]},
                "c": {"source": {"kind": "model_token", "model": p["ft_added"], "token_id": 4}, "force": True}}},
            # ft_same's template is ft_added's: `auto` has a plurality (a tie would follow mergekit's set order)
            "models": [m("base", 1.0), m("ft_same", 0.5), m("ft_added", 1.0), m("ft_other", 2.0)]},
        "inline chat template": {"merge_method": "linear", "dtype": "float32", "chat_template": TEMPLATE_2 + " ",
                                 "models": [m("base", 1.0), m("ft_same", 1.0)]},
    }


def vocab_of(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def template_of(folder: Path) -> str | None:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).chat_template


def compare(mk: Path, mm: Path) -> tuple[float, str]:
    """Max |difference| over every tensor (vocabulary rows matched by token) and what else differs."""
    notes = []
    mk_vocab, mm_vocab = vocab_of(mk), vocab_of(mm)
    if set(mk_vocab) != set(mm_vocab):
        notes.append(f"vocabularies differ: {sorted(set(mk_vocab) ^ set(mm_vocab))}")
    a, b = load(mk), load(mm)
    worst = 0.0
    for name in sorted(set(a) & set(b)):
        if name in VOCAB_TENSORS:
            common = sorted(set(mk_vocab) & set(mm_vocab))
            ia = torch.tensor([mk_vocab[t] for t in common])
            ib = torch.tensor([mm_vocab[t] for t in common])
            worst = max(worst, (a[name][ia].float() - b[name][ib].float()).abs().max().item())
            pad_a, pad_b = a[name][len(mk_vocab):], b[name][len(mm_vocab):]
            if pad_a.shape != pad_b.shape:
                notes.append(f"{name}: padding rows {pad_a.shape[0]} vs {pad_b.shape[0]}")
            elif pad_a.numel():
                worst = max(worst, (pad_a.float() - pad_b.float()).abs().max().item())
        elif a[name].shape != b[name].shape:
            notes.append(f"{name}: shape {list(a[name].shape)} vs {list(b[name].shape)}")
        else:
            worst = max(worst, (a[name].float() - b[name].float()).abs().max().item())
    if set(a) != set(b):
        notes.append(f"tensor names differ: {sorted(set(a) ^ set(b))[:3]}")
    sizes = [json.loads((x / "config.json").read_text())["vocab_size"] for x in (mk, mm)]
    if sizes[0] != sizes[1]:
        notes.append(f"vocab_size {sizes[0]} vs {sizes[1]}")
    if template_of(mk) != template_of(mm):
        notes.append(f"chat templates differ: {template_of(mk)!r} vs {template_of(mm)!r}")
    return worst, "; ".join(notes) or f"vocab_size {sizes[1]}, same tokens and chat template"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-path", help="folder holding the mergekit package (put first on PYTHONPATH)")
    args = ap.parse_args(argv)
    from modalmerge import merge
    from modalmerge.engine.recipe import load_recipe

    env = dict(os.environ)
    if args.mergekit_path:
        env["PYTHONPATH"] = os.pathsep.join([args.mergekit_path, env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build_models(root)
        print(f"{'recipe':<28} {'max |mergekit - modalmerge|':>28}  notes")
        failed = False
        for i, (name, recipe) in enumerate(recipes(paths).items()):
            yml = root / f"r{i}.yml"
            yml.write_text(yaml.safe_dump(recipe, sort_keys=False))
            mk_out, mm_out = root / f"mk{i}", root / f"mm{i}"
            r = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(yml), str(mk_out)],
                               env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name:<28} mergekit failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
                failed = True
                continue
            merge(load_recipe(yml), mm_out)
            worst, notes = compare(mk_out, mm_out)
            failed |= worst > 1e-5 or "differ" in notes or " vs " in notes
            print(f"{name:<28} {worst:>28.3g}  {notes}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
