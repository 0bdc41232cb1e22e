"""LoRA extraction: a PEFT adapter folder whose B·A approximates MODEL − BASE, layer by layer.

For each linear layer's weight W, the task vector T = W_model − W_base (computed in float32) is
factored by a truncated SVD, T ≈ U_k·diag(s_k)·V_kᵀ, and split as mergekit-extract-lora 0.1.5
does by default ("distribute scale"): A = diag(√s_k)·V_kᵀ (r × in), B = U_k·diag(√s_k) (out × r).
Both factors then have the same scale, which keeps them well inside a half-precision range.

Why an exact, full SVD in float32 (torch.linalg.svd, full_matrices=False), not a randomised one
(torch.svd_lowrank): the error it reports is then the best any rank-k matrix can do (Eckart–Young),
and the rank that `energy` picks comes from the true singular values, not from estimates of the
top few. It costs O(m·n·min(m, n)) per matrix, seconds for a 4096 × 11008 layer on a CPU, and the
device option moves it to a GPU. float32 because float16/bfloat16 SVDs are not supported by
torch and their rounding (≈ 1e-3) would swamp the small singular values we choose the rank by.

Rank per tensor: `rank` (capped by min(out, in)); with `energy` e, the smallest k whose singular
values keep a fraction e of ‖T‖_F² (Σ_{i<k} s_i² ≥ e·Σ s_i²), capped by `rank`. The adapter's `r`
is the largest rank chosen, lora_alpha = r, and every tensor with another rank is written into
rank_pattern and alpha_pattern with alpha = its rank, so PEFT's scaling (alpha / r) is 1 everywhere
and the merged weight is exactly base + B·A.

What is done with each tensor (classified by name and shape, no model code runs):
- a 2-D `*.weight` of a linear layer that differs: LoRA (`lora_A.weight`, `lora_B.weight`).
  GPT-2's Conv1D weights ([in, out], architectures.py's column_neurons) are factored transposed,
  as PEFT's fan_in_fan_out layers expect.
- an input embedding (embed_tokens, wte, word_embeddings, ...) or output head (lm_head,
  embed_out) that differs: with `embeddings`, an embedding LoRA (PEFT's lora_embedding_A
  [r, vocab] and lora_embedding_B [dim, r], the SVD of Tᵀ) or, for a head, a linear LoRA;
  without it, the module goes into modules_to_save, saved whole (mergekit does the same).
- any other tensor that differs (norm weights, biases of layers that are not LoRA targets,
  convolutions): its module goes into modules_to_save, all of that module's tensors saved whole
  from MODEL. A module-less parameter (no '.') cannot be saved by PEFT and is reported as left out.
- the bias of a LoRA layer that differs: PEFT can only carry it with `lora_bias`, which is one
  switch for the whole adapter, valid only when every LoRA layer has a bias and no embedding LoRA
  is written; then every lora_B gets its bias delta. Otherwise the bias deltas are reported as
  left out (mergekit writes them as lora_B.bias without lora_bias, where PEFT ignores them).
- tensors equal in both: nothing.

Streaming: a first pass reads each tensor of both models once to check names, shapes and
dtypes and to find what differs (before any slow work); the second computes one SVD at a time
and writes its factors to a scratch file inside the partial output; the last writes
adapter_model.safetensors from those files and MODEL's saved tensors. Memory: one tensor pair,
its float32 task vector and SVD, never a whole model.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint.output import AtomicFolder
from ..checkpoint.safetensors_io import SafetensorsFile, SafetensorsStreamWriter, TensorMeta
from ..checkpoint.sources import TensorSource, load_json, open_source
from ..engine.architectures import spec_for
from ..errors import MergeError

# leaf modules that are nn.Embedding in the model families we know (the LoRA kind differs)
EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|embed_positions|embed_in|wte|wpe|word_embeddings|position_embeddings|"
                       r"token_type_embeddings|token_embedding|position_embedding|shared)\.weight$")
# output heads: linear layers, extracted only with `embeddings` (they are as large as an embedding)
HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.weight$")
PREFIX = "base_model.model."
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ExtractedTensor:
    """What became of one tensor that differs between MODEL and BASE."""
    name: str
    kind: str  # "lora", "embedding lora", "saved" (modules_to_save), "lora bias", "left out"
    shape: tuple[int, ...]
    rank: int = 0
    error: float = 0.0  # ‖T − B·A‖_F / ‖T‖_F with the factors as written (their dtype)
    energy: float = 1.0  # fraction of ‖T‖_F² the kept singular values hold
    note: str = ""


@dataclass
class LoraReport:
    output: Path
    rank: int
    tensors: list[ExtractedTensor] = field(default_factory=list)
    unchanged: int = 0
    modules_to_save: list[str] = field(default_factory=list)
    lora_bias: bool = False
    seconds: float = 0.0

    def of_kind(self, *kinds: str) -> list[ExtractedTensor]:
        return [t for t in self.tensors if t.kind in kinds]


def choose_rank(singular_values: torch.Tensor, max_rank: int, energy: float | None = None) -> int:
    """The rank kept: `max_rank` (capped by the number of nonzero singular values), or with `energy` the
    smallest k with Σ_{i<k} s_i² ≥ energy·Σ s_i², capped by max_rank; 0 for a zero matrix."""
    s2 = singular_values.double() ** 2
    total = float(s2.sum())
    if total == 0.0:
        return 0
    k = min(max_rank, int((s2 > 0).sum()))  # singular values that are exactly zero add nothing
    if energy is not None:
        kept = torch.cumsum(s2, 0) / total
        # the first index reaching the threshold (a tiny tolerance for the rounding of the cumsum)
        k = min(k, int((kept < energy - 1e-12).sum()) + 1)
    return k


def low_rank_factors(delta: torch.Tensor, max_rank: int, energy: float | None = None,
                     device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [k, in], B [out, k], kept energy) with B·A the best rank-k approximation of `delta`
    [out, in]; float32 on the CPU. See the module docstring for the choice of k and the split."""
    t = delta.to(device=device, dtype=torch.float32)
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    k = choose_rank(s, max_rank, energy)
    root = s[:k].sqrt()
    a = root[:, None] * vh[:k]
    b = u[:, :k] * root[None, :]
    total = float((s.double() ** 2).sum())
    kept = float((s[:k].double() ** 2).sum()) / total if total else 1.0
    return a.cpu(), b.cpu(), kept


def relative_error(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """‖delta − B·A‖_F / ‖delta‖_F, in float32 (0 for a zero delta)."""
    d = delta.float()
    norm = float(torch.linalg.vector_norm(d))
    if norm == 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(d - b.float() @ a.float())) / norm


@dataclass
class _Plan:
    """What the first pass found: the tensors that differ and what becomes of each."""
    lora: list[str] = field(default_factory=list)        # linear weights to factor
    embedding: list[str] = field(default_factory=list)   # nn.Embedding weights to factor (transposed)
    transposed: set = field(default_factory=set)         # Conv1D weights ([in, out])
    biases: dict = field(default_factory=dict)           # LoRA module -> its bias tensor name, when it has one
    changed_biases: list[str] = field(default_factory=list)
    saved_modules: list[str] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)
    unchanged: int = 0


def _module(name: str) -> str | None:
    return name.rsplit(".", 1)[0] if "." in name else None


def _open_pair(model: str, base: str, allow_pickle: bool) -> tuple[TensorSource, TensorSource]:
    for label, ref in (("--base", base), ("MODEL", model)):
        if not str(ref).strip():
            raise MergeError(f"extract-lora: {label} is empty; give a model folder or hub id")
    base_src = open_source(base, label=f"base {base}", allow_pickle=allow_pickle)
    model_src = open_source(model, label=f"model {model}", allow_pickle=allow_pickle, base=base_src)
    return model_src, base_src


def _model_type(src: TensorSource) -> str | None:
    folder = src.folder
    if folder is not None and (folder / "config.json").is_file():
        cfg = load_json(folder / "config.json", "config.json", "re-save or re-download the model")
        if isinstance(cfg, dict):
            return cfg.get("model_type")
    return None


def _compare(model: TensorSource, base: TensorSource, embeddings: bool, progress: bool) -> _Plan:
    """Pass 1: names, shapes and dtypes must match; find the tensors that differ and sort them."""
    names, base_names = model.names(), set(base.names())
    missing = [n for n in names if n not in base_names]
    extra = sorted(base_names - set(names))
    if missing or extra:
        which = (f"{missing[0]!r} is in MODEL but not in BASE" if missing else f"{extra[0]!r} is in BASE but not in MODEL")
        raise MergeError(f"extract-lora: the models have different tensors ({len(missing) + len(extra)} differ; "
                         f"{which}); extract from a fine-tune of that base, with the same architecture")
    columns = spec_for(_model_type(model)).column_neurons
    plan = _Plan()
    differs: list[str] = []
    for name in tqdm(names, desc="comparing", disable=not progress, leave=False, dynamic_ncols=True):
        mm, bm = model.meta(name), base.meta(name)
        if tuple(mm.shape) != tuple(bm.shape):
            raise MergeError(f"extract-lora: tensor {name!r} is {list(mm.shape)} in MODEL but {list(bm.shape)} in "
                             "BASE; a LoRA cannot change a shape (resize the base's embeddings to the fine-tune's "
                             "vocabulary first)")
        if not (mm.dtype.is_floating_point and bm.dtype.is_floating_point):
            if torch.equal(model.read(name), base.read(name)):
                plan.unchanged += 1
                continue
            raise MergeError(f"extract-lora: tensor {name!r} is not floating point ({mm.dtype}) and differs; "
                             "it cannot be written as a LoRA")
        if torch.equal(model.read(name).float(), base.read(name).float()):
            plan.unchanged += 1
        else:
            differs.append(name)
    shapes = {n: tuple(model.meta(n).shape) for n in names}

    def linear(n: str) -> bool:
        return n.endswith(".weight") and len(shapes[n]) == 2 and not EMBEDDING.search(n) and \
            (embeddings or not HEAD.search(n))

    saved: dict[str, None] = {}
    for n in differs:
        if linear(n):
            plan.lora.append(n)
            if any(re.fullmatch(p, n) for p in columns):
                plan.transposed.add(n)
        elif embeddings and EMBEDDING.search(n) and len(shapes[n]) == 2:
            plan.embedding.append(n)
    targets = {_module(n) for n in plan.lora + plan.embedding}
    for n in differs:
        if n in plan.lora or n in plan.embedding:
            continue
        module = _module(n)
        if module is None:
            plan.left_out.append((n, "a parameter outside any module, which PEFT's modules_to_save cannot hold"))
        elif module in targets:
            if n == module + ".bias":
                plan.changed_biases.append(n)
            else:
                plan.left_out.append((n, "a parameter of a LoRA layer besides its weight and bias"))
        else:
            saved.setdefault(module, None)
    plan.saved_modules = list(saved)
    for module in targets:
        if module + ".bias" in shapes:
            plan.biases[module] = module + ".bias"
    # a module saved whole must not also hold a LoRA target (modules_to_save wraps all of it)
    for module in plan.saved_modules:
        inner = [n for n in plan.lora + plan.embedding if n.startswith(module + ".")]
        if inner:
            raise MergeError(f"extract-lora: module {module!r} must be saved whole (a tensor of it that is no "
                             f"linear weight differs) but also holds the LoRA layer {inner[0]!r}; PEFT cannot do both")
    return plan


def _target_modules(plan: _Plan, names: list[str]) -> list[str]:
    """PEFT's target_modules: a leaf name (q_proj) where every layer of that name is a target,
    else the full module names (so that a layer left as it is gets no LoRA)."""
    targets = {_module(n) for n in plan.lora + plan.embedding}
    saved = set(plan.saved_modules)
    candidates = {_module(n) for n in names if n.endswith(".weight")} - {None}
    by_leaf: dict[str, set] = {}
    for m in candidates:
        by_leaf.setdefault(m.rsplit(".", 1)[-1], set()).add(m)
    out = []
    for leaf in sorted({m.rsplit(".", 1)[-1] for m in targets}):
        same = by_leaf[leaf]
        # PEFT matches a leaf name as a suffix `.leaf`, and any module ending with it would be wrapped
        if same <= targets and not (same & saved):
            out.append(leaf)
        else:
            out.extend(sorted(same & targets))
    return out


def extract_lora(model: str, base: str, output: str | os.PathLike, *, rank: int, energy: float | None = None,
                 embeddings: bool = False, dtype: str | None = None, device: str = "cpu", overwrite: bool = False,
                 allow_pickle: bool = False, progress: bool = False, tool_version: str = "") -> LoraReport:
    """Write a PEFT LoRA adapter folder at `output` approximating MODEL − BASE (module docstring)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeError(f"extract-lora: rank {rank!r} is not a positive whole number; give --rank 1 or more")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise MergeError(f"extract-lora: energy {energy!r} is not a fraction in (0, 1]; give e.g. --energy 0.9")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"extract-lora: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        where = torch.device(device)
    except (RuntimeError, ValueError):
        raise MergeError(f"extract-lora: device {device!r} is not a torch device; give cpu, cuda or cuda:1") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    started = time.perf_counter()
    model_src, base_src = _open_pair(model, base, allow_pickle)
    inputs = [("model", p) for p in (model_src.path,) if p is not None] + \
        [("base", p) for p in (base_src.path,) if p is not None]
    plan = _compare(model_src, base_src, embeddings, progress)
    if not plan.lora and not plan.embedding:
        what = "linear layer or embedding" if embeddings else "linear layer"
        raise MergeError(f"extract-lora: no {what} differs between {model} and {base}; nothing to extract "
                         "(is MODEL a fine-tune of BASE?)")
    out_dtype = DTYPES[dtype] if dtype else None
    lora_bias = bool(plan.changed_biases) and not plan.embedding and \
        all(_module(n) in plan.biases for n in plan.lora)

    out = AtomicFolder(output, overwrite, inputs=inputs)
    try:
        with out.writing():
            report = _write(out, plan, model_src, base_src, rank=rank, energy=energy, out_dtype=out_dtype,
                            device=device, lora_bias=lora_bias, progress=progress)
            config = _adapter_config(plan, report, base, model_src, _target_modules(plan, model_src.names()))
            (out.tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            (out.tmp / "README.md").write_text(_card(model, base, report, rank, energy, tool_version))
            report.output = out.commit()
    except BaseException:
        out.abort()
        raise
    report.seconds = time.perf_counter() - started
    return report


def _write(out: AtomicFolder, plan: _Plan, model: TensorSource, base: TensorSource, *, rank: int,
           energy: float | None, out_dtype, device: str, lora_bias: bool, progress: bool) -> LoraReport:
    report = LoraReport(output=out.final, rank=0, unchanged=plan.unchanged, modules_to_save=list(plan.saved_modules),
                        lora_bias=lora_bias)
    scratch = out.scratch("factors-")
    entries: list[tuple[str, TensorMeta]] = []
    sources: dict[str, Path | None] = {}  # adapter key -> scratch file (None: read from MODEL)
    factored = plan.lora + plan.embedding
    total = sum(model.meta(n).numel for n in factored)
    with tqdm(total=total, desc="SVD", unit="param", unit_scale=True, disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for i, name in enumerate(factored):
            kind = "embedding lora" if name in plan.embedding else "lora"
            shape = tuple(model.meta(name).shape)
            want = out_dtype or model.meta(name).dtype
            delta = model.read(name).float() - base.read(name).float()
            # PEFT's layouts: lora_B @ lora_A is [out, in] for Linear, Tᵀ for Conv1D and Embedding
            matrix = delta.T if (kind == "embedding lora" or name in plan.transposed) else delta
            a, b, kept = low_rank_factors(matrix, rank, energy, device)
            a, b = a.to(want), b.to(want)
            err = relative_error(matrix, a, b)
            del delta, matrix
            module = _module(name)
            if kind == "lora":
                keys = {f"{PREFIX}{module}.lora_A.weight": a, f"{PREFIX}{module}.lora_B.weight": b}
                if lora_bias:
                    bias = plan.biases[module]
                    keys[f"{PREFIX}{module}.lora_B.bias"] = \
                        (model.read(bias).float() - base.read(bias).float()).to(want)
            else:
                keys = {f"{PREFIX}{module}.lora_embedding_A": a, f"{PREFIX}{module}.lora_embedding_B": b}
            path = scratch / f"{i}.safetensors"
            writer = SafetensorsStreamWriter(path, [(k, TensorMeta(tuple(v.shape), v.dtype)) for k, v in keys.items()])
            for k, v in keys.items():
                writer.write(k, v.contiguous())
                entries.append((k, TensorMeta(tuple(v.shape), v.dtype)))
                sources[k] = path
            writer.close()
            report.tensors.append(ExtractedTensor(name, kind, shape, a.shape[0], err, kept))
            report.rank = max(report.rank, a.shape[0])
            bar.update(model.meta(name).numel)
    for n in plan.changed_biases:
        if lora_bias:
            report.tensors.append(ExtractedTensor(n, "lora bias", tuple(model.meta(n).shape)))
        else:
            report.tensors.append(ExtractedTensor(
                n, "left out", tuple(model.meta(n).shape), error=1.0,
                note="bias of a LoRA layer; PEFT's lora_bias needs every LoRA layer to have a bias, and no "
                     "embedding LoRA"))
    for module in plan.saved_modules:
        for n in model.names():
            if _module(n) == module:
                meta = model.meta(n)
                entries.append((PREFIX + n, TensorMeta(tuple(meta.shape), out_dtype or meta.dtype)))
                sources[PREFIX + n] = None
                report.tensors.append(ExtractedTensor(n, "saved", tuple(meta.shape)))
    for n, why in plan.left_out:
        report.tensors.append(ExtractedTensor(n, "left out", tuple(model.meta(n).shape), error=1.0, note=why))
    # one file, as PEFT reads it; factors from the scratch files, saved modules streamed from MODEL
    writer = SafetensorsStreamWriter(out.tmp / "adapter_model.safetensors", entries)
    current: tuple[Path, SafetensorsFile] | None = None  # one scratch file open at a time (a file per layer)
    for key, meta in entries:
        path = sources[key]
        if path is None:
            value = model.read(key[len(PREFIX):]).to(meta.dtype)
        else:
            if current is None or current[0] != path:
                if current is not None:
                    current[1].close()
                current = (path, SafetensorsFile(path))
            value = current[1].read(key)
        writer.write(key, value.reshape(meta.shape).contiguous())
    writer.close()
    if current is not None:
        current[1].close()
    shutil.rmtree(scratch)
    return report


def _adapter_config(plan: _Plan, report: LoraReport, base: str, model: TensorSource, targets: list[str]) -> dict:
    r = report.rank
    ranks = {_module(t.name): t.rank for t in report.of_kind("lora", "embedding lora")}
    others = {m: k for m, k in ranks.items() if k != r}
    folder = model.folder
    arch = []
    if folder is not None and (folder / "config.json").is_file():
        cfg = load_json(folder / "config.json", "config.json", "re-save or re-download the model")
        arch = cfg.get("architectures") or [] if isinstance(cfg, dict) else []
    causal = any(str(a).endswith("ForCausalLM") for a in arch)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if causal else None,
        "base_model_name_or_path": str(base),
        "r": r,
        "lora_alpha": r,  # scaling alpha / r = 1: the merged weight is base + B·A
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": targets,
        "modules_to_save": list(plan.saved_modules) or None,
        "lora_bias": report.lora_bias,
        "fan_in_fan_out": bool(plan.transposed) and len(plan.transposed) == len(plan.lora),
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _card(model: str, base: str, report: LoraReport, rank: int, energy: float | None, version: str) -> str:
    loras = report.of_kind("lora", "embedding lora")
    worst = max((t.error for t in loras), default=0.0)
    how = f"rank ≤ {rank}" + (f", energy {energy:g}" if energy is not None else "")
    return ("---\ntags: [lora, modalmerge, extracted]\n---\n"
            f"# LoRA extracted with modalmerge {version}\n\n"
            f"`{model}` − `{base}` as a PEFT LoRA adapter on `{base}` ({how}; truncated SVD in float32).\n\n"
            f"- {len(loras)} LoRA layers, ranks {min((t.rank for t in loras), default=0)}–{report.rank}, "
            f"largest relative error {worst:.3g}\n"
            f"- {len(report.modules_to_save)} modules saved whole (modules_to_save)\n"
            f"- {len(report.of_kind('left out'))} changed tensors left out\n")


def summary_lines(report: LoraReport) -> list[str]:
    """What `modalmerge extract-lora` prints."""
    loras = report.of_kind("lora", "embedding lora")
    errors = [t.error for t in loras]
    mean = math.fsum(errors) / len(errors) if errors else 0.0
    ranks = sorted({t.rank for t in loras})
    lines = [f"extracted {len(loras)} LoRA layers (rank {ranks[0]}" + (f"-{ranks[-1]}" if len(ranks) > 1 else "")
             + f"), relative error mean {mean:.3g}, max {max(errors, default=0.0):.3g}; "
             f"{len(report.modules_to_save)} modules saved whole; {report.unchanged} tensors unchanged; "
             f"in {report.seconds:.1f} s -> {report.output}"]
    if report.lora_bias:
        lines.append("note: bias deltas of the LoRA layers are written as lora_B biases (lora_bias: true)")
    left = report.of_kind("left out")
    if left:
        lines.append(f"note: {len(left)} changed tensors are not in the adapter: "
                     + ", ".join(f"{t.name} ({t.note})" for t in left[:3]) + (", ..." if len(left) > 3 else ""))
    return lines
