"""Learning AdaMerging's coefficients (methods/adamerging.py) by entropy minimisation.

Not streaming: the base model, every task vector of the merged tensors and the merged
parameters (with their gradients) are held at once; --dry-run says how much that is.
"""

from __future__ import annotations

import torch
from tqdm import tqdm



def prediction_entropy(logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Shannon entropy of the predictive distributions (per example, or per token)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(dim=-1)
    if logits.dim() == 3 and attention_mask is not None:
        keep = attention_mask.to(ent.dtype)
        return (ent * keep).sum() / keep.sum().clamp_min(1)
    return ent.mean()


def fit_coefficients(base: dict[str, torch.Tensor], taus: dict[str, torch.Tensor], p, task_entropy,
                     progress: bool = False) -> tuple[torch.Tensor, list[float]]:
    """AdaMerging's λ: Adam (lr p.lr, p.steps steps, init p.init) on the summed prediction
    entropy of every model's calibration data, clamped to [0, 1] after each step.

    `base` maps tensor names to θ_0 and `taus` to the stacked task vectors [T, ...];
    `task_entropy(t, step, params)` is the entropy of model t's batch for this step on the merged
    parameters `params` (by tensor name). Returns λ ([T], or [T, tensors] layer-wise, in the
    order of `base`) and the mean entropy per step.
    """
    names = list(base)
    n_models = next(iter(taus.values())).shape[0]
    shape = (n_models,) if p.granularity == "task" else (n_models, len(names))
    lam = torch.full(shape, p.init, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=p.lr)
    losses = []
    for step in tqdm(range(p.steps), desc="adamerging", disable=not progress, leave=False):
        params = {n: base[n] + torch.tensordot(lam if p.granularity == "task" else lam[:, j], taus[n], dims=1)
                  for j, n in enumerate(names)}
        loss = sum(task_entropy(t, step, params) for t in range(n_models))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
        losses.append(loss.item() / n_models)
    return lam.detach(), losses


def learn_coefficients(plan, model, inputs: list[list[dict]], progress: bool = False
                       ) -> list[dict[str, torch.Tensor]]:
    """Per model, {tensor name: λ (1 value)} for every merged tensor. `model`: the base model, loaded
    (procedures/calibration.py loads it); `inputs[t]`: model t's batches, as the model's keyword arguments."""
    p = plan.params
    for q in model.parameters():
        q.requires_grad_(False)
    names = [t.name for t in plan.merged]
    own = set(model.state_dict())
    fitted = [n for n in names if n in own]  # tensors the model's forward uses
    base = {n: plan.base.read(n).float() for n in fitted}
    taus = {n: torch.stack([src.read(n).float() - base[n] for src in plan.models]) for n in fitted}
    n_models = len(plan.models)

    def task_entropy(t: int, step: int, params: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = inputs[t][step % len(inputs[t])]
        out = torch.func.functional_call(model, params, args=(), kwargs=batch, strict=False)
        return prediction_entropy(out.logits, batch.get("attention_mask"))

    lam, _ = fit_coefficients(base, taus, p, task_entropy, progress)
    out = []
    for t in range(n_models):
        col = {n: (lam[t] if p.granularity == "task" else lam[t, fitted.index(n)]).reshape(1).clone()
               for n in fitted}
        # merged tensors the forward never reads keep the initial coefficient
        col.update({n: torch.tensor([p.init]) for n in names if n not in col})
        out.append(col)
    return out
