"""M-SMoE (spec 13): merge the experts inside one MoE layer.

Experts are given in the fused layout of transformers' MoE blocks: gate_up [E, 2I, H] (the
gate projection's I rows, then the up projection's) and down [E, H, I]; an expert computes
down · (act(gate · x) ⊙ (up · x)). Routing statistics come from calibration tokens
(procedures/moe.py gathers the router logits [N, E]).

- routing frequencies f_i: the share of top-k selections expert i receives;
- the `num_experts` most used experts are group centres; every other expert joins the centre
  whose router-logit column is most similar (cosine over the calibration tokens);
- each member's hidden units are permuted to match its centre's by a linear assignment on
  weights (function-preserving: the rows of gate/up and the columns of down move together);
- a group merges as Σ f_i W_i / Σ f_i, and every member's slot holds the merged expert, so the
  router is unchanged and the layer has `num_experts` distinct experts.

Decision: each member is aligned to its own group's centre (the expert it is merged into).

The method works on a whole model (routing needs the model's forward pass on real tokens), so it
has no per-tensor kernel: its registry entry is `whole_model`, and the engine (procedures/moe.py)
runs it. `merge_experts` also takes the ablations the benchmark measures (no alignment, uniform
weights); recipes always use the method as specified.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..errors import MergeError
from .base import Merged, Method, Params, Stats, TensorGroup


class MsmoeParams(Params):
    num_experts: int | None = Field(None, gt=0, description="distinct experts kept per MoE layer (default: half)")
    held_out: float = Field(0.25, ge=0, lt=1, description="share of calibration batches kept to measure agreement")


def expert_similarity(gate_up: torch.Tensor, down: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """S[i, j] = how well expert b's hidden unit j matches expert a's unit i: the inner product
    of every weight the unit owns (its gate row, up row and down column)."""
    inner = down.shape[-1]
    ga, ua, da = gate_up[a, :inner], gate_up[a, inner:], down[a].T
    gb, ub, db = gate_up[b, :inner], gate_up[b, inner:], down[b].T
    return (ga.double() @ gb.double().T + ua.double() @ ub.double().T + da.double() @ db.double().T)


def align_permutation(gate_up: torch.Tensor, down: torch.Tensor, reference: int, expert: int) -> torch.Tensor:
    """perm such that expert's unit perm[i] takes slot i (maximises Σ_i S[i, perm[i]])."""
    from scipy.optimize import linear_sum_assignment

    if expert == reference:
        return torch.arange(down.shape[-1])
    s = expert_similarity(gate_up, down, reference, expert)
    rows, cols = linear_sum_assignment(s.numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def permute_expert(gate_up_e: torch.Tensor, down_e: torch.Tensor, perm: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert with its hidden units reordered by perm (the same function)."""
    inner = down_e.shape[-1]
    gate, up = gate_up_e[:inner][perm], gate_up_e[inner:][perm]
    return torch.cat([gate, up]), down_e[:, perm]


def routing_frequencies(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """f_i: the share of the N·k top-k selections that go to expert i."""
    chosen = router_logits.topk(top_k, dim=-1).indices.reshape(-1)
    counts = torch.bincount(chosen, minlength=router_logits.shape[-1]).double()
    return counts / max(float(counts.sum()), 1.0)


def group_experts(freq: torch.Tensor, router_logits: torch.Tensor, num_groups: int) -> list[int]:
    """For each expert, the centre of its group (centres are the num_groups most used experts,
    ties to the lower index; members join the centre of most similar router logits)."""
    n = freq.numel()
    order = sorted(range(n), key=lambda i: (-float(freq[i]), i))
    centres = order[:num_groups]
    cols = torch.nn.functional.normalize(router_logits.double().T, dim=-1)  # [E, N]
    sim = cols @ cols.T
    return [i if i in centres else max(centres, key=lambda c: (float(sim[i, c]), -c)) for i in range(n)]


def merge_experts(gate_up: torch.Tensor, down: torch.Tensor, freq: torch.Tensor, assignment: list[int], *,
                  align: bool = True, weighting: Literal["frequency", "uniform"] = "frequency"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Align members to their centre, merge each group by Σ f_i W_i / Σ f_i (a plain mean when no
    member was ever routed to), and put the merged expert in every member's slot.

    Ablations (the benchmark's baselines, not M-SMoE): `align=False` averages the experts' hidden
    units as they are stored; `weighting="uniform"` gives every member the same weight."""
    gate_up_out, down_out = gate_up.clone(), down.clone()
    for centre in sorted(set(assignment)):
        members = [i for i, c in enumerate(assignment) if c == centre]
        f = freq[members].double() if weighting == "frequency" else torch.ones(len(members), dtype=torch.float64)
        f = f / f.sum() if float(f.sum()) > 0 else torch.full_like(f, 1.0 / len(members))
        gu = torch.zeros_like(gate_up[0], dtype=torch.float64)
        dn = torch.zeros_like(down[0], dtype=torch.float64)
        for w, i in zip(f, members):
            a, b = (permute_expert(gate_up[i], down[i], align_permutation(gate_up, down, centre, i)) if align
                    else (gate_up[i], down[i]))
            gu += w * a.double()
            dn += w * b.double()
        for i in members:
            gate_up_out[i] = gu.to(gate_up.dtype)
            down_out[i] = dn.to(down.dtype)
    return gate_up_out, down_out


def _no_tensor_kernel(group: TensorGroup, p: MsmoeParams, stats: Stats) -> Merged:
    raise MergeError("method msmoe merges the experts inside one whole model folder (it runs the model on "
                     "calibration data), not tensor by tensor: use modalmerge.merge(recipe, output) or "
                     "`modalmerge merge RECIPE --output DIR`")


MSMOE = Method(
    "msmoe", _no_tensor_kernel, MsmoeParams,
    summary="Merge the experts inside one MoE model (M-SMoE): group by routing, align hidden units, average "
            "weighted by routing frequency; the router is unchanged (one model, calibration data, loaded whole).",
    base="forbidden", min_models=1, max_models=1,
    chunkable=lambda p, info: False,
    runs="whole_model",
    weighted=False,
)
