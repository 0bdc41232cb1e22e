"""`modalmerge inspect`: task-vector norms, sign conflicts and cosines of models against a base."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "inspect", help="compare fine-tunes' task vectors before merging",
        description="Check that models can be merged with BASE, then report, per tensor group (embeddings, "
                    "each block, norms, head) and for the whole model: each model's task-vector L2 norm, "
                    "the sign-conflict rate between the models (among elements where at least two task "
                    "vectors are non-zero), and the pairwise cosine of their task vectors. Without --base: "
                    "the parts of each model (language model, towers, projectors, head) and whether they "
                    "were found from its config (the model built on the meta device) or from a spec.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folders, safetensors files or LoRA adapters")
    p.add_argument("--base", help="the base model the task vectors are taken from (without it: each model's parts)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB", help="only tensors matching (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip tensors matching (repeatable)")
    p.add_argument("--allow-pickle", action="store_true", help="load pickled .bin checkpoints (weights_only)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _labels(paths: list[str]) -> list[str]:
    """Folder names, or the paths as given where two folders share a name."""
    names = [Path(p).name or p for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def run(args) -> int:
    from ..checkpoint.sources import open_source
    from ..engine.inspect import inspect_models

    if args.base is None:
        return _parts(args)
    base = open_source(args.base, label="base", allow_pickle=args.allow_pickle)
    models = [open_source(p, label=label, allow_pickle=args.allow_pickle, base=base)
              for p, label in zip(args.models, _labels(args.models))]
    result = inspect_models(base, models, include=args.include, exclude=args.exclude,
                            progress=not args.no_progress)
    data = result.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(format_table(data, args.base))
    return 0


def _parts(args) -> int:
    from ..checkpoint.sources import open_source
    from ..engine.inspect import model_parts
    from ..errors import MergeError

    if args.include or args.exclude:
        raise MergeError("--include and --exclude select the tensors compared with a base: give --base BASE, "
                         "or drop them to list each model's parts")

    reports = [model_parts(open_source(p, label=label, allow_pickle=args.allow_pickle))
               for p, label in zip(args.models, _labels(args.models))]
    print(json.dumps(reports, indent=2) if args.json else "\n\n".join(format_parts(r) for r in reports))
    return 0


PART_LABELS = {"llm": "language model", "head": "head", "encoder": "tower", "projector": "projector", "other": "other"}
SOURCES = {"discovered": "found from its config (the model's class built on the meta device)",
           "spec": "from the spec in engine/architectures.py (discovery failed)",
           "none": "none: no towers found, every tensor is the language model's"}


def format_parts(r: dict) -> str:
    arch = f" ({r['architecture']})" if r["architecture"] else ""
    out = [f"model   {r['model']}: {r['model_type'] or 'no model_type'}{arch}", f"parts   {SOURCES[r['source']]}"]
    for part in r["parts"]:
        shown = part["prefix"] + ("*" if part["prefix"].endswith(".") else "")
        module = f"  module {part['module']}" if part["module"] and part["module"] + "." != part["prefix"] \
            and part["module"] != part["prefix"] else ""
        cls = f"  [{part['class']}]" if part["class"] else ""
        out.append(f"  {PART_LABELS[part['kind']]:<15} {shown:<40} {part['tensors']:>5} tensors{module}{cls}")
    if r["unplaced_tensors"]:
        out.append(f"  ({r['unplaced_tensors']} tensors under no part: kept with the modality)")
    return "\n".join(out)


def _num(v, fmt="{:#.4g}") -> str:
    return "-" if v is None else fmt.format(v)


def format_table(data: dict, base_path: str) -> str:
    names = data["models"]
    pairs = [(c["a"], c["b"]) for c in data["total"]["cosine"]]
    header = ["group", "params"] + [f"|tau| {n}" for n in names]
    if len(names) > 1:
        header += ["conflict"] + [f"cos {a}~{b}" for a, b in pairs]
    rows = []
    for label, rep in [(g["group"], g) for g in data["groups"]] + [("total", data["total"])]:
        row = [label, f"{rep['params']:,}"] + [_num(rep["norms"][n]) for n in names]
        if len(names) > 1:
            row += [_num(rep["sign_conflict"], "{:.3f}")] + [_num(c["value"], "{:.3f}") for c in rep["cosine"]]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    out = [f"base    {base_path}", f"models  {', '.join(names)}", "", line(header)]
    out += [line(r) for r in rows[:-1]] + ["-" * len(line(header)), line(rows[-1])]
    if data["skipped_tensors"]:
        out.append(f"(not compared, not floating point: {', '.join(data['skipped_tensors'])})")
    out.append("conflict: fraction of elements, among those where >= 2 task vectors are non-zero, "
               "where their signs disagree")
    return "\n".join(out)
