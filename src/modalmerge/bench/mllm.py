"""`modalmerge bench mllm`: MMER's setting at a size this machine can train.

Each "MLLM" = a FROZEN modality encoder (mllm_data.py) + a trainable projector that turns its
features into a few soft tokens + the language model, fine-tuned from one shared base. The
language model is the real pretrained all-MiniLM-L6-v2 (a BERT encoder): it reads
[CLS] [soft tokens] [question] [SEP] through `inputs_embeds` and answers from the [CLS] output,
scored against its own tied word embeddings, so every modality answers in one output space
(training: softmax over the answer words and 1,000 other vocabulary words; accuracy: argmax
over the task's answer words). The word embeddings are frozen; the transformer layers are tuned.

Only the language model is merged; each modality keeps its encoder and projector. Rows: each
individual model, the base, task arithmetic (NaiveMC), TIES, DARE-TIES, TALL masks, EMR, MMER.
Also: the base's own text skill (a fixed SST-2 probe on base features) on each merged model's
text path, mixed-modality inputs (two modalities, a question about one), and forgetting (one
modality's model fine-tuned further on a new task, then re-merged with the old one).
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import minilm_path
from . import mllm_data as data
from .runtime_overhead import median_times

DISTRACTORS = 1000     # other vocabulary words each training answer competes with
SCALE = 20.0           # cosine-logit temperature of the answer scoring (fixed, not trained)
CACHE_VERSION = 2      # bump when training changes, so old cached models are not reused


# ---------------------------------------------------------------- configuration


@dataclass
class Config:
    model: str = "minilm"                  # "minilm" (the real pretrained one) or "tiny" (random, tests)
    seed: int = 0
    tasks: tuple = ("image", "speech", "table")
    soft_tokens: int = 4
    epochs: int = 2
    batch: int = 32
    lr_llm: float = 2e-4
    lr_proj: float = 3e-3
    # train / val / test examples per task (None: all); sized for a shared 2-core machine
    caps: tuple = (1500, 300, 600)
    forget_epochs: int = 2
    sst_train: int = 2000
    sst_test: int = 1000
    mixed_test: int = 200                  # mixed inputs per ordered pair of modalities
    methods: tuple = ("task_arithmetic", "ties", "dare_ties", "tall", "emr", "mmer")
    grids: dict = field(default_factory=lambda: {
        "task_arithmetic": [{"lambda": x} for x in (0.3, 0.5, 0.7, 1.0)],
        "ties": [{"density": 0.2, "lambda": x} for x in (0.7, 1.0, 1.5)],
        "dare_ties": [{"density": 0.5, "lambda": x} for x in (0.7, 1.0, 1.5)],
        "tall": [0.2, 0.3, 0.4, 0.5, 0.6],   # λ_t per task, each chosen on its own validation split
        "emr": [{}],
        "mmer": [{}],                        # spec 7 defaults: TIES k 0.2, λ 1, mask λ_i 1 (no tuning)
    })
    forgetting: bool = True
    cross_rows: bool = True                # each fine-tune scored on every modality ("Individual: x" rows)
    runtime_cost: bool = True              # time the routed runtime against the plain model

    def training_key(self, task: str, extra: str = "") -> str:
        fields = [CACHE_VERSION, self.model, self.seed, task, self.soft_tokens, self.epochs, self.batch,
                  self.lr_llm, self.lr_proj, list(self.caps), extra]
        return hashlib.sha256(json.dumps(fields, default=str).encode()).hexdigest()[:16]


def quick_config(**kw) -> Config:
    """CI: real MiniLM, small subsets, two epochs, short grids: a few minutes without a cache."""
    c = Config(caps=(500, 150, 300), epochs=2, forget_epochs=2, sst_train=500, sst_test=300, mixed_test=60)
    c.grids.update({"task_arithmetic": [{"lambda": x} for x in (0.3, 0.7, 1.0)],
                    "ties": [{"density": 0.2, "lambda": x} for x in (0.7, 1.0)],
                    "dare_ties": [{"density": 0.5, "lambda": 1.0}],
                    "tall": [0.2, 0.4, 0.6]})
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def tiny_config(**kw) -> Config:
    """Tests: a tiny random BERT, tiny subsets, one epoch; checks the machinery, not the claim."""
    c = Config(model="tiny", caps=(300, 60, 100), epochs=2, forget_epochs=1, sst_train=150, sst_test=100,
               mixed_test=60, lr_llm=1e-3, lr_proj=3e-3, batch=32)
    c.grids.update({"task_arithmetic": [{"lambda": 0.5}, {"lambda": 1.0}], "ties": [{"density": 0.2, "lambda": 1.0}],
                    "dare_ties": [{"density": 0.5, "lambda": 1.0}], "tall": [0.4, 0.6]})
    for k, v in kw.items():
        setattr(c, k, v)
    return c


# ---------------------------------------------------------------- language model and projector


def quiet_transformers() -> None:
    """transformers' own progress bars ("Loading weights", "Writing model shards") and logs would
    overwrite the benchmark's bar: silence them (call before any model is loaded or saved)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path("bench mllm"))


def load_llm(cfg: Config) -> nn.Module:
    """The base language model: the real all-MiniLM-L6-v2 (offline, from pip), or a tiny random BERT."""
    from transformers import AutoModel, BertConfig, BertModel

    if cfg.model == "minilm":
        m = AutoModel.from_pretrained(minilm_path("bench mllm"))
    else:
        torch.manual_seed(cfg.seed + 17)
        m = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=128), add_pooling_layer=False)
    return m.float().eval()


def llm_state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items() if v.is_floating_point()}


class Projector(nn.Module):
    """Frozen-encoder features -> `k` soft tokens in the language model's embedding space."""

    def __init__(self, features: int, hidden: int, k: int):
        super().__init__()
        self.k, self.hidden = k, hidden
        self.lin = nn.Linear(features, k * hidden)
        nn.init.normal_(self.lin.weight, std=0.02 / features ** 0.5 * 8)
        nn.init.zeros_(self.lin.bias)

    def forward(self, x):
        return self.lin(x).view(x.shape[0], self.k, self.hidden)


def load_projectors(projectors: dict[str, dict], tasks: dict[str, data.Task], hidden: int) -> dict[str, Projector]:
    """Each task's trained projector from its state dict (a task without one, {}, has none)."""
    out = {}
    for name, sd in projectors.items():
        if sd:
            p = Projector(tasks[name].train.x.shape[1], hidden, sd["lin.weight"].shape[0] // hidden)
            p.load_state_dict(sd)
            out[name] = p.eval()
    return out


class Prompter:
    """Builds [CLS] [soft tokens of each block] [question] [SEP] and the token groups:
    0 for text tokens, 1 + j for the tokens of block j's group."""

    def __init__(self, tok):
        self.tok = tok
        self.cls, self.sep = tok.cls_token_id, tok.sep_token_id
        self._q: dict[str, list[int]] = {}

    def question_ids(self, q: str) -> list[int]:
        if q not in self._q:
            self._q[q] = self.tok(q, add_special_tokens=False)["input_ids"]
        return self._q[q]

    def answer_ids(self, words: list[str]) -> torch.Tensor:
        ids = self.tok.convert_tokens_to_ids(words)
        if self.tok.unk_token_id in ids:
            raise ValueError(f"answer words {words} are not all single tokens of the vocabulary")
        return torch.tensor(ids)

    def distractors(self, answers: list[str], seed: int, n: int = DISTRACTORS) -> torch.Tensor:
        """`n` vocabulary words that are not among `answers`: the other tasks' answer words, then a
        seeded sample of whole-word tokens."""
        from .mllm_data import COLOURS, DIGIT_WORDS, NUMERALS

        words = [w for w in DIGIT_WORDS + NUMERALS + COLOURS + ["even", "odd"] if w not in answers]
        vocab = [w for w, _ in sorted(self.tok.get_vocab().items(), key=lambda kv: kv[1])
                 if w.isalpha() and w.isascii() and w not in answers and w not in words]
        g = np.random.default_rng(seed)
        words += [vocab[i] for i in g.choice(len(vocab), n - len(words), replace=False)]
        return torch.tensor(self.tok.convert_tokens_to_ids(words))

    def build(self, word_emb: nn.Embedding, blocks: list[torch.Tensor], block_groups: list[int], question: str):
        b = blocks[0].shape[0]
        q = torch.tensor([self.cls] + self.question_ids(question) + [self.sep])
        text = word_emb(q).unsqueeze(0).expand(b, -1, -1)
        parts, groups = [text[:, :1]], [0]
        for blk, g in zip(blocks, block_groups):
            parts.append(blk)
            groups += [g] * blk.shape[1]
        parts.append(text[:, 1:])
        groups += [0] * (len(q) - 1)
        return torch.cat(parts, dim=1), torch.tensor(groups).unsqueeze(0).expand(b, -1)


def logits_of(llm: nn.Module, prompter: Prompter, blocks, block_groups, question, vocab_ids=None):
    """Cosine logits of the [CLS] output against the word embeddings (all, or `vocab_ids`)."""
    emb = llm.embeddings.word_embeddings
    x, _ = prompter.build(emb, blocks, block_groups, question)
    return answer_logits(llm, llm(inputs_embeds=x).last_hidden_state[:, 0], vocab_ids)


def answer_logits(llm: nn.Module, cls_out: torch.Tensor, vocab_ids=None) -> torch.Tensor:
    w = llm.embeddings.word_embeddings.weight
    w = w if vocab_ids is None else w[vocab_ids]
    return SCALE * F.normalize(cls_out, dim=-1) @ F.normalize(w, dim=-1).T


def routed_inputs(composed, prompter: Prompter, blocks, which: list[str], question: str):
    """inputs_embeds and [batch, seq] group ids for the runtime: -1 (modalmerge.runtime.TEXT) for
    the text tokens, the task's index for each block's soft tokens."""
    from ..runtime import TEXT

    ids = [composed.task_index(t) for t in which]
    x, groups = prompter.build(composed.llm.embeddings.word_embeddings, blocks, [i + 1 for i in ids], question)
    return x, torch.where(groups == 0, TEXT, groups - 1)


def routed_logits(composed, prompter: Prompter, blocks, which: list[str], question: str, vocab_ids=None,
                  text_mask: str = "all") -> torch.Tensor:
    x, group_ids = routed_inputs(composed, prompter, blocks, which, question)
    with composed.route(group_ids, text_mask=text_mask):
        h = composed.llm(inputs_embeds=x).last_hidden_state[:, 0]
    return answer_logits(composed.llm, h, vocab_ids)


# ---------------------------------------------------------------- fine-tuning


def finetune(base: nn.Module, prompter: Prompter, task: data.Task, cfg: Config, *, init_llm=None,
             init_proj=None, epochs=None, progress=None) -> tuple[dict, dict, dict]:
    """Train the projector and the whole language model on one task; the encoder stays frozen.
    Loss: cross-entropy of the answer word against the other answers and distractor words. Weight
    decay 0, so parameters the task never moves keep their base values (no spurious task vector)."""
    torch.manual_seed(cfg.seed + sum(map(ord, task.name)))
    llm = copy.deepcopy(base)
    if init_llm is not None:
        llm.load_state_dict(init_llm, strict=False)
    proj = Projector(task.train.x.shape[1], llm.config.hidden_size, cfg.soft_tokens)
    if init_proj is not None:
        proj.load_state_dict(init_proj)
    llm.train()
    # the word embeddings (half of MiniLM's parameters) stay frozen: the transformer layers carry
    # the skill, and a step costs half as much
    llm.embeddings.word_embeddings.weight.requires_grad_(False)
    trainable = [p for p in llm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": trainable, "lr": cfg.lr_llm},
                             {"params": proj.parameters(), "lr": cfg.lr_proj}], weight_decay=0.0)
    # the answer is chosen among the task's answer words and DISTRACTORS other words of the
    # vocabulary (a fixed seeded sample incl. the other modalities' answers): an open-vocabulary
    # answer at a fraction of the cost of a softmax over all 30k words
    vocab = torch.cat([prompter.answer_ids(task.answers), prompter.distractors(task.answers, cfg.seed)])
    def batch_loss(idx):
        logits = logits_of(llm, prompter, [proj(task.train.x[idx])], [1], task.question, vocab)
        return F.cross_entropy(logits, task.train.y[idx])

    log = train_epochs(opt, len(task.train.y), cfg.batch, epochs or cfg.epochs, cfg.seed, batch_loss, progress)
    llm.eval()
    return llm_state(llm), {k: v.detach().clone() for k, v in proj.state_dict().items()}, log


def train_epochs(opt, n: int, batch: int, epochs: int, seed: int, batch_loss: Callable[[torch.Tensor], torch.Tensor],
                 progress=None) -> dict:
    """`epochs` seeded shuffles of n training examples in batches, one optimiser step per batch
    (`batch_loss(indices)` gives its loss), the learning rate warmed up over the first tenth of
    the steps and then decayed linearly to 0; the training log."""
    steps = epochs * ((n + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) *
                                              max(0.0, 1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            loss = batch_loss(perm[i:i + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress:
                progress(1)
    return {"steps": steps, "seconds": time.perf_counter() - t0, "first_loss": losses[0],
            "last_loss": float(np.mean(losses[-10:]))}


def cached_finetune(cache: Path | None, key: str, fn: Callable[[], tuple[dict, dict, dict]]):
    """Load a fine-tuned (llm, projector, log) from the cache or train and store it."""
    from safetensors.torch import load_file, save_file

    if cache is not None:
        folder = cache / key
        if (folder / "done").exists():
            return (load_file(folder / "llm.safetensors"), load_file(folder / "projector.safetensors"),
                    {**json.loads((folder / "log.json").read_text()), "cached": True})
    sd, proj, log = fn()
    if cache is not None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, folder / "llm.safetensors")
        save_file({k: v.contiguous() for k, v in proj.items()}, folder / "projector.safetensors")
        (folder / "log.json").write_text(json.dumps(log))
        (folder / "done").write_text("ok")
    return sd, proj, log


# ---------------------------------------------------------------- evaluation


def mixed_slices(n_asked: int, n_other: int, n: int, seed: int, batch: int, asked_first: bool | None = None):
    """Which test inputs make up mixed prompts, batch by batch: (indices into the asked task's
    test split, indices into the other's, whether the asked block comes first). n asked inputs
    (a seeded permutation), each paired with a random other input; the asked block comes first
    (asked_first True), second (False), or by default first in even batches and second in odd
    ones."""
    g = np.random.default_rng(seed)
    ia = g.permutation(n_asked)[:n]
    ib = g.integers(0, n_other, size=len(ia))
    for i in range(0, len(ia), batch):
        first = (i // batch) % 2 == 0 if asked_first is None else asked_first
        yield ia[i:i + batch], ib[i:i + batch], first


class Evaluator:
    """Accuracy of a language model (plain weights, or routed per token group) with the modality
    projectors, on single-modality, mixed and text-probe inputs."""

    def __init__(self, base: nn.Module, prompter: Prompter, tasks: dict[str, data.Task],
                 projectors: dict[str, dict], batch: int = 256):
        self.work = copy.deepcopy(base).eval()
        self.prompter, self.tasks, self.batch = prompter, tasks, batch
        self.projs = load_projectors(projectors, tasks, base.config.hidden_size)

    def load(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        self.work.load_state_dict(weights, strict=False)
        return self.work

    @torch.no_grad()
    def accuracy(self, weights, task: str, split: str = "test", projector: str | None = None) -> float:
        t = self.tasks[task]
        s = getattr(t, split)
        llm = self.load(weights)
        proj = self.projs[projector or task]
        answers = self.prompter.answer_ids(t.answers)
        correct = 0
        for i in range(0, len(s.y), self.batch):
            x = s.x[i:i + self.batch]
            pred = logits_of(llm, self.prompter, [proj(x)], [1], t.question, answers).argmax(-1)
            correct += int((pred == s.y[i:i + self.batch]).sum())
        return correct / len(s.y)

    def mixed_batches(self, asked: str, other: str, n: int, seed: int):
        """Two modalities in one input, a question about `asked`: yields (blocks, which task each
        block is, labels) batch by batch. The asked block comes first in even batches and second in
        odd ones, so with n ≤ batch it is always first (docs/results/mllm.md says so)."""
        ta, tb = self.tasks[asked], self.tasks[other]
        for ia, ib, first in mixed_slices(len(ta.test.y), len(tb.test.y), n, seed, self.batch):
            a = self.projs[asked](ta.test.x[ia])
            b = self.projs[other](tb.test.x[ib])
            blocks, which = ([a, b], [asked, other]) if first else ([b, a], [other, asked])
            yield blocks, which, ta.test.y[ia]

    @torch.no_grad()
    def mixed_accuracy(self, asked: str, other: str, n: int, seed: int, weights=None, composed=None,
                       text_mask: str = "all") -> float:
        """Accuracy on mixed inputs (see mixed_batches) of one plain model (`weights`), or of a
        composed model served by the library's routed runtime (`composed`, a
        modalmerge.runtime.ComposedModel): each modality's tokens on θ_0 + m_i ⊙ τ*, text tokens on
        θ_0 + m̄ ⊙ τ* (m̄ over all tasks, or over the two present with text_mask="present")."""
        answers = self.prompter.answer_ids(self.tasks[asked].answers)
        question = self.tasks[asked].question
        llm = self.load(weights) if composed is None else composed.llm
        correct = total = 0
        for blocks, which, y in self.mixed_batches(asked, other, n, seed):
            if composed is None:
                logits = logits_of(llm, self.prompter, blocks, [1] * len(blocks), question, answers)
            else:
                logits = routed_logits(composed, self.prompter, blocks, which, question, answers, text_mask)
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
        return correct / total


class TextProbe:
    """The base's own text skill: logistic regression on the base's mean-pooled SST-2 features,
    trained once and kept fixed; each model is scored on its text path."""

    def __init__(self, evaluator: Evaluator, base_weights, train, test, max_len=64):
        from sklearn.linear_model import LogisticRegression

        self.ev, self.test, self.max_len = evaluator, test, max_len
        feats = self.features(base_weights, train[0])
        self.clf = LogisticRegression(max_iter=2000, C=1.0).fit(feats, train[1].numpy())

    @torch.no_grad()
    def features(self, weights, texts) -> np.ndarray:
        llm = self.ev.load(weights)
        out = []
        for i in range(0, len(texts), 128):
            enc = self.ev.prompter.tok(texts[i:i + 128], padding=True, truncation=True, max_length=self.max_len,
                                       return_tensors="pt")
            h = llm(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((h * m).sum(1) / m.sum(1)).numpy())
        return np.concatenate(out)

    def accuracy(self, weights) -> float:
        return float(self.clf.score(self.features(weights, self.test[0]), self.test[1].numpy()))


# ---------------------------------------------------------------- merges


@dataclass
class Decoupled:
    """A task-conditional merge as served: task t uses θ_0 + c_t·m_t ⊙ shared; text tokens use
    θ_0 + mean_t(c_t·m_t) ⊙ shared over all tasks (mixed inputs go through modalmerge.runtime)."""

    base: dict
    shared: dict
    masks: dict          # task -> tensor name -> bool
    scalars: dict        # task -> float
    source: str = ""

    def task(self, t: str) -> dict:
        out = dict(self.base)
        for k, s in self.shared.items():
            out[k] = self.base[k] + self.scalars[t] * self.masks[t][k].float() * s
        return out

    def text(self) -> dict:
        tasks = list(self.masks)
        out = dict(self.base)
        for k, s in self.shared.items():
            c = sum(self.scalars[t] * self.masks[t][k].float() for t in tasks) / len(tasks)
            out[k] = self.base[k] + c * s
        return out

    def density(self, t: str) -> float:
        """Fraction of the shared vector's non-zero entries that task t's mask keeps."""
        kept = sum(int((self.masks[t][k] & (s != 0)).sum()) for k, s in self.shared.items())
        nonzero = sum(int((s != 0).sum()) for s in self.shared.values())
        return kept / max(1, nonzero)


def decoupled_from_sink(base: dict, sink, source: str) -> Decoupled:
    from ..ops import unpack_bits

    scalars = {t["name"]: float(t["scalar"]) for t in sink.manifest["tasks"]}
    masks = {t: {k: unpack_bits(sink.masks[f"{t}::{k}"], v.shape) for k, v in sink.shared.items()} for t in scalars}
    shared = {k: v.float() for k, v in sink.shared.items()}
    return Decoupled(base, shared, masks, scalars, source)


def run_merge(method: str, params, models: dict[str, dict], base: dict, seed: int):
    """A plain merged state dict, or a Decoupled for tall / emr / mmer."""
    from ..api import merge_state_dicts

    if method == "mmer":
        _, sink = merge_state_dicts("mmer", models, base, params or {}, seed=seed, return_decoupled=True)
        return decoupled_from_sink(base, sink, "modalmerge method 'mmer'")
    if method == "tall":
        lambdas = params                 # one λ per model, in the order of `models`
        _, sink = merge_state_dicts("tall", models, base, {"shared": "sum"}, seed=seed, return_decoupled=True,
                                    model_params=[{"lambda": x} for x in lambdas])
        return decoupled_from_sink(base, sink, "modalmerge method 'tall'")
    if method == "emr":
        _, sink = merge_state_dicts("emr", models, base, {}, seed=seed, return_decoupled=True)
        return decoupled_from_sink(base, sink, "modalmerge method 'emr'")
    return {k: v.float() for k, v in merge_state_dicts(method, models, base, params, seed=seed).items()}


def safetensors_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    """Bytes of the safetensors files directly in `folder` whose names match `pattern`."""
    return sum(f.stat().st_size for f in folder.glob(pattern) if f.is_file())


def composed_storage(folder: Path, separate: dict[str, int]) -> dict:
    """What a composed (decoupled) folder stores for the language model, against the separate
    models it replaces, both sides counted the same way: the bytes of their safetensors files.
    The composed side is everything serving needs: the text weights (θ_0 + m̄ ⊙ τ*), τ* and the
    masks (W_g = W_t + (m_g - m̄) ⊙ τ*); θ_0 is not needed beside them. Encoders and projectors
    are not in these folders: each modality keeps its own either way."""
    ddir = folder / "decoupled"
    masks = safetensors_bytes(ddir, "masks*.safetensors")
    shared = safetensors_bytes(ddir) - masks
    text = safetensors_bytes(folder)
    manifest = ddir / "manifest.json"
    fmt = json.loads(manifest.read_text()).get("shared_format", "dense") if manifest.exists() else "dense"
    return {"text_weights": text, "shared": shared, "shared_format": fmt, "masks": masks,
            "composed": text + shared + masks, "separate_models": sum(separate.values()),
            "models": len(separate)}


class Composer:
    """Decoupled merges as a user serves them: the base and each fine-tuned language model saved
    once as Hugging Face folders, merged by `modalmerge.merge` into a composed folder, loaded by
    `modalmerge.runtime.load_composed` (mixed inputs then go through its routed forward)."""

    def __init__(self, base_llm: nn.Module, llms: dict[str, dict], root: Path, tokenizer=None):
        self.root = root
        self.model_class = type(base_llm)   # what load_composed builds: BertModel here, a causal LM in collide
        self.folders = {}
        # a tied tensor (BertLMHeadModel's output head is its word embeddings) is saved once, under
        # its first name, as save_pretrained saves the model's own state dict
        seen, tied = set(), set()
        for k, v in base_llm.state_dict().items():
            if v.data_ptr() in seen:
                tied.add(k)
            seen.add(v.data_ptr())
        for name, state in [("base", llm_state(base_llm))] + list(llms.items()):
            self.folders[name] = root / "inputs" / name
            base_llm.save_pretrained(self.folders[name], state_dict={k: v for k, v in state.items() if k not in tied})
        if tokenizer is not None:   # the merge copies it into each composed folder (composed.generate reads it)
            tokenizer.save_pretrained(self.folders["base"])
        # a stored model's size, as the user's folders hold it (every model has the base's tensors)
        self.model_bytes = {name: safetensors_bytes(f) for name, f in self.folders.items()}

    def storage(self, method: str, names: list[str]) -> dict:
        """The composed folder of `method` against the separate fine-tuned models `names`."""
        return composed_storage(self.root / f"composed-{method}", {n: self.model_bytes[n] for n in names})

    def compose(self, method: str, chosen, names: list[str], seed: int):
        from ..api import merge
        from ..runtime import load_composed

        models = [{"path": str(self.folders[n]), "name": n} for n in names]
        params = dict(chosen or {})
        if method == "tall":  # one λ per model, chosen per task; the shared vector as run_merge
            lambdas = params.pop("lambda")
            for m in models:
                m["params"] = {"lambda": lambdas[m["name"]]}
            params = {"shared": "sum"}
        out = self.root / f"composed-{method}"
        merge({"method": method, "base": str(self.folders["base"]), "models": models, "params": params,
               "seed": seed}, out, overwrite=True)
        return load_composed(out, self.model_class)


def runtime_cost(composed, ev: "Evaluator", pairs, n: int, seed: int, repeats: int = 5) -> dict:
    """Tokens/s of the routed forward against the plain model on the same mixed inputs, measured
    side by side (one pass over the inputs of each in turn per round, the median of `repeats`
    rounds after a warm-up round), and what serving holds in memory against separate models.
    Two input sets: the benchmark's two-modality mixed inputs (every ordered pair, the top-level
    figures) and inputs holding every modality at once (`every_modality`: n per modality asked,
    the modalities in turn first)."""
    every = [t for t in composed.tasks if t in ev.tasks]
    pair_inputs, every_inputs = [], []
    g = np.random.default_rng(seed)
    with torch.no_grad():
        for a, b in pairs:
            for blocks, which, _ in ev.mixed_batches(a, b, n, seed):
                pair_inputs.append(routed_inputs(composed, ev.prompter, blocks, which, ev.tasks[a].question))
        for r in range(len(every)):
            order = every[r:] + every[:r]
            idx = {t: g.integers(0, len(ev.tasks[t].test.y), size=n) for t in order}
            for i in range(0, n, ev.batch):
                blocks = [ev.projs[t](ev.tasks[t].test.x[idx[t][i:i + ev.batch]]) for t in order]
                every_inputs.append(routed_inputs(composed, ev.prompter, blocks, order, ev.tasks[order[0]].question))

    def plain(inputs):
        for x, _ in inputs:
            composed.llm(inputs_embeds=x)

    def routed(inputs, text_mask):
        for x, ids in inputs:
            with composed.route(ids, text_mask=text_mask):
                composed.llm(inputs_embeds=x)

    def timed(inputs) -> dict:
        fns = {"plain": lambda: plain(inputs), "routed": lambda: routed(inputs, "all"),
               "routed, m̄ present": lambda: routed(inputs, "present")}
        with torch.no_grad():
            times = median_times(fns, repeats, str(composed.device))
        tokens = sum(x.shape[0] * x.shape[1] for x, _ in inputs)
        return {"tokens": tokens, "tokens_per_s": {k: tokens / v for k, v in times.items()},
                "x_plain": {k: v / times["plain"] for k, v in times.items()},
                "x_plain_tokens_per_s": {k: times["plain"] / v for k, v in times.items()}}

    resident = composed.resident_bytes()
    return {**timed(pair_inputs), "threads": torch.get_num_threads(), "repeats": repeats,
            "every_modality": {"modalities": len(every), **timed(every_inputs)},
            "resident_mib": {k: v / 2 ** 20 for k, v in resident.items()},
            "separate_models_mib": len(composed.tasks) * resident["model"] / 2 ** 20}


def weights_for(merged, task: str) -> dict:
    return merged.task(task) if isinstance(merged, Decoupled) else merged


def select(method: str, cfg: Config, models: dict[str, dict], base: dict, val_acc: Callable[[dict, str], float],
           task_of: dict[str, str]):
    """Choose hyperparameters on the validation splits only: the mean over tasks for one shared
    setting; TALL's λ_t per task on that task's own validation split. The grid runs through the
    search's study loop (procedures/search/tune.py, grid order); each trial records every task's
    validation accuracy, and the choice is made from those records."""
    from ..procedures.search.tune import tune

    grid = cfg.grids[method]
    names = list(models)
    if method != "tall" and len(grid) == 1:
        return run_merge(method, grid[0], models, base, cfg.seed), grid[0], []

    def score(values: dict) -> dict[str, float]:
        if method == "tall":
            merged = run_merge("tall", [values["lambda"]] * len(names), models, base, cfg.seed)
        else:
            merged = run_merge(method, values["params"], models, base, cfg.seed)
        per = {n: val_acc(weights_for(merged, n), task_of[n]) for n in names}
        return {"val_mean": float(np.mean(list(per.values()))), **{f"val/{n}": a for n, a in per.items()}}

    key = "lambda" if method == "tall" else "params"
    result = tune({key: {"search": list(grid)}}, score, ["val_mean:max"], sampler="grid", stop_on_error=True)
    trials = [{key: r["params"][key], "val": {n: r["metrics"][f"val/{n}"] for n in names}} for r in result.ordered()]
    if method == "tall":
        # each task its own λ_t; equal accuracies go to the λ nearest 0.6
        best = [result.best_by(f"val/{n}", prefer=lambda p: -abs(p["lambda"] - 0.6))["params"]["lambda"]
                for n in names]
        return run_merge("tall", best, models, base, cfg.seed), {"lambda": dict(zip(names, best))}, trials
    best = result.best["params"]["params"]
    return run_merge(method, best, models, base, cfg.seed), best, trials


# ---------------------------------------------------------------- the benchmark


LABELS = {"task_arithmetic": "Task arithmetic (NaiveMC)", "ties": "TIES", "dare_ties": "DARE-TIES",
          "tall": "TALL masks", "emr": "EMR", "mmer": "MMER"}


def build_tasks(cfg: Config, data_root, quick_missing_ok: bool, warn) -> dict[str, data.Task]:
    tasks = {}
    for name in cfg.tasks:
        try:
            if name == "image":
                tasks[name] = data.mnist_task(cfg.seed, cfg.caps)
            elif name == "speech":
                tasks[name] = data.fsdd_task(data_root, cfg.seed, cfg.caps)
            elif name == "table":
                tasks[name] = data.table_task(cfg.seed, cfg.caps)
            else:
                raise ValueError(f"unknown task {name!r}")
        except Exception as e:
            from ..errors import MergeError

            if quick_missing_ok and isinstance(e, MergeError):
                warn(f"skipping task {name}: {e}")
                continue
            raise
    return tasks


def run(cfg: Config, *, cache: Path | None, data_root=None, out: Path | None = None, missing_ok=False,
        log=print, progress=True) -> dict:
    """The whole benchmark; returns the result dict (also written to out/ as JSON, Markdown, PNG)."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    quiet_transformers()
    torch.manual_seed(cfg.seed)
    log("loading the language model and the data ...")
    tok = tokenizer()
    prompter = Prompter(tok)
    base_llm = load_llm(cfg)
    base = llm_state(base_llm)
    data_root = data.data_dir(data_root)
    tasks = build_tasks(cfg, data_root, missing_ok, log)
    if len(tasks) < 2:
        from ..errors import MergeError

        raise MergeError("bench mllm needs at least two modality tasks; see the messages above")
    if cfg.forgetting and "image" in tasks:
        tasks["image-parity"] = data.mnist_parity_task(cfg.seed, cfg.caps)
    names = [t for t in cfg.tasks if t in tasks]

    # fine-tuning (cached)
    total = sum(cfg.epochs * -(-len(tasks[n].train.y) // cfg.batch) for n in names)
    if "image-parity" in tasks:
        total += cfg.forget_epochs * -(-len(tasks["image-parity"].train.y) // cfg.batch)
    log(f"fine-tuning {len(names) + ('image-parity' in tasks)} language models ({total} steps"
        + (f"; kept in {cache} for the next run) ..." if cache else ") ..."))
    bar = tqdm(total=total, desc="fine-tuning", unit="step", disable=not progress, leave=False)
    llms, projs, train_logs = {}, {}, {}
    key_of = {}
    for n in names:
        key = cfg.training_key(n)
        key_of[n] = key
        llms[n], projs[n], train_logs[n] = cached_finetune(
            cache, key, lambda n=n: finetune(base_llm, prompter, tasks[n], cfg, progress=bar.update))
        if train_logs[n].get("cached"):
            bar.update(cfg.epochs * -(-len(tasks[n].train.y) // cfg.batch))
    if "image-parity" in tasks:
        key = cfg.training_key("image-parity", extra=f"after:{key_of['image']}:{cfg.forget_epochs}")
        llms["image-parity"], projs["image-parity"], train_logs["image-parity"] = cached_finetune(
            cache, key, lambda: finetune(base_llm, prompter, tasks["image-parity"], cfg, init_llm=llms["image"],
                                         init_proj=projs["image"], epochs=cfg.forget_epochs, progress=bar.update))
        if train_logs["image-parity"].get("cached"):
            bar.update(cfg.forget_epochs * -(-len(tasks["image-parity"].train.y) // cfg.batch))
    bar.close()

    ev = Evaluator(base_llm, prompter, tasks, projs)
    probe = None
    if cfg.sst_test:
        try:
            train, test = data.sst2(data_root, cfg.sst_train, cfg.sst_test, cfg.seed)
            probe = TextProbe(ev, base, train, test)
        except Exception as e:
            from ..errors import MergeError

            if not (missing_ok and isinstance(e, MergeError)):
                raise
            log(f"skipping the text probe: {e}")

    n_params = sum(v.numel() for v in base.values())
    mib = lambda b: b / 2 ** 20
    log("merging and evaluating ...")
    # every model as a user stores it (Hugging Face folders), for the composed merges and the storage
    scratch = tempfile.TemporaryDirectory(prefix="modalmerge-bench-mllm-")
    composer = Composer(base_llm, {n: llms[n] for n in names}, Path(scratch.name))
    one_model = composer.model_bytes["base"]    # a plain merge stores what one model does
    result: dict = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                    "tasks": {n: {"answers": tasks[n].answers, "question": tasks[n].question, "note": tasks[n].note,
                                  "sizes": [len(tasks[n].train.y), len(tasks[n].val.y), len(tasks[n].test.y)]}
                              for n in tasks},
                    "training": train_logs, "llm_parameters": n_params, "rows": [], "mixed_pairs": [],
                    "routed": "modalmerge.runtime (load_composed + route) on folders written by modalmerge.merge"}
    pairs = [(a, b) for a in names for b in names if a != b]
    result["mixed_pairs"] = [f"{a}+{b}" for a, b in pairs]

    steps = ["individual", "base"] + list(cfg.methods) + (["forgetting"] if "image-parity" in tasks else [])
    bar = tqdm(steps, desc="merge + evaluate", disable=not progress, leave=False)

    def evaluate_row(label, kind, weights_of: Callable[[str], dict], text_weights, mixed_fn, extra=None):
        row = {"row": label, "kind": kind, "acc": {}, "mask_density": {}, **(extra or {})}
        for n in names:
            row["acc"][n] = ev.accuracy(weights_of(n), n)
        row["text_probe"] = probe.accuracy(text_weights) if (probe and text_weights is not None) else None
        if mixed_fn is not None and pairs:
            row["mixed"] = {f"{a}+{b}": mixed_fn(a, b) for a, b in pairs}
        result["rows"].append(row)
        return row

    mixed_n = cfg.mixed_test
    for step in bar:
        bar.set_postfix_str(step)
        if step in ("individual", "base"):
            reference_rows(step, evaluate_row, ev, cfg, names, llms, base, composer)
        elif step == "forgetting":
            result["forgetting"] = forgetting(cfg, ev, base, llms, projs, tasks, log)
        else:
            models = {n: llms[n] for n in names}
            val = lambda w, t: ev.accuracy(w, t, "val")
            t0 = time.perf_counter()
            merged, chosen, trials = select(step, cfg, models, base, val, {n: n for n in names})
            sel_s = time.perf_counter() - t0
            if isinstance(merged, Decoupled):
                # mixed inputs: the same merge written to a folder and served by the routed runtime
                composed = composer.compose(step, chosen, names, cfg.seed)
                storage = composer.storage(step, names)
                row = evaluate_row(
                    LABELS[step], "decoupled", merged.task, merged.text(),
                    lambda a, b: ev.mixed_accuracy(a, b, mixed_n, cfg.seed, composed=composed),
                    {"params": chosen, "trials": trials, "source": merged.source, "select_seconds": sel_s,
                     "storage_mib": mib(storage["composed"]), "storage": storage})
                row["mask_density"] = {n: merged.density(n) for n in names}
                if step == "mmer":
                    # the spec's option: the text tokens' mean mask over the modalities present
                    row["mixed_present"] = {
                        f"{a}+{b}": ev.mixed_accuracy(a, b, mixed_n, cfg.seed, composed=composed, text_mask="present")
                        for a, b in pairs}
                    if pairs and cfg.runtime_cost:
                        result["runtime"] = runtime_cost(composed, ev, pairs, mixed_n, cfg.seed)
            else:
                evaluate_row(LABELS[step], "merged", lambda t: merged, merged,
                             lambda a, b: ev.mixed_accuracy(a, b, mixed_n, cfg.seed, weights=merged),
                             {"params": chosen, "trials": trials, "select_seconds": sel_s,
                              "storage_mib": mib(one_model)})
    bar.close()
    scratch.cleanup()

    ref = next(r for r in result["rows"] if r["kind"] == "reference")
    base_row = next(r for r in result["rows"] if r["kind"] == "base")
    for r in result["rows"]:
        r["retention"] = {n: r["acc"][n] / ref["acc"][n] if ref["acc"][n] else None for n in names}
        if r.get("text_probe") is not None and base_row.get("text_probe"):
            r["text_retention"] = r["text_probe"] / base_row["text_probe"]
        if r.get("mixed"):
            r["mixed_mean"] = float(np.mean(list(r["mixed"].values())))
        if r.get("mixed_present"):
            r["mixed_present_mean"] = float(np.mean(list(r["mixed_present"].values())))
    result["seconds"] = time.perf_counter() - t_start
    result["tasks_run"] = names
    if out is not None:
        write_outputs(result, out)
    return result


def reference_rows(step: str, evaluate_row, ev, cfg, names: list[str], llms: dict, base: dict, composer) -> None:
    """The rows the merges are measured against, through `evaluate_row(label, kind, weights_of,
    text_weights, mixed_fn, extra)`. step "individual": each fine-tune on every task (when
    cfg.cross_rows; mixed inputs are scored once, in the reference row) and the reference, each
    task's own model; step "base": the base with the fine-tuned projectors."""
    mib = lambda b: b / 2 ** 20  # noqa: E731
    if step == "individual":
        for n in names if cfg.cross_rows else []:
            evaluate_row(f"Individual: {n}", "individual", lambda t, n=n: llms[n], llms[n], None,
                         {"storage_mib": mib(composer.model_bytes[n])})
        evaluate_row("Individual models (each on its own task)", "reference", lambda t: llms[t], None,
                     lambda a, b: ev.mixed_accuracy(a, b, cfg.mixed_test, cfg.seed, weights=llms[a]),
                     {"storage_mib": mib(sum(composer.model_bytes[n] for n in names))})
    else:
        evaluate_row("Base LLM (projectors from fine-tuning)", "base", lambda t: base, base,
                     lambda a, b: ev.mixed_accuracy(a, b, cfg.mixed_test, cfg.seed, weights=base),
                     {"storage_mib": mib(composer.model_bytes["base"])})


def forgetting(cfg: Config, ev: Evaluator, base, llms, projs, tasks, log) -> dict:
    """The image model fine-tuned further on a new task (digit parity): the sequential model
    forgets; a re-merge of the old and the new model keeps both, the task choosing the mask."""
    old, new = "image", "image-parity"
    seq = llms[new]
    models = {old: llms[old], new: seq}
    res = {"old_task": old, "new_task": new, "rows": []}

    def add(label, w_old, w_new, extra=None):
        row = {"row": label, "old_acc": ev.accuracy(w_old, old), "new_acc": ev.accuracy(w_new, new), **(extra or {})}
        res["rows"].append(row)
        return row

    ref_old = add("Old model (before the new task)", llms[old], llms[old])
    ref_new = add("Sequential fine-tune (old model -> new task)", seq, seq)
    add("Base LLM", base, base)
    val = lambda w, t: ev.accuracy(w, t, "val")
    for m in cfg.methods:
        merged, chosen, _ = select(m, cfg, models, base, val, {old: old, new: new})
        row = add(LABELS[m], weights_for(merged, old), weights_for(merged, new), {"params": chosen})
        if isinstance(merged, Decoupled):
            row["mask_density"] = {old: merged.density(old), new: merged.density(new)}
    for r in res["rows"]:
        r["old_retention"] = r["old_acc"] / ref_old["old_acc"] if ref_old["old_acc"] else None
        r["new_retention"] = r["new_acc"] / ref_new["new_acc"] if ref_new["new_acc"] else None
    return res


# ---------------------------------------------------------------- reports


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(result: dict) -> str:
    names = result["tasks_run"]
    head = ["Model"] + [f"{n} acc" for n in names] + [f"{n} ret." for n in names] + \
           ["mask density (" + "/".join(names) + ")", "mixed acc", "SST-2 probe (ret.)", "LLM storage MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        dens = "/".join(_pct(r["mask_density"].get(n)) for n in names) if r["mask_density"] else "–"
        text = "–" if r.get("text_probe") is None else (
            f"{_pct(r['text_probe'])} ({_pct(r.get('text_retention'))})")
        mixed = _pct(r.get("mixed_mean"))
        if r.get("mixed_present_mean") is not None:
            mixed += f" (present m̄: {_pct(r['mixed_present_mean'])})"
        cells = [r["row"]] + [_pct(r["acc"][n]) for n in names] + [_pct(r["retention"][n]) for n in names] + \
                [dens, mixed, text, f"{r.get('storage_mib', 0):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    rt = result.get("runtime")
    if rt:
        speed = ", ".join(f"{k} {v:,.0f} tokens/s ({rt['x_plain'][k]:.2f}× the plain time)"
                          for k, v in rt["tokens_per_s"].items())
        held = ", ".join(f"{k} {v:.1f} MiB" for k, v in rt["resident_mib"].items())
        out += (f"\nMMER's mixed inputs through modalmerge.runtime ({rt['tokens']:,} tokens, "
                f"{rt['threads']} threads, median of {rt['repeats']}): {speed}. Held for serving: {held}.\n")
        every = rt.get("every_modality")
        if every:
            out += (f"Inputs holding all {every['modalities']} modalities ({every['tokens']:,} tokens): " + ", ".join(
                f"{k} {v:,.0f} tokens/s ({every['x_plain_tokens_per_s'][k]:.2f}× plain's tokens/s)"
                for k, v in every["tokens_per_s"].items()) + f". {every['modalities']} separate language models "
                f"would hold {rt['separate_models_mib']:.1f} MiB.\n")
    f = result.get("forgetting")
    if f:
        out += (f"\nForgetting: old task `{f['old_task']}`, new task `{f['new_task']}`\n\n"
                "| Model | old acc | old ret. | new acc | new ret. | params |\n|---|---|---|---|---|---|\n")
        for r in f["rows"]:
            out += (f"| {r['row']} | {_pct(r['old_acc'])} | {_pct(r['old_retention'])} | {_pct(r['new_acc'])} | "
                    f"{_pct(r['new_retention'])} | {json.dumps(r.get('params', ''))} |\n")
    return out


def plot_groups(result: dict) -> tuple[list[dict], list[tuple[str, list]]]:
    """The plotted rows (base and merges) and the bar groups with data: each modality's retention,
    mixed inputs (against the asked modality's own model) and the SST-2 probe, when they were run.
    A group's values, one per row, are fractions (None: not measured for that row)."""
    names = result["tasks_run"]
    rows = [r for r in result["rows"] if r["kind"] in ("base", "merged", "decoupled")]
    ref = next(r for r in result["rows"] if r["kind"] == "reference")
    groups = [(f"{n}\n(vs its own model)", [r["retention"][n] for r in rows]) for n in names]
    if ref.get("mixed_mean"):
        groups.append(("mixed inputs\n(vs the asked\nmodality's model)",
                       [None if r.get("mixed_mean") is None else r["mixed_mean"] / ref["mixed_mean"] for r in rows]))
    groups.append(("SST-2 text probe\n(vs the base)", [r.get("text_retention") for r in rows]))
    return rows, [(label, vals) for label, vals in groups if any(v is not None for v in vals)]


def plot(result: dict, path: Path) -> None:
    """Grouped bars: per modality (and mixed inputs, the text probe when run), each merge's
    retention of the individual models, the value over each bar when there are few."""
    rows, groups = plot_groups(result)
    retention_bars(path, [r["row"] for r in rows], groups, "mini-MLLM merge: how much of each model is retained")


def retention_bars(path: Path, row_labels: list[str], groups: list[tuple[str, list]], title: str) -> None:
    """Grouped bars, one group per (label, values) with one value per row: a fraction, None (not
    measured), or {"mean", "min", "max"} over seeds (drawn with a min–max error bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(row_labels))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 + 0.32 * len(groups) * max(1, len(row_labels))), 4.6))
    x = np.arange(len(groups))
    for i, label in enumerate(row_labels):
        vals = [g[i] for _, g in groups]
        spread = [v for v in vals if isinstance(v, dict)]
        mean = [v["mean"] if isinstance(v, dict) else v for v in vals]
        err = None
        if spread:
            err = [[100 * (v["mean"] - v["min"]) if isinstance(v, dict) else 0 for v in vals],
                   [100 * (v["max"] - v["mean"]) if isinstance(v, dict) else 0 for v in vals]]
        bars = ax.bar(x + i * width, [100 * (v or 0) for v in mean], width, yerr=err, capsize=2, label=label)
        if len(row_labels) <= 5:
            ax.bar_label(bars, labels=["–" if v is None else f"{100 * v:.1f}" for v in mean], fontsize=6.5,
                         padding=1)
    ax.axhline(100, color="0.6", lw=0.8, ls="--", zorder=0)  # the reference
    ax.set_xticks(x + width * (len(row_labels) - 1) / 2)
    ax.set_xticklabels([label for label, _ in groups], fontsize=9)
    ax.set_ylim(0, 115)
    ax.set_ylabel("accuracy, % of the reference")
    ax.set_title(title, fontsize=9 if len(title) > 60 else None)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=min(3, len(row_labels)),
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_outputs(result: dict, out: Path, stem: str = "mllm", to_markdown: Callable[[dict], str] = markdown,
                  to_plot: Callable[[dict, Path], None] = plot) -> dict[str, Path]:
    """OUT/STEM.json (every number), STEM.md (the tables) and STEM.png (the plot)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "plot": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str))
    paths["markdown"].write_text(to_markdown(result))
    to_plot(result, paths["plot"])
    return paths
