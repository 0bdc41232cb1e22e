"""A recipe's search space: the values it marks `{search: ...}`, and the recipe with them filled in.

A marker may stand for any value of a recipe, native or mergekit, wherever it is: a method
parameter, a model's weight or parameters, an element of a gradient list or of a filter list,
and the method itself (a choice of names). Each marker is one parameter of the search, named by
its place in the recipe (`parameters.density`, `models[1].parameters.weight`, `params.lambda`,
`parameters.weight[2]`, `merge_method`), so a trial's parameters read as the recipe does.

    {search: [a, b, c]}               one of these values (any YAML value: a number, a list, a name)
    {search: {uniform: [lo, hi]}}     a float in [lo, hi]
    {search: {log_uniform: [lo, hi]}} a float in [lo, hi], sampled on a log scale (0 < lo)
    {search: {int: [lo, hi]}}         an integer in [lo, hi]

Whether the filled-in recipe plans (known parameters, values in range) is checked once before
the search starts (`check_space`), for every choice of the method, so that a misspelled or
misplaced parameter is one error line and not a search whose every trial fails.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from ...engine.recipe import parse_yaml
from ...errors import MergeError, one_line

MARKER = "search"
KINDS = ("uniform", "log_uniform", "int")
METHOD_KEYS = ("merge_method", "method")  # mergekit's and the native name of the method field
MAX_PARAMETERS = 256
MAX_PROBES = 200  # recipes planned by check_space; more choices than this are checked by a sample


@dataclass(frozen=True)
class Parameter:
    """One searched value: a choice among `choices`, or a number in [low, high]."""

    name: str
    kind: str                      # "choice" | "uniform" | "log_uniform" | "int"
    path: tuple                    # keys and list indices from the recipe's root
    choices: tuple = ()
    low: float | int | None = None
    high: float | int | None = None

    @property
    def numeric(self) -> bool:
        return self.kind != "choice" or all(_is_number(c) for c in self.choices)

    def describe(self) -> str:
        if self.kind == "choice":
            return f"one of {json.dumps(list(self.choices))}"
        return f"{self.kind.replace('_', '-')} in [{self.low}, {self.high}]"

    def optuna_choices(self) -> list:
        """The choices as Optuna stores them: plain values kept, lists and mappings as JSON text."""
        if all(_is_plain(c) for c in self.choices):
            return list(self.choices)
        return [json.dumps(c, sort_keys=True) for c in self.choices]

    def decode(self, value: Any) -> Any:
        """A value Optuna gave back (optuna_choices' form) as the recipe's value."""
        if self.kind != "choice":
            return value
        encoded = self.optuna_choices()
        return copy.deepcopy(self.choices[encoded.index(value)])


class SearchSpace:
    """The recipe (a mapping, markers in place) and its parameters, in the order they appear."""

    def __init__(self, data: dict[str, Any], parameters: list[Parameter], where: str = "recipe"):
        self.data = data
        self.parameters = parameters
        self.where = where
        self.by_name = {p.name: p for p in parameters}

    @property
    def method_parameter(self) -> Parameter | None:
        """The parameter that chooses the method (`merge_method: {search: [...]}`), if any."""
        return next((p for p in self.parameters if p.path in ((k,) for k in METHOD_KEYS)), None)

    def concrete(self, params: dict[str, Any]) -> dict[str, Any]:
        """The recipe with every marker replaced by its value in `params` (a value per parameter)."""
        missing = [n for n in self.by_name if n not in params]
        extra = [n for n in params if n not in self.by_name]
        if missing or extra:
            what = f"no value for {missing[0]!r}" if missing else f"{extra[0]!r} is no parameter of the space"
            raise MergeError(f"{self.where}: search parameters: {what}; the space has "
                             f"{', '.join(self.by_name) or 'no parameters'}")
        return _fill(self.data, (), {p.path: params[p.name] for p in self.parameters})

    def suggest(self, trial) -> dict[str, Any]:
        """An Optuna trial's values for every parameter (the recipe's values, choices decoded)."""
        out = {}
        for p in self.parameters:
            if p.kind == "choice":
                out[p.name] = p.decode(trial.suggest_categorical(p.name, p.optuna_choices()))
            elif p.kind == "int":
                out[p.name] = trial.suggest_int(p.name, p.low, p.high)
            else:
                out[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.kind == "log_uniform")
        return out

    def decode(self, optuna_params: dict[str, Any]) -> dict[str, Any]:
        """Parameters as Optuna stored them (a finished trial's) as the recipe's values."""
        return {p.name: p.decode(optuna_params[p.name]) for p in self.parameters if p.name in optuna_params}

    def grid(self) -> dict[str, list]:
        """The grid of an all-choice space, as Optuna's GridSampler takes it."""
        numeric = [p.name for p in self.parameters if p.kind != "choice"]
        if numeric:
            raise MergeError(f"{self.where}: the grid sampler needs every searched value to be a choice "
                             f"({{search: [a, b, ...]}}); {numeric[0]!r} is a range; use --sampler tpe or random, "
                             "or list its values")
        return {p.name: p.optuna_choices() for p in self.parameters}

    def grid_size(self) -> int:
        return math.prod(len(p.choices) for p in self.parameters)

    def grid_index(self, params: dict[str, Any]) -> tuple[int, ...]:
        """Where a point (the recipe's values, as decode gives them) stands in grid order: sorting by
        it orders the points as nested loops over the parameters, first one outermost, would."""
        index = []
        for p in self.parameters:
            value = params[p.name]  # the same type as its choice: True is not the choice 1
            index.append(next(i for i, c in enumerate(p.choices) if type(c) is type(value) and c == value))
        return tuple(index)

    def fingerprint(self) -> str:
        """The recipe and its space, as one hash: a journal of another space is not resumed."""
        text = json.dumps(self.data, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def probes(self) -> list[dict[str, Any]]:
        """Parameter values that check_space plans: for each choice of the method, every other
        parameter at its low end, at its high end, and each choice of each other choice."""
        method = self.method_parameter
        others = [p for p in self.parameters if p is not method]
        low = {p.name: p.choices[0] if p.kind == "choice" else p.low for p in others}
        high = {p.name: p.choices[-1] if p.kind == "choice" else p.high for p in others}
        rows = [low, high] + [{**low, p.name: c} for p in others if p.kind == "choice" for c in p.choices[1:-1]]
        seen, unique = set(), []
        for row in rows:
            key = json.dumps(row, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                unique.append(row)
        if method is None:
            return unique[:MAX_PROBES]
        per_method = max(2, MAX_PROBES // len(method.choices))
        return [{**row, method.name: m} for m in method.choices for row in unique[:per_method]]

    def lines(self) -> list[str]:
        """One line per parameter, for the model card and --help-like summaries."""
        return [f"{p.name}: {p.describe()}" for p in self.parameters]


def parse_space(source: str | dict[str, Any], where: str = "recipe") -> SearchSpace:
    """The search space of a recipe given as YAML text or a mapping (either format)."""
    data = parse_yaml(source, where) if isinstance(source, str) else copy.deepcopy(source)
    if not isinstance(data, dict):
        raise MergeError(f"{where}: not a recipe; write it as a YAML mapping with `method` and `models` keys")
    parameters: list[Parameter] = []
    _collect(data, (), parameters, where)
    if not parameters:
        raise MergeError(f"{where}: the search space is empty: no value is marked to search; mark one, e.g. "
                         "`density: {search: [0.2, 0.4]}` or `weight: {search: {uniform: [0.2, 1.0]}}`")
    names = [p.name for p in parameters]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise MergeError(f"{where}: two searched values are both named {one_line(twice, 80)!r} (a key with a dot in "
                         "it?); rename the key")
    if len(parameters) > MAX_PARAMETERS:
        raise MergeError(f"{where}: {len(parameters)} searched values; at most {MAX_PARAMETERS}")
    method = next((p for p in parameters if p.path in ((k,) for k in METHOD_KEYS)), None)
    if method is not None and (method.kind != "choice" or not all(isinstance(c, str) for c in method.choices)):
        raise MergeError(f"{where}: {method.name}: the method is searched as a choice of names, "
                         "e.g. {search: [ties, dare_ties]}; fix it")
    return SearchSpace(data, parameters, where)


def check_space(space: SearchSpace, plan: Callable[[dict[str, Any]], Any]) -> None:
    """Plan the recipe filled in with each of space.probes() (`plan`: a concrete recipe mapping ->
    its plan, raising MergeError); the first recipe that does not plan is one error line naming the
    parameter values that made it."""
    for values in space.probes():
        try:
            plan(space.concrete(values))
        except MergeError as e:
            chosen = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in values.items())
            raise MergeError(f"search space: with {one_line(chosen, 160)}: {e}") from None


def name_of(path: tuple) -> str:
    """A parameter's readable name: keys joined by dots, list indices in brackets."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _collect(value: Any, path: tuple, out: list[Parameter], where: str) -> None:
    if isinstance(value, dict):
        if MARKER in value:
            out.append(_marker(value, path, where))
            return
        for k, v in value.items():
            _collect(v, path + (k,), out, where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _collect(v, path + (i,), out, where)


def _marker(value: dict, path: tuple, where: str) -> Parameter:
    name = name_of(path) or "(the recipe)"
    at = f"{where}: {one_line(name, 80)}"
    if not path:
        raise MergeError(f"{where}: the whole recipe cannot be searched; mark values inside it")
    extra = [one_line(str(k), 40) for k in value if k != MARKER]
    if extra:
        raise MergeError(f"{at}: a search marker is a mapping with the one key `search`; remove {extra[0]!r}")
    body = value[MARKER]
    if isinstance(body, list):
        if not body:
            raise MergeError(f"{at}: `search: []` has no choices; list at least one value")
        for c in body:
            if _has_marker(c):
                raise MergeError(f"{at}: a choice holds another search marker; search each value once")
        return Parameter(name, "choice", path, choices=tuple(body))
    if isinstance(body, dict) and len(body) == 1 and next(iter(body)) in KINDS:
        kind, bounds = next(iter(body.items()))
        return _range(name, kind, bounds, path, at)
    raise MergeError(f"{at}: `search` takes a list of choices or one of {{uniform: [lo, hi]}}, "
                     "{log_uniform: [lo, hi]}, {int: [lo, hi]}; fix it")


def _range(name: str, kind: str, bounds: Any, path: tuple, at: str) -> Parameter:
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(_is_number(b) for b in bounds)):
        raise MergeError(f"{at}: {kind} takes two numbers [lo, hi]; fix the bounds")
    lo, hi = bounds
    if kind == "int":
        if not all(isinstance(b, int) for b in bounds):
            raise MergeError(f"{at}: int takes two integers [lo, hi]; fix the bounds")
    else:
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise MergeError(f"{at}: {kind} bounds must be finite numbers; fix the bounds")
    if not lo < hi:
        raise MergeError(f"{at}: {kind} bounds [{lo}, {hi}]: the low bound must be below the high one; fix them")
    if kind == "log_uniform" and lo <= 0:
        raise MergeError(f"{at}: log_uniform bounds must be above 0 (got {lo}); use uniform, or a positive low bound")
    return Parameter(name, kind, path, low=lo, high=hi)


def _fill(value: Any, path: tuple, values: dict[tuple, Any]) -> Any:
    if path in values:
        return copy.deepcopy(values[path])
    if isinstance(value, dict):
        return {k: _fill(v, path + (k,), values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, path + (i,), values) for i, v in enumerate(value)]
    return value


def _has_marker(value: Any) -> bool:
    if isinstance(value, dict):
        return MARKER in value or any(_has_marker(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_marker(v) for v in value)
    return False


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_plain(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float, str))
