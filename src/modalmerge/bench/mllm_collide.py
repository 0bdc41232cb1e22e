"""`modalmerge bench mllm --setting collide`: a mini-MLLM benchmark where merges collide.

The small setting (mllm.py) barely separates the methods: its three fine-tunes hardly
interfere and the MiniLM "LLM" answers from [CLS]. This setting makes interference real:

- the language model is a small GENERATIVE decoder (transformers' Qwen2ForCausalLM), pretrained
  here on the sentconv sentences (all files but TREC's, which the text task uses) with
  `bench moe`'s data, vocabulary and training loop (moe.py), cached;
- four tasks: digits as images (MNIST), spoken digits (FSDD), tabular readings (scikit-learn
  digits) and a text task, TREC question type; each answers in its own words, code words the
  pretraining saw often (ANSWERS); each non-text modality = a frozen random encoder
  (mllm_data.py) + a trainable projector to soft tokens; the text task's question is read as
  ordinary tokens;
- `modalmerge demo` runs this code with decoder="minilm" instead: the pip all-MiniLM-L6-v2 as a
  causal decoder (BertLMHeadModel), no pretraining and no data folder, image and table only;
- the decoder is fine-tuned per task: every transformer layer and norm, at a high learning rate
  for several epochs (strong task vectors that collide when merged); the input embeddings and
  the output head stay frozen, so the layers carry each skill and every model embeds and scores
  words alike;
- the answer is GENERATED: greedy decoding after the prompt over the whole vocabulary, with the
  KV cache; correct = exactly the answer's tokens, then end-of-sequence. A merged model that
  answers an image with another task's word is wrong, as a user would see it.

Merges, hyperparameter selection and forgetting are mllm.py's (select(), run_merge(),
forgetting()); mixed inputs of the decoupled merges go through modalmerge.runtime's route() on
folders written by modalmerge.merge (mllm.Composer): the prompt's prefill routed per token group,
the answer decoded on the text weights. The base's own text skill: held-out perplexity of each
model's text path on sentconv sentences the decoder never trained on. Several seeds, reported as
mean and min–max.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import cache_dir, mllm, moe, sentconv, write_cache_entry
from . import mllm_data as data

CACHE_VERSION = 1      # bump when training, ANSWERS or QUESTIONS change, so old cached models are not reused
TEXT_TASK = "text"
# Each task answers in its own words. The decoder's output head stays frozen in fine-tuning, so
# the answers are words its pretraining saw often (75 to 870 times each in the training
# sentences): a rare word's row is barely trained and hard to generate. The non-text tasks'
# words are code words for their classes, as the small setting's colour code is.
ANSWERS = {
    "image": ["man", "woman", "father", "mother", "boy", "girl", "son", "daughter", "wife", "friend"],  # digit 0..9
    "speech": ["world", "home", "school", "city", "house", "country", "car", "town", "sea", "water"],  # 0..9
    "table": ["day", "night", "year", "summer", "hour", "minute", "time", "age", "past", "future"],  # 0..9
    # TREC's labels 0..5: description, entity, abbreviation, human, location, numeric
    TEXT_TASK: ["reason", "thing", "name", "person", "place", "number"],
    "image-parity": ["even", "odd"],
}
QUESTIONS = {"image": "which code word names the digit in the picture ?",
             "speech": "which code word names the spoken number ?",
             "table": "which code word does this reading have ?",
             TEXT_TASK: "what kind of answer does this question ask for ?",
             "image-parity": "is the digit even or odd ?"}


@dataclass
class CollideConfig:
    seed: int = 0
    tasks: tuple = ("image", "speech", "table", TEXT_TASK)
    soft_tokens: int = 4
    # "pretrained": a Qwen2 decoder pretrained here on sentconv text (below); "minilm": the pip
    # all-MiniLM-L6-v2's layers run as a causal decoder (transformers' BertLMHeadModel, its word
    # embeddings the output head; no text needed, as the demo has none), the tasks answering in
    # the small setting's words
    decoder: str = "pretrained"
    # the decoder (Qwen2ForCausalLM, output head untied) and its pretraining on sentconv text
    hidden: int = 128
    intermediate: int = 384
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 3000
    pretrain_steps: int = 1500
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    pretrain_length: int = 40
    pretrain_sentences: int | None = None     # None: every sentence left after the held-out ones
    pretrain_seed: int = 0                    # one pretrained base for every seed, as a real LLM is
    heldout_sentences: int = 500              # never trained on: the base's text skill (perplexity)
    # fine-tuning: strong on purpose (high learning rate, several epochs)
    epochs: int = 8
    batch: int = 32
    lr_llm: float = 1e-3
    lr_proj: float = 3e-3
    lr_head: float = 0.0                      # the output head's learning rate (0: frozen, as the embeddings)
    caps: tuple = (1500, 300, 600)            # train / val / test per task
    text_length: int = 24                     # the text task's question, in tokens (left-padded)
    forget_epochs: int = 3
    mixed_test: int = 100                     # mixed inputs per ordered pair of tasks
    samples: int = 4                          # generated answers kept per row and task
    methods: tuple = ("task_arithmetic", "ties", "tall", "emr", "mmer")
    grids: dict = field(default_factory=lambda: {
        "task_arithmetic": [{"lambda": x} for x in (0.3, 0.5, 0.7, 1.0)],
        "ties": [{"density": k, "lambda": x} for k in (0.2, 0.5) for x in (0.7, 1.0, 1.5)],
        "dare_ties": [{"density": 0.5, "lambda": x} for x in (0.7, 1.0)],
        "tall": [0.2, 0.4, 0.6, 0.8, 1.0],
        "emr": [{}],
        # spec 7's defaults (τ* = TIES k 0.2) and a denser τ*, chosen on validation as TIES's k is
        "mmer": [{}, {"base_params": {"density": 0.5}}],
    })
    forgetting: bool = True
    cross_rows: bool = True
    # diagnostic rows: each task's own task vector TIES-trimmed to k, nothing merged; MMER's
    # θ_0 + m_t ⊙ τ* keeps at most what its τ*'s trim keeps of τ_t
    trim_bounds: tuple = (0.2, 0.5)

    def pretrain_settings(self) -> moe.MoeBenchConfig:
        """bench moe's settings for the decoder's pretraining: one expert, no router loss."""
        return moe.MoeBenchConfig(hidden=self.hidden, intermediate=self.intermediate, layers=self.layers,
                                  heads=self.heads, kv_heads=self.kv_heads, experts=1, top_k=1, vocab=self.vocab,
                                  max_length=self.pretrain_length, aux_loss_coef=0.0, balance="model",
                                  steps=self.pretrain_steps, batch_size=self.pretrain_batch, lr=self.pretrain_lr,
                                  warmup=max(1, self.pretrain_steps // 20), seed=self.pretrain_seed,
                                  eval_sentences=self.heldout_sentences, calibration_sentences=0,
                                  train_sentences=self.pretrain_sentences)

    def decoder_key(self) -> str:
        if self.decoder == "minilm":
            return f"minilm-decoder-v{CACHE_VERSION}"
        spec = [CACHE_VERSION, "qwen2, untied head", "without TREC", self.pretrain_settings().key()]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]

    def training_key(self, task: str, extra: str = "") -> str:
        spec = [CACHE_VERSION, self.decoder_key(), self.seed, task, self.soft_tokens, self.epochs, self.batch,
                self.lr_llm, self.lr_proj, list(self.caps), self.text_length, self.lr_head, extra]
        return hashlib.sha256(json.dumps(spec, default=str).encode()).hexdigest()[:16]


def quick_config(**kw) -> CollideConfig:
    """CI: smaller subsets, shorter pretraining and grids: a few minutes without a cache."""
    c = CollideConfig(pretrain_steps=400, caps=(500, 150, 300), epochs=3, forget_epochs=2, mixed_test=40,
                      heldout_sentences=200)
    c.grids.update({"task_arithmetic": [{"lambda": x} for x in (0.3, 0.7, 1.0)],
                    "ties": [{"density": 0.2, "lambda": x} for x in (0.7, 1.0)], "tall": [0.4, 0.8]})
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def tiny_config(**kw) -> CollideConfig:
    """Tests: a tiny decoder pretrained for a few steps on 2,000 sentences, tiny subsets; checks
    the machinery end to end in seconds, not the claim."""
    c = CollideConfig(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, vocab=400, pretrain_steps=30,
                      pretrain_batch=16, pretrain_sentences=2000, heldout_sentences=64, caps=(160, 40, 48),
                      epochs=2, forget_epochs=1, mixed_test=16, text_length=16, lr_llm=3e-3)
    c.grids.update({"task_arithmetic": [{"lambda": 0.5}, {"lambda": 1.0}], "ties": [{"density": 0.2, "lambda": 1.0}],
                    "tall": [0.4, 1.0]})
    for k, v in kw.items():
        setattr(c, k, v)
    return c


# ---------------------------------------------------------------- the decoder


class DenseForMoeTrainer(nn.Module):
    """moe.train's loop calls `model(**batch, output_router_logits=True)` and adds
    aux_loss_coef × `out.aux_loss`: a dense decoder has no router, so that term is zero."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, output_router_logits=False):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return SimpleNamespace(logits=logits, aux_loss=logits.new_zeros(()))


class TokenizerVocabulary:
    """The tokenizer's own ids, unchanged (moe.Vocabulary's interface): BOS, EOS and UNK are its
    [CLS], [SEP] and [UNK]."""

    def __init__(self, tokenizer):
        self.kept = list(range(len(tokenizer)))
        self.index = {t: t for t in self.kept}
        self.bos, self.eos, self.unk = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id
        self.size = len(self.kept)


@dataclass
class Decoder:
    model: nn.Module                 # Qwen2ForCausalLM (untied output head) or BertLMHeadModel, float32, eval
    vocab: moe.Vocabulary | TokenizerVocabulary
    tokenizer: object                # all-MiniLM-L6-v2's wordpiece tokenizer (ids remapped by vocab)
    heldout: list                    # batches of held-out sentences (perplexity)
    info: dict

    def encode(self, text: str) -> list[int]:
        pieces = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.vocab.index.get(t, self.vocab.unk) for t in pieces]

    def decode(self, ids: list[int]) -> str:
        """The generated ids as text, up to end-of-sequence; ids outside the wordpieces (UNK, BOS)
        are appended as " <unk>"."""
        words = []
        for i in ids:
            if i == self.vocab.eos:
                break
            words.append(self.vocab.kept[i] if i < len(self.vocab.kept) else None)
        text = self.tokenizer.decode([w for w in words if w is not None])
        return text + " <unk>" * sum(w is None for w in words)


def all_answer_words() -> list[str]:
    return [w for words in ANSWERS.values() for w in words]


def build_decoder(cfg: CollideConfig, vocab_size: int, bos: int, eos: int) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=128, tie_word_embeddings=False,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(cfg.pretrain_seed)
    return Qwen2ForCausalLM(config)


def trec_sentences(folder: Path) -> set[str]:
    """Every TREC sentence, normalised as moe.load_sentences compares them."""
    return {" ".join(t.lower().split()) for f in sentconv.TASKS["trec"].files.values()
            for t, _ in sentconv.read_examples(folder / f)}


def minilm_decoder(seed: int) -> Decoder:
    """all-MiniLM-L6-v2 (pip) as a causal decoder: BertLMHeadModel with is_decoder, its pretrained
    layers and word embeddings (the tied output head); the head's transform, which the pip
    weights lack, seeded. No held-out text: its text skill is not measured."""
    from transformers import AutoConfig, BertLMHeadModel

    from . import minilm_path

    path = minilm_path("the demo's decoder")
    tok = mllm.tokenizer()
    config = AutoConfig.from_pretrained(path)
    config.update({"is_decoder": True, "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id,
                   "pad_token_id": tok.pad_token_id, "architectures": ["BertLMHeadModel"]})
    torch.manual_seed(seed)
    model = BertLMHeadModel.from_pretrained(path, config=config, dtype=torch.float32).eval()
    model.generation_config.update(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    return Decoder(model, TokenizerVocabulary(tok), tok, [],
                   {"source": "all-MiniLM-L6-v2 (pip) as BertLMHeadModel (is_decoder); head transform seeded"})


def load_decoder(cfg: CollideConfig, data_root, cache: Path | None, log) -> Decoder:
    """The pretrained decoder: from the cache, or trained now by bench moe's loop. Its training
    and held-out sentences are bench moe's split of the sentconv sentences less every TREC
    sentence (the text task's), so the base never saw the text task's questions. With
    cfg.decoder "minilm": minilm_decoder()."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    if cfg.decoder == "minilm":
        return minilm_decoder(cfg.pretrain_seed)

    settings = cfg.pretrain_settings()
    settings.data_dir = str(data_root) if data_root else None
    sentences, info = moe.load_sentences(settings.data_dir)
    trec = trec_sentences(sentconv.sentconv_dir(settings.data_dir or sentconv.default_data_dir()))
    sentences = [s for s in sentences if " ".join(s.lower().split()) not in trec]
    splits = moe.split_sentences(sentences, settings)
    tok = AutoTokenizer.from_pretrained(moe.default_tokenizer_path())
    pieces = {k: moe.wordpieces(tok, v, settings.max_length) for k, v in splits.items() if v}
    fitted = moe.Vocabulary.fit(pieces["train"], settings.vocab)
    # the answers' and questions' words are always in the vocabulary
    needed = [t for w in all_answer_words() + list(QUESTIONS.values())
              for t in tok(w, add_special_tokens=False)["input_ids"]]
    extra = list(dict.fromkeys(t for t in needed if t not in fitted.index))
    vocab = moe.Vocabulary(fitted.kept + extra)
    seqs = {k: vocab.encode(v) for k, v in pieces.items()}
    heldout = moe.pad_batches(seqs["eval"], 64, vocab.eos)
    info = {"sentences_without_trec": len(sentences), "splits": {k: len(v) for k, v in splits.items()},
            "vocabulary": vocab.size, "trec_sentences_left_out": len(trec), **info}

    folder = cache / f"decoder-{cfg.decoder_key()}" if cache else None
    if folder is not None and (folder / "pretrain.json").is_file():
        meta = json.loads((folder / "pretrain.json").read_text())
        if meta.get("kept_token_ids") != vocab.kept:
            from ..errors import MergeError

            raise MergeError(f"bench mllm: the cached decoder in {folder} was trained with another vocabulary; "
                             "remove that folder or use --no-cache")
        model = Qwen2ForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        training = {**{k: v for k, v in meta.items() if k != "kept_token_ids"}, "cached": True}
    else:
        log(f"pretraining the decoder ({cfg.layers} layers, hidden {cfg.hidden}) on "
            f"{len(splits['train'])} sentconv sentences for {settings.steps} steps ...")
        model = build_decoder(cfg, vocab.size, vocab.bos, vocab.eos)
        training = moe.train(DenseForMoeTrainer(model), seqs["train"], settings, vocab.eos, log)
        model.eval()
        if folder is not None:
            meta = {**training, "kept_token_ids": vocab.kept}

            def fill(tmp: Path) -> None:
                model.save_pretrained(str(tmp))
                (tmp / "pretrain.json").write_text(json.dumps(meta))

            write_cache_entry(folder, fill)
    info["training"] = training
    return Decoder(model, vocab, tok, heldout, info)


# ---------------------------------------------------------------- tasks


def text_task(decoder: Decoder, data_root, seed: int, caps, length: int) -> data.Task:
    """TREC question type as a generative text task: the question's tokens (left-padded to
    `length` with -1) are the input, the answer one of ANSWERS["text"]. TREC's test set is the
    test split; validation is a seeded part of its training file (sentconv.load_task)."""
    folder = sentconv.sentconv_dir(data_root or sentconv.default_data_dir())
    sentconv.check_files(folder, ["trec"])
    td = sentconv.load_task(folder, "trec", seed)
    splits = []
    for part, cap in zip(("train", "val", "test"), caps):
        rows = sentconv.subsample(getattr(td, part), cap, seed, f"collide/{part}")
        x = torch.full((len(rows), length), -1, dtype=torch.long)
        for i, (text, _) in enumerate(rows):
            ids = decoder.encode(text)[:length]
            x[i, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
        splits.append(data.Split(x, torch.tensor([y for _, y in rows], dtype=torch.long)))
    return data.Task(TEXT_TASK, "text", QUESTIONS[TEXT_TASK], list(ANSWERS[TEXT_TASK]), *splits,
                     note=f"TREC question type (sentconv), the question as tokens (≤ {length}); test = TREC's test, "
                          "validation seeded from its training file",
                     meta={"provenance": td.provenance})


def build_tasks(cfg: CollideConfig, decoder: Decoder, data_root) -> dict[str, data.Task]:
    """The small setting's modality tasks (mllm.build_tasks) and the text task, in cfg.tasks's
    order, each with this setting's question and answer words."""
    from dataclasses import replace

    modal = mllm.build_tasks(replace(cfg, tasks=tuple(t for t in cfg.tasks if t != TEXT_TASK)), data_root, False,
                             print)
    tasks = {n: text_task(decoder, data_root, cfg.seed, cfg.caps, cfg.text_length) if n == TEXT_TASK else modal[n]
             for n in cfg.tasks}
    if cfg.forgetting and "image" in tasks:
        tasks["image-parity"] = data.mnist_parity_task(cfg.seed, cfg.caps)
    if cfg.decoder == "pretrained":   # words the pretraining saw often; MiniLM knows the small setting's
        for t in tasks.values():
            t.question, t.answers = QUESTIONS[t.name], list(ANSWERS[t.name])
    return tasks


# ---------------------------------------------------------------- prompts, training, decoding


class Prompts:
    """[BOS] [each block] [question] → the answer's tokens, then EOS. A block is a modality's
    soft tokens (projector output) or the text task's question tokens. Token groups: 0 for
    BOS and the question, 1 + j for block j's tokens."""

    def __init__(self, decoder: Decoder, tasks: dict[str, data.Task]):
        self.decoder = decoder
        self.bos, self.eos = decoder.vocab.bos, decoder.vocab.eos
        self.question = {n: decoder.encode(t.question) for n, t in tasks.items()}
        self.answers = {n: [decoder.encode(a) + [self.eos] for a in t.answers] for n, t in tasks.items()}
        self.tasks = tasks

    def answer_table(self, task: str) -> torch.Tensor:
        """[classes, longest answer] token ids, -100 after each answer's EOS."""
        ans = self.answers[task]
        width = max(len(a) for a in ans)
        return torch.tensor([a + [-100] * (width - len(a)) for a in ans])

    def block(self, emb: nn.Embedding, task: str, x: torch.Tensor, projector: nn.Module | None):
        if self.tasks[task].modality == "text":
            return emb(x.clamp(min=0)), (x >= 0).long()
        soft = projector(x)
        return soft, torch.ones(soft.shape[:2], dtype=torch.long)

    def build(self, emb: nn.Embedding, blocks: list, question: list[int]):
        """inputs_embeds, attention mask and groups of a batch of prompts."""
        b = blocks[0][0].shape[0]
        ids = torch.tensor([self.bos] + question)
        text = emb(ids).unsqueeze(0).expand(b, -1, -1)
        parts, masks, groups = [text[:, :1]], [torch.ones(b, 1, dtype=torch.long)], [0]
        for j, (e, m) in enumerate(blocks):
            parts.append(e)
            masks.append(m)
            groups += [1 + j] * e.shape[1]
        parts.append(text[:, 1:])
        masks.append(torch.ones(b, len(question), dtype=torch.long))
        groups += [0] * len(question)
        return torch.cat(parts, 1), torch.cat(masks, 1), torch.tensor(groups).unsqueeze(0).expand(b, -1)


@torch.no_grad()
def greedy(llm: nn.Module, embeds, mask, steps: int, prefill=contextlib.nullcontext,
           decode=contextlib.nullcontext) -> torch.Tensor:
    """Greedy decoding of `steps` tokens after the prompt, with the KV cache: the prompt runs
    inside `prefill()` (a routed context for a composed model), each new token inside
    `decode()`. Returns [batch, steps] token ids."""
    emb = llm.get_input_embeddings()
    with prefill():   # the head on the last position only: a vocabulary-wide matmul per token is most of the work
        out = llm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(steps - 1):
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
        with decode():
            out = llm(inputs_embeds=emb(tokens[-1])[:, None], attention_mask=mask,
                      cache=out.cache, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1)


def exact(generated: torch.Tensor, table: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[batch] bool: the generated tokens are the answer's tokens and its EOS (what follows the
    EOS is not looked at)."""
    want = table[y]
    return ((generated[:, :want.shape[1]] == want) | (want == -100)).all(1)


def finetune(base: nn.Module, prompts: Prompts, task: data.Task, cfg: CollideConfig, *, init_llm=None,
             init_proj=None, epochs=None, progress=None) -> tuple[dict, dict, dict]:
    """The decoder (less its frozen input embeddings, and its output head unless lr_head > 0) and
    the task's projector, trained on the answer tokens (teacher forcing, cross-entropy over the
    whole vocabulary). Weight decay 0, so parameters the task never moves keep their base values."""
    torch.manual_seed(cfg.seed + sum(map(ord, task.name)))
    llm = copy.deepcopy(base)
    if init_llm is not None:
        llm.load_state_dict(init_llm, strict=False)
    emb = llm.get_input_embeddings()
    emb.weight.requires_grad_(False)
    head = list(llm.get_output_embeddings().parameters())   # its weight (and a bias tied to the head's)
    for p in head:
        p.requires_grad_(cfg.lr_head > 0)
    proj = None
    if task.modality != "text":
        proj = mllm.Projector(task.train.x.shape[1], llm.config.hidden_size, cfg.soft_tokens)
        if init_proj is not None:
            proj.load_state_dict(init_proj)
    llm.train()
    in_head = {id(p) for p in head}
    groups = [{"params": [p for p in llm.parameters() if p.requires_grad and id(p) not in in_head], "lr": cfg.lr_llm}]
    if cfg.lr_head > 0:
        groups.append({"params": head, "lr": cfg.lr_head})
    if proj is not None:
        groups.append({"params": list(proj.parameters()), "lr": cfg.lr_proj})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    table = prompts.answer_table(task.name)

    def batch_loss(idx):
        x, mask, _ = prompts.build(emb, [prompts.block(emb, task.name, task.train.x[idx], proj)],
                                   prompts.question[task.name])
        labels = table[task.train.y[idx]]
        answer_in = emb(labels[:, :-1].clamp(min=0))
        x = torch.cat([x, answer_in], 1)
        mask = torch.cat([mask, torch.ones(answer_in.shape[:2], dtype=torch.long)], 1)
        logits = llm(inputs_embeds=x, attention_mask=mask, logits_to_keep=labels.shape[1]).logits
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)

    log = mllm.train_epochs(opt, len(task.train.y), cfg.batch, epochs or cfg.epochs, cfg.seed, batch_loss, progress)
    llm.eval()
    proj_state = {} if proj is None else {k: v.detach().clone() for k, v in proj.state_dict().items()}
    return mllm.llm_state(llm), proj_state, log


# ---------------------------------------------------------------- evaluation


class Evaluator:
    """Generated-answer accuracy of a decoder (plain weights, or a composed model routed per
    token group) with the modality projectors; the interface mllm.select/forgetting use."""

    def __init__(self, decoder: Decoder, prompts: Prompts, projectors: dict[str, dict], batch: int = 200):
        self.decoder, self.prompts, self.batch = decoder, prompts, batch
        self.work = copy.deepcopy(decoder.model).eval()
        self.tasks = prompts.tasks
        self.projs = mllm.load_projectors(projectors, self.tasks, decoder.model.config.hidden_size)

    def load(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        self.work.load_state_dict(weights, strict=False)
        return self.work

    @torch.no_grad()
    def accuracy(self, weights, task: str, split: str = "test", samples: list | None = None) -> float:
        """Exact-answer accuracy; `samples` (a list) receives the first few inputs' expected and
        generated answers as text."""
        s = getattr(self.tasks[task], split)
        llm = self.load(weights)
        emb = llm.get_input_embeddings()
        table = self.prompts.answer_table(task)
        correct = 0
        for i in range(0, len(s.y), self.batch):
            block = self.prompts.block(emb, task, s.x[i:i + self.batch], self.projs.get(task))
            x, mask, _ = self.prompts.build(emb, [block], self.prompts.question[task])
            gen = greedy(llm, x, mask, table.shape[1])
            y = s.y[i:i + self.batch]
            correct += int(exact(gen, table, y).sum())
            if samples is not None and i == 0:
                samples += [{"expected": self.tasks[task].answers[int(y[j])],
                             "generated": self.decoder.decode(gen[j].tolist())}
                            for j in range(min(len(y), self.samples_per_task))]
        return correct / len(s.y)

    samples_per_task = 4

    asked_first: bool | None = None   # where mixed inputs put the asked block (None: see mixed_batches)

    def mixed_batches(self, asked: str, other: str, n: int, seed: int, emb: nn.Embedding):
        """Two tasks' inputs in one prompt, a question about `asked`: yields (blocks, which task
        each block is, labels). The asked block comes first (self.asked_first True), second
        (False), or by default first in even batches and second in odd ones, so with n ≤ batch
        inputs always first."""
        ta, tb = self.tasks[asked], self.tasks[other]
        for ia, ib, first in mllm.mixed_slices(len(ta.test.y), len(tb.test.y), n, seed, self.batch,
                                               self.asked_first):
            a = self.prompts.block(emb, asked, ta.test.x[ia], self.projs.get(asked))
            b = self.prompts.block(emb, other, tb.test.x[ib], self.projs.get(other))
            blocks, which = ([a, b], [asked, other]) if first else ([b, a], [other, asked])
            yield blocks, which, ta.test.y[ia]

    @torch.no_grad()
    def mixed_accuracy(self, asked: str, other: str, n: int, seed: int, weights=None, composed=None,
                       text_mask: str = "all", text_tasks: str = "present") -> float:
        """Mixed inputs on one plain model (`weights`), or on a composed model served by
        modalmerge.runtime: the prompt's prefill inside route() (each block's tokens on its
        task's weights, BOS and question on the text weights), the answer decoded on the text
        weights: m̄ over all tasks, or with text_mask="present" over the two tasks present
        (text_tasks="present") or over the asked task alone (text_tasks="asked": the user says
        which modality the question is about)."""
        from ..runtime import TEXT

        llm = self.load(weights) if composed is None else composed.llm
        emb = llm.get_input_embeddings()
        table = self.prompts.answer_table(asked)
        correct = total = 0
        for blocks, which, y in self.mixed_batches(asked, other, n, seed, emb):
            x, mask, groups = self.prompts.build(emb, blocks, self.prompts.question[asked])
            prefill = decode = contextlib.nullcontext
            if composed is not None:
                ids = torch.tensor([TEXT] + [composed.task_index(t) for t in which])
                group_ids = ids[groups]
                present = which if text_tasks == "present" else [asked]
                prefill = lambda: composed.route(group_ids, text_mask=text_mask, present=present)  # noqa: E731
                if text_mask == "present":
                    step_ids = torch.full((len(y), 1), TEXT)
                    decode = lambda: composed.route(step_ids, text_mask="present", present=present)  # noqa: E731
            gen = greedy(llm, x, mask, table.shape[1], prefill, decode)
            correct += int(exact(gen, table, y).sum())
            total += len(y)
        return correct / total

    @torch.no_grad()
    def perplexity(self, weights) -> float | None:
        """Held-out perplexity on sentconv sentences the decoder never trained on (its text skill);
        None for a decoder with no held-out text (MiniLM's)."""
        if not self.decoder.heldout:
            return None
        llm = self.load(weights)
        return moe.perplexity((llm(**b).logits for b in self.decoder.heldout), self.decoder.heldout)


# ---------------------------------------------------------------- one seed


def run_seed(cfg: CollideConfig, *, cache: Path | None, data_root=None, log=print, progress=True,
             serve=None) -> dict:
    """One seed: fine-tune (cached), merge, evaluate. Returns the result dict. `serve(method,
    composed, evaluator)` is called with each decoupled merge's composed model (loaded by
    modalmerge.runtime from its folder, which is removed at the end) after its row."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    mllm.quiet_transformers()
    torch.manual_seed(cfg.seed)
    data_root = data.data_dir(data_root)
    decoder = load_decoder(cfg, data_root, cache, log)
    base_llm = decoder.model
    base = mllm.llm_state(base_llm)
    tasks = build_tasks(cfg, decoder, data_root)
    prompts = Prompts(decoder, tasks)
    names = [t for t in cfg.tasks if t in tasks]

    sizes = {n: cfg.epochs * -(-len(tasks[n].train.y) // cfg.batch) for n in names}
    total = sum(sizes.values()) + (cfg.forget_epochs * -(-len(tasks["image-parity"].train.y) // cfg.batch)
                                   if "image-parity" in tasks else 0)
    log(f"seed {cfg.seed}: fine-tuning {len(names) + ('image-parity' in tasks)} decoders ({total} steps"
        + (f"; kept in {cache})" if cache else ")") + " ...")
    bar = tqdm(total=total, desc="fine-tuning", unit="step", disable=not progress, leave=False)
    llms, projs, train_logs, key_of = {}, {}, {}, {}
    for n in names:
        key_of[n] = cfg.training_key(n)
        llms[n], projs[n], train_logs[n] = mllm.cached_finetune(
            cache / "finetuned" if cache else None, key_of[n],
            lambda n=n: finetune(base_llm, prompts, tasks[n], cfg, progress=bar.update))
        if train_logs[n].get("cached"):
            bar.update(sizes[n])
    if "image-parity" in tasks:
        key = cfg.training_key("image-parity", extra=f"after:{key_of['image']}:{cfg.forget_epochs}")
        new = "image-parity"
        llms[new], projs[new], train_logs[new] = mllm.cached_finetune(
            cache / "finetuned" if cache else None, key,
            lambda: finetune(base_llm, prompts, tasks[new], cfg, init_llm=llms["image"], init_proj=projs["image"],
                             epochs=cfg.forget_epochs, progress=bar.update))
        if train_logs[new].get("cached"):
            bar.update(total - sum(sizes.values()))
    bar.close()

    ev = Evaluator(decoder, prompts, projs)
    ev.samples_per_task = cfg.samples
    scratch = tempfile.TemporaryDirectory(prefix="modalmerge-bench-collide-")
    # the tokenizer goes with the folders only where the decoder's ids are its own (not remapped)
    own_ids = isinstance(decoder.vocab, TokenizerVocabulary)
    composer = mllm.Composer(base_llm, {n: llms[n] for n in names}, Path(scratch.name),
                             decoder.tokenizer if own_ids else None)
    mib = lambda b: b / 2 ** 20  # noqa: E731
    one_model = composer.model_bytes["base"]
    pairs = [(a, b) for a in names for b in names if a != b]
    result: dict = {
        "setting": "collide", "seed": cfg.seed,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "decoder": {"class": type(base_llm).__name__, "parameters": sum(v.numel() for v in base.values()),
                    **decoder.info},
        "tasks": {n: {"answers": tasks[n].answers, "question": tasks[n].question, "note": tasks[n].note,
                      "sizes": [len(tasks[n].train.y), len(tasks[n].val.y), len(tasks[n].test.y)]} for n in tasks},
        "training": train_logs, "rows": [], "mixed_pairs": [f"{a}+{b}" for a, b in pairs], "tasks_run": names,
        "routed": "modalmerge.runtime (load_composed + route for the prefill; the answer decoded on the text "
                  "weights with the KV cache) on folders written by modalmerge.merge"}

    def evaluate_row(label, kind, weights_of, text_weights, mixed_fn, extra=None):
        row = {"row": label, "kind": kind, "acc": {}, "mask_density": {}, "samples": {}, **(extra or {})}
        for n in names:
            row["samples"][n] = []
            row["acc"][n] = ev.accuracy(weights_of(n), n, samples=row["samples"][n])
        row["perplexity"] = ev.perplexity(text_weights) if text_weights is not None else None
        if mixed_fn is not None and pairs:
            row["mixed"] = {f"{a}+{b}": mixed_fn(a, b) for a, b in pairs}
            ev.asked_first = False   # the same inputs with the asked block second
            try:
                row["mixed_second"] = {f"{a}+{b}": mixed_fn(a, b) for a, b in pairs}
            finally:
                ev.asked_first = None
        result["rows"].append(row)
        return row

    mixed_n = cfg.mixed_test
    steps = ["individual", "base"] + (["trim"] if cfg.trim_bounds else []) + list(cfg.methods) + \
        (["forgetting"] if "image-parity" in tasks else [])
    bar = tqdm(steps, desc="merge + evaluate", disable=not progress, leave=False)
    for step in bar:
        bar.set_postfix_str(step)
        if not progress:
            log(f"seed {cfg.seed}: {step} ({time.perf_counter() - t_start:.0f} s)")
        if step in ("individual", "base"):
            mllm.reference_rows(step, evaluate_row, ev, cfg, names, llms, base, composer)
        elif step == "trim":
            for k in cfg.trim_bounds:
                trimmed = {n: mllm.run_merge("ties", {"density": k, "lambda": 1.0}, {n: llms[n]}, base, cfg.seed)
                           for n in names}
                evaluate_row(f"Own task vector TIES-trimmed to k {k} (nothing merged)", "bound",
                             lambda t: trimmed[t], None, None)
        elif step == "forgetting":
            result["forgetting"] = mllm.forgetting(cfg, ev, base, llms, projs, tasks, log)
        else:
            models = {n: llms[n] for n in names}
            t0 = time.perf_counter()
            merged, chosen, trials = mllm.select(step, cfg, models, base, lambda w, t: ev.accuracy(w, t, "val"),
                                                 {n: n for n in names})
            extra = {"params": chosen, "trials": trials, "select_seconds": time.perf_counter() - t0}
            if isinstance(merged, mllm.Decoupled):
                composed = composer.compose(step, chosen, names, cfg.seed)
                storage = composer.storage(step, names)
                row = evaluate_row(
                    mllm.LABELS[step], "decoupled", merged.task, merged.text(),
                    lambda a, b: ev.mixed_accuracy(a, b, mixed_n, cfg.seed, composed=composed),
                    {**extra, "source": merged.source, "storage_mib": mib(storage["composed"]), "storage": storage})
                row["mask_density"] = {n: merged.density(n) for n in names}
                row["reconstruction"] = reconstruction(merged, models, base, names)
                if step == "mmer":
                    row["mixed_present"] = {
                        f"{a}+{b}": ev.mixed_accuracy(a, b, mixed_n, cfg.seed, composed=composed, text_mask="present")
                        for a, b in pairs}
                    row["mixed_text_asked"] = {
                        f"{a}+{b}": ev.mixed_accuracy(a, b, mixed_n, cfg.seed, composed=composed, text_mask="present",
                                                      text_tasks="asked")
                        for a, b in pairs}
                    row["extracted_equal_masked"] = extracted_equal_masked(composer.root / f"composed-{step}",
                                                                           merged, names)
                if serve is not None:
                    serve(step, composed, ev)
            else:
                evaluate_row(mllm.LABELS[step], "merged", lambda t: merged, merged,
                             lambda a, b: ev.mixed_accuracy(a, b, mixed_n, cfg.seed, weights=merged),
                             {**extra, "storage_mib": mib(one_model)})
    bar.close()
    scratch.cleanup()

    ref = next(r for r in result["rows"] if r["kind"] == "reference")
    for r in result["rows"]:
        r["retention"] = {n: r["acc"][n] / ref["acc"][n] if ref["acc"][n] else None for n in names}
        if r.get("mixed"):
            r["mixed_mean"] = float(np.mean(list(r["mixed"].values())))
        for key in ("mixed_second", "mixed_present", "mixed_text_asked"):
            if r.get(key):
                r[f"{key}_mean"] = float(np.mean(list(r[key].values())))
    result["test_sizes"] = {n: len(tasks[n].test.y) for n in names}
    result["seconds"] = time.perf_counter() - t_start
    return result


def reconstruction(merged: "mllm.Decoupled", llms: dict, base: dict, names: list[str]) -> dict[str, dict]:
    """Per task, how far its masked reconstruction θ_0 + m_t ⊙ τ* is from its own fine-tune θ_t:
    the relative error ‖rec − θ_t‖ / ‖τ_t‖; the scale of the reconstructed delta along τ_t,
    ⟨rec − θ_0, τ_t⟩ / ‖τ_t‖² (1: as long as the task's own); and the share of τ_t's L1 mass on
    entries the reconstruction leaves at the base value (not kept by τ*'s trim, or masked off)."""
    out = {}
    for n in names:
        rec = merged.task(n)
        err = tau_sq = along = lost = total = 0.0
        for k in merged.shared:
            tau = llms[n][k].float() - base[k].float()
            delta = rec[k] - base[k]
            err += float((rec[k] - llms[n][k].float()).pow(2).sum())
            tau_sq += float(tau.pow(2).sum())
            along += float((delta * tau).sum())
            lost += float(tau.abs()[delta == 0].sum())
            total += float(tau.abs().sum())
        out[n] = {"relative_error": (err / tau_sq) ** 0.5 if tau_sq else 0.0,
                  "scale_along_own": along / tau_sq if tau_sq else 0.0,
                  "mass_left_at_base": lost / total if total else 0.0}
    return out


def extracted_equal_masked(folder: Path, merged: "mllm.Decoupled", names: list[str]) -> dict[str, bool]:
    """Per task: the standalone model `modalmerge extract` writes from the composed folder equals
    θ_0 + m_t ⊙ τ* rebuilt from the merge's own masks and τ*, tensor by tensor (to 1e-6)."""
    from safetensors.torch import load_file

    from ..checkpoint.decoupled import extract_task

    out = {}
    with tempfile.TemporaryDirectory(prefix="modalmerge-extract-") as tmp:
        for n in names:
            got = {}
            for f in sorted(extract_task(folder, n, Path(tmp) / n).glob("*.safetensors")):
                got.update(load_file(f))
            want = merged.task(n)
            out[n] = set(want) <= set(got) and all(
                torch.allclose(got[k].float(), want[k], rtol=0, atol=1e-6) for k in want)
    return out


# ---------------------------------------------------------------- several seeds


def run(cfg: CollideConfig, seeds: list[int], *, cache: Path | None, data_root=None, out: Path | None = None,
        log=print, progress=True, serve=None) -> dict:
    """Every seed, then the summary: mean and min–max of each row's numbers over the seeds
    (`serve`: run_seed's)."""
    t0 = time.perf_counter()
    per_seed = []
    for s in seeds:
        c = copy.deepcopy(cfg)
        c.seed = s
        per_seed.append(run_seed(c, cache=cache, data_root=data_root, log=log, progress=progress, serve=serve))
        if out is not None:   # each seed's numbers as soon as they exist
            out.mkdir(parents=True, exist_ok=True)
            (out / f"seed-{s}.json").write_text(json.dumps(per_seed[-1], indent=2, default=str))
    result = {"setting": "collide", "seeds": list(seeds), "per_seed": per_seed, "summary": summarise(per_seed),
              "seconds": time.perf_counter() - t0}
    if out is not None:
        write_outputs(result, out)
    return result


def spread(values: list[float | None]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": float(np.mean(vals)), "min": float(min(vals)), "max": float(max(vals)),
            "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, "n": len(vals)}


def over_tasks(fn, per_task: dict, names: list[str]) -> float | None:
    """fn over the tasks' values; None when a task has none (its own model scored 0)."""
    vals = [per_task[n] for n in names]
    return None if any(v is None for v in vals) else float(fn(vals))


def summarise(per_seed: list[dict]) -> dict:
    """Rows by label: each number's mean, min, max, std (ddof 1) over the seeds; plus the
    single-seed noise (the binomial standard error of one seed's test accuracy)."""
    names = per_seed[0]["tasks_run"]
    labels = [r["row"] for r in per_seed[0]["rows"]]
    rows = []
    for label in labels:
        runs = [next(r for r in res["rows"] if r["row"] == label) for res in per_seed]
        row = {"row": label, "kind": runs[0]["kind"],
               "acc": {n: spread([r["acc"][n] for r in runs]) for n in names},
               "retention": {n: spread([r["retention"][n] for r in runs]) for n in names},
               "mean_retention": spread([over_tasks(np.mean, r["retention"], names) for r in runs]),
               "min_retention": spread([over_tasks(min, r["retention"], names) for r in runs]),
               "mixed": spread([r.get("mixed_mean") for r in runs]),
               "mixed_second": spread([r.get("mixed_second_mean") for r in runs]),
               "mixed_present": spread([r.get("mixed_present_mean") for r in runs]),
               "mixed_text_asked": spread([r.get("mixed_text_asked_mean") for r in runs]),
               "perplexity": spread([r.get("perplexity") for r in runs]),
               "mask_density": {n: spread([r["mask_density"].get(n) for r in runs]) for n in names},
               "params": [r.get("params") for r in runs]}
        rows.append(row)
    out = {"tasks": names, "rows": rows}
    if all("forgetting" in res for res in per_seed):
        f_rows = []
        for label in [r["row"] for r in per_seed[0]["forgetting"]["rows"]]:
            runs = [next(r for r in res["forgetting"]["rows"] if r["row"] == label) for res in per_seed]
            f_rows.append({"row": label, **{k: spread([r[k] for r in runs]) for k in
                                            ("old_acc", "old_retention", "new_acc", "new_retention")},
                           "params": [r.get("params") for r in runs]})
        out["forgetting"] = {"old_task": per_seed[0]["forgetting"]["old_task"],
                             "new_task": per_seed[0]["forgetting"]["new_task"], "rows": f_rows}
    ref = next(r for r in rows if r["kind"] == "reference")
    out["single_seed_noise"] = {
        n: float(np.sqrt(ref["acc"][n]["mean"] * (1 - ref["acc"][n]["mean"]) / per_seed[0]["test_sizes"][n]))
        for n in names}
    return out


# ---------------------------------------------------------------- reports


def cell(s: dict | None, scale: float = 100, digits: int = 1) -> str:
    """mean (min–max) over the seeds."""
    if s is None:
        return "–"
    f = f"{{:.{digits}f}}"
    if s["n"] == 1:
        return f.format(scale * s["mean"])
    return f"{f.format(scale * s['mean'])} ({f.format(scale * s['min'])}–{f.format(scale * s['max'])})"


def markdown(result: dict) -> str:
    summ = result["summary"]
    names = summ["tasks"]
    seeds = result["seeds"]
    lines = [f"Seeds {', '.join(map(str, seeds))}: each cell is the mean over the seeds (min–max in brackets)."
             if len(seeds) > 1 else f"Seed {seeds[0]}.", "",
             "| Model | " + " | ".join(f"{n} acc" for n in names) + " | mean ret. | min ret. | mixed acc | "
             "held-out ppl | mask density (" + "/".join(names) + ") |",
             "|" + "---|" * (len(names) + 6)]
    for r in summ["rows"]:
        dens = "/".join(cell(r["mask_density"][n], digits=0).split(" ")[0] for n in names) \
            if any(r["mask_density"][n] for n in names) else "–"
        mixed = cell(r["mixed"])
        if r["mixed_second"]:
            mixed += f"; asked second: {cell(r['mixed_second'])}"
        if r["mixed_present"]:
            mixed += f"; present m̄: {cell(r['mixed_present'])}"
        if r["mixed_text_asked"]:
            mixed += f"; text on the asked task's mask: {cell(r['mixed_text_asked'])}"
        lines.append(f"| {r['row']} | " + " | ".join(cell(r["acc"][n]) for n in names) +
                     f" | {cell(r['mean_retention'])} | {cell(r['min_retention'])} | {mixed} | "
                     f"{cell(r['perplexity'], scale=1, digits=2)} | {dens} |")
    lines += ["", "Retention (accuracy / the task's own model's), per task:", "",
              "| Model | " + " | ".join(f"{n} ret." for n in names) + " |", "|" + "---|" * (len(names) + 1)]
    for r in summ["rows"]:
        if r["kind"] in ("base", "bound", "merged", "decoupled"):
            lines.append(f"| {r['row']} | " + " | ".join(cell(r["retention"][n]) for n in names) + " |")
    noise = ", ".join(f"{n} ±{100 * v:.1f}" for n, v in summ["single_seed_noise"].items())
    lines += ["", f"Single-seed noise: the binomial standard error of one seed's test accuracy at the individual "
                  f"models' accuracy, in points: {noise}."]
    f = summ.get("forgetting")
    if f:
        lines += ["", f"Forgetting: old task `{f['old_task']}`, new task `{f['new_task']}`", "",
                  "| Model | old acc | old ret. | new acc | new ret. |", "|---|---|---|---|---|"]
        for r in f["rows"]:
            lines.append(f"| {r['row']} | {cell(r['old_acc'])} | {cell(r['old_retention'])} | {cell(r['new_acc'])} | "
                         f"{cell(r['new_retention'])} |")
    first = result["per_seed"][0]
    ex = next((r for r in first["rows"] if r["row"] == "MMER"), first["rows"][0])
    lines += ["", f"Generated answers (seed {first['seed']}, {ex['row']}, first test inputs): " + "; ".join(
        f"{n}: " + ", ".join(f"{s['expected']!r}→{s['generated']!r}" for s in ex["samples"][n][:3]) for n in names)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Grouped bars: per task and for mixed inputs, each merge's mean retention over the seeds,
    with min–max error bars."""
    summ = result["summary"]
    names = summ["tasks"]
    rows = [r for r in summ["rows"] if r["kind"] in ("base", "merged", "decoupled")]
    ref = next(r for r in summ["rows"] if r["kind"] == "reference")
    groups = [(f"{n}\n(vs its own model)", [r["retention"][n] for r in rows]) for n in names]
    if ref["mixed"] and ref["mixed"]["mean"] > 0:
        m = ref["mixed"]["mean"]
        groups.append(("mixed inputs\n(vs the asked\nmodality's model)",
                       [None if r["mixed"] is None else {k: r["mixed"][k] / m for k in ("mean", "min", "max")}
                        for r in rows]))
    mllm.retention_bars(path, [r["row"] for r in rows], groups,
                        f"mini-MLLM merge, generative decoder, {len(names)} tasks: retention "
                        + (f"(mean, min–max over {len(result['seeds'])} seeds)" if len(result["seeds"]) > 1
                           else f"(seed {result['seeds'][0]})"))


def write_outputs(result: dict, out: Path) -> dict[str, Path]:
    return mllm.write_outputs(result, out, "mllm-collide", markdown, plot)


def default_cache() -> Path:
    return cache_dir("bench-mllm-collide")


def reconstruction_report(folder: Path, cache: Path, data_root=None) -> dict:
    """For a finished run (folder/mllm-collide.json): each decoupled merge's reconstruction of
    each task (reconstruction()), rebuilt from the cached fine-tunes with the parameters the run
    chose, and MMER at spec 7's default k 0.2 beside it. Written to folder/reconstruction.json."""
    result = json.loads((folder / "mllm-collide.json").read_text())
    out = {}
    for run in result["per_seed"]:
        cfg = CollideConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in run["config"].items()})
        decoder = load_decoder(cfg, data.data_dir(data_root), cache, print)
        base = mllm.llm_state(decoder.model)
        names = run["tasks_run"]

        def missing(n=None):
            from ..errors import MergeError

            raise MergeError(f"the fine-tunes of seed {cfg.seed} are not in {cache}; run the benchmark first")

        llms = {n: mllm.cached_finetune(cache / "finetuned", cfg.training_key(n), missing)[0] for n in names}
        rows = {r["row"]: r for r in run["rows"]}
        per = {}
        for m in ("tall", "emr", "mmer"):
            chosen = rows[mllm.LABELS[m]]["params"]
            params = [chosen["lambda"][n] for n in names] if m == "tall" else chosen
            per[m] = reconstruction(mllm.run_merge(m, params, llms, base, cfg.seed), llms, base, names)
        per["mmer, k 0.2"] = reconstruction(mllm.run_merge("mmer", {}, llms, base, cfg.seed), llms, base, names)
        out[str(cfg.seed)] = per
    (folder / "reconstruction.json").write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="each decoupled merge's reconstruction of each task, for a finished "
                                             "`bench mllm --setting collide` run")
    ap.add_argument("folder", type=Path)
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--data-dir")
    a = ap.parse_args()
    mllm.quiet_transformers()
    torch.set_num_threads(1)
    for seed, per in reconstruction_report(a.folder, a.cache, a.data_dir).items():
        for m, tasks in per.items():
            print(f"seed {seed} {m}: " + ", ".join(f"{n} error {v['relative_error']:.2f}, scale "
                                                   f"{v['scale_along_own']:.2f}, left at base "
                                                   f"{100 * v['mass_left_at_base']:.0f}%" for n, v in tasks.items()))
