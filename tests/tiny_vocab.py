"""Tiny models with their own word-level tokenizers, for the vocabulary tests (tokenizer_source,
tokenizer.tokens, slices with tokenizers, and the mergekit conformance recipes)."""

from __future__ import annotations

from pathlib import Path

import torch

# two vocabularies that share tokens in a different order, and two chat templates
BASE_WORDS = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e"]
OTHER_WORDS = ["<unk>", "<s>", "</s>", "a", "c", "b", "f"]
TEMPLATE_1 = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
TEMPLATE_2 = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def save_tokenizer(folder: Path, words: list[str], added: tuple[str, ...] = (), template: str | None = None) -> dict:
    """A word-level fast tokenizer saved in `folder`; its vocabulary {token: id}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        fast.add_tokens(list(added))
    if template:
        fast.chat_template = template
    fast.save_pretrained(folder)
    return {w: i for i, w in enumerate([*words, *added])}


def save_model(folder: Path, vocab_size: int, seed: int, layers: int = 1) -> None:
    """A tiny Llama with N(0, 1) parameters: distinct rows everywhere (Llama's init leaves norms at 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=vocab_size, max_position_embeddings=32,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape))
    model.save_pretrained(folder)


def save_two_vocabularies(root: Path, layers: int = 1) -> tuple[Path, Path]:
    """Models a (303 words) and b (the first 150, a new word and an added token) under root."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(300)]
    a, b = root / "a", root / "b"
    save_tokenizer(a, words)
    save_model(a, len(words), 0, layers)
    save_tokenizer(b, words[:150] + ["z"], added=("<q>",))
    save_model(b, 152, 1, layers)
    return a, b


def record_read_sizes(monkeypatch, sources, names) -> list[int]:
    """Spy on each source's `read` of the tensors `names`: the list of entries each read spans
    (a whole-tensor read counts as 10**9), filled as the test reads."""
    sizes: list[int] = []
    for src in sources:
        original = src.read

        def spy(name, start=0, stop=None, _orig=original):
            if name in names:
                sizes.append((stop if stop is not None else 10**9) - start)
            return _orig(name, start, stop)
        monkeypatch.setattr(src, "read", spy)
    return sizes
