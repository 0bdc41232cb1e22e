"""Git Re-Basin weight matching (spec 14): permute a model's hidden units onto a reference's.

A permutation spec says, per permutation, which tensor axes it reorders, in units of `block`
entries (1 for a hidden unit, head_dim for an attention head). Coordinate descent: in a seeded
random order, each permutation is re-solved as a linear assignment maximising
Σ ⟨W_ref, W_model permuted⟩ over every axis it touches (the model's other axes permuted as
currently chosen); rounds stop when no permutation improves the objective (≤ 100 rounds).

Specs (from config.json's model_type):
- llama-style (llama, mistral, qwen2, …): per block the MLP hidden units (gate/up rows, down
  columns) and the attention heads per key/value group (k, v rows; the q heads of that group;
  o columns; with as many KV heads as heads this is one permutation per head). RoPE pairs stay
  inside a head, so whole heads move.
- bert-style: per layer the intermediate units and the attention heads (q, k, v rows and biases,
  attention output columns).
- a plain MLP (no config): a chain of `*.weight` [out, in] (and `*.bias`) tensors in natural
  name order; the units between consecutive layers.
The residual stream is not permuted (its permutation would touch every block, the embeddings
and the norms); neither are the heads within a GQA group. Both models are held in memory.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

import torch

from .. import ops
from ..errors import MergeError

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
BERT_TYPES = ("bert", "roberta", "xlm-roberta", "electra")


@dataclass
class PermSpec:
    # permutation name -> [(tensor name, axis, block)]
    axes: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def add(self, perm: str, name: str, axis: int, block: int, shapes: dict) -> None:
        if name not in shapes:
            return
        n = shapes[name][axis] // block
        if self.sizes.setdefault(perm, n) != n:
            raise AssertionError(f"{perm}: {name} axis {axis} has {n} units, not {self.sizes[perm]}")
        self.axes.setdefault(perm, []).append((name, axis, block))


def _natural(name: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)]


def llama_spec(shapes: dict, cfg: dict) -> PermSpec:
    spec = PermSpec()
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rep = heads // kv
    layers = sorted({int(m.group(1)) for n in shapes if (m := re.search(r"\.layers\.(\d+)\.", n))})
    for i in layers:
        pre = next(n for n in shapes if f".layers.{i}." in n).split(f".layers.{i}.")[0] + f".layers.{i}."
        mlp, att = pre + "mlp.", pre + "self_attn."
        for part in ("gate_proj", "up_proj"):
            spec.add(f"mlp{i}", mlp + part + ".weight", 0, 1, shapes)
            spec.add(f"mlp{i}", mlp + part + ".bias", 0, 1, shapes)
        spec.add(f"mlp{i}", mlp + "down_proj.weight", 1, 1, shapes)
        for part, block in (("q_proj", hd * rep), ("k_proj", hd), ("v_proj", hd)):
            spec.add(f"heads{i}", att + part + ".weight", 0, block, shapes)
            spec.add(f"heads{i}", att + part + ".bias", 0, block, shapes)
        spec.add(f"heads{i}", att + "o_proj.weight", 1, hd * rep, shapes)
    return spec


def bert_spec(shapes: dict, cfg: dict) -> PermSpec:
    spec = PermSpec()
    heads = cfg["num_attention_heads"]
    hd = cfg["hidden_size"] // heads
    for n in shapes:
        m = re.match(r"(.*\.layer\.(\d+)\.)intermediate\.dense\.weight$", n)
        if not m:
            continue
        pre, i = m.group(1), m.group(2)
        spec.add(f"mlp{i}", pre + "intermediate.dense.weight", 0, 1, shapes)
        spec.add(f"mlp{i}", pre + "intermediate.dense.bias", 0, 1, shapes)
        spec.add(f"mlp{i}", pre + "output.dense.weight", 1, 1, shapes)
        for part in ("query", "key", "value"):
            spec.add(f"heads{i}", pre + f"attention.self.{part}.weight", 0, hd, shapes)
            spec.add(f"heads{i}", pre + f"attention.self.{part}.bias", 0, hd, shapes)
        spec.add(f"heads{i}", pre + "attention.output.dense.weight", 1, hd, shapes)
    return spec


def mlp_spec(shapes: dict) -> PermSpec:
    weights = sorted((n for n, s in shapes.items() if n.endswith(".weight") and len(s) == 2), key=_natural)
    others = [n for n in shapes if n not in weights and not (n.endswith(".bias") and n[:-5] + ".weight" in weights)]
    if len(weights) < 2 or others:
        raise MergeError("align: no architecture spec for this model (no config.json model_type) and it is not a "
                         "plain MLP (a chain of *.weight [out, in] and *.bias tensors)")
    spec = PermSpec()
    for k, (a, b) in enumerate(zip(weights, weights[1:])):
        if shapes[b][1] != shapes[a][0]:
            raise MergeError(f"align: {a} {list(shapes[a])} does not feed {b} {list(shapes[b])}; not a plain MLP chain")
        spec.add(f"hidden{k}", a, 0, 1, shapes)
        spec.add(f"hidden{k}", a[:-7] + ".bias", 0, 1, shapes)
        spec.add(f"hidden{k}", b, 1, 1, shapes)
    return spec


def spec_for(shapes: dict, cfg: dict | None) -> PermSpec:
    model_type = (cfg or {}).get("model_type")
    if model_type in LLAMA_TYPES:
        return llama_spec(shapes, cfg)
    if model_type in BERT_TYPES:
        return bert_spec(shapes, cfg)
    if model_type is None:
        return mlp_spec(shapes)
    raise MergeError(f"align: no permutation spec for model type {model_type!r}; supported: "
                     f"{', '.join(LLAMA_TYPES + BERT_TYPES)} and plain MLPs")


def _units(w: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """w viewed as [units, everything else] along `axis` in blocks of `block`."""
    x = w.movedim(axis, 0)
    return x.reshape(x.shape[0] // block, -1)


def permute(w: torch.Tensor, axis: int, block: int, perm: torch.Tensor) -> torch.Tensor:
    x = w.movedim(axis, 0)
    shape = x.shape
    x = x.reshape(perm.numel(), block, -1).index_select(0, perm).reshape(shape)
    return x.movedim(0, axis).contiguous()


def _apply(params: dict, spec: PermSpec, perms: dict, name: str, skip: str | None = None) -> torch.Tensor:
    w = params[name]
    for p, entries in spec.axes.items():
        if p == skip:
            continue
        for n, axis, block in entries:
            if n == name:
                w = permute(w, axis, block, perms[p])
    return w


def weight_matching(ref: dict, model: dict, spec: PermSpec, max_rounds: int = 100, seed: int = 0) -> dict:
    """The permutations (name -> perm, perm[i] = the model's unit placed at i)."""
    perms = {p: torch.arange(n) for p, n in spec.sizes.items()}
    rng = random.Random(seed)
    names = list(spec.sizes)
    for _ in range(max_rounds):
        improved = False
        rng.shuffle(names)
        for p in names:
            n = spec.sizes[p]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for name, axis, block in spec.axes[p]:
                a = _units(ref[name].double(), axis, block)
                b = _units(_apply(model, spec, perms, name, skip=p).double(), axis, block)
                cost += a @ b.T
            new = ops.best_permutation(cost)
            old_score = float(cost[torch.arange(n), perms[p]].sum())
            new_score = float(cost[torch.arange(n), new].sum())
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[p] = new
                improved = True
        if not improved:
            break
    return perms


def permuted(model: dict, spec: PermSpec, perms: dict) -> dict:
    touched = {n for entries in spec.axes.values() for n, _, _ in entries}
    return {n: (_apply(model, spec, perms, n) if n in touched else v) for n, v in model.items()}


def align_folders(model_path, reference_path, output, *, overwrite: bool = False, seed: int = 0,
                  max_rounds: int = 100, allow_pickle: bool = False) -> dict:
    """Align the model folder to the reference and write the permuted model to `output`."""
    from ..checkpoint.output import AtomicFolder, ShardedWriter, copy_aux_files
    from ..checkpoint.safetensors_io import TensorMeta
    from ..checkpoint.sources import open_source

    src = open_source(model_path, label="model", allow_pickle=allow_pickle)
    ref = open_source(reference_path, label="reference", allow_pickle=allow_pickle)
    names = src.names()
    for n in names:
        if n not in ref or ref.meta(n).shape != src.meta(n).shape:
            raise MergeError(f"align: tensor {n!r} of {model_path} is missing or shaped differently in the reference "
                             f"{reference_path}; align models of one architecture")
    cfg = None
    folder = src.folder
    if folder is not None and (folder / "config.json").exists():
        cfg = json.loads((folder / "config.json").read_text())
    model = {n: src.read(n) for n in names}
    shapes = {n: tuple(v.shape) for n, v in model.items()}
    spec = spec_for(shapes, cfg)
    floats = {n: v.float() for n, v in model.items() if v.is_floating_point()}
    ref_sd = {n: ref.read(n).float() for n in floats}
    perms = weight_matching(ref_sd, floats, spec, max_rounds, seed)
    out = permuted(floats, spec, perms)
    atomic = AtomicFolder(output, overwrite)
    try:
        w = ShardedWriter(atomic.tmp, [(n, TensorMeta(tuple(v.shape), v.dtype)) for n, v in model.items()])
        for n, v in model.items():
            w.write(n, out[n].to(v.dtype) if n in out else v)
        w.close()
        copy_aux_files(folder, atomic.tmp)
        moved = {p: int((perm != torch.arange(perm.numel())).sum()) for p, perm in perms.items()}
        (atomic.tmp / "alignment.json").write_text(json.dumps(
            {"reference": str(reference_path), "model": str(model_path), "seed": seed,
             "permutations": {p: perm.tolist() for p, perm in perms.items()}, "moved_units": moved}, indent=2))
        atomic.commit()
    except BaseException:
        atomic.abort()
        raise
    return perms
