"""Tokenizers and vocabularies with mergekit 0.1.5's semantics (issue 13, item 1).

Tiny Llama folders, each with its own WordLevel tokenizer built here: a base, a fine-tune with the
same vocabulary, one that added tokens (its embedding and LM head grown) and one with another
vocabulary. The expected rows are computed densely, by token, from the rules mergekit's
tokenizer/build.py and tokenizer/embed.py apply (restated in `expected_rows`); the merge must give
them (tests/test_mergekit_conformance.py checks the same against mergekit itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_vocab import (BASE_WORDS, OTHER_WORDS, TEMPLATE_1, TEMPLATE_2, record_read_sizes, save_model,
                        save_tokenizer, save_two_vocabularies)

from modalmerge import merge
from modalmerge.checkpoint import vocabulary as vocab_mod
from modalmerge.engine.embedding_views import align_vocabularies
from modalmerge.engine.plan import open_models
from modalmerge.engine.recipe import load_recipe, parse_recipe
from modalmerge.errors import MergeError

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    specs = {"base": (BASE_WORDS, (), None, 0), "ft_same": (BASE_WORDS, (), TEMPLATE_1, 1),
             "ft_added": (BASE_WORDS, ("<x>", "<y>"), TEMPLATE_1, 2),
             "ft_other": (OTHER_WORDS, ("<y>",), TEMPLATE_2, 3)}
    paths = {}
    for name, (words, added, template, seed) in specs.items():
        folder = root / name
        vocab = save_tokenizer(folder, words, added, template)
        save_model(folder, len(vocab), seed)
        paths[name] = folder
    return paths


def model_vocab(folder: Path) -> dict[str, int]:
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    vocab.update({e["content"]: e["id"] for e in data["added_tokens"]})
    return vocab


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------- mergekit's rules, restated densely

def expected_rows(folders: list[Path], out_tokens: list[str], name: str, base: int | None = None,
                  overrides: dict | None = None, pad_to: int | None = None) -> list[torch.Tensor]:
    """Each input's tensor `name` in the output vocabulary (PermutedVocabulary.execute): its own row;
    a missing row from the recipe's override, else the one holder's, else the base's (when the base
    is an input and has it), else the holders' mean, else zero; forced tokens from the override in
    every input; padding rows the input's mean row."""
    overrides = overrides or {}
    vocabs = [model_vocab(f) for f in folders]
    mats = [tensors(f)[name] for f in folders]
    n = len(out_tokens)
    size = n if not pad_to or n % pad_to == 0 else n + pad_to - n % pad_to
    out = []
    for j, mat in enumerate(mats):
        rows = torch.zeros(size, mat.shape[1])
        for i, tok in enumerate(out_tokens):
            cfg = overrides.get(tok)
            if tok in vocabs[j] and not (cfg and cfg.get("force")):
                rows[i] = mat[vocabs[j][tok]]
                continue
            holders = [k for k, v in enumerate(vocabs) if tok in v]
            if cfg:
                src = cfg["source"]
                if src == "zero":
                    continue
                k, tok_src = src
                rows[i] = mats[k][vocabs[k][tok_src]]
            elif len(holders) == 1:
                rows[i] = mats[holders[0]][vocabs[holders[0]][tok]]
            elif base is not None and base in holders:
                rows[i] = mats[base][vocabs[base][tok]]
            elif holders:
                rows[i] = sum(mats[k][vocabs[k][tok]] for k in holders) / len(holders)
        if size > n:
            rows[n:] = rows[:n].mean(dim=0)
        out.append(rows)
    return out


def out_tokens_of(folder: Path) -> list[str]:
    vocab = model_vocab(folder)
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def write_recipe(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "recipe.yml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


# ---------------------------------------------------------------- whole merges

def test_union_linear_mergekit_recipe(family, tmp_path):
    f = family
    recipe = write_recipe(tmp_path, {
        "merge_method": "linear", "base_model": str(f["base"]), "dtype": "float32", "tokenizer_source": "union",
        "models": [{"model": str(f["base"]), "parameters": {"weight": 0.2}},
                   {"model": str(f["ft_added"]), "parameters": {"weight": 0.3}},
                   {"model": str(f["ft_other"]), "parameters": {"weight": 0.5}}]})
    out = tmp_path / "out"
    merge(load_recipe(recipe), out)
    # the union: the base's ids kept, then the others' new regular tokens, then their added ones
    assert out_tokens_of(out) == BASE_WORDS + ["f", "<x>", "<y>"]
    folders = [f["base"], f["ft_added"], f["ft_other"]]
    got = tensors(out)
    for name in VOCAB_TENSORS:
        rows = expected_rows(folders, out_tokens_of(out), name, base=0)
        want = 0.2 * rows[0] + 0.3 * rows[1] + 0.5 * rows[2]
        assert got[name].shape == want.shape
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=1e-6)
    # tensors outside the vocabulary are merged as before
    w = [tensors(x)["model.norm.weight"] for x in folders]
    torch.testing.assert_close(got["model.norm.weight"], 0.2 * w[0] + 0.3 * w[1] + 0.5 * w[2])
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 11


def test_task_arithmetic_base_source_native(family, tmp_path):
    f = family
    recipe = parse_recipe({"method": "task_arithmetic", "base": str(f["base"]), "tokenizer_source": "base",
                           "params": {"lambda": 1.0}, "models": [str(f["ft_same"]), str(f["ft_added"]), str(f["ft_other"])]})
    out = tmp_path / "out"
    merge(recipe, out)
    assert out_tokens_of(out) == BASE_WORDS
    folders = [f["base"], f["ft_same"], f["ft_added"], f["ft_other"]]
    got = tensors(out)
    for name in VOCAB_TENSORS:
        rows = expected_rows(folders, BASE_WORDS, name, base=0)
        want = rows[0] + sum(r - rows[0] for r in rows[1:])
        torch.testing.assert_close(got[name], want, atol=1e-5, rtol=1e-5)


def test_model_source_overrides_and_padding(family, tmp_path):
    f = family
    tokens = {"<z>": {"source": {"kind": "zero"}},
              "<x>": {"source": {"kind": "model_token", "model": str(f["base"]), "token": "a"}, "force": True},
              "<y>": {"source": str(f["ft_other"])},
              "c": {"source": {"kind": "model_token", "model": str(f["ft_added"]), "token_id": 4}, "force": True}}
    recipe = write_recipe(tmp_path, {
        "merge_method": "linear", "dtype": "float32",
        "tokenizer": {"source": str(f["ft_added"]), "tokens": tokens, "pad_to_multiple_of": 8},
        "models": [{"model": str(f["base"]), "parameters": {"weight": 1.0}},
                   {"model": str(f["ft_added"]), "parameters": {"weight": 1.0}},
                   {"model": str(f["ft_other"]), "parameters": {"weight": 2.0}}]})
    out = tmp_path / "out"
    merge(load_recipe(recipe), out)
    toks = out_tokens_of(out)
    assert toks == BASE_WORDS + ["<x>", "<y>", "<z>"]   # the source's vocabulary, then the appended token
    folders = [f["base"], f["ft_added"], f["ft_other"]]
    overrides = {"<z>": {"source": "zero"}, "<x>": {"source": (0, "a"), "force": True}, "<y>": {"source": (2, "<y>")},
                 "c": {"source": (1, "b"), "force": True}}  # token_id 4 is "b" in ft_added
    got = tensors(out)
    for name in VOCAB_TENSORS:
        rows = expected_rows(folders, toks, name, base=None, overrides=overrides, pad_to=8)
        want = (rows[0] + rows[1] + 2 * rows[2]) / 4
        assert got[name].shape == (16, 16)
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 16
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == 16 and len(tok) == 11
    ids = tok("a <x> <z>", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == 16


def test_fill_rules_per_row_block(family):
    """The views read in small, unaligned flat ranges give the dense reference's rows; mean (no
    base), single owner, zero and base preference."""
    f = family
    for base_first in (False, True):
        data = {"method": "linear", "tokenizer_source": "union",
                "models": [str(f["ft_same"]), str(f["ft_added"]), str(f["ft_other"])],
                "tokenizer": None}
        if base_first:
            data = {"method": "task_arithmetic", "base": str(f["base"]), "tokenizer_source": "union",
                    "models": [str(f["ft_added"]), str(f["ft_other"])]}
        recipe = parse_recipe({k: v for k, v in data.items() if v is not None})
        base, models = open_models(recipe)
        base, models, vocabulary = align_vocabularies(recipe, base, models)
        inputs = ([base] if base is not None else []) + models
        folders = [Path(s.path) for s in inputs]
        for name in VOCAB_TENSORS:
            want = expected_rows(folders, vocabulary.tokens, name, base=0 if base_first else None)
            for src, rows in zip(inputs, want):
                torch.testing.assert_close(src.read(name), rows)
                flat = rows.reshape(-1)
                for start, stop in ((0, 5), (7, 40), (33, 90), (100, flat.numel())):
                    torch.testing.assert_close(src.read(name, start, stop), flat[start:stop])
        if not base_first:  # "<y>" is held by two models and no base: their mean
            y = vocabulary.tokens.index("<y>")
            assert int(vocabulary.fill[y]) == vocab_mod._MEAN


def test_reads_are_row_blocks(tmp_path, monkeypatch):
    """A vocabulary tensor is read one block of rows at a time, never whole, for every model."""
    a, b = save_two_vocabularies(tmp_path)
    monkeypatch.setattr(vocab_mod, "_BLOCK_ELEMS", 32 * 16)   # 32 rows of 16
    recipe = parse_recipe({"method": "linear", "models": [str(a), str(b)], "tokenizer_source": "union"})
    base, models = open_models(recipe)
    largest = record_read_sizes(monkeypatch, models, VOCAB_TENSORS)
    _, views, vocabulary = align_vocabularies(recipe, None, models)
    assert vocabulary.size == 305
    for v in views:
        v.read("lm_head.weight")
    assert largest and max(largest) <= (32 + vocab_mod._GAP_ROWS) * 16


# ---------------------------------------------------------------- chat templates

def test_chat_template_auto_and_inline(family, tmp_path):
    f = family
    for value, want in (("auto", TEMPLATE_1), (TEMPLATE_2 + " ", TEMPLATE_2 + " ")):
        out = tmp_path / f"out{len(want)}"
        recipe = {"merge_method": "linear", "base_model": str(f["base"]), "chat_template": value,
                  "models": [{"model": str(f["ft_same"])}, {"model": str(f["base"])}]}
        if value == "auto":  # with a built tokenizer; the inline template on the copied one
            recipe["tokenizer_source"] = "union"
            recipe["models"].insert(1, {"model": str(f["ft_added"])})
        merge(parse_recipe(recipe), out)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out)
        assert tok.chat_template == want
        assert (out / "chat_template.jinja").read_text() == want
        text = tok.apply_chat_template([{"role": "user", "content": "a b"}], tokenize=False)
        assert "a b" in text


def test_chat_template_named_and_invalid(family, tmp_path):
    f = family
    for value, needle in (("chatml", "chatml"), ("nonsense", "nonsense")):
        recipe = parse_recipe({"merge_method": "linear", "chat_template": value,
                               "models": [{"model": str(f["base"])}, {"model": str(f["ft_same"])}]})
        with pytest.raises(MergeError, match=needle):
            merge(recipe, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- errors and recipes

def test_different_vocabularies_need_tokenizer_source(family, tmp_path):
    f = family
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": str(f["base"])},
                                                                {"model": str(f["ft_added"])}]})
    with pytest.raises(MergeError, match="tokenizer_source"):
        merge(recipe, tmp_path / "o")


def test_recipe_fields(family, tmp_path):
    f = family
    r = parse_recipe({"merge_method": "ties", "base_model": {"model": {"path": str(f["base"])}},
                      "models": [{"model": str(f["ft_same"])}], "chat_template": "auto",
                      "tokenizer": {"source": {"model": {"path": str(f["ft_added"])}},
                                    "tokens": {"<x>": {"source": str(f["base"]), "force": False}}}})
    assert r.tokenizer.source == str(f["ft_added"]) and r.chat_template == "auto"
    assert r.tokenizer.tokens["<x>"].source == str(f["base"])
    with pytest.raises(MergeError, match="pad_to_multiple_of"):
        parse_recipe({"method": "linear", "models": ["a"], "tokenizer": {"pad_to_multiple_of": 0}})
    with pytest.raises(MergeError, match="tokens"):
        parse_recipe({"method": "linear", "models": ["a"], "tokenizer": {"tokens": {"x": {"force": True}}}})
    both = parse_recipe({"method": "linear", "models": [str(f["base"]), str(f["ft_same"])],
                         "tokenizer_source": "union", "tokenizer": {"source": "base"}})
    with pytest.raises(MergeError, match="both"):
        merge(both, tmp_path / "o")
    # relative model references in the tokenizer settings are relative to the recipe's folder
    (tmp_path / "r.yml").write_text(yaml.safe_dump({
        "method": "linear", "models": ["../vocab0/base"], "tokenizer": {"source": "../vocab0/ft_added"}}))
    loaded = load_recipe(tmp_path / "r.yml")
    assert loaded.tokenizer.source == str(tmp_path / "../vocab0/ft_added")


def test_token_source_must_be_an_input(family, tmp_path):
    f = family
    recipe = parse_recipe({"method": "linear", "models": [str(f["base"]), str(f["ft_added"])],
                           "tokenizer": {"source": "union", "tokens": {"<x>": {"source": "elsewhere"}}}})
    with pytest.raises(MergeError, match="not one of the merge's models"):
        merge(recipe, tmp_path / "o")


def test_model_without_tokenizer_takes_the_base_one(family, tmp_path):
    """As mergekit: a model folder without tokenizer files is read with the base's vocabulary."""
    import shutil

    f = family
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f["ft_same"] / name, bare / name)
    recipe = parse_recipe({"method": "task_arithmetic", "base": str(f["base"]), "tokenizer_source": "union",
                           "params": {"lambda": 1.0}, "models": [str(bare), str(f["ft_added"])]})
    out = tmp_path / "out"
    merge(recipe, out)
    toks = out_tokens_of(out)
    assert toks == BASE_WORDS + ["<x>", "<y>"]
    folders = [f["base"], f["ft_same"], f["ft_added"]]   # ft_same's files: the same vocabulary as bare's
    for name in VOCAB_TENSORS:
        rows = expected_rows(folders, toks, name, base=0)
        torch.testing.assert_close(tensors(out)[name], rows[1] + rows[2] - rows[0], atol=1e-5, rtol=1e-5)


def test_chat_template_needs_the_tokenizer_copied(family, tmp_path):
    f = family
    recipe = parse_recipe({"merge_method": "linear", "chat_template": TEMPLATE_1,
                           "models": [{"model": str(f["base"])}, {"model": str(f["ft_same"])}]})
    with pytest.raises(MergeError, match="no-copy-tokenizer"):
        merge(recipe, tmp_path / "o", copy_tokenizer=False)
    # a built tokenizer is written whatever --no-copy-tokenizer says, as mergekit writes it
    recipe = parse_recipe({"merge_method": "linear", "tokenizer_source": "base",
                           "models": [{"model": str(f["base"])}, {"model": str(f["ft_added"])}]})
    merge(recipe, tmp_path / "o2", copy_tokenizer=False)
    assert out_tokens_of(tmp_path / "o2") == BASE_WORDS
