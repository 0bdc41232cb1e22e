"""Speed and memory of the routed runtime against the plain model, measured side by side.

    python -m modalmerge.bench.runtime_overhead [--arch bert|llama] [--device cpu|cuda] [--tokens 256]

Builds a randomly initialised LLM (BERT: all-MiniLM-L6-v2's shape; Llama: a small decoder),
three synthetic fine-tunes with the same base, composes them with MMER into a temporary folder,
and times forward passes over soft-token inputs (inputs_embeds), one call of each in turn per
round, the median of the rounds:
- plain: the loaded text weights, no routing;
- routed: three modality groups + text tokens in every sequence, text tokens on m̄ over all
  three (each group's weights built per layer from the bit-packed mask and τ*, used, dropped);
- one-modality: one modality + text with text_mask="present" (weights patched in place once per
  context, patch and restore included in the time);
- routed+cache: repeated passes over one prompt with each group's weights kept (cache=True).
For the decoder, the speed of incremental decoding with the KV cache after a plain and after a
routed prefill (decoding runs outside route(), on the stored weights). Prints tokens/s, the
ratio to the plain model's, and the resident bytes of the model, τ*, the masks and the mask
counts against N separate models (and the peak allocated memory on CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
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


def median_times(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each function; one call of each per round, in turn, so that load on a
    shared machine falls on all of them alike (one warm-up round first)."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if r:
                runs[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in runs.items()}


def mixed_groups(batch: int, tokens: int, n: int, text_share: float = 0.25) -> torch.Tensor:
    """[batch, tokens] group ids: the first `text_share` of each sequence text, the rest in n
    equal modality spans (what is left over at the end: text)."""
    groups = torch.full((batch, tokens), -1, dtype=torch.long)
    first = int(tokens * text_share)
    span = (tokens - first) // n
    for i in range(n):
        groups[:, first + i * span: first + (i + 1) * span] = i
    return groups


def measure(folder: Path, cls, device: str, tokens: int, batch: int, repeats: int, decode_steps: int = 0) -> dict:
    from ..runtime import load_composed

    composed = load_composed(folder, cls, device=device)
    hidden = composed.llm.config.hidden_size
    x = torch.randn(batch, tokens, hidden, device=device) * 0.5
    n = len(composed.tasks)
    groups = mixed_groups(batch, tokens, n)
    one = torch.where(groups >= 0, torch.zeros_like(groups), groups)

    def plain():
        with torch.no_grad():
            composed.llm(inputs_embeds=x)

    def routed(ids, **kw):
        def run():
            with torch.no_grad(), composed.route(ids, **kw):
                composed.llm(inputs_embeds=x)
        return run

    results = median_times({"plain": plain, "routed": routed(groups), "one-modality": routed(one, text_mask="present")},
                            repeats, device)
    with torch.no_grad(), composed.route(groups, cache=True):
        composed.llm(inputs_embeds=x)  # builds each group's weights, kept for the context
        results["routed+cache"] = median_times({"cached": lambda: composed.llm(inputs_embeds=x)},
                                                repeats, device)["cached"]
    peaks = None
    if device.startswith("cuda"):
        peaks = {}
        for name, fn in (("plain", plain), ("routed", routed(groups))):
            torch.cuda.reset_peak_memory_stats()
            fn()
            peaks[name] = torch.cuda.max_memory_allocated()
    resident = composed.resident_bytes()
    out = {
        "arch": type(composed.llm).__name__, "device": device, "batch": batch, "tokens": tokens,
        "modalities": n, "text_mask": "all", "threads": torch.get_num_threads(), "repeats": repeats,
        "modality_token_share": float((groups >= 0).float().mean()),
        "tokens_per_s": {k: batch * tokens / v for k, v in results.items()},
        "x_plain_tokens_per_s": {k: results["plain"] / v for k, v in results.items()},
        "resident_bytes": resident,
        # what serving the same modalities takes without composing: N models of the LLM's size
        "separate_models_bytes": n * resident["model"],
    }
    if peaks is not None:
        out["cuda_peak_bytes"] = peaks
    if decode_steps:
        out["decode"] = decode_speed(composed, x, groups, decode_steps, repeats, device)
    return out


def decode_speed(composed, x: torch.Tensor, groups: torch.Tensor, steps: int, repeats: int, device: str) -> dict:
    """Tokens/s of incremental decoding with the KV cache, one soft token a step for each
    sequence, after a plain prefill and after a routed one (the decode steps run outside
    route(), on the stored weights, either way)."""
    step = x[:, -1:]

    def after(routed_prefill: bool):
        def run():
            with torch.no_grad():
                with composed.route(groups) if routed_prefill else contextlib.nullcontext():
                    cache = composed.llm(inputs_embeds=x, use_cache=True).cache
                t0 = time.perf_counter()
                for _ in range(steps):
                    cache = composed.llm(inputs_embeds=step, cache=cache, use_cache=True).cache
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds.setdefault(routed_prefill, []).append(time.perf_counter() - t0)
        return run

    seconds: dict[bool, list[float]] = {}
    median_times({"plain prefill": after(False), "routed prefill": after(True)}, repeats, device)
    # the first round is the warm-up: drop it, as median_times does
    med = {k: statistics.median(v[1:]) for k, v in seconds.items()}
    per_s = {"after plain prefill": x.shape[0] * steps / med[False],
             "after routed prefill": x.shape[0] * steps / med[True]}
    return {"steps": steps, "tokens_per_s": per_s,
            "routed_over_plain": per_s["after routed prefill"] / per_s["after plain prefill"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("bert", "llama"), default="bert")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    ap.add_argument("--decode-steps", type=int, default=32, help="decode steps timed (llama only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder, cls = build(Path(tmp), args.arch)
        r = measure(folder, cls, args.device, args.tokens, args.batch, args.repeats,
                    args.decode_steps if args.arch == "llama" else 0)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['arch']} on {r['device']}, batch {r['batch']} x {r['tokens']} tokens "
          f"({r['modality_token_share']:.0%} from {r['modalities']} modalities, the rest text, m̄ over all), "
          f"{r['threads']} thread(s), median of {r['repeats']}")
    for k, v in r["tokens_per_s"].items():
        print(f"  {k:<13} {v:>12,.0f} tokens/s   x{r['x_plain_tokens_per_s'][k]:.2f} plain's tokens/s")
    if "decode" in r:
        d = r["decode"]
        print(f"  decode ({d['steps']} steps, KV cache): " + ", ".join(
            f"{k} {v:,.0f} tokens/s" for k, v in d["tokens_per_s"].items()) + f"  (x{d['routed_over_plain']:.2f})")
    mb = {k: v / 2**20 for k, v in r["resident_bytes"].items()}
    print(f"  resident: model {mb['model']:.1f} MiB, tau* {mb['tau*']:.1f} MiB, masks {mb['masks']:.1f} MiB, "
          f"mask counts {mb['mask counts']:.1f} MiB = {sum(mb.values()):.1f} MiB; "
          f"{r['modalities']} separate models {r['separate_models_bytes'] / 2**20:.1f} MiB")
    if "cuda_peak_bytes" in r:
        print(f"  CUDA peak: plain {r['cuda_peak_bytes']['plain'] / 2**20:.1f} MiB, routed "
              f"{r['cuda_peak_bytes']['routed'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
