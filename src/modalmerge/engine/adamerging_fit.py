"""Learning AdaMerging's coefficients (methods/adamerging.py) by entropy minimisation.

Not streaming: the base model, every task vector of the merged tensors and the merged
parameters (with their gradients) are held at once; --dry-run says how much that is.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from ..errors import MergeError
from .calibration import load_model, model_inputs


def prediction_entropy(logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Shannon entropy of the predictive distributions (per example, or per token)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(dim=-1)
    if logits.dim() == 3 and attention_mask is not None:
        keep = attention_mask.to(ent.dtype)
        return (ent * keep).sum() / keep.sum().clamp_min(1)
    return ent.mean()


def learn_coefficients(plan, batches: list[list[dict]], progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per model, {tensor name: λ (1 value)} for every merged tensor."""
    p = plan.params
    if plan.base is None:
        raise MergeError("adamerging needs a base model: add `base: path/to/base` to the recipe")
    model = load_model(plan.base, f"model {plan.base.label!r}")
    for q in model.parameters():
        q.requires_grad_(False)
    names = [t.name for t in plan.merged]
    own = set(model.state_dict())
    fitted = [n for n in names if n in own]  # tensors the model's forward uses
    base = {n: plan.base.read(n).float() for n in fitted}
    taus = [{n: src.read(n).float() - base[n] for n in fitted} for src in plan.models]
    n_models = len(plan.models)
    shape = (n_models,) if p.granularity == "task" else (n_models, len(fitted))
    lam = torch.full(shape, p.init, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=p.lr)
    for step in tqdm(range(p.steps), desc="adamerging", disable=not progress, leave=False):
        params = {}
        for j, n in enumerate(fitted):
            coef = lam if p.granularity == "task" else lam[:, j]
            params[n] = base[n] + sum(coef[t] * taus[t][n] for t in range(n_models))
        loss = 0.0
        for t in range(n_models):
            batch = batches[t][step % len(batches[t])]
            out = torch.func.functional_call(model, params, args=(), kwargs=model_inputs(batch), strict=False)
            loss = loss + prediction_entropy(out.logits, batch.get("attention_mask"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
    lam = lam.detach()
    out = []
    for t in range(n_models):
        col = {n: (lam[t] if p.granularity == "task" else lam[t, fitted.index(n)]).reshape(1).clone()
               for n in fitted}
        # merged tensors the forward never reads keep the initial coefficient
        col.update({n: torch.tensor([p.init]) for n in names if n not in col})
        out.append(col)
    return out
