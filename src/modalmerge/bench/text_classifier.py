"""bench text's classifiers: the bench's settings, the encoder with a task head, its batches,
fine-tuning and evaluation, and the cache key of a fine-tuned model. bench/text.py (the bench) and
bench/text_methods.py (what some methods need besides the fine-tuned models) both build on it."""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import MergeError
from . import cache_dir, minilm_path, sentconv

DEFAULT_TASKS = sentconv.DEFAULT_TASKS
QUICK_TASKS = ["sst2", "trec"]


@dataclass
class TextBenchConfig:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    data_dir: str | None = None
    model: str | None = None            # a Hugging Face encoder folder; default all-MiniLM-L6-v2
    cache: str | None = None
    seed: int = 0
    train_examples: int | None = 2000   # per task, seeded subset of the training split
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    val_examples: int | None = 300      # per task, for choosing hyperparameters
    test_examples: int | None = 1000    # per task
    methods: list[str] | None = None    # default: every method in the registry
    tune: bool = True
    quick: bool = False
    threads: int | None = None
    calibration_examples: int = 256     # per task, from its training texts (fisher, regmean, adamerging)
    checkpoints: int = 5                # saved along one run, for metrics_weighted

    @classmethod
    def quick_preset(cls, **overrides) -> "TextBenchConfig":
        base = dict(tasks=list(QUICK_TASKS), train_examples=256, val_examples=64, test_examples=128,
                    lr=1e-4, quick=True, calibration_examples=32)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def default_cache() -> Path:
    return cache_dir("bench-text")


def default_model_path() -> str:
    return minilm_path("bench text", "give --model FOLDER")


# -- model -----------------------------------------------------------------------------------------

class Classifier(torch.nn.Module):
    """Encoder + mean pooling over the attention mask + a linear head."""

    def __init__(self, encoder: torch.nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def load_encoder(path: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # the user's folder: its own code (auto_map) is never run
        encoder = AutoModel.from_pretrained(path, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise MergeError(f"cannot load the encoder at {path}: {str(e).splitlines()[0]}; give --model a "
                         "Hugging Face model folder with its tokenizer") from None
    return encoder.float(), tokenizer


def batches(tokenizer, examples: list[tuple[str, int]], max_length: int, batch_size: int,
            sort: bool) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Tokenised, padded per batch (sorted by length when `sort`, for evaluation speed)."""
    enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_length)["input_ids"]
    labels = [y for _, y in examples]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i])) if sort else list(range(len(enc)))
    pad = tokenizer.pad_token_id or 0
    out = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(enc[i])] = torch.tensor(enc[i])
            mask[r, :len(enc[i])] = 1
        out.append((ids, mask, torch.tensor([labels[i] for i in idx])))
    return out


@torch.inference_mode()
def accuracy(model: Classifier, data: list) -> float:
    model.eval()
    right = total = 0
    for ids, mask, y in data:
        right += int((model(ids, mask).argmax(-1) == y).sum())
        total += len(y)
    return right / total if total else 0.0


@torch.inference_mode()
def mean_loss(model: Classifier, data: list) -> float:
    """Mean cross-entropy over the examples."""
    model.eval()
    total, n = 0.0, 0
    for ids, mask, y in data:
        total += float(torch.nn.functional.cross_entropy(model(ids, mask), y, reduction="sum"))
        n += len(y)
    return total / n if n else 0.0


def training_steps(n_examples: int, cfg: TextBenchConfig) -> int:
    return max(1, (n_examples + cfg.batch_size - 1) // cfg.batch_size * cfg.epochs)


def fine_tune(encoder, tokenizer, train: list, num_labels: int, cfg: TextBenchConfig, seed: int, *,
              moments: dict[str, torch.Tensor] | None = None,
              on_step: Callable[[int, Classifier], None] | None = None) -> Classifier:
    """Full fine-tuning of encoder + head: AdamW, linear warm-up (6%) and decay, dropout on.

    `moments`, when given, is filled with AdamW's exp_avg_sq of each encoder parameter (for OTA);
    `on_step(step, model)` is called after every optimiser step (for checkpoints of the run)."""
    torch.manual_seed(seed)
    model = Classifier(encoder, num_labels)
    shuffled = list(train)
    random.Random(seed).shuffle(shuffled)
    total = training_steps(len(shuffled), cfg)
    warm = max(1, int(0.06 * total))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    model.train()
    step = 0
    for epoch in range(cfg.epochs):
        order = list(shuffled)
        random.Random(seed * 1000 + epoch).shuffle(order)
        for ids, mask, y in batches(tokenizer, order, cfg.max_length, cfg.batch_size, sort=False):
            loss = torch.nn.functional.cross_entropy(model(ids, mask), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if on_step is not None:
                on_step(step, model)
    if moments is not None:
        # a parameter that never had a gradient (the pooler: the head mean-pools) has no optimiser
        # state; its second moment is 0, as Adam's would be
        moments.update({n: opt.state[q]["exp_avg_sq"].detach().clone() if q in opt.state else torch.zeros_like(q)
                        for n, q in model.encoder.named_parameters()})
    model.eval()
    return model


# -- cache -----------------------------------------------------------------------------------------

def model_identity(path: str) -> str:
    """Hash of the encoder folder's config and weight files (names, sizes, first/last MB)."""
    h = hashlib.sha256()
    folder = Path(path)
    for f in sorted(folder.glob("*")):
        if f.suffix in (".json", ".safetensors", ".txt", ".bin") and f.is_file():
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def cache_key(model_id: str, task: str, train: list, cfg: TextBenchConfig, seed: int) -> str:
    data = hashlib.sha256(json.dumps(train).encode()).hexdigest()[:16]
    spec = {"model": model_id, "task": task, "data": data, "seed": seed, "epochs": cfg.epochs, "lr": cfg.lr,
            "batch": cfg.batch_size, "max_length": cfg.max_length, "v": 1}
    return f"{task}-{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]}"
