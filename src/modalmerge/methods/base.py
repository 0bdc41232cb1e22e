"""What a merge method is: validated parameters, an input contract, optional statistics passes,
and a kernel over the stacked values of one tensor (or one row-chunk of it).

Kernels see float32 tensors and never touch files; the engine decides what is in memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from types import UnionType
from typing import Any, Callable, ClassVar, Generic, Literal, TypeVar, Union, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .. import ops
from ..errors import MergeError, one_line

# Random values are generated in fixed blocks of rows, so a chunk of a tensor sees the same
# numbers whatever the chunking, order or parallelism of the run (spec: seeded per tensor).
_RANDOM_BLOCK_ELEMS = 1 << 20


class Params(BaseModel):
    """Base of every method's parameters: typed, with defaults; unknown keys are errors.

    Strict: `density: true` or `density: "0.5"` is an error, not 1.0 or 0.5 (an int is still a float)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, strict=True)

    # Parameters a recipe may also set per input model (mergekit's "per-model scope").
    per_model: ClassVar[frozenset[str]] = frozenset()


@dataclass
class TensorInfo:
    """What the architecture spec says about one tensor."""

    name: str
    shape: tuple[int, ...]
    kind: str = "other"                 # linear | embedding | conv | point | other
    neuron_dim: int | None = 0          # the axis whose index is a neuron; None: no neurons (point)
    layer: int | None = None            # decoder/encoder block index, when the name has one
    part: str = "all"                   # llm | encoder | projector | all (multimodal layouts)


class ElectionState:
    """The sign-election bookkeeping one block's kernel shares with the engine (spec 0's tie
    rule): exact zero sums Σ_t x_t = 0 take the sign of the total over the whole tensor, ties to
    +. The engine makes one per block; elections are keyed so a kernel may hold several.

    For a whole tensor (or a statistics sample) the sign is exact. For a row block the tensor's
    total is not known yet: + is used provisionally, and the kernel reports with settle() whether
    that sign decided anything; the engine sums the blocks' `partials` and runs such a block again
    with `totals` known when the finished tensor's total turns out negative (exact ties are rare).
    """

    def __init__(self, exact: bool, totals: dict[str, float] | None = None):
        self.exact = exact                                  # the block is a whole tensor or a sample
        self.totals: dict[str, float] = dict(totals or {})  # whole-tensor totals, when known
        self.partials: dict[str, float] = {}                # this block's contributions
        self.provisional = False                            # a provisional + decided some element
        self._guessed: set[str] = set()                     # elections that used a provisional +

    def tie_sign(self, total: torch.Tensor, key: str = "elect") -> float:
        """The sign for exact zeros of an election whose block sum is `total` (Σ_t x_t)."""
        partial = ops.deterministic_sum(total)
        self.partials[key] = self.partials.get(key, 0.0) + partial
        if self.exact:
            return 1.0 if partial >= 0 else -1.0
        if key in self.totals:
            return 1.0 if self.totals[key] >= 0 else -1.0
        self._guessed.add(key)
        return 1.0

    def rule(self, key: str = "elect") -> Callable[[torch.Tensor], float]:
        """tie_sign for one election, as the tie rule ops.trimmed_merge asks."""
        return lambda total: self.tie_sign(total, key)

    def settle(self, total: torch.Tensor, merged: torch.Tensor, key: str = "elect") -> None:
        """After an election that used tie_sign(key): note whether a provisional sign decided
        any element (see ops.tie_positions)."""
        if key in self._guessed and bool(ops.tie_positions(total, merged).any()):
            self.provisional = True


@dataclass
class TensorGroup:
    """The N inputs of one merge job: one tensor, or a block of its rows, from every model.

    Kernels read it and never change it: a kernel that works in place takes its own copy
    (task_vectors(), inputs().task_vectors()). What kernels and the engine share for the block
    is `election`."""

    info: TensorInfo
    base: torch.Tensor | None           # float32, the chunk's shape
    models: torch.Tensor                # [T, *chunk shape] float32
    model_names: list[str]
    weights: torch.Tensor               # [T] float32, recipe weights (default 1)
    model_params: list[dict[str, Any]]  # per-model parameter overrides
    row_start: int = 0                  # first row of the tensor this chunk holds
    seed: int = 0
    sample_weight: float = 1.0          # statistics passes over a sample: elements each stands for
    is_sample: bool = False             # a flat random sample (statistics pass), not a row block
    tensor_stats: list | None = None    # Method.tensor_statistic of each model over the whole tensor
    # data-aware methods: per-model statistics gathered from calibration data or optimiser state
    # before the merge, by kind ("fisher", "gram", ...), each stacked [T, ...] float32; a tensor
    # shaped like this one is cut to the same chunk, any other shape is given whole
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    # the block's inputs as stored (e.g. bfloat16), for methods with fused kernels
    # (Method.fused): the engine then leaves `base` and `models` on the meta device (shapes
    # only); the kernel reads them through inputs()
    raw_base: torch.Tensor | None = None
    raw_models: list[torch.Tensor] | None = None
    # sign-election bookkeeping shared with the engine (default: a block on its own)
    election: ElectionState | None = None

    def __post_init__(self):
        self.num_models = int(self.models.shape[0])
        self.chunk_shape = tuple(self.models.shape[1:])
        if self.election is None:
            self.election = ElectionState(exact=self.is_whole or self.is_sample)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def fused_inputs(self) -> bool:
        """The float32 stack was not built: the kernel reads the stored inputs (inputs())."""
        return self.raw_models is not None and self.models.is_meta

    def inputs(self) -> ops.trimmed_merge.Inputs:
        """The block's inputs for ops.trimmed_merge's operations, which choose C or torch."""
        if self.fused_inputs:
            return ops.trimmed_merge.Inputs(self.raw_base, self.raw_models, self.chunk_shape, c_kernels=True)
        return ops.trimmed_merge.Inputs(self.base, self.models, self.chunk_shape)

    @property
    def is_whole(self) -> bool:
        return not self.is_sample and self.row_start == 0 and self.chunk_shape == self.info.shape

    def task_vectors(self) -> torch.Tensor:
        """τ_t = θ_t − θ_0, stacked [T, ...] float32 (a new tensor the caller owns)."""
        if self.base is None:
            raise ValueError("this method needs a base model")
        if self.fused_inputs:
            return self.inputs().task_vectors()
        return self.models - self.base.unsqueeze(0)

    def weights_like(self, x: torch.Tensor) -> torch.Tensor:
        """The model weights shaped to broadcast over a [T, ...] stack."""
        return self.weights.reshape((-1,) + (1,) * (x.dim() - 1))

    def per_model(self, params: Params, key: str) -> list:
        """A parameter's value for each model: the model's override, else the method-wide value."""
        field_name = next((k for k, f in type(params).model_fields.items() if f.alias == key), key)
        default = getattr(params, field_name)
        return [mp.get(key, mp.get(field_name, default)) for mp in self.model_params]

    def uniform(self, model_index: int, salt: str = "") -> torch.Tensor:
        """Seeded uniform [0, 1) values shaped like one model's chunk, the same under any chunking."""
        row_elems = 1
        for s in self.info.shape[1:]:
            row_elems *= s
        chunk_shape = self.chunk_shape
        n = 1
        for s in chunk_shape:
            n *= s
        start = self.row_start * row_elems
        block = _RANDOM_BLOCK_ELEMS
        out = torch.empty(n, dtype=torch.float32)
        pos = start
        while pos < start + n:
            b = pos // block
            gen = torch.Generator().manual_seed(_seed_of(self.seed, self.name, model_index, b, salt))
            values = torch.rand(min(block, _numel(self.info.shape) - b * block), generator=gen)
            take = min((b + 1) * block, start + n) - pos
            out[pos - start: pos - start + take] = values[pos - b * block: pos - b * block + take]
            pos += take
        return out.reshape(chunk_shape).to(self.weights.device)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _seed_of(*parts) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Merged:
    """A kernel's answer for one chunk.

    `tensor` is what the output model holds. Task-conditional methods also give the shared
    vector they decouple (`shared`) and, per task, a binary mask; task t is then served by
    θ_0 + scalar_t · mask_t ⊙ shared (scalars come from statistics, default 1).
    """

    tensor: torch.Tensor
    shared: torch.Tensor | None = None
    masks: dict[str, torch.Tensor] | None = None


R = TypeVar("R")


class Statistic(Generic[R]):
    """One statistics pass: it observes every merged tensor, then gives a result (an R) to the kernels.

    `sampled` statistics may see a seeded random sample of each tensor's elements (with
    `group.sample_weight` saying how many elements each one stands for); others see everything.
    Kernels ask for the result by the statistic's class: stats.get(TaskMagnitudes).
    """

    name: str = "stat"
    sampled: bool = False

    @property
    def provides(self) -> type["Statistic"]:
        """The class whose result this pass gives (a refinement gives its original's)."""
        return type(self)

    def observe(self, group: TensorGroup, params: Params, prior: "Stats") -> None:
        raise NotImplementedError

    def result(self, params: Params, prior: "Stats") -> R:
        raise NotImplementedError

    def refinement(self, result: R) -> "Statistic[R] | None":
        """A further pass that makes an approximate result exact (run when exact statistics are
        asked for); its result replaces this one's."""
        return None


class Stats:
    """What the kernels know about the whole model: each statistics pass's result, by the class of
    the statistic (stats.get(TaskMagnitudes) is a MagnitudeResult), and values the engine gives
    otherwise (OPCM's running scale), by their own class."""

    def __init__(self, values: dict[type, Any] | None = None):
        self._values: dict[type, Any] = dict(values or {})
        self._names: dict[type, str] = {}

    def put(self, statistic: Statistic[R], result: R) -> None:
        self._values[statistic.provides] = result
        self._names[statistic.provides] = statistic.name

    def get(self, kind: type[Statistic[R]] | type[R]) -> R:
        try:
            return self._values[kind]
        except KeyError:
            raise KeyError(f"no {kind.__name__} result: the method must list it in its statistics") from None

    def __contains__(self, kind: type) -> bool:
        return kind in self._values

    def summaries(self) -> dict[str, Any]:
        """For the merge report: each pass's name and its result's summary(), if it has one."""
        return {self._names.get(k, k.__name__): getattr(v, "summary", lambda: None)()
                for k, v in self._values.items()}


Kernel = Callable[[TensorGroup, Any, Stats], Merged]


def parse_params(params: type[Params], raw: dict[str, Any] | None, method: str, where: str = "params") -> Params:
    """`raw` validated as method `method`'s parameters; a one-line MergeError naming the field."""
    if raw is not None and not isinstance(raw, dict):
        raise MergeError(f"method {method}: {where} must be a mapping of parameter names to values; fix it")
    try:
        return params.model_validate(raw or {})
    except ValidationError as e:
        err = e.errors()[0]
        # names and messages may quote recipe text: kept to one short line
        loc = one_line(".".join(str(x) for x in err["loc"]), 80) or "?"
        msg = one_line(err["msg"])
        known = ", ".join(sorted(f.alias or k for k, f in params.model_fields.items()))
        if err["type"] == "extra_forbidden":
            raise MergeError(f"method {method}: unknown parameter {where}.{loc}; its parameters are: "
                             f"{known or 'none'}") from None
        raise MergeError(f"method {method}: {where}.{loc}: {msg} (parameters: {known or 'none'})") from None


@dataclass(frozen=True)
class MergekitForm:
    """How mergekit 0.1.5 names a method (merge_methods/registry.py) and what its recipes mean, in this
    method's native parameters; engine/recipe.py applies it and knows no method by name."""

    name: str  # mergekit's `merge_method`
    # mergekit's defaults (generalized_task_arithmetic.py), applied before the recipe's parameters
    defaults: dict[str, Any] = field(default_factory=dict)
    # mergekit per-model parameter -> native name (applied to the top-level defaults too)
    per_model_renames: dict[str, str] = field(default_factory=dict)
    # mergekit's sign election: its ties break towards + and `normalize` divides by the agreeing
    # models' weights (native: `tie: positive`, `aggregate: mean`, or `sum` without normalize)
    electing: bool = False
    # takes mergekit's `rescale` (mergekit rescales to the L1 norm: native `rescale: l1`)
    rescale: bool = False
    # native parameters that reproduce mergekit's behaviour; the recipe's own may override them
    native: dict[str, Any] = field(default_factory=dict)
    # mergekit adds the base to the inputs and this method averages it with the others
    base_is_input: bool = False
    # mergekit stops when an input has no `weight` (its ParameterSpec has no default)
    weight_required: bool = False


@dataclass
class Method:
    """A merge method: how it is called, what it needs, and its kernel."""

    name: str
    kernel: Kernel
    params: type[Params]
    summary: str
    base: Literal["required", "optional", "forbidden"] = "required"
    min_models: int = 1
    max_models: int | None = None
    # statistics passes to run before the apply pass, in order; later ones see earlier results
    statistics: Callable[[Any], list[Statistic]] = field(default=lambda p: [])
    # whether a large tensor may be cut into row blocks for this method and these params
    chunkable: Callable[[Any, TensorInfo], bool] = field(default=lambda p, info: True)
    # for these params, a statistic of one model's whole tensor (e.g. a per-tensor top-k
    # threshold), or None; given to the kernel as group.tensor_stats of every row block of a
    # tensor merged in blocks (a whole tensor's kernel computes it itself). Lets a tensor-scoped
    # method still merge large tensors in row blocks. The statistic is called one model at a
    # time as (params, info, base or None, model [whole tensor, storage dtype], model_params,
    # fused: whether the engine lets the C kernels read them) -> value
    tensor_statistic: Callable[[Any], Callable[..., Any] | None] | None = None
    # the kernel reads its inputs only through group.inputs() (ops.trimmed_merge's operations,
    # which run the C kernels where they can): the engine may then hand it the stored inputs
    # (TensorGroup.raw_models) instead of building a float32 stack
    fused: bool = False
    # task-conditional: writes a shared vector and per-task masks besides the merged model
    decoupled: bool = False
    # whether the kernel applies the models' recipe `weight` (engine/plan.py refuses a weight
    # the method would ignore)
    weighted: bool = True
    # whether the method reads the recipe's `parts` (name patterns of a multimodal model's parts,
    # TensorInfo.part); engine/plan.py refuses `parts` for the others
    reads_parts: bool = False
    # per-task scalars of a decoupled method, from its statistics (default: 1 each)
    task_scalars: Callable[[Any, Stats, list[str]], list[float]] | None = None
    # the mergekit methods this method stands for, and how their recipes translate
    mergekit: tuple[MergekitForm, ...] = ()
    # per-model metrics (loss, step) the engine fills in at plan time from a checkpoint folder's
    # trainer_state.json where the recipe does not give them (engine/metrics.py)
    metrics: tuple[str, ...] = ()
    # how a merge with this method runs (procedures/run.py chooses the procedure from it):
    #  streaming    tensor by tensor through the streaming executor (the default)
    #  sequential   models applied one at a time, state kept in the output (OPCM, procedures/continual.py)
    #  whole_model  inside one whole model that it loads and runs on calibration data (M-SMoE,
    #               procedures/moe.py): no kernel, no streaming executor
    #  composed     model folders split into parts; the language models streamed with this method's
    #               kernel, encoders and projectors kept (MMER, procedures/mmer.py); state dicts in
    #               memory stream as usual
    runs: Literal["streaming", "sequential", "whole_model", "composed"] = "streaming"
    # data-aware methods: the kinds of per-model statistics (procedures/calibration.py gathers them
    # before the streaming merge) that its kernels read from `group.data`
    data: Callable[[Any], tuple[str, ...]] = field(default=lambda p: ())

    @property
    def mergekit_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.mergekit)

    @property
    def sequential(self) -> bool:
        return self.runs == "sequential"

    @property
    def whole_model(self) -> bool:
        return self.runs == "whole_model"

    def parse_params(self, raw: dict[str, Any] | None, where: str = "params") -> Params:
        return parse_params(self.params, raw, self.name, where)

    def parameter_table(self) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, description) for `modalmerge methods`."""
        rows = []
        for key, f in self.params.model_fields.items():
            default = "required" if f.is_required() else f.get_default(call_default_factory=True)
            rows.append((f.alias or key, _type_name(f.annotation), default, f.description or ""))
        return rows


def _type_name(ann) -> str:
    """float, a|b for a Literal, float|fit for a Union of the two."""
    if get_origin(ann) is Literal:
        return "|".join(str(a) for a in get_args(ann))
    if get_args(ann) and get_origin(ann) in (Union, UnionType):
        return "|".join(_type_name(a) for a in get_args(ann))
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
