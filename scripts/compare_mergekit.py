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
import json
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
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
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
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", **common,
                             "models": models([0.7, 1.0, 0.4], density=[0.5, 0.3, 0.8]),
                             "parameters": {"gamma": 0.05, "lambda": 0.9}},
        "breadcrumbs_ties_normalized": {"merge_method": "breadcrumbs_ties", **common, "models": models([0.7, 1.0, 0.4]),
                                        "parameters": {"density": 0.4, "gamma": 0.02, "normalize": True}},
        "breadcrumbs_rescale": {"merge_method": "breadcrumbs", **common, "models": models([0.7, 1.0, 0.4]),
                                "parameters": {"density": 0.3, "gamma": 0.05, "rescale": True}},
        "breadcrumbs_ties_rescale": {"merge_method": "breadcrumbs_ties", **common, "models": models([0.7, 1.0, 0.4]),
                                     "parameters": {"density": 0.3, "gamma": 0.05, "rescale": True,
                                                    "normalize": True}},
        "sce": {"merge_method": "sce", **common, "models": [{"model": p[f"ft{i}"]} for i in range(3)]},
        "sce_topk": {"merge_method": "sce", **common, "models": [{"model": p[f"ft{i}"]} for i in range(3)],
                     "parameters": {"select_topk": 0.3}},
        "nearswap": {"merge_method": "nearswap", **common, "models": [{"model": p["ft1"]}],
                     "parameters": {"t": 0.01}},
        "slerp": {"merge_method": "slerp", **common, "models": [{"model": p["base"]}, {"model": p["ft0"]}],
                  "parameters": {"t": 0.3}},
        "nuslerp": {"merge_method": "nuslerp", **common, "models": models([0.7, 0.3])},
        "nuslerp_rows_no_base": {"merge_method": "nuslerp", "dtype": "float32", "models": models([0.4, 0.6]),
                                 "parameters": {"nuslerp_flatten": False}},
        "nuslerp_row_wise": {"merge_method": "nuslerp", **common, "models": models([1.0, 2.0]),
                             "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "nuslerp_filtered": {"merge_method": "nuslerp", **common,
                             "models": [{"model": p["ft0"], "parameters": {"weight": [0.2, 0.9]}},
                                        {"model": p["ft1"], "parameters": {"weight": 0.5}}],
                             "parameters": {"nuslerp_flatten": [{"filter": "mlp", "value": False}, {"value": True}]}},
        "multislerp": {"merge_method": "multislerp", **common, "models": models([0.5, 0.3, 0.2])},
        "multislerp_no_base": {"merge_method": "multislerp", "dtype": "float32", "models": models([1.0, 2.0, 1.0]),
                               "parameters": {"eps": 1e-6}},
        "karcher": {"merge_method": "karcher", **common, "models": [{"model": p[f"ft{i}"]} for i in range(3)]},
        "karcher_no_base": {"merge_method": "karcher", "dtype": "float32",
                            "models": [{"model": p[f"ft{i}"]} for i in range(3)],
                            "parameters": {"max_iter": 3, "tol": 1e-6}},
        "arcee_fusion": {"merge_method": "arcee_fusion", **common, "models": [{"model": p["base"]}, {"model": p["ft2"]}]},
        "ram": {"merge_method": "ram", **common, "models": [{"model": p[f"ft{i}"]} for i in range(3)],
                "parameters": {"epsilon": 0.02}},
        "ram_default": {"merge_method": "ram", **common, "models": [{"model": p[f"ft{i}"]} for i in range(2)]},
        "ramplus_tl": {"merge_method": "ramplus_tl", **common, "models": [{"model": p[f"ft{i}"]} for i in range(3)],
                       "parameters": {"epsilon": 0.015, "r": 0.5, "alpha": 0.4}},
        "ramplus_tl_default": {"merge_method": "ramplus_tl", **common,
                               "models": [{"model": p[f"ft{i}"]} for i in range(3)], "parameters": {"epsilon": 0.03}},
        **filter_recipes(p),
        **slice_recipes(p),
    }


def filter_recipes(p: dict[str, str]) -> dict[str, dict]:
    """Filter lists (`[{filter, value}, ...]`, first substring match; a model's list that matches
    nothing falls back to the global value), gradients inside them, in the `models` form."""
    common = {"base_model": p["base"], "dtype": "float32"}
    return {
        "filters_ties": {"merge_method": "ties", **common, "models": [
            {"model": p["ft0"], "parameters": {"weight": 0.7, "density": [{"filter": "mlp", "value": 0.3}]}},
            {"model": p["ft1"], "parameters": {"weight": [{"filter": "self_attn", "value": [0.2, 1.0]}]}},
            {"model": p["ft2"]}],
            "parameters": {"density": [{"filter": "self_attn", "value": [0.1, 0.6]}, {"filter": "norm", "value": 1.0},
                                       {"value": 0.5}], "weight": 0.5,
                           "lambda": [{"filter": "layers.3", "value": 0.5}, {"filter": "*", "value": [0.9, 1.1]}]}},
        "filters_task_arithmetic": {"merge_method": "task_arithmetic", **common, "models": [
            {"model": p["ft0"], "parameters": {"weight": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.4}]}},
            {"model": p["ft1"], "parameters": {"weight": {"filter": "q_proj", "value": -0.5}}}],
            # mergekit's `weight` is required: a list must give every tensor one (here: the global catch-all)
            "parameters": {"weight": [{"filter": "self_attn", "value": 0.3}, {"value": 0.6}], "normalize": False,
                           "lambda": [{"filter": "embed", "value": 0.0}, {"value": 0.8}]}},
        "filters_linear": {"merge_method": "linear", **common, "models": [
            {"model": p["ft0"], "parameters": {"weight": [{"filter": "mlp", "value": [1.0, 3.0]}]}},
            {"model": p["ft1"], "parameters": {"weight": 2.0}}],
            "parameters": {"weight": [{"filter": "layers.0", "value": 0.5}, {"value": 1.0}]}},
        "filters_slerp": {"merge_method": "slerp", **common, "models": [{"model": p["base"]}, {"model": p["ft0"]}],
                          "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                               {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
    }


def slice_recipes(p: dict[str, str]) -> dict[str, dict]:
    """Layer stacking (`slices:`), on the 4-layer models."""
    def src(model, a, b, **params):
        return {"model": p[model], "layer_range": [a, b], **({"parameters": params} if params else {})}

    return {
        "slices_passthrough": {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [src("ft0", 0, 3)]}, {"sources": [src("ft1", 2, 4)]}]},
        "slices_passthrough_scale": {"merge_method": "passthrough", "dtype": "float32",
                                     "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]},
                                     "slices": [{"sources": [src("ft0", 0, 2)]},
                                                {"sources": [src("ft1", 1, 4, scale=[{"filter": "mlp", "value": 0.5}])]}]},
        "slices_linear": {"merge_method": "linear", "dtype": "float32", "slices": [
            {"sources": [src("ft0", 0, 2, weight=0.7), src("ft1", 1, 3, weight=0.3)]},
            {"sources": [src("ft2", 3, 4, weight=0.7), src("ft0", 0, 1, weight=0.3)]}]},
        "slices_linear_weights": {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0}, "slices": [
            {"sources": [src("ft0", 0, 3, weight=[1.0, 0.2]), src("ft1", 0, 3, weight=[0.0, 0.8])]},
            {"sources": [src("ft0", 3, 4, weight=0.3), src("ft1", 3, 4)], "parameters": {"weight": 0.6}}]},
        "slices_ties": {"merge_method": "ties", "base_model": p["base"], "dtype": "float32",
                        "parameters": {"density": 0.5}, "slices": [
            {"sources": [src("base", 0, 2), src("ft0", 0, 2, weight=0.6), src("ft1", 0, 2, weight=0.4)]},
            {"sources": [src("base", 1, 4), src("ft0", 1, 4, weight=0.6), src("ft1", 1, 4, weight=0.4, density=0.3)],
             "parameters": {"lambda": 0.8}}]},
        "slices_slerp_gradient": {"merge_method": "slerp", "base_model": p["ft0"], "dtype": "float32",
                                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                                       {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                                       {"value": 0.5}]},
                                  "slices": [{"sources": [src("ft0", 0, 4), src("ft1", 0, 4)]}]},
        "slices_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": p["base"], "dtype": "float32",
                                   "parameters": {"lambda": [0.5, 1.0]}, "slices": [
            {"sources": [src("base", 0, 3), src("ft0", 0, 3, weight=0.5), src("ft2", 0, 3, weight=0.5)]},
            {"sources": [src("base", 2, 4), src("ft0", 2, 4, weight=0.5), src("ft2", 2, 4, weight=0.5)]}]},
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
            layers = [json.loads((Path(o) / "config.json").read_text()).get("num_hidden_layers") for o in (mk_out, mm_out)]
            if layers[0] != layers[1]:
                print(f"{name:<28} num_hidden_layers differ: mergekit {layers[0]}, modalmerge {layers[1]}")
                worst = float("inf")
                continue
            worst = max(worst, diff)
            print(f"{name:<28} {diff:>28.3g}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
