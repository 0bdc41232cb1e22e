"""Per-layer parameter schedules: a parameter value `{layers: [v0, v1, ...]}` (mergekit's gradient).

The values are spread evenly over the layer index range 0 … L−1 (L = the number of blocks the plan
sees) and interpolated linearly in between; a single value is constant. A tensor without a layer
index (embeddings, final norm, LM head) uses the first value. The engine resolves a schedule per
tensor before the kernel runs (`params_for`), so methods only ever see plain numbers.
Statistics passes see the first value of each schedule.
"""

from __future__ import annotations

from typing import Any


def is_schedule(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"layers"}


def _values(key: str, value: dict) -> list[float]:
    vals = value["layers"]
    if not isinstance(vals, list) or not vals or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in vals):
        raise ValueError(f"parameter {key!r}: `layers` must be a non-empty list of numbers")
    return [float(v) for v in vals]


def has_schedules(raw: dict[str, Any]) -> bool:
    return any(is_schedule(v) for v in raw.values())


def value_at(values: list[float], layer: int | None, num_layers: int) -> float:
    """The schedule's value at block `layer` of `num_layers` (linear interpolation)."""
    if layer is None or len(values) == 1 or num_layers <= 1:
        return values[0]
    pos = min(max(layer, 0), num_layers - 1) / (num_layers - 1) * (len(values) - 1)
    i = min(int(pos), len(values) - 2)
    frac = pos - i
    return values[i] * (1 - frac) + values[i + 1] * frac


def resolve(raw: dict[str, Any], layer: int | None, num_layers: int) -> dict[str, Any]:
    """`raw` with every schedule replaced by its value at `layer`."""
    return {k: value_at(_values(k, v), layer, num_layers) if is_schedule(v) else v for k, v in raw.items()}
