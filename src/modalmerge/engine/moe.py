"""M-SMoE on a whole model: find its MoE blocks, route calibration tokens, merge each block's
experts (methods/msmoe.py), write the model and a report.

Not streaming: the one model is loaded whole (its own size, plus activations), as M-SMoE needs
the model's routing on real tokens. The output is an ordinary model folder (transformers loads
it; merged experts are stored once per slot) plus `msmoe.json`: the groups of each layer, the
routing frequencies, the distinct-expert parameter reduction and the output agreement with the
original model on held-out calibration tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.output import AtomicFolder
from ..errors import MergeError
from ..methods import msmoe
from .calibration import forward_with_hooks, load_batches, model_inputs, spec_of

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


def _predictions(model, batches: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**model_inputs(b)).logits.float() for b in batches]


def _agreement(before: list[torch.Tensor], after: list[torch.Tensor], batches: list[dict]) -> dict[str, float]:
    """Top-1 agreement and mean KL(original ‖ merged) over held-out token positions."""
    same, kl, n = 0.0, 0.0, 0
    for a, b, batch in zip(before, after, batches):
        keep = batch.get("attention_mask")
        keep = torch.ones(a.shape[:-1], dtype=torch.bool) if keep is None else keep.bool().reshape(a.shape[:-1])
        la, lb = torch.log_softmax(a[keep], -1), torch.log_softmax(b[keep], -1)
        same += float((la.argmax(-1) == lb.argmax(-1)).sum())
        kl += float((la.exp() * (la - lb)).sum())
        n += int(keep.sum())
    return {"top1_agreement": same / max(n, 1), "mean_kl": kl / max(n, 1), "tokens": n}


def merge_moe_model(model, batches: list[dict], params: msmoe.MsmoeParams) -> dict[str, Any]:
    """Merge the experts of every MoE block of `model` in place; returns the report."""
    blocks = find_moe_blocks(model)
    if not blocks:
        raise MergeError("msmoe: the model has no MoE block with a router (`gate`) and fused experts "
                         "(gate_up_proj, down_proj); is this a Mixtral/Qwen-MoE-style model?")
    held = int(round(len(batches) * params.held_out)) if len(batches) > 1 else 0
    calib, heldout = batches[:len(batches) - held], batches[len(batches) - held:]
    before = _predictions(model, heldout) if heldout else []
    logits = _router_logits(model, blocks, calib)
    layers, kept, total, per_expert_total = [], 0, 0, 0
    for block, lg in zip(blocks, logits):
        e = block.router.weight.shape[0]
        k = params.num_experts or max(1, e // 2)
        if k > e:
            raise MergeError(f"msmoe: num_experts {k} is more than the {e} experts of {block.name}; lower it")
        freq = msmoe.routing_frequencies(lg, block.top_k)
        assignment = msmoe.group_experts(freq, lg, k)
        with torch.no_grad():
            gu, dn = msmoe.merge_experts(block.experts.gate_up_proj.data, block.experts.down_proj.data, freq,
                                         assignment)
            block.experts.gate_up_proj.data.copy_(gu)
            block.experts.down_proj.data.copy_(dn)
        per_expert = block.experts.gate_up_proj[0].numel() + block.experts.down_proj[0].numel()
        kept += len(set(assignment)) * per_expert
        total += e * per_expert
        per_expert_total += per_expert
        layers.append({"block": block.name, "experts": e, "kept": len(set(assignment)),
                       "groups": assignment, "frequencies": [round(float(f), 6) for f in freq]})
    after = _predictions(model, heldout) if heldout else []
    all_params = sum(p.numel() for p in model.parameters())
    return {
        "method": "msmoe",
        "params": params.model_dump(),
        "layers": layers,
        "expert_parameters": {"before": total, "after_distinct": kept,
                              "reduction": 1 - kept / total if total else 0.0},
        "model_parameters": {"before": all_params, "after_distinct": all_params - (total - kept)},
        "agreement": _agreement(before, after, heldout) if heldout else None,
        "calibration_tokens": int(logits[0].shape[0]),
    }


def msmoe_folder(model_path: str | Path, output: str | Path, calibration: dict[str, Any],
                 params: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """`modalmerge msmoe`: merge a model folder's experts into `output` (written atomically)."""
    from ..checkpoint.sources import open_source
    from .calibration import load_model

    p = msmoe.MsmoeParams.model_validate(params or {})
    src = open_source(model_path, label=Path(model_path).name)
    batches = load_batches(spec_of(calibration, f"model {src.label!r}"), src.folder, f"model {src.label!r}")
    out = AtomicFolder(output, overwrite=overwrite)
    try:
        model = load_model(src, f"model {src.label!r}")
        report = merge_moe_model(model, batches, p)
        model.save_pretrained(out.tmp)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                  "tokenizer.model"):
            if (src.folder / f).exists():
                (out.tmp / f).write_bytes((src.folder / f).read_bytes())
        (out.tmp / REPORT).write_text(json.dumps(report, indent=2))
        out.commit()
        return report
    except BaseException:
        out.abort()
        raise


def estimate(model_path: str | Path) -> dict[str, Any]:
    """--dry-run: the model is held whole (float32) with a copy of the held-out outputs."""
    from ..checkpoint.sources import open_source

    src = open_source(model_path, label=Path(model_path).name)
    n = sum(src.meta(k).numel for k in src.names())
    return {"parameters": n, "peak_bytes": n * 4 * 2}
