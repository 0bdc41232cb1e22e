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
        reference = r["method"] in ("individual", "base + heads")
        cells = [r["method"], r["setting"], "" if reference else _fmt_params(r["params"]),
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


def _norm_of(result: dict, method: str, setting: str) -> float | None:
    for r in rows(result):
        if r["method"] == method and r["setting"] == setting:
            return r["normalised"]
    return None


def checks(result: dict) -> list[str]:
    """What to verify before believing the table, and the papers' ordering, measured on this run."""
    out = []
    ind, base = result["individual"], result["base_with_heads"]
    gaps = {t: 100 * (ind[t] - base[t]) for t in ind}
    out.append("individual models vs the base encoder with the same heads: "
               + ", ".join(f"{t} {g:+.1f}" for t, g in gaps.items()) + " points"
               + (" (fine-tuning clearly moved every task)" if min(gaps.values()) > 5 else
                  " (WARNING: some task barely differs from the base)"))
    dist = {m["method"]: m["default"].get("distance_from_base") for m in result["methods"]}
    accs = {m["method"]: tuple(round(v, 6) for v in m["default"]["test"].values()) for m in result["methods"]}
    out.append(f"merges differ: {len(set(accs.values()))} distinct default accuracy vectors over {len(accs)} "
               "methods; L2 distance of each default merge from the base: "
               + ", ".join(f"{k} {v:.2f}" for k, v in dist.items() if v is not None)
               + "; the individual models: " + ", ".join(f"{t} {v:.2f}" for t, v in
                                                           result.get("individual_distance_from_base", {}).items()))
    merged_norms = [r["normalised"] for r in rows(result) if r["method"] not in ("individual", "base + heads")]
    if merged_norms and min(merged_norms) > 0.99:
        out.append("WARNING: every method is within a point of the individual models: the benchmark is not "
                   "measuring interference (fine-tune longer or with a higher learning rate)")
    for setting in ("default", "validation"):
        n = {m: _norm_of(result, m, setting) for m in ("task_arithmetic", "ties", "neuromerging")}
        if all(v is not None for v in n.values()):
            holds = n["neuromerging"] > n["ties"] > n["task_arithmetic"]
            out.append(f"{setting}: NeuroMerging {100 * n['neuromerging']:.1f} > TIES {100 * n['ties']:.1f} > task "
                       f"arithmetic {100 * n['task_arithmetic']:.1f} (normalised %): "
                       + ("holds" if holds else "does NOT hold"))
        for m in ("tall", "emr", "mmer"):
            v = _norm_of(result, m, setting)
            if v is not None:
                out.append(f"{setting}: {m} per-task models at {100 * v:.1f}% normalised (papers: about 99-100%): "
                           + ("holds" if v >= 0.985 else "below"))
    return out


def results_page(result: dict, command: str, png: str = "text.png") -> str:
    """docs/results/text.md: the table, the command, the seed, the checks."""
    cfg = result["config"]
    splits = result["data"]["splits"]
    lines = [
        "# Text benchmark: merging sentence classifiers fine-tuned from all-MiniLM-L6-v2",
        "",
        f"Made by `{command}` (seed {result['seed']}, {result['environment']['threads']} torch threads, torch "
        f"{result['environment']['torch']}; {result['seconds']:.0f} s in all, of which fine-tuning "
        f"{sum(t.get('seconds', 0) for t in result['training'].values()):.0f} s when not cached).",
        "",
        f"Encoder `{result['model']}` fully fine-tuned per task with mean pooling + a linear head: "
        f"{cfg['train_examples']} training examples per task, {cfg['epochs']} epoch(s), lr {cfg['lr']}, batch "
        f"{cfg['batch_size']}, max length {cfg['max_length']}. Encoders merged with `merge_state_dicts`; each task "
        "keeps its head; decoupled methods (tall, emr, mmer) serve each task with its own reconstructed encoder. "
        "`default` = the method's no-validation defaults; `validation` = its main hyperparameter chosen on the "
        "validation splits (average accuracy; TALL's λ per task on that task's split). Test accuracy (%); "
        "normalised = mean over tasks of merged / individual accuracy.",
        "",
        "Splits (used / available; seeded where the data has none): "
        + "; ".join(f"{t} {s['used']['train']}/{s['available']['train']} train, {s['used']['val']}/"
                    f"{s['available']['val']} val, {s['used']['test']}/{s['available']['test']} test "
                    f"(val: {s['provenance']['val']})" for t, s in splits.items()) + ".",
        "",
        markdown(result),
        f"![normalised accuracy per method]({png})",
        "",
        "## Checks (computed from this run)",
        "",
        *[f"- {c}" for c in checks(result)],
        "",
    ]
    if result.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()), ""]
    return "\n".join(lines)
