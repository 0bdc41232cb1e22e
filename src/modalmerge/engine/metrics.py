"""Per-model metrics read at plan time from a Hugging Face Trainer checkpoint folder.

A method that declares `metrics` (metrics_weighted) gets each model's `step` and `loss` filled in
from `trainer_state.json` beside the weights when the recipe does not give them: step = its
`global_step`; loss = the `eval_loss` logged at that step, else the training `loss` logged at
that step, else the last eval_loss (then loss) logged before it. The kernels only see tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint.sources import load_json
from ..errors import MergeError


def trainer_metrics(folder: Path) -> dict[str, float]:
    path = folder / "trainer_state.json"
    if not path.exists():
        return {}
    state = load_json(path, "Trainer state", "fix it or give `loss`/`step` in the recipe")
    try:
        step = state.get("global_step")
        history = state.get("log_history") or []
    except (OSError, ValueError, AttributeError):
        raise MergeError(f"{path}: cannot read it as a Trainer state; fix it or give `loss`/`step` in the recipe") from None
    out: dict[str, float] = {}
    if isinstance(step, (int, float)) and step > 0:
        out["step"] = float(step)
    logged = [e for e in history if isinstance(e, dict) and isinstance(e.get("step"), (int, float))]
    for key in ("eval_loss", "loss"):
        at = [e[key] for e in logged if e["step"] == step and isinstance(e.get(key), (int, float))]
        if at:
            out["loss"] = float(at[-1])
            return out
    for key in ("eval_loss", "loss"):
        before = [e[key] for e in logged if (step is None or e["step"] <= step) and isinstance(e.get(key), (int, float))]
        if before:
            out["loss"] = float(before[-1])
            return out
    return out


def fill_metrics(models: list, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each model entry's params with the missing `keys` read from its folder's trainer_state.json."""
    out = []
    for entry in models:
        params = dict(entry.params)
        missing = [k for k in keys if k not in params]
        folder = Path(entry.path)
        if missing and folder.is_dir():
            found = trainer_metrics(folder)
            params.update({k: found[k] for k in missing if k in found})
        out.append(params)
    return out
