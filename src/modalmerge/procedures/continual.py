"""Continual (sequential) merging: OPCM's models applied one at a time, state kept on disk.

A merge folder written here holds, besides the model (θ_0 + Δ), a `continual/` part:
`manifest.json` (format, method, parameters, the base's path, λ, the norm history, the models so
far, the recipe's options) and `delta*.safetensors`, the running Δ in float32 (the model's own
dtype may be lower). `continual_add` adds one model to such a folder without the earlier models.

Memory: one tensor of the base, of Δ and of the new model at a time. Each step streams twice:
pass 1 computes Δ' per tensor (SVDs for linear weights), accumulates ‖Δ'‖² and ‖τ_t‖² with
deterministic sums, and writes Δ' unscaled to a scratch file; pass 2 rescales it by 1/λ_new. This
re-reads Δ' once instead of computing every SVD twice. A final pass writes θ_0 + Δ.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import ops
from ..checkpoint.hub import is_hub_reference
from ..checkpoint.output import ShardedWriter
from ..checkpoint.safetensors_io import TensorMeta, check_regular
from ..checkpoint.sources import SafetensorsSource, TensorSource
from ..errors import MergeError
from ..methods.base import Stats, TensorGroup
from ..methods.opcm import RunningScale
from ..engine.plan import Plan, build_plan, open_models, who
from ..engine.recipe import Recipe, parse_recipe
from ..engine.sinks import FolderSink

CONTINUAL_DIR = "continual"
MANIFEST = "manifest.json"
FORMAT = "modalmerge-continual/1"


def _open_delta(folder: Path) -> TensorSource:
    files = sorted(folder.glob("delta*.safetensors"))
    if not files:
        raise MergeError(f"{folder}: no delta*.safetensors; the continual state is incomplete, redo the merge")
    return SafetensorsSource(files, "running merge", folder)


def _write_all(folder: Path, stem: str, plan: Plan, values) -> None:
    """Stream (name, float32 tensor) pairs into `folder/stem*.safetensors`."""
    folder.mkdir(parents=True, exist_ok=True)
    w = ShardedWriter(folder, [(t.name, TensorMeta(t.meta.shape, torch.float32)) for t in plan.merged], stem=stem)
    for name, value in values:
        w.write(name, value.contiguous())
    w.close()


def _step(plan: Plan, model: TensorSource, prev: TensorSource | None, lam: float, norms: list[float],
          work: Path, k: int, progress: bool) -> tuple[Path, float, list[float]]:
    """One model into the running merge; returns (folder of the new Δ, λ_new, norms)."""
    merged = plan.merged
    sums = {"new": 0.0, "tau": 0.0}

    def deltas():
        for t in tqdm(merged, desc=f"opcm step {k + 1}", disable=not progress, leave=False):
            base = plan.base.read(t.name).float()
            tau = model.read(t.name).float() - base
            if not bool(torch.isfinite(tau).all()):
                raise MergeError(f"model {who(model)}: tensor {t.name!r} contains NaN or Inf; fix or exclude it")
            sums["tau"] += ops.deterministic_dot(tau, tau)
            if prev is None:
                d = tau
            else:
                stack = torch.stack([prev.read(t.name).float(), tau])
                group = TensorGroup(info=t.info, base=None, models=stack, model_names=["running", model.label],
                                    weights=torch.ones(2), model_params=[{}, {}])
                d = plan.method.kernel(group, plan.params, Stats({RunningScale: RunningScale(lam)})).tensor
            sums["new"] += ops.deterministic_dot(d, d)
            yield t.name, d

    first = prev is None
    unscaled = work / (f"delta-{k}" if first else f"unscaled-{k}")
    _write_all(unscaled, "delta", plan, deltas())
    norms = norms + [math.sqrt(sums["tau"])]
    if first:
        return unscaled, 1.0, norms
    mean = sum(norms) / len(norms)
    if sums["new"] <= 0 or mean <= 0:
        raise MergeError(f"opcm: model {who(model)}: the merged task vector is zero, so it cannot be rescaled; "
                         "are the models identical to the base?")
    lam_new = math.sqrt(sums["new"]) / mean
    src = _open_delta(unscaled)
    out = work / f"delta-{k}"
    _write_all(out, "delta", plan, ((t.name, src.read(t.name).float() / lam_new) for t in merged))
    shutil.rmtree(unscaled)
    return out, lam_new, norms


def _finish(plan: Plan, sink: FolderSink, delta_dir: Path, state: dict[str, Any], progress: bool,
            tool_version: str) -> Path:
    """Write θ_0 + Δ (and the copied tensors), move Δ into continual/, write the manifest."""
    delta = _open_delta(delta_dir)
    for t in tqdm(plan.tensors, desc="writing", disable=not progress, leave=False):
        if t.merge:
            value = plan.base.read(t.name).float() + delta.read(t.name).float()
        else:
            value = plan.copy_source.read(t.name)
        sink.write(t.name, value.to(t.out_dtype))
    target = sink.folder.tmp / CONTINUAL_DIR
    target.mkdir(exist_ok=True)
    for f in delta_dir.iterdir():
        f.rename(target / f.name)
    del delta
    shutil.rmtree(delta_dir.parent, ignore_errors=True)  # the scratch folder
    (target / MANIFEST).write_text(json.dumps(state, indent=2))
    sink.tool_version = tool_version
    return sink.close()


def _state(plan: Plan, recipe: Recipe, lam: float, norms: list[float], history: list[dict]) -> dict[str, Any]:
    options = recipe.model_dump(exclude={"models", "base", "method", "params", "source_format", "copy_files_from"})
    return {"format": FORMAT, "method": plan.method.name, "params": plan.params.model_dump(by_alias=True),
            "base": _abs(recipe.base), "lambda": lam, "norms": norms, "models": history,
            "tensors": [t.name for t in plan.merged], "recipe": options}


def run_sequential(plan: Plan, output, *, overwrite: bool = False, progress: bool = False,
                   tool_version: str = "?") -> Path:
    """`merge` with a sequential method: the recipe's models applied in order."""
    if plan.base is None or plan.recipe.base is None or plan.base.path is None:
        raise MergeError(f"method {plan.method.name} needs a base model folder: add `base: path/to/base`")
    sink = FolderSink(plan, output, overwrite=overwrite)
    try:
        with sink.folder.writing():  # a full or read-only disk: one line
            work = sink.folder.tmp / ".work"
            prev_dir, lam, norms = None, 1.0, []
            for k, model in enumerate(plan.models):
                prev = _open_delta(prev_dir) if prev_dir is not None else None
                new_dir, lam, norms = _step(plan, model, prev, lam, norms, work, k, progress)
                if prev_dir is not None:
                    del prev
                    shutil.rmtree(prev_dir)
                prev_dir = new_dir
            history = [{"name": m.label, "path": _abs(m.path)} for m in plan.recipe.models]
            return _finish(plan, sink, prev_dir, _state(plan, plan.recipe, lam, norms, history), progress,
                           tool_version)
    except BaseException:
        sink.abort()
        raise


def _abs(path: str) -> str:
    """A local path made absolute (the state outlives the working folder); a hub id as it is."""
    return str(Path(path).absolute()) if Path(path).exists() else path


def read_state(previous) -> dict[str, Any]:
    path = Path(previous) / CONTINUAL_DIR / MANIFEST
    try:
        if path.exists():
            check_regular(path, "continual merge state")  # a FIFO there would block the read
        state = json.loads(path.read_text())
    except OSError:
        raise MergeError(f"{previous}: not a continual merge (no {CONTINUAL_DIR}/{MANIFEST}); start one with "
                         "`modalmerge merge` and `method: opcm`") from None
    except ValueError:
        raise MergeError(f"{path}: not valid JSON; the continual state is damaged, redo the merge") from None
    if state.get("format") != FORMAT:
        raise MergeError(f"{path}: format {state.get('format')!r} is not {FORMAT!r}; redo the merge with this version")
    return state


def continual_add(previous, add: str, output, *, name: str | None = None, overwrite: bool = False,
                  allow_pickle: bool = False, progress: bool = False, tool_version: str = "?") -> Path:
    """Add one model to the continual merge in folder `previous`; the result goes to `output`, a
    new folder (`previous` is an input, so it is never replaced: remove it afterwards if you wish)."""
    previous = Path(previous)
    state = read_state(previous)
    if not Path(state["base"]).exists() and not is_hub_reference(state["base"]):  # a hub id: read from the cache
        raise MergeError(f"{previous}: its base model {state['base']} is not there any more; OPCM needs the base "
                         "to add a model: put it back at that path")
    history = list(state["models"])
    entry = {"path": add, **({"name": name} if name else {})}
    recipe = parse_recipe({"method": state["method"], "base": state["base"], "models": [entry],
                           "params": state["params"], "copy_files_from": str(previous), **state["recipe"]})
    label = recipe.models[0].label
    if any(m["name"] == label for m in history):
        raise MergeError(f"model name {label!r} is already in the merge {previous}; give it another name (--name)")
    base, models = open_models(recipe, allow_pickle=allow_pickle)
    plan = build_plan(recipe, base, models)
    if [t.name for t in plan.merged] != state["tensors"]:
        raise MergeError(f"model {who(models[0])}: its merged tensors differ from those of {previous}; add a model "
                         "of the same architecture (and the same include/exclude)")
    history.append({"name": label, "path": _abs(add)})
    # the model card lists every model of the merge, not only the new one
    entries = [{"path": m["path"], "name": m["name"]} for m in history]
    plan.recipe = parse_recipe({**recipe.model_dump(exclude={"source_format"}), "models": entries})
    # the previous merge is an input: the output is never it (not even with --overwrite), inside or around it
    sink = FolderSink(plan, output, overwrite=overwrite, inputs=[("previous merge", str(previous))])
    try:
        with sink.folder.writing():
            work = sink.folder.tmp / ".work"
            new_dir, lam, norms = _step(plan, models[0], _open_delta(previous / CONTINUAL_DIR),
                                        float(state["lambda"]), [float(x) for x in state["norms"]], work,
                                        len(history) - 1, progress)
            return _finish(plan, sink, new_dir, _state(plan, recipe, lam, norms, history), progress,
                           tool_version)
    except BaseException:
        sink.abort()
        raise
