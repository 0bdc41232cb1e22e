"""Run the same mergekit YAML recipes through mergekit and modalmerge; print the max |difference|.

mergekit is run as a subprocess (`python -m mergekit.scripts.run_yaml`), so it can live in its
own folder without touching this environment's torch:

    pip install --no-deps --target /tmp/mksite mergekit==0.1.5 immutables
    python scripts/compare_mergekit.py --mergekit-path /tmp/mksite

Models: a tiny float32 Llama base and three fine-tunes (base + small random deltas) built here.
Methods that modalmerge's registry does not map yet are reported as skipped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml


def build_models(root: Path) -> dict[str, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).eval()
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for i in range(3):
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        base.save_pretrained(root / f"ft{i}")
        with torch.no_grad():  # back to the base for the next fine-tune
            g = torch.Generator().manual_seed(10 + i)
            for p in base.parameters():
                p.sub_(0.02 * torch.randn(p.shape, generator=g))
        paths[f"ft{i}"] = root / f"ft{i}"
    return {k: str(v) for k, v in paths.items()}


def recipes(p: dict[str, str]) -> dict[str, dict]:
    def models(weights, **per):
        out = []
        for i, w in enumerate(weights):
            params = {"weight": w}
            for k, values in per.items():
                params[k] = values[i]
            out.append({"model": p[f"ft{i}"], "parameters": params})
        return out

    common = {"base_model": p["base"], "dtype": "float32"}
    return {
        "linear": {"merge_method": "linear", **common, "models": models([0.5, 0.3, 0.2]),
                   "parameters": {"weight": 0.4}},
        "task_arithmetic": {"merge_method": "task_arithmetic", **common, "models": models([0.7, -0.3, 0.5]),
                            "parameters": {"lambda": 0.8}},
        "task_arithmetic_normalized": {"merge_method": "task_arithmetic", **common,
                                       "models": models([0.7, 0.3, 0.5]), "parameters": {"normalize": True}},
        "ties": {"merge_method": "ties", **common, "models": models([0.7, 0.3, 1.0], density=[0.5, 0.3, 0.01]),
                 "parameters": {"lambda": 0.9}},
        "ties_sum": {"merge_method": "ties", **common, "models": models([1.0, 1.0, 1.0]),
                     "parameters": {"density": 0.2, "normalize": False}},
        "dare_ties_density1": {"merge_method": "dare_ties", **common, "models": models([0.5, 0.3, 0.2]),
                               "parameters": {"density": 1.0}},
        "breadcrumbs": {"merge_method": "breadcrumbs", **common, "models": models([1.0, 1.0, 1.0]),
                        "parameters": {"density": 0.5, "gamma": 0.05}},
        "model_stock": {"merge_method": "model_stock", **common, "models": [{"model": p[f"ft{i}"]} for i in range(3)]},
        "slerp": {"merge_method": "slerp", **common, "models": [{"model": p["base"]}, {"model": p["ft0"]}],
                  "parameters": {"t": 0.3}},
    }


def load(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-path", help="folder holding the mergekit package (put first on PYTHONPATH)")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from modalmerge import merge
    from modalmerge.errors import MergeError

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        root.mkdir(parents=True, exist_ok=True)
        paths = build_models(root / "models")
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        if args.mergekit_path:
            env["PYTHONPATH"] = os.pathsep.join([args.mergekit_path, env.get("PYTHONPATH", "")])
        print(f"{'recipe':<28} {'max |mergekit - modalmerge|':>28}")
        worst = 0.0
        for name, recipe in recipes(paths).items():
            yml = root / f"{name}.yaml"
            yml.write_text(yaml.safe_dump(recipe, sort_keys=False))
            mm_out, mk_out = root / f"mm_{name}", root / f"mk_{name}"
            try:
                merge(yml, mm_out, overwrite=True)
            except MergeError as e:
                why = "not mapped in modalmerge yet" if "is not supported" in str(e) else str(e)
                print(f"{name:<28} skipped: {why}")
                continue
            r = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(yml), str(mk_out),
                                "--no-copy-tokenizer", "--allow-crimes"], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name:<28} mergekit failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
                continue
            a, b = load(str(mk_out)), load(str(mm_out))
            if set(a) != set(b):
                print(f"{name:<28} tensor names differ: {sorted(set(a) ^ set(b))[:3]}")
                continue
            diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            worst = max(worst, diff)
            print(f"{name:<28} {diff:>28.3g}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
