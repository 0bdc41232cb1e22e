"""What a search writes in OUT/search: trials.json, trials.md and search.png, and the model
card's account of the search.

trials.json lists every finished trial (number, params, metrics, seconds, status, error, node,
worker) with the objectives, the sampler and the chosen trial; trials.md is the same as a table;
search.png plots the objective over the trials with the best so far, the first two numeric
parameters coloured by the objective, and the Pareto front when there are two objectives. The
plot is drawn on a matplotlib Figure of its own (no pyplot: no process-wide state).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

from .space import SearchSpace
from .study import SearchResult

TRIALS_JSON, TRIALS_MD, PLOT = "trials.json", "trials.md", "search.png"


def write_report(folder: Path, result: SearchResult, space: SearchSpace) -> list[str]:
    """Write the three files into `folder` (each replaced whole); returns notes for the user."""
    folder = Path(folder)
    data = {"objectives": [{"metric": o.metric, "direction": o.direction} for o in result.objectives],
            "sampler": result.sampler, "seed": result.seed, "space": space.lines(),
            "best": result.best["number"] if result.best else None, "pareto": result.pareto,
            "trials": result.trials}
    _write(folder / TRIALS_JSON, json.dumps(data, indent=2, default=str) + "\n")
    _write(folder / TRIALS_MD, "\n".join(table_lines(result, space)) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        return [f"{folder / PLOT} not drawn: matplotlib is not installed (pip install 'modalmerge[bench]')"]
    plot(result, space, folder / PLOT)
    return []


def table_lines(result: SearchResult, space: SearchSpace) -> list[str]:
    """trials.md: one row per trial, the chosen one (and the Pareto front) marked."""
    objectives = [o.metric for o in result.objectives]
    others = sorted({k for t in result.trials for k in t["metrics"]} - set(objectives))
    names = [p.name for p in space.parameters]
    head = ["trial", "status", *objectives, *others, *names, "seconds", "node", "worker", "error"]
    best = result.best["number"] if result.best else None
    lines = [f"# Search: {', '.join(str(o) for o in result.objectives)}", "",
             f"{len(result.trials)} trials, sampler {result.sampler}, seed {result.seed}. "
             + (f"Chosen: trial {best} (**bold**)." if best is not None else "No trial completed.")
             + (f" Pareto front: trials {', '.join(map(str, result.pareto))} (*)." if result.pareto else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in result.trials:
        number = f"**{t['number']}**" if t["number"] == best else str(t["number"])
        if t["number"] in result.pareto:
            number += " *"
        cells = [number, t["status"], *[_cell(t["metrics"].get(m)) for m in objectives + others],
                 *[_cell(t["params"].get(n)) for n in names], _cell(t["seconds"]), t["node"], t["worker"],
                 (t["error"] or "").replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def card_lines(result: SearchResult, space: SearchSpace) -> list[str]:
    """The model card's section on the search that chose this merge."""
    best = result.best
    lines = ["## Search", "",
             f"This merge is trial {best['number']} of a `modalmerge search` of {len(result.trials)} trials "
             f"(sampler {result.sampler}, seed {result.seed}), objective "
             f"{', '.join(str(o) for o in result.objectives)}.", "",
             "Searched:", "", *[f"- `{line}`" for line in space.lines()], "",
             "Chosen parameters:", "", *[f"- `{k}`: `{json.dumps(v)}`" for k, v in best["params"].items()], "",
             "Metrics: " + ", ".join(f"{k} {_cell(v)}" for k, v in best["metrics"].items()), ""]
    if result.pareto:
        lines += [f"Pareto front: trials {', '.join(map(str, result.pareto))}.", ""]
    lines += ["Every trial: `search/trials.md` and `search/trials.json` beside this card.", ""]
    return lines


def plot(result: SearchResult, space: SearchSpace, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    objective = result.objectives[0]
    ok = [t for t in result.trials if t["status"] == "ok" and objective.metric in t["metrics"]]
    numeric = [p.name for p in space.parameters if p.numeric]
    panels = 2 + (len(result.objectives) == 2)
    fig = Figure(figsize=(5 * panels, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, panels, 1)
    xs = [t["number"] for t in ok]
    ys = [t["metrics"][objective.metric] for t in ok]
    ax.scatter(xs, ys, s=16, label="trial")
    best, running = [], None
    for y in ys:
        running = y if running is None else (min(running, y) if objective.minimize else max(running, y))
        best.append(running)
    if xs:
        ax.step(xs, best, where="post", color="C1", label="best so far")
    for status, marker in (("pruned", "v"), ("failed", "x")):
        rows = [t for t in result.trials if t["status"] == status]
        if rows and ys:
            ax.scatter([t["number"] for t in rows], [min(ys) if objective.minimize else max(ys)] * len(rows),
                       marker=marker, color="gray", label=status)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{objective.metric} ({'lower' if objective.minimize else 'higher'} is better)")
    ax.legend(fontsize="small")
    ax = fig.add_subplot(1, panels, 2)
    if len(numeric) >= 2:
        sc = ax.scatter([_float(t["params"][numeric[0]]) for t in ok], [_float(t["params"][numeric[1]]) for t in ok],
                        c=ys, cmap="viridis")
        ax.set_xlabel(numeric[0])
        ax.set_ylabel(numeric[1])
        fig.colorbar(sc, ax=ax, label=objective.metric)
    elif numeric:
        ax.scatter([_float(t["params"][numeric[0]]) for t in ok], ys, c=ys, cmap="viridis")
        ax.set_xlabel(numeric[0])
        ax.set_ylabel(objective.metric)
    else:
        ax.text(0.5, 0.5, "no numeric parameter", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("parameters, coloured by the objective", fontsize="small")
    if panels == 3:
        second = result.objectives[1]
        ax = fig.add_subplot(1, panels, 3)
        both = [t for t in ok if second.metric in t["metrics"]]
        ax.scatter([t["metrics"][objective.metric] for t in both], [t["metrics"][second.metric] for t in both],
                   s=16, color="gray", label="trial")
        front = sorted((t for t in both if t["number"] in result.pareto), key=lambda t: t["metrics"][objective.metric])
        ax.plot([t["metrics"][objective.metric] for t in front], [t["metrics"][second.metric] for t in front],
                "o-", color="C3", label="Pareto front")
        ax.set_xlabel(objective.metric)
        ax.set_ylabel(second.metric)
        ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _float(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value).replace("|", "\\|")
    return str(value).replace("|", "\\|")
