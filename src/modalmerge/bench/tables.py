"""Reports of the text benchmark: rows, a Markdown table, JSON and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _avg(xs: dict[str, float]) -> float:
    return sum(xs.values()) / len(xs) if xs else 0.0


def rows(result: dict) -> list[dict[str, Any]]:
    """One row per model: accuracies per task, average, normalised accuracy (mean over tasks of
    accuracy / the individual model's accuracy), seconds to merge."""
    ind = result["individual"]

    def row(name, setting, params, acc, seconds=None):
        norm = {t: acc[t] / ind[t] if ind[t] else 0.0 for t in acc}
        return {"method": name, "setting": setting, "params": params, "accuracy": acc, "average": _avg(acc),
                "normalised": _avg(norm), "merge_seconds": seconds}

    out = [row("individual", "fine-tuned, one per task", {}, ind),
           row("base + heads", "pretrained encoder, tuned heads", {}, result["base_with_heads"])]
    for m in result["methods"]:
        out.append(row(m["method"], "default", m["default"]["params"], m["default"]["test"],
                       m["default"]["merge_seconds"]))
        if "tuned" in m:
            out.append(row(m["method"], "validation", m["tuned"]["params"], m["tuned"]["test"],
                           m["tuned"]["merge_seconds"]))
    return out


def _fmt_params(p: dict) -> str:
    if not p:
        return "defaults"
    parts = []
    for k, v in p.items():
        if isinstance(v, dict):
            v = "/".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v.values())
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def markdown(result: dict) -> str:
    tasks = result["tasks"]
    head = ["method", "setting", "params", *tasks, "avg", "norm %", "merge s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows(result):
        cells = [r["method"], r["setting"], _fmt_params(r["params"]),
                 *[f"{100 * r['accuracy'][t]:.1f}" for t in tasks], f"{100 * r['average']:.1f}",
                 f"{100 * r['normalised']:.1f}",
                 "" if r["merge_seconds"] is None else f"{r['merge_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps({**result, "rows": rows(result)}, indent=2))


def write_png(result: dict, path: str | Path) -> None:
    """Horizontal bars of normalised accuracy: default and validation-chosen settings per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = rows(result)
    names = []
    default, tuned = [], []
    by_method: dict[str, dict] = {}
    for r in rs:
        by_method.setdefault(r["method"], {})[r["setting"]] = r["normalised"] * 100
    for name, d in by_method.items():
        names.append(name)
        vals = list(d.values())
        default.append(d.get("default", vals[0]))
        tuned.append(d.get("validation", float("nan")))
    fig, ax = plt.subplots(figsize=(7, 0.38 * len(names) + 1.2))
    y = list(range(len(names)))
    ax.barh([i - 0.2 for i in y], default, height=0.4, label="default (no validation)", color="#4c72b0")
    ax.barh([i + 0.2 for i in y], tuned, height=0.4, label="chosen on validation", color="#dd8452")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    low = min(v for v in default + tuned if v == v)
    ax.set_xlim(max(0, low - 5), max(101, max(v for v in default + tuned if v == v) + 1))
    ax.axvline(100, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("normalised accuracy, % of the individual models (test)")
    ax.set_title(f"bench text: {', '.join(result['tasks'])} (seed {result['seed']})", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
