"""Per-tensor parameter values: per-layer schedules and name filters (mergekit's gradients and
filter lists).

A parameter value may be
- plain: a number, a bool or a string;
- a schedule `{layers: [v0, v1, ...]}` (mergekit's gradient): numbers are spread evenly over the
  block index range 0 … L−1 (L = the number of blocks the plan sees) and interpolated linearly in
  between; bools and strings are picked, not interpolated. As in mergekit (plan.py), block i of L
  sits at t = i/(L−1) (t = 1 for a single block) and a tensor without a block index (embeddings,
  final norm, LM head) at t = 0, the first value;
- a filter list `{filters: [{filter: "self_attn", value: 0.5}, {value: 0.3}]}` (mergekit's
  `[{filter, value}, ...]`): the first entry whose `filter` is a substring of the tensor's name
  gives the value (plain or a schedule); an entry without `filter`, or with `filter: "*"`, matches
  every tensor. When none matches, the value is absent for that tensor and the next level applies
  (a model's own value → the recipe's → the method's default).

The engine resolves these per tensor before the kernel runs (engine/plan.py `Plan.params_for`), so
methods only ever see plain values. Resolution depends on a tensor only through its block index
and which filter entry matched (`match_key`), so the engine caches per distinct combination.
"""

from __future__ import annotations

from typing import Any

PLAIN = (bool, int, float, str)
_FIX = ("write it as one value, {layers: [0.2, 0.5, 1.0]}, or {filters: [{filter: self_attn, value: 0.5}, "
        "{value: 0.3}]}")


def is_schedule(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"layers"}


def is_filters(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"filters"}


def is_per_tensor(value: Any) -> bool:
    return is_schedule(value) or is_filters(value)


def has_schedules(raw: dict[str, Any]) -> bool:
    """Whether any value of `raw` depends on the tensor (a schedule or a filter list)."""
    return any(is_per_tensor(v) for v in raw.values())


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _short(x: Any) -> str:
    text = repr(x).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def check(key: str, value: Any) -> None:
    """Raise ValueError (one line, naming `key` and the fix) unless `value` is a well-formed
    schedule or filter list; plain values are left to the method's own validation."""
    if is_schedule(value):
        values = value["layers"]
        if not isinstance(values, list) or not values or not all(isinstance(v, PLAIN) for v in values):
            raise ValueError(f"parameter {key!r}: `layers` must be a non-empty list of values (numbers are "
                             "interpolated over the layers); write it as {layers: [0.2, 0.5, 1.0]}")
        return
    if is_filters(value):
        entries = value["filters"]
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"parameter {key!r}: `filters` must be a non-empty list of {{filter, value}} "
                             f"entries; {_FIX}")
        for i, entry in enumerate(entries):
            where = f"parameter {key!r}: filters[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where} is {_short(entry)}, not a mapping; write it as {{filter: self_attn, "
                                 "value: 0.5}} (or {value: 0.3} for every other tensor)")
            unknown = [k for k in entry if k not in ("filter", "value")]
            if unknown:
                raise ValueError(f"{where} has unknown key {_short(unknown[0])}; an entry has `filter` (a "
                                 "substring of the tensor name, optional) and `value`")
            if "filter" in entry and not isinstance(entry["filter"], str):
                raise ValueError(f"{where}: `filter` must be a string (a substring of the tensor name), not "
                                 f"{_short(entry['filter'])}; quote it, or leave it out to match every tensor")
            if "value" not in entry:
                raise ValueError(f"{where} has no `value`; add `value: ...` (one value or {{layers: [...]}})")
            inner = entry["value"]
            if is_schedule(inner):
                check(f"{key}.filters[{i}].value", inner)
            elif not isinstance(inner, PLAIN):
                raise ValueError(f"{where}: `value` must be one value or {{layers: [...]}}, not {_short(inner)}; "
                                 "filter lists do not nest")
        return
    if isinstance(value, dict) and ({"layers", "filters"} & set(value)):
        raise ValueError(f"parameter {key!r}: a per-tensor value has exactly one key, `layers` or `filters`, "
                         f"not {sorted(map(str, value))}; {_FIX}")


def candidates(value: Any) -> list[Any]:
    """Every plain value `value` can give some tensor (a schedule's listed values, each filter's)
    — for validating them all before any work. Interpolated numbers lie between listed ones."""
    if is_schedule(value):
        return list(value["layers"])
    if is_filters(value):
        return [c for entry in value["filters"] for c in candidates(entry["value"])]
    return [value]


def _matches(entry: dict[str, Any], name: str | None) -> bool:
    pattern = entry.get("filter")
    # as mergekit: no filter or "*" matches every tensor, anything else is a substring of the name
    return pattern is None or pattern == "*" or (bool(name) and pattern in name)


def match(value: dict[str, Any], name: str | None) -> int | None:
    """Index of the first filter entry that matches tensor `name`; None when none does."""
    return next((i for i, e in enumerate(value["filters"]) if _matches(e, name)), None)


def match_key(raws: list[dict[str, Any]], name: str | None) -> tuple:
    """Which filter entry each filter list of `raws` picks for tensor `name`: with the block
    index, everything resolution depends on (a cache key)."""
    return tuple(match(v, name) for raw in raws for v in raw.values() if is_filters(v))


def value_at(values: list[Any], layer: int | None, num_layers: int) -> Any:
    """The schedule's value at block `layer` of `num_layers`: numbers interpolated linearly,
    other values picked (mergekit's evaluate_setting)."""
    if layer is None:
        t = 0.0
    elif num_layers > 1:
        t = min(max(layer, 0), num_layers - 1) / (num_layers - 1)
    else:
        t = 1.0
    if not all(_is_number(v) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


_ABSENT = object()


def resolve_value(value: Any, layer: int | None, num_layers: int, name: str | None = None) -> Any:
    """One parameter value at a tensor; `_ABSENT` when a filter list has no entry for it."""
    if is_filters(value):
        i = match(value, name)
        if i is None:
            return _ABSENT
        value = value["filters"][i]["value"]
    if is_schedule(value):
        return value_at(value["layers"], layer, num_layers)
    return value


def resolve(raw: dict[str, Any], layer: int | None, num_layers: int, name: str | None = None) -> dict[str, Any]:
    """`raw` at one tensor (block `layer`, name `name`): every schedule replaced by its value there,
    every filter list by its matching entry's value, or left out when no entry matches."""
    out = {}
    for k, v in raw.items():
        if is_per_tensor(v):
            check(k, v)
            v = resolve_value(v, layer, num_layers, name)
            if v is _ABSENT:
                continue
        out[k] = v
    return out


def first(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with each per-tensor value replaced by its first candidate (what plan-time checks
    that need one value use)."""
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            check(k, v)
        if is_per_tensor(v):
            v = candidates(v)[0]
        out[k] = v
    return out


def with_fallback(value: Any, fallback: Any) -> Any:
    """`value` where it gives one, else `fallback` (mergekit's precedence: a model's filter list
    that matches nothing falls back to the global value), as one value."""
    if not is_filters(value):
        return value
    tail = fallback["filters"] if is_filters(fallback) else [{"value": fallback}]
    return {"filters": list(value["filters"]) + list(tail)}
