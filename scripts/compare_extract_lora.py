"""Run `modalmerge extract-lora` and mergekit 0.1.5's `mergekit-extract-lora` on the same MODEL and
BASE; print, per tensor, the rank each chose and the relative Frobenius error of its B·A (times
PEFT's scaling) against the task vector MODEL − BASE, and both wall times.

mergekit runs as a subprocess from its own folder (`pip install --no-deps --target /tmp/mksite
mergekit==0.1.5 immutables`), so it need not share this environment; so does modalmerge, so both
wall times include the start of Python and the imports:

    python scripts/compare_extract_lora.py --mergekit-path /tmp/mksite                # tiny Llama built here
    python scripts/compare_extract_lora.py --mergekit-path /tmp/mksite --size big --rank 16
    python scripts/compare_extract_lora.py --mergekit-path /tmp/mksite --model FT --base BASE --rank 32

Built models: a float32 Llama base and a fine-tune = base + a rank-`--true-rank` delta on every
linear layer + small full-rank noise (and a changed final norm), so that errors are small but not
zero at --rank ≥ the true rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

SIZES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=256),
         "big": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, vocab_size=4096)}


def build_models(root: Path, size: str, true_rank: int, dtype: str) -> tuple[str, str]:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, **SIZES[size])
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    sd = {}
    with safe_open(root / "base" / "model.safetensors", "pt") as f:
        for k in f.keys():
            sd[k] = f.get_tensor(k)
    if dtype == "bfloat16":  # both models stored in bfloat16 (the fine-tune rounded after the delta is added)
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, root / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for k, v in sd.items():
        if k.endswith("_proj.weight"):
            out, inp = v.shape
            signal = torch.randn(out, true_rank, generator=g) @ torch.randn(true_rank, inp, generator=g)
            sd[k] = v + 0.02 * signal / true_rank ** 0.5 + 1e-4 * torch.randn(v.shape, generator=g)
    sd["model.norm.weight"] = sd["model.norm.weight"] + 0.01
    (root / "ft").mkdir()
    (root / "ft" / "config.json").write_bytes((root / "base" / "config.json").read_bytes())
    save_file({k: v.to(getattr(torch, dtype)) for k, v in sd.items()}, root / "ft" / "model.safetensors")
    return str(root / "ft"), str(root / "base")


class Weights:
    """A model folder's tensors by name (one or more safetensors files), read one at a time."""

    def __init__(self, folder: str):
        files = sorted(Path(folder).glob("*.safetensors"))
        self.where = {}
        for p in files:
            with safe_open(p, "pt") as f:
                for k in f.keys():
                    self.where[k] = p

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self.where[name], "pt") as f:
            return f.get_tensor(name)


def adapter_products(folder: Path) -> dict[str, tuple[int, torch.Tensor]]:
    """{tensor name of the model: (rank, scaling · B·A in the weight's layout)} of a PEFT adapter folder."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = {}
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    out = {}
    prefix = "base_model.model."
    for key, a in tensors.items():
        for a_suffix, b_suffix, embedding in ((".lora_A.weight", ".lora_B.weight", False),
                                              (".lora_embedding_A", ".lora_embedding_B", True)):
            if not key.endswith(a_suffix):
                continue
            module = key[len(prefix):-len(a_suffix)]
            b = tensors[key[:-len(a_suffix)] + b_suffix]
            rank = a.shape[0]
            alpha = cfg.get("alpha_pattern", {}).get(module, cfg["lora_alpha"])
            r = cfg.get("rank_pattern", {}).get(module, cfg["r"])
            product = (b.double() @ a.double()) * (alpha / r)
            out[module + ".weight"] = (rank, product.T if embedding else product)
    return out


def run(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{cmd[2]} failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit-path", required=True, help="folder where mergekit 0.1.5 is installed (--target)")
    ap.add_argument("--model", help="fine-tuned model folder (default: build one)")
    ap.add_argument("--base", help="its base model folder")
    ap.add_argument("--size", choices=list(SIZES), default="tiny", help="size of the built models")
    ap.add_argument("--true-rank", type=int, default=4, help="rank of the built fine-tune's delta")
    ap.add_argument("--rank", type=int, default=8, help="--rank / --max-rank of both tools")
    ap.add_argument("--energy", type=float, help="modalmerge's --energy (mergekit has no such option)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the built models")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = ap.parse_args()
    if bool(args.model) != bool(args.base):
        ap.error("give both --model and --base, or neither")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, base = (args.model, args.base) if args.model else build_models(root, args.size, args.true_rank, args.dtype)
        ours, theirs = root / "modalmerge", root / "mergekit"
        t_ours = run([sys.executable, "-m", "modalmerge", "extract-lora", model, "--base", base, "-o", str(ours),
                      "--rank", str(args.rank), "--no-progress"]
                     + (["--energy", str(args.energy)] if args.energy is not None else []))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [args.mergekit_path,
                                                                       os.environ.get("PYTHONPATH")])))
        t_theirs = run([sys.executable, "-m", "mergekit.scripts.extract_lora", "--model", model, "--base-model", base,
                        "--out-path", str(theirs), "--max-rank", str(args.rank)], env=env)
        mine, other = adapter_products(ours), adapter_products(theirs)
        sizes = []
        for folder in (ours, theirs):
            saved = json.loads((folder / "adapter_config.json").read_text()).get("modules_to_save") or []
            mib = (folder / "adapter_model.safetensors").stat().st_size / 2**20
            sizes.append(f"{mib:.2f} MiB, modules_to_save {len(saved)} ({', '.join(sorted(saved)[:3])}"
                         f"{', ...' if len(saved) > 3 else ''})")
        ft, bw = Weights(model), Weights(base)
        rows = []
        for name in sorted(set(mine) | set(other)):
            delta = ft[name].double() - bw[name].double()
            norm = float(delta.norm()) or 1.0
            cells = []
            for found in (mine, other):
                if name in found:
                    rank, product = found[name]
                    cells += [str(rank), f"{float((delta - product).norm()) / norm:.3e}"]
                else:
                    cells += ["-", "-"]
            rows.append([name] + cells)

    header = ["tensor", "rank (modalmerge)", "rel. error (modalmerge)", "rank (mergekit)", "rel. error (mergekit)"]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        width = max(len(r[0]) for r in rows)
        print(f"{'tensor':<{width}}  {'rank':>4} {'modalmerge':>11}  {'rank':>4} {'mergekit':>11}")
        for r in rows:
            print(f"{r[0]:<{width}}  {r[1]:>4} {r[2]:>11}  {r[3]:>4} {r[4]:>11}")
    print(f"\nwall time (whole command, imports included): modalmerge {t_ours:.1f} s, mergekit {t_theirs:.1f} s")
    print(f"adapter: modalmerge {sizes[0]}; mergekit {sizes[1]}")


if __name__ == "__main__":
    main()
