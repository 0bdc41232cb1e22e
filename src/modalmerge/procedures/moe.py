"""M-SMoE on a whole model: find its MoE blocks, route calibration tokens, merge each block's
experts (methods/msmoe.py), write the model and a report.

Not streaming: the one model is loaded whole (its own size, plus activations), as M-SMoE needs
the model's routing on real tokens. `modalmerge merge` with `method: msmoe` (a Method whose
`whole_model` is set) and `modalmerge msmoe` both come here (`run`). The output is an ordinary
model folder (transformers loads it; merged experts are stored once per slot) plus `msmoe.json`:
the groups of each layer, the routing frequencies, the distinct-expert parameter reduction and
the output agreement with the original model on held-out calibration tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from ..checkpoint.output import AtomicFolder, copy_aux_files
from ..checkpoint.sources import TensorSource
from ..errors import MergeError
from ..methods import msmoe
from .calibration import calibration_of, forward_with_hooks, load_batches, load_model, model_class, model_inputs
from ..engine.plan import who

REPORT = "msmoe.json"


@dataclass
class MoeBlock:
    name: str
    router: torch.nn.Module          # weight [E, H]; its output[0] is the router logits
    experts: torch.nn.Module         # gate_up_proj [E, 2I, H], down_proj [E, H, I]
    top_k: int


def find_moe_blocks(model) -> list[MoeBlock]:
    """Blocks with a router (`gate`, weight [E, H], `top_k`) and fused experts."""
    blocks = []
    for name, m in model.named_modules():
        experts, router = getattr(m, "experts", None), getattr(m, "gate", None)
        if experts is None or router is None or not isinstance(getattr(router, "weight", None), torch.Tensor):
            continue
        gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3 or dn.dim() != 3:
            continue
        e, h = router.weight.shape
        if gu.shape[0] != e or dn.shape[0] != e or gu.shape[1] != 2 * dn.shape[2] or gu.shape[2] != h:
            continue  # a layout msmoe.py does not know (e.g. transposed experts)
        blocks.append(MoeBlock(name, router, experts, int(getattr(router, "top_k", 2))))
    return blocks


def _router_logits(model, blocks: list[MoeBlock], batches: list[dict]) -> list[torch.Tensor]:
    """Each block's router logits [N, E] over the (unpadded) calibration tokens."""
    logits: list[list[torch.Tensor]] = [[] for _ in blocks]
    mask: dict[str, Any] = {"mask": None}

    def hook(i):
        def fn(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            keep = mask["mask"]
            out = out.detach().float()
            if keep is not None and keep.numel() == out.shape[0]:
                out = out[keep.reshape(-1) > 0]
            logits[i].append(out)
        return fn

    handles = [b.router.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    forward_with_hooks(model, batches, handles, mask)
    return [torch.cat(x) for x in logits]


def predictions(model, batches: list[dict]) -> list[torch.Tensor]:
    """The model's logits on each batch (float32)."""
    with torch.no_grad():
        return [model(**model_inputs(b)).logits.float() for b in batches]


def agreement(before: list[torch.Tensor], after: list[torch.Tensor], batches: list[dict]) -> dict[str, float]:
    """Top-1 agreement and mean KL(original ‖ merged) over every unpadded token position."""
    same, kl, n = 0.0, 0.0, 0
    for a, b, batch in zip(before, after, batches):
        keep = batch.get("attention_mask")
        keep = torch.ones(a.shape[:-1], dtype=torch.bool) if keep is None else keep.bool().reshape(a.shape[:-1])
        la, lb = torch.log_softmax(a[keep], -1), torch.log_softmax(b[keep], -1)
        same += float((la.argmax(-1) == lb.argmax(-1)).sum())
        kl += float((la.exp() * (la - lb)).sum())
        n += int(keep.sum())
    return {"top1_agreement": same / max(n, 1), "mean_kl": kl / max(n, 1), "tokens": n}


def merge_moe_model(model, batches: list[dict], params: msmoe.MsmoeParams, *, align: bool = True,
                    weighting: Literal["frequency", "uniform"] = "frequency",
                    grouping: Callable[[torch.Tensor, torch.Tensor, int], list[int]] | None = None
                    ) -> dict[str, Any]:
    """Merge the experts of every MoE block of `model` in place; returns the report.

    `align`, `weighting` and `grouping` (freq, router logits, k -> each expert's centre; default
    msmoe.group_experts) are ablations for the benchmark's baselines; M-SMoE is the default."""
    blocks = find_moe_blocks(model)
    if not blocks:
        raise MergeError("msmoe: the model has no MoE block with a router (`gate`) and fused experts "
                         "(gate_up_proj, down_proj); is this a Mixtral/Qwen-MoE-style model?")
    held = int(round(len(batches) * params.held_out)) if len(batches) > 1 else 0
    calib, heldout = batches[:len(batches) - held], batches[len(batches) - held:]
    for block in blocks:
        e = block.router.weight.shape[0]
        if (params.num_experts or 0) > e:
            raise MergeError(f"msmoe: num_experts {params.num_experts} is more than the {e} experts of {block.name}; "
                             "lower it")
    before = predictions(model, heldout) if heldout else []
    logits = _router_logits(model, blocks, calib)
    layers, kept, total = [], 0, 0
    for block, lg in zip(blocks, logits):
        e = block.router.weight.shape[0]
        k = params.num_experts or max(1, e // 2)
        freq = msmoe.routing_frequencies(lg, block.top_k)
        assignment = (grouping or msmoe.group_experts)(freq, lg, k)
        with torch.no_grad():
            gu, dn = msmoe.merge_experts(block.experts.gate_up_proj.data, block.experts.down_proj.data, freq,
                                         assignment, align=align, weighting=weighting)
            block.experts.gate_up_proj.data.copy_(gu)
            block.experts.down_proj.data.copy_(dn)
        per_expert = block.experts.gate_up_proj[0].numel() + block.experts.down_proj[0].numel()
        kept += len(set(assignment)) * per_expert
        total += e * per_expert
        layers.append({"block": block.name, "experts": e, "kept": len(set(assignment)),
                       "groups": assignment, "frequencies": [round(float(f), 6) for f in freq]})
    after = predictions(model, heldout) if heldout else []
    all_params = sum(p.numel() for p in model.parameters())
    return {
        "method": "msmoe",
        "params": params.model_dump(),
        "layers": layers,
        "expert_parameters": {"before": total, "after_distinct": kept,
                              "reduction": 1 - kept / total if total else 0.0},
        "model_parameters": {"before": all_params, "after_distinct": all_params - (total - kept)},
        "agreement": agreement(before, after, heldout) if heldout else None,
        "calibration_tokens": int(logits[0].shape[0]),
    }


# -- the recipe path (`modalmerge merge` with method msmoe, and `modalmerge msmoe`) ------------

def _who(src: TensorSource) -> str:
    return f"model {who(src)}"


def layout(src: TensorSource, trust_remote_code: bool = False) -> list[dict[str, Any]]:
    """The MoE blocks of a model folder, from its config alone (the model is built on the meta
    device: no weights are read): name, experts, top_k, parameters per expert."""
    from transformers import AutoConfig

    if src.folder is None or not (src.folder / "config.json").exists():
        raise MergeError(f"{_who(src)}: msmoe builds the model with transformers from its config.json, which is "
                         "not there; give a Hugging Face model folder")
    cls = model_class(src, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(str(src.folder), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = cls.from_config(config, trust_remote_code=trust_remote_code) if cls.__name__.startswith("Auto") \
                else cls(config)
    except Exception as e:  # noqa: BLE001 - any failure: transformers cannot build this config
        raise MergeError(f"{_who(src)}: transformers cannot build the model its config.json describes "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); msmoe needs a "
                         "Mixtral/Qwen-MoE-style model transformers knows") from None
    blocks = find_moe_blocks(model)
    if not blocks:
        raise MergeError(f"{_who(src)}: msmoe found no MoE block (a router `gate` with fused experts "
                         "gate_up_proj, down_proj) in this model; give a Mixtral/Qwen-MoE-style model")
    return [{"block": b.name, "experts": int(b.router.weight.shape[0]), "top_k": b.top_k,
             "expert_parameters": b.experts.gate_up_proj[0].numel() + b.experts.down_proj[0].numel(),
             "vocab_size": int(getattr(config, "vocab_size", 0) or 0)} for b in blocks]


def _check(plan) -> list[dict[str, Any]]:
    """Everything that can be checked before the model is loaded; returns the layout."""
    recipe = plan.recipe
    if recipe.include or recipe.exclude:
        raise MergeError("method msmoe merges every MoE block of the model and keeps the rest; remove `include` "
                         "and `exclude` from the recipe")
    src = plan.models[0]
    calibration_of(plan, 0)
    blocks = layout(src, plan.trust_remote_code)
    k = plan.params.num_experts
    if k is not None:
        for b in blocks:
            if k > b["experts"]:
                raise MergeError(f"{_who(src)}: num_experts {k} is more than the {b['experts']} experts of "
                                 f"{b['block']}; lower `num_experts`")
    return blocks


def _output_dtype(plan) -> torch.dtype:
    """The recipe's dtype, else the model's own (its most common floating-point dtype)."""
    if plan.recipe.dtype:
        return getattr(torch, plan.recipe.dtype)
    src = plan.models[0]
    counts: Counter = Counter()
    for name in src.names():
        meta = src.meta(name)
        if meta.dtype.is_floating_point:
            counts[meta.dtype] += meta.numel
    return counts.most_common(1)[0][0] if counts else torch.float32


def summary(plan) -> dict[str, Any]:
    """What --dry-run prints for msmoe: the blocks, the distinct experts kept, the memory need."""
    blocks = _check(plan)
    spec = calibration_of(plan, 0)
    src = plan.models[0]
    n = sum(src.meta(name).numel for name in src.names())
    kept_total = before_total = 0
    for b in blocks:
        k = plan.params.num_experts or max(1, b["experts"] // 2)
        b["kept"] = k
        kept_total += k * b["expert_parameters"]
        before_total += b["experts"] * b["expert_parameters"]
    # held-out tokens as max_examples x max_length (a callable's batches may be longer)
    held_tokens = int(round(spec.max_examples * plan.params.held_out)) * spec.max_length
    vocab = blocks[0]["vocab_size"]
    largest_block = max(b["experts"] * b["expert_parameters"] for b in blocks)
    # the float32 model, one layer's experts copied while merging, and the held-out logits of the
    # original and the merged model (before and after)
    peak = n * 4 + largest_block * 4 + 2 * held_tokens * vocab * 4
    return {
        "method": plan.method.name,
        "params": plan.params.model_dump(by_alias=True),
        "base": None,
        "models": plan.model_names,
        "whole_model": True,
        "parameters": n,
        "layers": blocks,
        "expert_parameters": {"before": before_total, "after_distinct": kept_total,
                              "reduction": 1 - kept_total / before_total if before_total else 0.0},
        "held_out_tokens_estimate": held_tokens,
        "estimated_peak_bytes": int(peak),
        "output_bytes": int(n * _output_dtype(plan).itemsize),
    }


def run(plan, output: str | Path, *, overwrite: bool = False, tool_version: str = "?") -> dict[str, Any]:
    """Merge the experts of the plan's one model and write it to `output` (atomically); returns
    the report (also written as msmoe.json)."""
    from ..engine.sinks import model_card, plan_inputs

    _check(plan)
    src = plan.models[0]
    where = f"model {src.label!r}"
    out = AtomicFolder(output, overwrite=overwrite, inputs=plan_inputs(plan))  # refused over an input
    try:
        batches = load_batches(calibration_of(plan, 0), src.folder, where)
        model = load_model(src, where, trust_remote_code=plan.trust_remote_code)
        report = merge_moe_model(model, batches, plan.params)
        with out.writing():  # a full or read-only disk: one line
            model.to(_output_dtype(plan)).save_pretrained(out.tmp)
            copy_aux_files(plan.aux_folder, out.tmp)  # tokenizer etc.; save_pretrained wrote the config
            (out.tmp / REPORT).write_text(json.dumps(report, indent=2))
            (out.tmp / "README.md").write_text(model_card(plan, tool_version))
        out.commit()
        return report
    except BaseException:
        out.abort()
        raise


def recipe_for(model_path: str | Path, calibration: dict[str, Any], params: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """The recipe `modalmerge msmoe MODEL …` stands for."""
    return {"method": "msmoe", "models": [str(model_path)], "calibration": calibration,
            "params": {k: v for k, v in (params or {}).items() if v is not None}}
