"""Tokenizer fields with `slices:` recipes, as mergekit 0.1.5 plans them (issue 13, item 1).

Tiny 4-layer Llama folders with their own WordLevel tokenizers (test_tokenizer_merge's builders):
A has the base vocabulary, B and D added tokens, C another vocabulary. mergekit builds the output
tokenizer from every model the slices name (plus `base_model`), and fills each vocabulary
tensor's missing rows from the models that tensor comes from: the first slice's for the
embeddings, the last slice's for the LM head. The expected rows are test_tokenizer_merge's dense
reference (`expected_rows`, by token) applied to those models; the merge must give them to 1e-6.
The same recipes against mergekit itself: `test_against_mergekit` (needs MODALMERGE_MERGEKIT_PYTHON).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_tokenizer_merge import expected_rows, model_vocab, out_tokens_of, write_recipe
from tiny_vocab import (BASE_WORDS, OTHER_WORDS, TEMPLATE_1, TEMPLATE_2, record_read_sizes, save_model,
                        save_tokenizer, save_two_vocabularies)

from modalmerge import merge
from modalmerge.cli import main
from modalmerge.engine.recipe import load_recipe, parse_recipe
from modalmerge.errors import MergeError

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
LAYERS = 4


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab_slices")
    specs = {"A": (BASE_WORDS, (), None, 0), "B": (BASE_WORDS, ("<x>", "<y>"), TEMPLATE_1, 2),
             "C": (OTHER_WORDS, ("<y>",), TEMPLATE_2, 3), "D": (BASE_WORDS, ("<x>", "<y>"), TEMPLATE_1, 4)}
    paths = {}
    for name, (words, added, template, seed) in specs.items():
        folder = root / name
        vocab = save_tokenizer(folder, words, added, template)
        save_model(folder, len(vocab), seed, LAYERS)
        paths[name] = folder
    return paths


def src(f, name, a, b, **params):
    out = {"model": str(f[name]), "layer_range": [a, b]}
    if params:
        out["parameters"] = params
    return out


def recipes(f) -> dict[str, dict]:
    """mergekit recipes: slices with tokenizer_source union / base / a model, and `tokenizer.tokens`."""
    return {
        # one source per slice: the embeddings are A's alone, the head C's alone (missing rows: zero)
        "passthrough union": {
            "merge_method": "passthrough", "dtype": "float32", "tokenizer_source": "union",
            "slices": [{"sources": [src(f, "A", 0, 2)]}, {"sources": [src(f, "C", 2, 4)]}]},
        # the base is the tokenizer base and is preferred where it is one of a tensor's models
        "linear union base_model": {
            "merge_method": "linear", "dtype": "float32", "base_model": str(f["A"]), "tokenizer_source": "union",
            "slices": [{"sources": [src(f, "A", 0, 2, weight=0.3), src(f, "B", 0, 2, weight=0.7)]},
                       {"sources": [src(f, "B", 2, 4, weight=0.4), src(f, "C", 2, 4, weight=0.6)]}]},
        "task_arithmetic tokens": {
            "merge_method": "task_arithmetic", "dtype": "float32", "base_model": str(f["A"]),
            "tokenizer": {"source": "union", "tokens": {
                "<y>": {"source": str(f["C"])},
                "<z>": {"source": {"kind": "model_token", "model": str(f["B"]), "token": "<x>"}},
                "c": {"source": {"kind": "zero"}, "force": True}}},
            "slices": [{"sources": [src(f, "A", 0, 2), src(f, "B", 0, 2, weight=1.0), src(f, "C", 0, 2, weight=0.5)]},
                       {"sources": [src(f, "A", 2, 4), src(f, "B", 2, 4, weight=0.5), src(f, "C", 2, 4, weight=1.0)]}]},
        # a model's tokenizer, padded; `auto` takes the template B and D share
        "linear model source pad": {
            "merge_method": "linear", "dtype": "float32", "chat_template": "auto",
            "tokenizer": {"source": str(f["C"]), "pad_to_multiple_of": 16},
            "slices": [{"sources": [src(f, "B", 0, 3, weight=1.0), src(f, "C", 0, 3, weight=1.0)]},
                       {"sources": [src(f, "D", 3, 4, weight=1.0), src(f, "C", 3, 4, weight=2.0)]}]},
        "slerp base": {
            "merge_method": "slerp", "dtype": "float32", "base_model": str(f["B"]), "tokenizer_source": "base",
            "parameters": {"t": 0.3},
            "slices": [{"sources": [src(f, "B", 0, 4), src(f, "C", 0, 4)]}]},
    }


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def run(f, tmp_path, name) -> tuple[Path, Path]:
    recipe = write_recipe(tmp_path, recipes(f)[name])
    out = tmp_path / "out"
    merge(load_recipe(recipe), out)
    return recipe, out


def close(got, want):
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_passthrough_union(family, tmp_path):
    f = family
    _, out = run(f, tmp_path, "passthrough union")
    toks = out_tokens_of(out)
    assert toks == BASE_WORDS + ["f", "<y>"]   # A's vocabulary first, then C's new tokens
    got = tensors(out)
    close(got[EMBED], expected_rows([f["A"]], toks, EMBED)[0])
    close(got[HEAD], expected_rows([f["C"]], toks, HEAD)[0])
    assert got[EMBED][toks.index("f")].abs().sum() == 0 and got[HEAD][toks.index("d")].abs().sum() == 0
    close(got["model.layers.3.mlp.down_proj.weight"], tensors(f["C"])["model.layers.3.mlp.down_proj.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 10 and config["num_hidden_layers"] == 4


def test_linear_union_base_model(family, tmp_path):
    f = family
    _, out = run(f, tmp_path, "linear union base_model")
    toks = out_tokens_of(out)
    assert toks == BASE_WORDS + ["f", "<x>", "<y>"]
    got = tensors(out)
    a, b = expected_rows([f["A"], f["B"]], toks, EMBED, base=0)   # the base A is one of the embeddings' models
    close(got[EMBED], 0.3 * a + 0.7 * b)
    b, c = expected_rows([f["B"], f["C"]], toks, HEAD)            # the head's models: no base among them
    close(got[HEAD], 0.4 * b + 0.6 * c)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 11


def test_task_arithmetic_token_overrides(family, tmp_path):
    f = family
    _, out = run(f, tmp_path, "task_arithmetic tokens")
    toks = out_tokens_of(out)
    assert toks == BASE_WORDS + ["f", "<x>", "<y>", "<z>"]   # `<z>`: no tokenizer has it, appended
    overrides = {"<y>": {"source": (2, "<y>")}, "<z>": {"source": (1, "<x>")},
                 "c": {"source": "zero", "force": True}}
    folders = [f["A"], f["B"], f["C"]]
    got = tensors(out)
    for name, (wb, wc) in ((EMBED, (1.0, 0.5)), (HEAD, (0.5, 1.0))):   # the first slice's weights, the last's
        base, b, c = expected_rows(folders, toks, name, base=0, overrides=overrides)
        close(got[name], base + wb * (b - base) + wc * (c - base))


def test_model_source_padding_and_auto_template(family, tmp_path):
    f = family
    _, out = run(f, tmp_path, "linear model source pad")
    toks = out_tokens_of(out)
    assert toks == out_tokens_of(f["C"])
    got = tensors(out)
    b, c = expected_rows([f["B"], f["C"]], toks, EMBED, pad_to=16)
    close(got[EMBED], (b + c) / 2)
    d, c = expected_rows([f["D"], f["C"]], toks, HEAD, pad_to=16)
    close(got[HEAD], (d + 2 * c) / 3)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 16
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE_1


def dense_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp of two whole tensors (angle of the flattened tensors)."""
    dot = float((v0 / v0.norm() * v1 / v1.norm()).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = torch.arccos(torch.tensor(dot, dtype=torch.float64))
    s0 = torch.sin(theta * (1 - t)) / torch.sin(theta)
    s1 = torch.sin(theta * t) / torch.sin(theta)
    return (s0 * v0.double() + s1 * v1.double()).float()


def test_slerp_base_source(family, tmp_path):
    f = family
    _, out = run(f, tmp_path, "slerp base")
    toks = out_tokens_of(out)
    assert toks == out_tokens_of(f["B"])   # the base's vocabulary; C lacks <x>: B's row, its one owner
    got = tensors(out)
    for name in (EMBED, HEAD):
        b, c = expected_rows([f["B"], f["C"]], toks, name)
        torch.testing.assert_close(got[name], dense_slerp(0.3, b, c), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- --dry-run

def test_dry_run_shows_the_vocabulary(family, tmp_path, capsys):
    f = family
    for name, want in (
            ("passthrough union", ["vocabulary  union: 10 rows = 10 tokens",
                                   "            model.embed_tokens.weight: A lacks 2 (2 zero)",
                                   "            lm_head.weight: C lacks 2 (2 zero)"]),
            ("task_arithmetic tokens", [
                "vocabulary  union: 12 rows = 12 tokens",
                "            tokens: '<y>' from C, '<z>' from B's <x>, 'c' zero (forced); appended '<z>'",
                "            model.embed_tokens.weight, lm_head.weight: A lacks 4 (2 as `tokens` says, 2 copied "
                "from their one owner); B lacks 2 (1 as `tokens` says, 1 copied from their one owner); C lacks 4 "
                "(1 as `tokens` says, 1 copied from their one owner, 2 from the base)"]),
            ("linear model source pad", [
                "vocabulary  model C: 16 rows = 8 tokens + 8 padding (to a multiple of 16, each model's mean row); "
                "chat template auto: B's (2 of 3 models with a template have it)",
                "            model.embed_tokens.weight: B lacks 1 (1 copied from their one owner); C lacks 0",
                "            lm_head.weight: D lacks 1 (1 copied from their one owner); C lacks 0"])):
        recipe = write_recipe(tmp_path, recipes(f)[name])
        assert main(["merge", str(recipe), "--dry-run"]) == 0
        lines = capsys.readouterr().out.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("vocabulary"))
        assert lines[start:start + len(want)] == want, name
        assert lines[start + len(want)].startswith("output")
    # a chat template alone: the copied tokenizer, and which template
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "chat_template": TEMPLATE_2 + " ",
                                     "models": [{"model": str(f["B"])}, {"model": str(f["D"])}]})
    assert main(["merge", str(recipe), "--dry-run"]) == 0
    assert f"vocabulary  the copied tokenizer's; chat template the recipe's ({len(TEMPLATE_2) + 1} characters)" \
        in capsys.readouterr().out.splitlines()


# ---------------------------------------------------------------- errors and other procedures

def test_token_source_must_feed_the_tensor(family, tmp_path):
    """As mergekit: a token's named source must be one of the models of a tensor that needs it."""
    f = family
    recipe = write_recipe(tmp_path, {
        "merge_method": "passthrough", "dtype": "float32",
        "tokenizer": {"source": "union", "tokens": {"<x>": {"source": str(f["B"])}}},
        "slices": [{"sources": [src(f, "A", 0, 2)]}, {"sources": [src(f, "B", 2, 4)]}]})
    with pytest.raises(MergeError, match=r"tokenizer.tokens\['<x>'\]: its source model .*B' is not among the first "
                                         r"slice's models, which tensor 'model.embed_tokens.weight' comes from \(A\)"):
        merge(load_recipe(recipe), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_slices_with_different_vocabularies_need_tokenizer_source(family, tmp_path):
    f = family
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "dtype": "float32",
                                     "slices": [{"sources": [src(f, "A", 0, 4, weight=1.0),
                                                             src(f, "B", 0, 4, weight=1.0)]}]})
    with pytest.raises(MergeError, match="tokenizer_source: union"):
        merge(load_recipe(recipe), tmp_path / "o")


@pytest.mark.parametrize("method, field, reason", [
    ("mmer", "tokenizer_source", "decoupled masks"),
    ("mmer", "tokenizer", "decoupled masks"),
    ("opcm", "tokenizer_source", "continual/ state"),
    ("msmoe", "tokenizer_source", "loads one whole model folder"),
    ("msmoe", "chat_template", "loads one whole model folder"),
])
def test_procedures_that_cannot_apply_a_field_name_it(family, tmp_path, method, field, reason):
    f = family
    value = {"tokenizer_source": "union", "tokenizer": {"source": "union"}, "chat_template": TEMPLATE_1}[field]
    data = {"method": method, "base": str(f["B"]), "models": [str(f["D"])], field: value}
    if method == "msmoe":
        data = {"method": method, "models": [str(f["B"])], "calibration": {"callable": "nowhere:tokens"},
                field: value}
    with pytest.raises(MergeError, match=rf"^`{field}` is not supported for method {method}: .*{reason}"):
        merge(parse_recipe(data), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_sequential_writes_the_chat_template(family, tmp_path):
    """OPCM keeps the models' vocabulary: a chat template is written into the output's tokenizer."""
    f = family
    out = tmp_path / "out"
    merge(parse_recipe({"method": "opcm", "base": str(f["B"]), "models": [str(f["D"])],
                        "chat_template": TEMPLATE_2 + " "}), out)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE_2 + " "
    assert model_vocab(out) == model_vocab(f["B"])


def test_slice_reads_are_row_blocks(tmp_path, monkeypatch):
    """Memory stays bounded: each model's vocabulary rows are read one block at a time, never whole."""
    from modalmerge.checkpoint import vocabulary as vocab_mod
    from modalmerge.engine.embedding_views import align_slice_vocabularies
    from modalmerge.engine.slices import open_slices

    a, b = save_two_vocabularies(tmp_path, LAYERS)
    monkeypatch.setattr(vocab_mod, "_BLOCK_ELEMS", 32 * 16)   # 32 rows of 16
    recipe = parse_recipe({"merge_method": "linear", "tokenizer_source": "union", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [2, 4]}, {"model": str(a), "layer_range": [2, 4]}]}]})
    expanded, base, models = open_slices(recipe)
    sources = {id(p.source): p.source for m in models for p in m.pieces}.values()
    largest = record_read_sizes(monkeypatch, sources, (EMBED, HEAD))
    _, views, vocabulary = align_slice_vocabularies(expanded, base, models)
    assert vocabulary.size == 305
    for v in views:
        assert v.read(EMBED).shape == v.read(HEAD).shape == (305, 16)
    assert largest and max(largest) <= (32 + vocab_mod._GAP_ROWS) * 16


def test_composed_writes_the_chat_template(tmp_path):
    """MMER keeps its models' vocabulary: a chat template is written into the output's tokenizer."""
    from tiny_mllm import build_family
    from tiny_mllm import recipe as mmer_recipe
    from transformers import AutoTokenizer

    family = build_family(tmp_path / "models")
    save_tokenizer(family["base"], ["<unk>", "<s>", "</s>", "a"])
    merge({**mmer_recipe(family, ("vision", "audio")), "chat_template": TEMPLATE_2 + " "}, tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == TEMPLATE_2 + " "
