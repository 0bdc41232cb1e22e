"""The calibration-data hook of data-aware methods (spec 13).

A recipe names calibration data for all models (`calibration:` at the top) or per model (the
model entry's own `calibration:`, e.g. each fine-tune's task data):

    calibration: {callable: "my_pkg.data:batches", any: kwargs}        # fn(**kwargs) -> batches
    calibration: {file: data.jsonl, loader: text, max_examples: 256, max_length: 64}

A callable returns an iterable of batches: dicts of tensors given to the model as keyword
arguments (`labels`, when present, is kept out of the forward and used as y; so is
`visual_mask`, FRANK's marking of visual tokens), or plain
`input_ids` tensors. A `.txt` file has one example per line; a `.jsonl` file one object per
line with `text` (loader `text`, tokenised by the model folder's tokenizer) or `input_ids`
(loader `tokens`), and optionally `label`.

Before the streaming merge, each model is loaded (transformers, per its config), the data is
run through it, and per-tensor statistics are written to a scratch folder as safetensors; the
executor then reads them tensor by tensor next to the weights (`TensorGroup.data[kind]`), so
the merge itself stays streaming. Kinds (each one entry of DATA_KINDS, at the end of this file):

- fisher: diagonal Fisher, the mean over examples of (∂ log p(y|x) / ∂θ)².
- gram: per nn.Linear, G = XᵀX / n of its inputs (float64 accumulation), keyed by its weight.
- exp_avg_sq: the optimiser's second moments of each parameter (the model entry's `optimizer_state`).
- adamerging: coefficients learned by entropy minimisation; one value per model and tensor.
- visual_attention (FRANK's `a: fit`): the vision model's per-decoder-layer share of its text
  tokens' attention on visual tokens, [1, L] under every merged tensor's name (zeros for the
  reasoning models, which need no data). Visual tokens are a batch's boolean `visual_mask`
  [batch, seq] (kept out of the forward, like `labels`) or the input_ids equal to the config's
  image/video token id (LLaVA-style); see visual_attention_profile.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ..checkpoint.safetensors_io import SafetensorsFile, check_regular
from ..checkpoint.sources import TensorSource, load_json, open_source
from ..errors import MergeError, one_line
from ..methods.frank import vision_index
from .adamerging_fit import learn_coefficients
from ..engine.plan import who

TRUST_RECIPE_CODE_FIX = ("pass --trust-recipe-code (Python API: trust_recipe_code=True) if you trust this recipe, "
                         "or give `calibration: {file: data.jsonl}` instead")
TRUST_REMOTE_CODE_FIX = ("pass --trust-remote-code (Python API: trust_remote_code=True) if you trust this model "
                         "folder's code")

# batch keys that are not model inputs
NOT_INPUTS = ("labels", "visual_mask")


class CalibrationSpec(BaseModel):
    """Where calibration data comes from; keys besides these go to the callable."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)

    # what the user allowed (calibration_of sets them from the plan's trust flags; never a recipe)
    _trust_recipe_code: bool = PrivateAttr(False)
    _trust_remote_code: bool = PrivateAttr(False)

    callable_: str | None = Field(None, alias="callable")
    file: str | None = None
    loader: Literal["text", "tokens"] = "text"
    text_field: str = "text"
    max_examples: int = Field(256, gt=0)
    max_length: int = Field(64, gt=0)
    batch_size: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.callable_ is None) == (self.file is None):
            raise ValueError("give exactly one of `callable` (pkg.module:function) or `file` (a .jsonl or .txt)")
        return self

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def spec_of(raw: dict[str, Any], where: str) -> CalibrationSpec:
    try:
        return CalibrationSpec.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = one_line(".".join(str(x) for x in err["loc"]), 80)
        raise MergeError(f"{where}: calibration{('.' + loc) if loc else ''}: {one_line(err['msg'])}") from None


def calibration_readers(method, params, model_params: list[dict[str, Any]]) -> set[int]:
    """The models whose calibration data a method runs (the indices into the recipe's models)."""
    if method.whole_model:
        return set(range(len(model_params)))
    return set().union(*(DATA_KINDS[k].readers(params, model_params) for k in method.data(params)))


def loads_models(method, params) -> bool:
    """Whether the method loads model folders with transformers (to run data, or whole)."""
    return method.whole_model or any(DATA_KINDS[k].loads_models for k in method.data(params))


def remote_code_file(folder: Path | None) -> str | None:
    """The file of a model folder that names custom modelling code (`auto_map`: transformers would
    import Python files from the folder), or None."""
    if folder is None:
        return None
    for name in ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        path = Path(folder) / name
        if not path.exists():
            continue
        config = load_json(path, "model config", "fix or replace it")
        if isinstance(config, dict) and config.get("auto_map"):
            return name
    return None


def check_remote_code(folder: Path | None, who: str, trusted: bool) -> None:
    """Refuse a model folder with custom code unless its code is trusted."""
    found = None if trusted else remote_code_file(folder)
    if found:
        raise MergeError(f"{who}: {Path(folder) / found} names custom modelling code (auto_map), which loading "
                         f"the model with transformers would run; {TRUST_REMOTE_CODE_FIX}")


# -- data ------------------------------------------------------------------------------------

def load_batches(spec: CalibrationSpec, model_folder: Path | None = None, where: str = "calibration", *,
                 trust_recipe_code: bool = False, trust_remote_code: bool = False) -> list[dict[str, torch.Tensor]]:
    """The calibration batches, at most `max_examples` examples in all. A callable is imported and
    run only when trusted (here, or by the plan that made `spec`: calibration_of)."""
    if spec.callable_ is not None:
        raw = _batches_of(_call(spec, where, trust_recipe_code or spec._trust_recipe_code), spec.callable_, where)
    else:
        raw = _from_file(spec, model_folder, where, trust_remote_code or spec._trust_remote_code)
    out, left = [], spec.max_examples
    for batch in raw:
        if left <= 0:
            break
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch if batch.dim() > 1 else batch.unsqueeze(0)}
        if not isinstance(batch, dict) or not batch:
            raise MergeError(f"{where}: a calibration batch must be a dict of tensors or an input_ids tensor, "
                             f"got {type(batch).__name__}; fix the callable")
        n = _batch_len(batch)
        if n > left:
            batch = {k: v[:left] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
            n = left
        out.append(batch)
        left -= n
    if not out:
        raise MergeError(f"{where}: the calibration data has no examples; check the file or callable")
    return out


def check_callable_trusted(spec: CalibrationSpec, where: str, trusted: bool) -> None:
    if spec.callable_ is not None and not trusted:
        raise MergeError(f"{where}: calibration callable {spec.callable_!r} is code named by the recipe, which "
                         f"would be imported and run; {TRUST_RECIPE_CODE_FIX}")


def _call(spec: CalibrationSpec, where: str, trusted: bool) -> Any:
    check_callable_trusted(spec, where, trusted)
    target = spec.callable_
    module_name, _, fn_name = target.partition(":")
    if not module_name or not fn_name:
        raise MergeError(f"{where}: calibration callable {target!r} must be written 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise MergeError(f"{where}: cannot import calibration callable {target!r} ({one_line(e)}); check the name "
                         "and that its package is importable") from None
    except Exception as e:  # noqa: BLE001 - the module's own code failed while importing
        raise MergeError(f"{where}: importing calibration callable {target!r} failed ({type(e).__name__}: "
                         f"{one_line(e)}); fix that module") from None
    if not callable(fn):
        raise MergeError(f"{where}: calibration callable {target!r} is a {type(fn).__name__}, not a function; "
                         "name a function that returns batches")
    try:
        return fn(**spec.kwargs)
    except Exception as e:  # noqa: BLE001 - the user's function failed: one line naming it
        raise MergeError(f"{where}: calibration callable {target!r} raised {type(e).__name__} ({one_line(e)}); "
                         "fix the function or its arguments in `calibration`") from None


def _batches_of(raw: Any, target: str, where: str) -> Iterable:
    """A callable's result as batches; its failures while iterating are one line naming it."""
    try:
        it = iter(raw)
    except TypeError:
        raise MergeError(f"{where}: calibration callable {target!r} returned a {type(raw).__name__}, not an iterable "
                         "of batches; make it return (or yield) dicts of tensors or input_ids tensors") from None
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except MergeError:
            raise
        except Exception as e:  # noqa: BLE001 - raised inside the user's generator
            raise MergeError(f"{where}: calibration callable {target!r} raised {type(e).__name__} ({one_line(e)}) "
                             "while giving batches; fix the function") from None
        yield batch


def _from_file(spec: CalibrationSpec, model_folder: Path | None, where: str, trust_remote_code: bool = False
               ) -> Iterable:
    path = Path(spec.file)
    if not path.exists():
        raise MergeError(f"{where}: calibration file {path} does not exist; check `calibration.file`")
    check_regular(path, "calibration file (.jsonl or .txt)")  # a FIFO or device would block the read
    examples = []
    with path.open() as f:
        for i, line in enumerate(f):
            if len(examples) >= spec.max_examples:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    examples.append(json.loads(line))
                except ValueError:
                    raise MergeError(f"{path}: line {i + 1} is not JSON; fix it or use a .txt file") from None
            else:
                examples.append({spec.text_field: line})
    if spec.loader == "text":
        tokenizer = _tokenizer(model_folder, where, trust_remote_code)
        ids = [tokenizer(ex[spec.text_field], truncation=True, max_length=spec.max_length)["input_ids"]
               for ex in _need(examples, spec.text_field, path)]
    else:
        ids = [list(ex["input_ids"])[:spec.max_length] for ex in _need(examples, "input_ids", path)]
    labels = [ex.get("label") for ex in examples]
    # one example per batch row, padded to the longest of its batch on the right
    for s in range(0, len(ids), spec.batch_size):
        chunk, lab = ids[s:s + spec.batch_size], labels[s:s + spec.batch_size]
        width = max(len(x) for x in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, x in enumerate(chunk):
            input_ids[r, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[r, :len(x)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if all(v is not None for v in lab):
            batch["labels"] = torch.tensor(lab, dtype=torch.long)
        yield batch


def _need(examples: list[dict], key: str, path: Path) -> list[dict]:
    for i, ex in enumerate(examples):
        if key not in ex:
            raise MergeError(f"{path}: example {i + 1} has no {key!r} field; add it or set `calibration.loader`")
    return examples


def _tokenizer(folder: Path | None, where: str, trust_remote_code: bool = False):
    check_remote_code(folder, where, trust_remote_code)
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure means: no usable tokenizer there
        raise MergeError(f"{where}: no tokenizer in {folder} for the text loader ({type(e).__name__}); add "
                         "tokenizer files to the model folder or use `loader: tokens` with input_ids") from None


def _batch_len(batch: dict) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


def split_examples(batch: dict) -> list[dict]:
    """One batch as its single examples (each with a batch dimension of 1)."""
    n = _batch_len(batch)
    return [{k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
            for i in range(n)]


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in NOT_INPUTS}


# -- models ----------------------------------------------------------------------------------

def load_model(src: TensorSource, where: str, attn_implementation: str | None = None, *,
               trust_remote_code: bool = False):
    """A transformers model of the class its config names, in float32, in eval mode
    (`attn_implementation="eager"` where attention weights are read: sdpa returns none).
    A folder with custom code (auto_map) is loaded only with `trust_remote_code`."""
    cls = model_class(src, trust_remote_code=trust_remote_code)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = cls.from_pretrained(str(src.folder), dtype=torch.float32, trust_remote_code=trust_remote_code, **extra)
    return model.eval()


def model_class(src: TensorSource, *, trust_remote_code: bool = False):
    """The transformers class a model folder's config.json names (AutoModel when it names none)."""
    folder = src.folder
    if folder is None or not (folder / "config.json").exists():
        raise MergeError(f"model {src.label!r}: running calibration data needs a Hugging Face model folder with "
                         "config.json; give statistics in memory with merge_state_dicts(data=...) instead")
    check_remote_code(folder, f"model {src.label!r}", trust_remote_code)
    import transformers

    config = load_json(folder / "config.json", "model config", "fix or replace it")
    if not isinstance(config, dict):
        raise MergeError(f"model {src.label!r}: {folder / 'config.json'} is not a JSON object; fix or replace it")
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if isinstance(archs, list) and archs and isinstance(archs[0], str) \
        else None
    return cls if cls is not None else transformers.AutoModel


def _param_names(model) -> dict[int, list[str]]:
    """id(parameter) -> every state-dict name that holds it (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        names.setdefault(id(value), []).append(name)
    return names


def log_likelihood_terms(model, example: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(weight, log p(y|x))] whose weighted squared gradients average to the Fisher of one example.

    Labels given: the empirical Fisher (weight 1). A classifier without labels: the exact
    expectation over its classes, Σ_y p(y|x) (∂ log p(y|x))². A language model: y is the
    example's own next tokens (log-likelihood summed over the sequence).
    """
    logits = model(**model_inputs(example)).logits.float()
    labels = example.get("labels")
    if logits.dim() == 2:  # [1, classes]
        logp = torch.log_softmax(logits[0], dim=-1)
        if labels is not None:
            return [(torch.tensor(1.0), logp[int(labels.reshape(-1)[0])])]
        probs = logp.detach().exp()
        return [(probs[c], logp[c]) for c in range(logp.numel())]
    if logits.dim() == 3:  # [1, length, vocab]: next-token prediction
        target = (labels if labels is not None else example["input_ids"])[:, 1:]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        keep = target != -100
        if "attention_mask" in example:
            keep = keep & (example["attention_mask"][:, 1:] > 0)
        picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return [(torch.tensor(1.0), (picked * keep).sum())]
    raise MergeError(f"model output logits of shape {list(logits.shape)} are neither a classifier's nor a "
                     "language model's; Fisher merging needs one of those")


def fisher_diagonal(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of every parameter: mean over examples of the squared gradient of log p(y|x)."""
    params = [p for p in model.parameters() if p.requires_grad]
    acc = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    n = 0
    for batch in batches:
        for example in split_examples(batch):
            terms = log_likelihood_terms(model, example)
            for i, (w, ll) in enumerate(terms):
                grads = torch.autograd.grad(ll, params, retain_graph=i + 1 < len(terms), allow_unused=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        acc[id(p)].add_(g.float().square(), alpha=float(w))
            n += 1
    out = {}
    for pid, names in _param_names(model).items():
        if pid in acc:
            for name in names:
                out[name] = acc[pid] / max(n, 1)
    return out


def gram_matrices(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Per nn.Linear, G = XᵀX / n over every (unpadded) token's input, keyed by the weight's name."""
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name):
        def pre(module, args):
            x = args[0].detach()
            mask = current["mask"]
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask > 0]
            x = x.reshape(-1, x.shape[-1]).double()
            if name not in grams:
                grams[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
                counts[name] = 0
            grams[name].addmm_(x.T, x)
            counts[name] += x.shape[0]
        return pre

    handles = [m.register_forward_pre_hook(hook(f"{name}.weight"))
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    forward_with_hooks(model, batches, handles, current)
    return {name: (g / max(counts[name], 1)).float() for name, g in grams.items()}


def forward_with_hooks(model, batches: list[dict], handles: list, current: dict) -> None:
    """Run every batch through the model with hooks attached, then remove them. The hooks read
    the batch's attention mask from current["mask"] to skip padding."""
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch.get("attention_mask")
                model(**model_inputs(batch))
    finally:
        for h in handles:
            h.remove()


# image/video placeholder ids of LLaVA-style configs: input_ids hold one per visual feature
VISUAL_TOKEN_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def visual_token_ids(model) -> list[int]:
    """The token ids the model's config names as image (or video) placeholders."""
    ids = {getattr(model.config, k, None) for k in VISUAL_TOKEN_KEYS}
    return sorted(int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool))


def visual_mask_of(batch: dict, token_ids: list[int], where: str) -> torch.Tensor:
    """[batch, seq] bool: the batch's `visual_mask`, else its input_ids that are visual token ids."""
    if "visual_mask" in batch:
        mask = batch["visual_mask"]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise MergeError(f"{where}: a calibration batch's visual_mask must be a [batch, seq] boolean tensor, got "
                             f"{list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}; "
                             "fix the calibration callable")
        return mask.bool()
    ids = batch.get("input_ids")
    if ids is None or not token_ids:
        raise MergeError(f"{where}: cannot tell which calibration tokens are visual: give each batch a boolean "
                         "`visual_mask` [batch, seq] (from a calibration callable), or input_ids with the image "
                         "tokens of a model whose config names one (image_token_id / image_token_index)")
    return torch.isin(ids, torch.tensor(token_ids, dtype=ids.dtype))


def visual_attention_profile(model, batches: list[dict], where: str = "calibration") -> torch.Tensor:
    """s_l per decoder layer l: the mean over examples of the attention mass that text queries
    put on visual keys, averaged over heads and the example's text query positions.

    Text queries are the non-visual, non-padding positions after the example's last visual
    token (under a causal mask, the ones that see all of it); examples without visual tokens
    or without text after them are skipped. The model must return attention weights
    (eager attention; see load_model)."""
    token_ids = visual_token_ids(model)
    total: torch.Tensor | None = None
    used, visual_seen = 0, False
    with torch.no_grad():
        for batch in batches:
            visual = visual_mask_of(batch, token_ids, where)
            out = model(**model_inputs(batch), output_attentions=True)
            att = getattr(out, "attentions", None)
            if not att:
                raise MergeError(f"{where}: the model returned no attention weights with output_attentions=True; "
                                 "fitting FRANK's `a` needs a transformers model with eager attention")
            if tuple(visual.shape) != tuple(att[0].shape[:1] + att[0].shape[-1:]):
                raise MergeError(f"{where}: the batch's visual tokens are marked over {list(visual.shape)} positions "
                                 f"but the model attends over [batch, seq] = {[att[0].shape[0], att[0].shape[-1]]}; "
                                 "give visual_mask one flag per input position")
            valid = batch.get("attention_mask")
            valid = valid.bool() if isinstance(valid, torch.Tensor) and valid.shape == visual.shape \
                else torch.ones_like(visual)
            if total is None:
                total = torch.zeros(len(att), dtype=torch.float64)
            for b in range(visual.shape[0]):
                keys = visual[b] & valid[b]
                if not bool(keys.any()):
                    continue
                visual_seen = True
                queries = valid[b] & ~visual[b]
                queries[: int(keys.nonzero().max()) + 1] = False
                if not bool(queries.any()):
                    continue
                maps = torch.stack([a[b] for a in att]).double()          # [L, heads, seq, seq]
                total += maps[:, :, queries][..., keys].sum(dim=-1).mean(dim=(1, 2))
                used += 1
    if not visual_seen:
        raise MergeError(f"{where}: the calibration data has no visual tokens (no visual_mask entry set, no image "
                         f"token id {token_ids or '(the config names none)'} in input_ids); give batches with "
                         "images, or give FRANK's `a` as a number")
    if used == 0:
        raise MergeError(f"{where}: no calibration example has text tokens after its visual tokens, so there is no "
                         "text-to-visual attention to measure; put the prompt text after the image")
    return total / used


def visual_attention_statistics(plan) -> list[dict[str, torch.Tensor]]:
    """FRANK's `a: fit` data: the vision model's visual_attention_profile as a [1, L] row under every
    merged tensor's name; the reasoning models, which need no data, get zeros in the same places."""
    v = vision_index(plan.params, plan.model_params)
    src = plan.models[v]
    where = f"model {src.label!r}"
    model = load_model(src, where, attn_implementation="eager", trust_remote_code=plan.trust_remote_code)
    profile = visual_attention_profile(model, load_batches(calibration_of(plan, v), src.folder, where), where)
    del model
    row = profile.reshape(1, -1).float()
    # one tensor each: safetensors refuses to save tensors that share memory
    return [{t.name: (row if i == v else torch.zeros_like(row)).clone() for t in plan.merged}
            for i in range(len(plan.models))]


def optimizer_second_moments(path: str, model_label: str, names: list[str], allow_pickle: bool
                             ) -> dict[str, torch.Tensor]:
    """exp_avg_sq per parameter: a safetensors file keyed like the parameters, or (with
    --allow-pickle) a torch optimizer.pt whose states are keyed by name or by the index of the
    parameter in `names` (param_groups' `param_names` are used when the optimizer saved them)."""
    p = Path(path)
    where = f"model {model_label!r}: optimizer state {p}"
    if not p.exists():
        raise MergeError(f"{where} does not exist; check `optimizer_state`")
    check_regular(p, "optimizer state file")  # a FIFO or device would block the read
    if p.suffix == ".safetensors":
        sf = SafetensorsFile(p)  # validated like a model file, one line if corrupt
        try:
            return {n: sf.read(n) for n in sf.names()}
        finally:
            sf.close()
    if not allow_pickle:
        raise MergeError(f"model {model_label!r}: {p} is a pickled optimizer state; pass --allow-pickle to load "
                         "it with weights_only, or save exp_avg_sq as safetensors keyed like the parameters")
    fix = "save exp_avg_sq as safetensors keyed like the parameters"
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or unsafe pickle
        raise MergeError(f"{where} cannot be loaded with weights_only ({type(e).__name__}); {fix}") from None
    states = state.get("state", state) if isinstance(state, dict) else None
    groups = state.get("param_groups", []) if isinstance(state, dict) else None
    if not isinstance(states, dict) or not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise MergeError(f"{where} is not a torch optimizer state dict (`state` and `param_groups`); {fix}")
    ids: dict = {}  # parameter index -> name, when the optimizer saved `param_names`
    for g in groups:
        params, pnames = g.get("params"), g.get("param_names")
        if isinstance(params, list) and isinstance(pnames, list) and len(params) == len(pnames):
            ids.update((i, n) for i, n in zip(params, pnames) if isinstance(i, int) and isinstance(n, str))
    out = {}
    for key, s in states.items():
        if not isinstance(s, dict) or "exp_avg_sq" not in s:
            continue
        name = key if isinstance(key, str) else ids.get(key)
        if name is None and isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(names):
            if len(states) != len(names):  # positions only say which parameter when every one has a state
                raise MergeError(f"{where} has {len(states)} parameter states, the model {len(names)} tensors, and no "
                                 f"parameter names; {fix}")
            name = names[key]
        if name is None:
            raise MergeError(f"{where}: cannot tell which parameter its state {key!r:.60} belongs to; {fix}")
        v = s["exp_avg_sq"]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise MergeError(f"{where}: exp_avg_sq of {name!r} is not a floating-point tensor; {fix}")
        out[name] = v.float()
    return out


# -- gathering -------------------------------------------------------------------------------

def calibration_of(plan, t: int) -> CalibrationSpec:
    """Model t's calibration spec, checked against the plan's trust flags (which it carries on)."""
    entry = plan.recipe.models[t]
    raw = entry.calibration if entry.calibration is not None else plan.recipe.calibration
    if raw is None:
        raise MergeError(f"model {entry.label!r}: method {plan.method.name} needs calibration data; add "
                         "`calibration: {file: data.jsonl}` (or `{callable: pkg.module:function}`) to the recipe "
                         "or to this model's entry")
    where = f"model {entry.label!r}"
    spec = spec_of(raw, where)
    check_callable_trusted(spec, where, plan.trust_recipe_code)
    spec._trust_recipe_code = plan.trust_recipe_code
    spec._trust_remote_code = plan.trust_remote_code
    return spec


def _check_calibration(plan, t: int) -> None:
    calibration_of(plan, t)


def _check_optimizer_state(plan, t: int) -> None:
    entry = plan.recipe.models[t]
    if entry.optimizer_state is None:
        raise MergeError(f"model {entry.label!r}: method {plan.method.name} needs the optimiser's second "
                         "moments; add `optimizer_state: path/exp_avg_sq.safetensors` to its entry")


def _check_vision_data(plan) -> None:
    """FRANK's `a: fit`: only the vision model runs data."""
    v = vision_index(plan.params, plan.model_params)
    entry = plan.recipe.models[v]
    if entry.calibration is None and plan.recipe.calibration is None:
        raise MergeError(f"model {entry.label!r}: frank with `a: fit` fits its vision prior from this (vision) model's "
                         "attention to visual tokens and needs calibration data: add `calibration: {callable: "
                         "pkg.module:function}` (batches with image tokens or a visual_mask) to the recipe or to "
                         "this model's entry, or give `a` as a number")
    calibration_of(plan, v)


def _check(plan, kinds) -> None:
    """What each kind needs is in the recipe: the plan-wide checks first, then model by model."""
    for kind in kinds:
        if DATA_KINDS[kind].check_plan:
            DATA_KINDS[kind].check_plan(plan)
    for t in range(len(plan.recipe.models)):
        for kind in kinds:
            if DATA_KINDS[kind].check_model:
                DATA_KINDS[kind].check_model(plan, t)


def _batches_of_model(plan, t: int) -> list[dict]:
    src = plan.models[t]
    return load_batches(calibration_of(plan, t), src.folder, f"model {src.label!r}")


def run_each_model(statistic: Callable[[Any, list[dict]], dict[str, torch.Tensor]]):
    """A kind's computation that loads each model in turn and runs its calibration data through it."""
    def compute(plan, names: list[str], allow_pickle: bool, progress: bool) -> list[dict[str, torch.Tensor]]:
        per_model = []
        for t, src in enumerate(plan.models):
            batches = _batches_of_model(plan, t)
            model = load_model(src, f"model {src.label!r}", trust_remote_code=plan.trust_remote_code)
            per_model.append(statistic(model, batches))
            del model
        return per_model
    return compute


def second_moments_of_models(plan, names: list[str], allow_pickle: bool, progress: bool
                             ) -> list[dict[str, torch.Tensor]]:
    """exp_avg_sq of every model, read from its optimizer_state; every merged tensor must have one."""
    per_model = []
    for entry in plan.recipe.models[:len(plan.models)]:
        moments = optimizer_second_moments(entry.optimizer_state, entry.label, names, allow_pickle)
        for t_plan in plan.merged:
            got = moments.get(t_plan.name)
            if got is None or tuple(got.shape) != tuple(t_plan.meta.shape):
                what = "has no entry" if got is None else f"has shape {list(got.shape)}"
                raise MergeError(f"model {entry.label!r}: optimizer state {entry.optimizer_state} {what} "
                                 f"for tensor {t_plan.name!r}; give its exp_avg_sq (shape "
                                 f"{list(t_plan.meta.shape)}) or add the tensor to `exclude`")
        per_model.append(moments)
    return per_model


def adamerging_coefficients(plan, batches: list[list[dict]], progress: bool = False
                            ) -> list[dict[str, torch.Tensor]]:
    """AdaMerging's λ, learned on the base model (procedures/adamerging_fit.py) from each model's batches:
    per model, {tensor name: λ (1 value)} for every merged tensor."""
    if plan.base is None:
        raise MergeError("adamerging needs a base model: add `base: path/to/base` to the recipe")
    model = load_model(plan.base, f"model {plan.base.label!r}", trust_remote_code=plan.trust_remote_code)
    return learn_coefficients(plan, model, [[model_inputs(b) for b in bs] for bs in batches], progress)


def _adamerging(plan, names: list[str], allow_pickle: bool, progress: bool) -> list[dict[str, torch.Tensor]]:
    return adamerging_coefficients(plan, [_batches_of_model(plan, t) for t in range(len(plan.models))], progress)


def _float_params(plan) -> int:
    return sum(t.meta.numel for t in plan.tensors if t.meta.dtype.is_floating_point)


def _merged_params(plan) -> int:
    return sum(t.meta.numel for t in plan.merged)


def _all_models(params, model_params: list[dict[str, Any]]) -> set[int]:
    return set(range(len(model_params)))


def _no_models(params, model_params: list[dict[str, Any]]) -> set[int]:
    return set()


def _vision_model(params, model_params: list[dict[str, Any]]) -> set[int]:
    return {vision_index(params, model_params)}


def _visual_attention(plan, names: list[str], allow_pickle: bool, progress: bool) -> list[dict[str, torch.Tensor]]:
    return visual_attention_statistics(plan)


def _fisher_estimate(plan) -> dict[str, Any]:
    # one model at a time: its weights, their gradients and the Fisher accumulator
    params = _float_params(plan)
    return {"stored_bytes_per_model": params * 4, "peak_bytes": params * 4 * 3,
            "note": "one backward pass per example"}


def _gram_estimate(plan) -> dict[str, Any]:
    gram = sum(t.meta.shape[1] ** 2 for t in plan.merged if t.info.kind == "linear" and len(t.meta.shape) == 2)
    return {"stored_bytes_per_model": gram * 4, "peak_bytes": _float_params(plan) * 4 + gram * 8,
            "note": "float64 accumulation, forward passes only"}


def _second_moments_estimate(plan) -> dict[str, Any]:
    merged = _merged_params(plan)
    return {"stored_bytes_per_model": merged * 4, "peak_bytes": merged * 4,
            "note": "read from each model's optimizer_state"}


def _adamerging_estimate(plan) -> dict[str, Any]:
    # the base, T task vectors, the merged parameters and their gradients, all at once
    return {"stored_bytes_per_model": len(plan.merged) * 4,
            "peak_bytes": _float_params(plan) * 4 * 3 + _merged_params(plan) * 4 * len(plan.models),
            "note": "not streaming: all task vectors are held while coefficients are learned"}


def _visual_attention_estimate(plan) -> dict[str, Any]:
    # the vision model alone, forward passes only; a [1, layers] row per merged tensor
    return {"stored_bytes_per_model": len(plan.merged) * max(plan.num_layers, 1) * 4,
            "peak_bytes": _float_params(plan) * 4,
            "note": "vision model only, eager attention; each batch also holds every layer's "
                    "attention maps (layers x batch x heads x seq^2 x 4 bytes)"}


@dataclass(frozen=True)
class DataKind:
    """One kind of per-model statistic that data-aware methods name in `Method.data`; a new kind is
    one entry of DATA_KINDS. The executor reads it as `TensorGroup.data[name]`, tensor by tensor."""

    name: str
    # gathering loads model folders with transformers and runs calibration data through them
    loads_models: bool
    # the models whose calibration data it runs: (params, the recipe's per-model params) -> indices
    readers: Callable[[Any, list[dict[str, Any]]], set[int]]
    # per model, {tensor name: statistic}: (plan, every tensor name, allow_pickle, progress)
    compute: Callable[[Any, list[str], bool, bool], list[dict[str, torch.Tensor]]]
    # what --dry-run says: stored bytes per model, peak bytes, a note
    estimate: Callable[[Any], dict[str, Any]]
    # what the recipe must give, checked before any work: once per plan, and for each model t
    check_plan: Callable[[Any], None] | None = None
    check_model: Callable[[Any, int], None] | None = None


DATA_KINDS: dict[str, DataKind] = {k.name: k for k in (
    DataKind("fisher", loads_models=True, readers=_all_models, compute=run_each_model(fisher_diagonal),
             estimate=_fisher_estimate, check_model=_check_calibration),
    DataKind("gram", loads_models=True, readers=_all_models, compute=run_each_model(gram_matrices),
             estimate=_gram_estimate, check_model=_check_calibration),
    DataKind("exp_avg_sq", loads_models=False, readers=_no_models, compute=second_moments_of_models,
             estimate=_second_moments_estimate, check_model=_check_optimizer_state),
    DataKind("adamerging", loads_models=True, readers=_all_models, compute=_adamerging,
             estimate=_adamerging_estimate, check_model=_check_calibration),
    # FRANK's `a: fit`: only the vision model runs data
    DataKind("visual_attention", loads_models=True, readers=_vision_model, compute=_visual_attention,
             estimate=_visual_attention_estimate, check_plan=_check_vision_data),
)}
KINDS = tuple(DATA_KINDS)


def gather(plan, kinds: list[str], folder: str, *, allow_pickle: bool = False, progress: bool = False
           ) -> dict[str, list[TensorSource]]:
    """Compute each kind of per-model statistic, write it to `folder`, open it as sources."""
    from safetensors.torch import save_file

    _check(plan, kinds)
    out: dict[str, list[TensorSource]] = {}
    names = [t.name for t in plan.tensors]
    for kind in kinds:
        per_model = DATA_KINDS[kind].compute(plan, names, allow_pickle, progress)
        sources = []
        for t, stats in enumerate(per_model):
            path = Path(folder) / f"{kind}-{t}.safetensors"
            save_file({k: v.contiguous() for k, v in stats.items()}, str(path))
            sources.append(open_source(path, label=f"{kind} of {plan.model_names[t]}"))
        out[kind] = sources
    return out


def estimate(plan) -> dict[str, Any]:
    """What --dry-run says about the data pass: per kind, the statistics stored per model and the
    memory needed to compute them (besides activations, which depend on the data)."""
    kinds = list(plan.method.data(plan.params))
    _check(plan, kinds)
    out: dict[str, Any] = {kind: DATA_KINDS[kind].estimate(plan) for kind in kinds}
    out["peak_bytes"] = max(v["peak_bytes"] for v in out.values())
    n = len(plan.models)
    out["stored_bytes"] = sum(v["stored_bytes_per_model"] for k, v in out.items() if isinstance(v, dict)) * n
    return out


def check_data_fields(plan) -> None:
    """Refuse a `calibration` or `optimizer_state` the method does not read: a field is never
    ignored silently."""
    recipe, method, params = plan.recipe, plan.method, plan.params
    kinds = method.data(params)
    readers = calibration_readers(method, params, plan.model_params)
    for i, entry in enumerate(recipe.models):
        who_ = f"model {entry.label!r}"
        if entry.calibration is not None and i not in readers:
            why = "only the vision model's data is run" if readers else "it runs no calibration data"
            raise MergeError(f"{who_}: field `calibration` is not used by method {method.name} with these parameters "
                             f"({why}); remove it")
        if entry.optimizer_state is not None and "exp_avg_sq" not in kinds:
            raise MergeError(f"{who_}: field `optimizer_state` is not used by method {method.name} (only ota reads "
                             "optimiser state); remove it")
    if recipe.calibration is not None:
        if not readers:
            raise MergeError(f"field `calibration` is not used by method {method.name} with these parameters (it runs "
                             "no calibration data); remove it")
        if all(recipe.models[i].calibration is not None for i in readers):
            raise MergeError("the recipe's top-level `calibration` is not used: every model that runs data has its "
                             "own; remove one of them")


def check_trust(plan) -> None:
    """Refuse, before any work, code the merge would import or run without the user's consent
    (the plan's trust_recipe_code and trust_remote_code)."""
    recipe, method, params = plan.recipe, plan.method, plan.params
    for i in sorted(calibration_readers(method, params, plan.model_params)):
        entry = recipe.models[i]
        raw = entry.calibration if entry.calibration is not None else recipe.calibration
        if raw is not None:
            where = f"model {entry.label!r}"
            check_callable_trusted(spec_of(raw, where), where, plan.trust_recipe_code)
    if loads_models(method, params):
        for src in [s for s in (plan.base, *plan.models) if s is not None]:
            for s in (src, getattr(src, "base", None)):
                if s is not None:
                    check_remote_code(s.folder, f"model {who(s)}", plan.trust_remote_code)
