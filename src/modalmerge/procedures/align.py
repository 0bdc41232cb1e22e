"""Git Re-Basin weight matching (spec 14): permute a model's hidden units onto a reference's.

A permutation spec says, per permutation, which tensor axes it reorders, in units of `block`
entries (1 for a hidden unit, head_dim for an attention head); one permutation may reorder
several axes of one tensor (a head's dense layer that maps the residual stream back onto it),
but each axis of a tensor belongs to one permutation at most. Coordinate descent: in a seeded
random order, each permutation is re-solved as a linear assignment maximising
Σ ⟨W_ref, W_model permuted⟩ over every axis it touches (everything else permuted as currently
chosen), and kept only if the objective over the tensors it touches goes up; rounds stop when no
permutation improves (≤ 100 rounds).

Specs (from config.json's model_type):
- llama-style (llama, mistral, qwen2, qwen3, gemma, gemma2): per block the MLP hidden units
  (gate/up rows and biases, down columns) and the key/value heads (k, v rows and biases; the q
  heads of each KV group and their o columns follow their group; RoPE pairs stay inside a head,
  so whole heads move). With grouped-query attention the q heads sharing a KV head are also
  permuted among themselves: a nested permutation `qheads{i}` (q rows and biases, o columns, in
  heads) that keeps every q head in its group; it is solved jointly with its group permutation
  `heads{i}` (one small assignment inside each pair of groups, then one over the groups). Phi-3's
  fused qkv_proj / gate_up_proj layout is not supported.
- bert-style (bert, roberta, xlm-roberta, electra): per layer the intermediate units (intermediate
  rows and biases, output columns) and the attention heads (q, k, v rows and biases, attention
  output columns).
- a plain MLP (no config): a chain of `*.weight` [out, in] (and `*.bias`) tensors in natural
  name order; the units between consecutive layers.

The residual stream (on by default; `residual=False`, `modalmerge align --no-residual`, leaves it
as it is) is one more permutation, `residual`, shared by every block, since every block reads it
and adds to it:
- llama-style: embed_tokens columns; q/k/v, gate and up input columns; o_proj and down_proj
  output rows and their biases where a checkpoint has them; every RMSNorm weight in and after the
  blocks (RMSNorm divides by a permutation-invariant root mean square, then scales elementwise,
  so it commutes with a permutation); lm_head and score columns. A tied lm_head is the embedding matrix, so it moves
  with it. q/k/v biases lie on the head axis, not the residual one; qwen3's q_norm / k_norm act
  on head_dim, shared by all heads, and stay as they are.
- bert-style: word, position and token-type embedding columns and the embedding LayerNorm
  (LayerNorm's mean and variance are permutation-invariant too); q/k/v and intermediate input
  columns; attention-output and output dense rows, biases and LayerNorms; pooler input columns
  (the pooler's output is a space of its own, left alone); heads that read the sequence output
  (token-classification and QA heads, RoBERTa/ELECTRA classification heads, ELECTRA's
  discriminator and multiple-choice summary) by their input columns; a bare classifier.weight
  reads the sequence output in a *ForTokenClassification and the pooler (or ELECTRA's summary)
  in a *ForSequenceClassification / *ForMultipleChoice, as config.json's architectures says
  (neither named: an error). A masked-LM head's decoder is tied to the word embeddings, so the
  space of its transform output (cls.predictions.transform, RoBERTa's lm_head.dense, ELECTRA's
  generator_predictions) is the embedding space: its dense rows, bias and LayerNorm move with the
  embedding columns. ELECTRA with embedding_size ≠
  hidden_size has an embeddings_project: the embeddings then get a permutation of their own,
  `embedding`, and embeddings_project maps it onto the residual stream.
A tensor with a hidden-size axis that the spec does not know is an error (align with the
residual stream left alone, or extend the spec), never a silently broken model. Both models are
held in memory.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

import torch

from .. import ops
from ..errors import MergeError
from ..engine.architectures import permutable_model_types, permutation_rules

NO_RESIDUAL_HINT = "align with the residual stream left alone (--no-residual, residual=False)"


@dataclass
class PermSpec:
    # permutation name -> [(tensor name, axis, block)]
    axes: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    # parent -> (child, group): the child permutes units in runs of `group`, run g taking run parent[g]
    # of the model reordered inside; it is solved jointly with its parent, never on its own
    inner: dict[str, tuple[str, int]] = field(default_factory=dict)
    # tensor name -> [(permutation, axis, block)]
    by_name: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)

    def add(self, perm: str | None, name: str, axis: int, block: int, shapes: dict) -> None:
        if perm is None or name not in shapes:
            return
        n = shapes[name][axis] // block
        if self.sizes.setdefault(perm, n) != n:
            others = ", ".join(sorted({t for t, _, _ in self.axes.get(perm, [])})[:2])
            raise MergeError(f"cannot align tensor {name!r}: its axis {axis} has {n} units where {others} "
                             f"(permuted together with it) have {self.sizes[perm]}; the checkpoint does not follow "
                             "its config's layout — check config.json against the weights")
        if any(a == axis for _, a, _ in self.by_name.get(name, ())):
            raise AssertionError(f"{name} axis {axis} is claimed by two permutations")
        self.axes.setdefault(perm, []).append((name, axis, block))
        self.by_name.setdefault(name, []).append((perm, axis, block))

    def nest(self, parent: str, child: str, group: int) -> None:
        if parent in self.sizes and child in self.sizes:
            assert self.sizes[child] == self.sizes[parent] * group, (parent, child, group)
            self.inner[parent] = (child, group)

    def touched(self, *perms: str) -> list[str]:
        return list(dict.fromkeys(n for p in perms for n, _, _ in self.axes.get(p, ())))


def _natural(name: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)]


def _check_known(spec: PermSpec, shapes: dict, fixed: set, family: str) -> None:
    """Refuse a tensor with an axis the size of the residual stream (or of ELECTRA's embeddings) that the
    spec neither permutes nor knows to leave alone: it may read that space, and would then break."""
    dims = {spec.sizes[p] for p in ("residual", "embedding") if p in spec.sizes}
    for n, s in shapes.items():
        if n not in spec.by_name and n not in fixed and dims & set(s):
            raise MergeError(f"align: tensor {n!r} {list(s)} has a hidden-size axis that the {family} permutation "
                             f"spec does not know, so the residual stream cannot be permuted safely; {NO_RESIDUAL_HINT}")


def llama_spec(shapes: dict, cfg: dict, residual: bool = True) -> PermSpec:
    spec = PermSpec()
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hidden = cfg["hidden_size"]
    hd = cfg.get("head_dim") or hidden // heads
    rep = heads // kv
    res = "residual" if residual else None
    fixed: set = set()
    prefixes: dict[int, str] = {}
    for n in shapes:
        if m := re.search(r"(?:^|\.)layers\.(\d+)\.", n):
            prefixes.setdefault(int(m.group(1)), n[:m.end()])
    for i, pre in sorted(prefixes.items()):
        mlp, att = pre + "mlp.", pre + "self_attn."
        for part in [att + x for x in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                [mlp + x for x in ("gate_proj", "up_proj", "down_proj")]:
            if part + ".weight" not in shapes:
                raise MergeError(f"align: {part}.weight is missing; a {cfg.get('model_type')} checkpoint with fused "
                                 f"projections (qkv_proj, gate_up_proj) or another layout is not supported")
        for part in ("gate_proj", "up_proj"):
            spec.add(f"mlp{i}", mlp + part + ".weight", 0, 1, shapes)
            spec.add(f"mlp{i}", mlp + part + ".bias", 0, 1, shapes)
            spec.add(res, mlp + part + ".weight", 1, 1, shapes)
        spec.add(f"mlp{i}", mlp + "down_proj.weight", 1, 1, shapes)
        spec.add(res, mlp + "down_proj.weight", 0, 1, shapes)
        spec.add(res, mlp + "down_proj.bias", 0, 1, shapes)
        # KV heads; the q heads of a group (and their o columns) move with it, and inside it when rep > 1
        qperm = f"heads{i}" if rep == 1 else f"qheads{i}"
        for part, perm in (("q_proj", qperm), ("k_proj", f"heads{i}"), ("v_proj", f"heads{i}")):
            spec.add(perm, att + part + ".weight", 0, hd, shapes)
            spec.add(perm, att + part + ".bias", 0, hd, shapes)
            spec.add(res, att + part + ".weight", 1, 1, shapes)
        spec.add(qperm, att + "o_proj.weight", 1, hd, shapes)
        spec.add(res, att + "o_proj.weight", 0, 1, shapes)
        spec.add(res, att + "o_proj.bias", 0, 1, shapes)
        if rep > 1:
            spec.nest(f"heads{i}", qperm, rep)
        for n, s in shapes.items():
            if n.startswith(pre) and len(s) == 1 and n.endswith("norm.weight"):
                if n.startswith(att):
                    fixed.add(n)   # qwen3's q_norm / k_norm: per head_dim, shared by all heads
                else:
                    spec.add(res, n, 0, 1, shapes)
    if not residual:
        return spec
    for n, s in shapes.items():
        if re.search(r"(?:^|\.)layers\.\d+\.", n):
            continue
        if re.search(r"(?:^|\.)(embed_tokens|lm_head|score)\.weight$", n) and len(s) == 2:
            spec.add(res, n, 1, 1, shapes)
        elif len(s) == 1 and n.endswith("norm.weight"):
            spec.add(res, n, 0, 1, shapes)
    _check_known(spec, shapes, fixed, "llama-style")
    return spec


# bert-style heads: tensor name -> [(axis, space)]; space "res" is the residual stream, "emb" the word
# embedding space (the residual stream unless ELECTRA projects it), None a space of the head's own
_BERT_HEADS = {
    # masked-LM heads: the decoder is tied to the word embeddings, so the transform outputs the embedding space
    **{f"{pre}.{dense}.weight": [(1, "res"), (0, "emb")] for pre, dense in
       (("cls.predictions.transform", "dense"), ("lm_head", "dense"), ("generator_predictions", "dense"))},
    **{f"{pre}.{part}": [(0, "emb")] for pre in ("cls.predictions.transform", "generator_predictions")
       for part in ("dense.bias", "LayerNorm.weight", "LayerNorm.bias")},
    **{f"lm_head.{part}": [(0, "emb")] for part in ("dense.bias", "layer_norm.weight", "layer_norm.bias")},
    **{f"{dec}.weight": [(1, "emb")] for dec in ("cls.predictions.decoder", "lm_head.decoder", "generator_lm_head")},
    # heads that read the sequence output (ELECTRA's multiple choice through its sequence summary)
    **{f"{h}.weight": [(1, "res")] for h in ("qa_outputs", "classifier.dense", "discriminator_predictions.dense",
                                             "sequence_summary.summary")},
    "pooler.dense.weight": [(1, "res")],
    # the pooler's, a head's own and the vocabulary's spaces
    **{n: [] for n in ("pooler.dense.bias", "cls.seq_relationship.weight", "classifier.dense.bias",
                       "classifier.out_proj.weight", "discriminator_predictions.dense.bias",
                       "discriminator_predictions.dense_prediction.weight", "sequence_summary.summary.bias",
                       "cls.predictions.bias", "cls.predictions.decoder.bias", "lm_head.bias", "lm_head.decoder.bias",
                       "generator_lm_head.bias", "cls.seq_relationship.bias", "qa_outputs.bias", "classifier.bias",
                       "classifier.out_proj.bias", "discriminator_predictions.dense_prediction.bias")},
}


def bert_spec(shapes: dict, cfg: dict, residual: bool = True) -> PermSpec:
    spec = PermSpec()
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    hd = hidden // heads
    res = "residual" if residual else None
    projected = any(n.endswith("embeddings_project.weight") for n in shapes)
    space = {"res": res, "emb": ("embedding" if projected else res) if residual else None}
    for n in shapes:
        m = re.match(r"(.*\.layer\.(\d+)\.)intermediate\.dense\.weight$", n)
        if not m:
            continue
        pre, i = m.group(1), m.group(2)
        spec.add(f"mlp{i}", pre + "intermediate.dense.weight", 0, 1, shapes)
        spec.add(f"mlp{i}", pre + "intermediate.dense.bias", 0, 1, shapes)
        spec.add(f"mlp{i}", pre + "output.dense.weight", 1, 1, shapes)
        spec.add(res, pre + "intermediate.dense.weight", 1, 1, shapes)
        for part in ("query", "key", "value"):
            spec.add(f"heads{i}", pre + f"attention.self.{part}.weight", 0, hd, shapes)
            spec.add(f"heads{i}", pre + f"attention.self.{part}.bias", 0, hd, shapes)
            spec.add(res, pre + f"attention.self.{part}.weight", 1, 1, shapes)
        spec.add(f"heads{i}", pre + "attention.output.dense.weight", 1, hd, shapes)
        for out in ("attention.output.", "output."):
            spec.add(res, pre + out + "dense.weight", 0, 1, shapes)
            for part in ("dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
                spec.add(res, pre + out + part, 0, 1, shapes)
    if not residual:
        return spec
    fixed = set()
    for n, s in shapes.items():
        if re.search(r"(?:^|\.)embeddings\.(word|position|token_type)_embeddings\.weight$", n):
            spec.add(space["emb"], n, 1, 1, shapes)
        elif re.search(r"(?:^|\.)embeddings\.LayerNorm\.(weight|bias)$", n):
            spec.add(space["emb"], n, 0, 1, shapes)
        elif n.endswith("embeddings_project.weight"):
            spec.add(space["emb"], n, 1, 1, shapes)
            spec.add(res, n, 0, 1, shapes)
        elif n.endswith("embeddings_project.bias"):
            spec.add(res, n, 0, 1, shapes)
        elif (key := re.sub(r"^(?:bert|roberta|electra)\.(?=pooler\.)", "", n)) in _BERT_HEADS:
            for axis, sp in _BERT_HEADS[key]:
                spec.add(space[sp], n, axis, 1, shapes)
            fixed.add(n)
    if "classifier.weight" in shapes:
        archs = cfg.get("architectures") or []
        if any(a.endswith("TokenClassification") for a in archs):
            spec.add(res, "classifier.weight", 1, 1, shapes)
        elif any(a.endswith(("SequenceClassification", "MultipleChoice")) for a in archs):
            fixed.add("classifier.weight")   # reads the pooler's (or a sequence summary's) output
        else:
            raise MergeError(f"align: cannot tell whether classifier.weight reads the residual stream or the pooler "
                             f"(config.json's architectures {archs} names no known head); {NO_RESIDUAL_HINT}")
    _check_known(spec, shapes, fixed, "bert-style")
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


def spec_for(shapes: dict, cfg: dict | None, residual: bool = True) -> PermSpec:
    """The permutation spec of a model from its (floating-point) tensor shapes and config.json."""
    model_type = (cfg or {}).get("model_type")
    rules = permutation_rules(model_type)  # which model types follow which rules: engine/architectures.py
    if rules:
        return PERMUTATION_RULES[rules](shapes, cfg, residual)
    if model_type is None:
        return mlp_spec(shapes)
    raise MergeError(f"align: no permutation spec for model type {model_type!r}; supported: "
                     f"{', '.join(permutable_model_types())} and plain MLPs")


# the permutation rules of each family that engine/architectures.py's specs name (ArchSpec.permutation)
PERMUTATION_RULES = {"llama": llama_spec, "bert": bert_spec}


def _units(w: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """w viewed as [units, everything else] along `axis` in blocks of `block`."""
    x = w.movedim(axis, 0)
    return x.reshape(x.shape[0] // block, -1)


def permute(w: torch.Tensor, axis: int, block: int, perm: torch.Tensor) -> torch.Tensor:
    x = w.movedim(axis, 0)
    shape = x.shape
    x = x.reshape(perm.numel(), block, -1).index_select(0, perm).reshape(shape)
    return x.movedim(0, axis).contiguous()


def _apply(params: dict, spec: PermSpec, perms: dict, name: str, skip: tuple | None = None) -> torch.Tensor:
    """params[name] with every permutation applied, except the one on axis skip = (perm, axis)."""
    w = params[name]
    for p, axis, block in spec.by_name.get(name, ()):
        if (p, axis) != skip:
            w = permute(w, axis, block, perms[p])
    return w


def _cost(ref: dict, model: dict, spec: PermSpec, perms: dict, p: str) -> torch.Tensor:
    """[n, n]: entry (i, j) = Σ ⟨ref unit i, model unit j⟩ over p's axes, everything else as now."""
    n = spec.sizes[p]
    cost = torch.zeros(n, n, dtype=torch.float64)
    for name, axis, block in spec.axes[p]:
        a = _units(ref[name].double(), axis, block)
        b = _units(_apply(model, spec, perms, name, skip=(p, axis)).double(), axis, block)
        cost += a @ b.T
    return cost


def objective(ref: dict, model: dict, spec: PermSpec, perms: dict, names=None) -> float:
    """Σ ⟨W_ref, W_model permuted⟩ over `names` (default: every tensor the spec touches)."""
    names = spec.touched(*spec.sizes) if names is None else names
    return sum(float(torch.dot(ref[n].reshape(-1).double(), _apply(model, spec, perms, n).reshape(-1).double()))
               for n in names)


def _candidate(ref: dict, model: dict, spec: PermSpec, perms: dict, p: str) -> dict:
    """p (with its nested child, if any) re-solved, everything else as now."""
    cost = _cost(ref, model, spec, perms, p)
    if p not in spec.inner:
        return {p: ops.best_permutation(cost)}
    child, r = spec.inner[p]
    n = spec.sizes[p]
    # the best order inside group pair (g, h) is its own small assignment; its value joins cost[g, h]
    blocks = _cost(ref, model, spec, perms, child).reshape(n, r, n, r).transpose(1, 2)
    inside = {}
    for g in range(n):
        for h in range(n):
            s = ops.best_permutation(blocks[g, h])
            inside[g, h] = s
            cost[g, h] += blocks[g, h][torch.arange(r), s].sum()
    new = ops.best_permutation(cost)
    return {p: new, child: torch.cat([h * r + inside[g, h] for g, h in enumerate(new.tolist())])}


def weight_matching(ref: dict, model: dict, spec: PermSpec, max_rounds: int = 100, seed: int = 0) -> dict:
    """The permutations (name -> perm, perm[i] = the model's unit placed at i)."""
    perms = {p: torch.arange(n) for p, n in spec.sizes.items()}
    rng = random.Random(seed)
    children = {c for c, _ in spec.inner.values()}
    names = [p for p in spec.sizes if p not in children]
    for _ in range(max_rounds):
        improved = False
        rng.shuffle(names)
        for p in names:
            new = _candidate(ref, model, spec, perms, p)
            if all(torch.equal(v, perms[q]) for q, v in new.items()):
                continue
            # judged on the true objective: a permutation on two axes of one tensor makes the cost a linearisation
            touched = spec.touched(*new)
            old_score = objective(ref, model, spec, perms, touched)
            new_score = objective(ref, model, spec, {**perms, **new}, touched)
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms.update(new)
                improved = True
        if not improved:
            break
    return perms


def permuted(model: dict, spec: PermSpec, perms: dict) -> dict:
    return {n: (_apply(model, spec, perms, n) if n in spec.by_name else v) for n, v in model.items()}


def align_folders(model_path, reference_path, output, *, overwrite: bool = False, seed: int = 0,
                  max_rounds: int = 100, allow_pickle: bool = False, residual: bool = True) -> dict:
    """Align the model folder to the reference and write the permuted model to `output`.

    residual=False leaves the residual stream (and ELECTRA's embedding space) unpermuted."""
    from ..checkpoint.output import AtomicFolder, ShardedWriter, copy_aux_files
    from ..checkpoint.safetensors_io import TensorMeta
    from ..checkpoint.sources import load_json, open_source

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
        cfg = load_json(folder / "config.json", "model config", "fix or replace it")
    # before any work: the output is neither input, nor inside or around one, and ours alone
    atomic = AtomicFolder(output, overwrite, inputs=[("model", model_path), ("reference", reference_path)])
    try:
        model = {n: src.read(n) for n in names}
        floats = {n: v.float() for n, v in model.items() if v.is_floating_point()}
        spec = spec_for({n: tuple(v.shape) for n, v in floats.items()}, cfg, residual)
        ref_sd = {n: ref.read(n).float() for n in floats}
        perms = weight_matching(ref_sd, floats, spec, max_rounds, seed)
        out = permuted(floats, spec, perms)
        with atomic.writing():  # a full or read-only disk: one line
            w = ShardedWriter(atomic.tmp, [(n, TensorMeta(tuple(v.shape), v.dtype)) for n, v in model.items()])
            for n, v in model.items():
                w.write(n, out[n].to(v.dtype) if n in out else v)
            w.close()
            copy_aux_files(folder, atomic.tmp)
            moved = {p: int((perm != torch.arange(perm.numel())).sum()) for p, perm in perms.items()}
            (atomic.tmp / "alignment.json").write_text(json.dumps(
                {"reference": str(reference_path), "model": str(model_path), "seed": seed, "residual": residual,
                 "permutations": {p: perm.tolist() for p, perm in perms.items()}, "moved_units": moved}, indent=2))
        atomic.commit()
    except BaseException:
        atomic.abort()
        raise
    return perms
