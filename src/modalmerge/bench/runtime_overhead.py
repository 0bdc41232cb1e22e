"""Speed and memory of the routed runtime against the plain model.

    python -m modalmerge.bench.runtime_overhead [--arch bert|llama] [--device cpu|cuda] [--tokens 256]

Builds a randomly initialised LLM (BERT: all-MiniLM-L6-v2's shape; Llama: a small decoder),
three synthetic fine-tunes with the same base, composes them with MMER into a temporary folder,
and times forward passes over soft-token inputs (inputs_embeds):
- plain: the loaded text weights, no routing;
- routed: three modality groups + text tokens in every sequence (per-layer corrections built from
  the bit-packed masks and τ*, used and dropped);
- routed+cache: the same, corrections kept for the context (repeated passes over one prompt);
- one-modality: one modality + text with text_mask="present" (weights patched in place once per
  context, patch and restore included in the time).
Prints tokens/s and the resident bytes of the model, τ* and the masks (and the peak allocated
memory on CUDA).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def _bert(seed: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512)
    return BertModel(cfg).eval(), BertModel


def _llama(seed: int):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=8000, max_position_embeddings=2048)
    return LlamaModel(cfg).eval(), LlamaModel


def build(root: Path, arch: str, n_modalities: int = 3) -> tuple[Path, type]:
    from ..api import merge

    base, cls = (_bert if arch == "bert" else _llama)(0)
    base.save_pretrained(root / "base")
    models = []
    for i in range(n_modalities):
        g = torch.Generator().manual_seed(100 + i)
        ft = cls(base.config)
        with torch.no_grad():
            for (name, p), (_, q) in zip(ft.named_parameters(), base.named_parameters()):
                p.copy_(q + 0.01 * torch.randn(q.shape, generator=g))
        ft.save_pretrained(root / f"m{i}")
        models.append({"path": str(root / f"m{i}"), "name": f"modality{i}"})
    merge({"method": "mmer", "base": str(root / "base"), "models": models}, root / "composed")
    return root / "composed", cls


def _time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def measure(folder: Path, cls, device: str, tokens: int, batch: int, repeats: int) -> dict:
    from ..runtime import load_composed

    composed = load_composed(folder, cls, device=device)
    hidden = composed.llm.config.hidden_size
    x = torch.randn(batch, tokens, hidden, device=device) * 0.5
    n = len(composed.tasks)
    # a quarter of the tokens text, the rest in n equal modality spans
    groups = torch.full((batch, tokens), -1, dtype=torch.long)
    span = (tokens - tokens // 4) // n
    for i in range(n):
        groups[:, tokens // 4 + i * span: tokens // 4 + (i + 1) * span] = i
    one = torch.where(groups >= 0, torch.zeros_like(groups), groups)

    def plain():
        with torch.no_grad():
            composed.llm(inputs_embeds=x)

    def routed(ids, **kw):
        def run():
            with torch.no_grad(), composed.route(ids, **kw):
                composed.llm(inputs_embeds=x)
        return run

    def routed_cached_passes():
        with torch.no_grad(), composed.route(groups, cache=True):
            composed.llm(inputs_embeds=x)  # builds the corrections
            t = _time(lambda: composed.llm(inputs_embeds=x), repeats, device)
        return t

    results = {}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    results["plain"] = _time(plain, repeats, device)
    peak_plain = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    results["routed"] = _time(routed(groups), repeats, device)
    peak_routed = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    results["routed+cache"] = routed_cached_passes()
    results["one-modality"] = _time(routed(one, text_mask="present"), repeats, device)
    out = {
        "arch": type(composed.llm).__name__, "device": device, "batch": batch, "tokens": tokens,
        "modalities": n, "threads": torch.get_num_threads(),
        "tokens_per_s": {k: batch * tokens / v for k, v in results.items()},
        "slowdown": {k: v / results["plain"] for k, v in results.items()},
        "resident_bytes": composed.resident_bytes(),
    }
    if peak_plain is not None:
        out["cuda_peak_bytes"] = {"plain": peak_plain, "routed": peak_routed}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("bert", "llama"), default="bert")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder, cls = build(Path(tmp), args.arch)
        r = measure(folder, cls, args.device, args.tokens, args.batch, args.repeats)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['arch']} on {r['device']}, batch {r['batch']} x {r['tokens']} tokens, {r['modalities']} modalities, "
          f"{r['threads']} thread(s)")
    for k, v in r["tokens_per_s"].items():
        print(f"  {k:<13} {v:>12,.0f} tokens/s   x{r['slowdown'][k]:.2f} time of plain")
    mb = {k: v / 2**20 for k, v in r["resident_bytes"].items()}
    print(f"  resident: model {mb['model']:.1f} MiB, tau* {mb['tau*']:.1f} MiB, masks {mb['masks']:.1f} MiB, "
          f"mask counts {mb['mask counts']:.1f} MiB")
    if "cuda_peak_bytes" in r:
        print(f"  CUDA peak: plain {r['cuda_peak_bytes']['plain'] / 2**20:.1f} MiB, routed "
              f"{r['cuda_peak_bytes']['routed'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
