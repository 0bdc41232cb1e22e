"""`modalmerge msmoe`: merge the experts inside one MoE model (M-SMoE, spec 13)."""

from __future__ import annotations

import json

from ..errors import MergeError
from .options import add_trust_flags


def _calibration(args) -> dict:
    if bool(args.calibration_file) == bool(args.calibration_callable):
        raise MergeError("msmoe needs calibration tokens: give --calibration-file data.jsonl|.txt or "
                         "--calibration-callable pkg.module:function")
    if args.calibration_file:
        return {"file": args.calibration_file, "loader": args.loader, "max_examples": args.max_examples,
                "max_length": args.max_length}
    return {"callable": args.calibration_callable, "max_examples": args.max_examples}


def dry_run_lines(s: dict, output=None) -> list[str]:
    """--dry-run of msmoe (`modalmerge msmoe` and `merge` with method msmoe): the plan's summary()."""
    from ..units import human_bytes

    ep = s["expert_parameters"]
    kept = sorted({(b["kept"], b["experts"], b["top_k"]) for b in s["layers"]})
    shape = ", ".join(f"{k} of {e} experts (top-{t})" for k, e, t in kept)
    return [
        f"method      {s['method']}  {json.dumps(s['params'])}",
        f"model       {', '.join(s['models'])}: {s['parameters']:,} parameters, loaded whole (not streaming)",
        f"moe layers  {len(s['layers'])}, keeping {shape}: {ep['before']:,} -> {ep['after_distinct']:,} distinct "
        f"expert parameters ({100 * ep['reduction']:.1f}% fewer)",
        f"memory      ~{human_bytes(s['estimated_peak_bytes'])} (float32 model, one layer's experts copied, held-out "
        f"logits of ~{s['held_out_tokens_estimate']:,} tokens; besides activations)",
        f"output      {human_bytes(s['output_bytes'])} -> {output or '(no --output given)'}",
    ]


def report_lines(report: dict, output) -> list[str]:
    """What a finished msmoe merge prints."""
    ep = report["expert_parameters"]
    lines = [f"merged experts of {len(report['layers'])} MoE layers: {ep['before']:,} -> {ep['after_distinct']:,} "
             f"distinct expert parameters ({100 * ep['reduction']:.1f}% fewer)"]
    if report["agreement"]:
        a = report["agreement"]
        lines.append(f"held-out agreement with the original: top-1 {100 * a['top1_agreement']:.1f}% over "
                     f"{a['tokens']} tokens, mean KL {a['mean_kl']:.4f}")
    lines.append(f"-> {output} (report: msmoe.json)")
    return lines


def cmd_msmoe(args) -> int:
    from .. import api
    from ..procedures import moe
    from ..engine.recipe import parse_recipe

    recipe = parse_recipe(moe.recipe_for(args.model, _calibration(args),
                                         {"num_experts": args.experts, "held_out": args.held_out}), "msmoe")
    plan = api.plan(recipe, trust_recipe_code=args.trust_recipe_code, trust_remote_code=args.trust_remote_code)
    if args.dry_run:
        print("\n".join(dry_run_lines(api.describe(plan), args.output)))
        return 0
    if not args.output:
        raise MergeError("msmoe needs --output DIR (or --dry-run)")
    report = api.merge(plan, args.output, overwrite=args.overwrite).statistics["experts"]
    print("\n".join(report_lines(report, args.output)))
    if args.json:
        print(json.dumps(report))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "msmoe", help="merge the experts inside one MoE model (M-SMoE)",
        description="Group the experts of each MoE layer by routing (most-used experts are centres, the others "
                    "join the centre of most similar router logits), align hidden units, merge each group weighted "
                    "by routing frequency; every slot of a group points to the merged expert, the router is "
                    "unchanged. Reports the parameter reduction and held-out agreement. The same as `modalmerge merge` "
                    "with a recipe `method: msmoe`, one model, `calibration:` and params num_experts, held_out.")
    p.add_argument("model", help="MoE model folder (Mixtral / Qwen-MoE style)")
    p.add_argument("--output", "-o", help="output folder (written atomically)")
    p.add_argument("--experts", type=int, help="distinct experts kept per layer (default: half)")
    p.add_argument("--held-out", type=float, default=0.25, help="share of calibration batches used to measure "
                   "agreement (default 0.25)")
    p.add_argument("--calibration-file", help=".jsonl (text or input_ids per line) or .txt calibration data")
    p.add_argument("--calibration-callable", help="pkg.module:function returning calibration batches")
    p.add_argument("--loader", choices=("text", "tokens"), default="text", help="how to read the file")
    p.add_argument("--max-examples", type=int, default=256, help="calibration examples (default 256)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (default 64)")
    p.add_argument("--dry-run", action="store_true", help="print the memory need only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    add_trust_flags(p)  # --calibration-callable needs --trust-recipe-code
    p.set_defaults(func=cmd_msmoe)
