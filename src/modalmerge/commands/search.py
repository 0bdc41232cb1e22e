"""`modalmerge search`: choose a recipe's marked values on validation data (procedures/search)."""

from __future__ import annotations

import json
import sys

from .options import add_trust_flags, set_threads


def cmd_search(args) -> int:
    from ..api import search
    from ..bench.mllm_eval import EVALUATORS as MLLM_EVALUATORS
    from ..bench.text_eval import EVALUATORS  # the benchmark tasks' evaluators (procedures/ may not import bench)

    if args.workers == 1 and not args.address:
        set_threads(args.threads)  # trials run in this process (Ray workers set their own)
    outcome = search(args.recipe, args.eval, args.output, trials=args.trials, workers=args.workers,
                     address=args.address, seed=args.seed, sampler=args.sampler, objectives=args.objective or (),
                     threads=args.threads, device=args.device, trust_recipe_code=args.trust_recipe_code,
                     trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                     overwrite=args.overwrite, prune=not args.no_prune, progress=not args.no_progress,
                     batch_size=args.batch_size, extra_evals={**EVALUATORS, **MLLM_EVALUATORS})
    result = outcome.result
    for note in outcome.notes:
        print(f"note: {note}", file=sys.stderr)
    counts = {s: sum(t["status"] == s for t in result.trials) for s in ("ok", "pruned", "failed")}
    resumed = f" ({result.resumed} from the journal)" if result.resumed else ""
    print(f"{len(result.trials)} trials{resumed}: {counts['ok']} ok, {counts['pruned']} pruned, "
          f"{counts['failed']} failed")
    best = result.best
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in best["metrics"].items())
    print(f"best: trial {best['number']}: {metrics}; {json.dumps(best['params'])}")
    if result.pareto:
        print(f"Pareto front: trials {', '.join(map(str, result.pareto))}")
    print(f"merged the best trial -> {outcome.output} (every trial: {outcome.search_folder / 'trials.md'})")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "search", help="search a recipe's marked values on validation data, then merge the best",
        description="Search the values a recipe marks, e.g. `density: {search: [0.2, 0.4]}`, "
                    "`lambda: {search: {uniform: [0.2, 1.5]}}`, `{search: {log_uniform: [lo, hi]}}`, "
                    "`{search: {int: [lo, hi]}}`, or `merge_method: {search: [ties, dare_ties]}`, anywhere in a "
                    "native or mergekit recipe (method parameters, model weights, gradient and filter lists). "
                    "Each trial merges in memory from inputs opened once per worker and evaluates the merged model; "
                    "Optuna chooses the next values. OUT gets search/trials.json, trials.md, search.png and a "
                    "journal (the same command resumes an interrupted search), then the best trial's merge, "
                    "written as `modalmerge merge` writes it. See docs/search.md.")
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML file with search markers")
    p.add_argument("--eval", action="append", required=True, metavar="EVAL",
                   help="perplexity:FILE (causal LM, one document per line), accuracy:FILE (sequence classifier, "
                        "label<TAB>text lines), python:MODULE:FUNCTION ((model, tokenizer) -> {metric: value}; needs "
                        "--trust-recipe-code), lm_eval:TASK[,TASK], bench-text:TASK=FOLDER[,TASK=FOLDER] (the "
                        "text benchmark's validation accuracy with each task's fine-tuned head) or "
                        "bench-mllm:TASK=FOLDER[,TASK=FOLDER] (the mini-MLLM benchmark's, each task's encoder and "
                        "projector on the merged language model); repeat to record more metrics")
    p.add_argument("--output", "-o", required=True, metavar="OUT", help="output folder (the best merge, and search/)")
    p.add_argument("--trials", type=int, default=20, help="trials to finish, counting a resumed journal's (default 20)")
    p.add_argument("--objective", action="append", metavar="NAME[:min|max]",
                   help="the metric to optimise (default: the first --eval's own); give two for a Pareto front")
    p.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe",
                   help="Optuna's TPE (default), random search, or a grid (all values choices)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    p.add_argument("--workers", type=int, default=1,
                   help="trials at once; more than 1 runs them on Ray workers on this machine (default 1: in this "
                        "process)")
    p.add_argument("--address", help="a Ray cluster to run the trials on (or set RAY_ADDRESS)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: the cores available)")
    p.add_argument("--device", default="cpu", help="where trials merge and evaluate: cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size (default 8)")
    p.add_argument("--no-prune", action="store_true",
                   help="run every trial to its end (default: stop one whose objective after an evaluation batch "
                        "is worse than the median of the finished trials')")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an existing OUT (its journal discarded; the rest replaced at the end)")
    p.add_argument("--allow-pickle", action="store_true", help="load pickled .bin checkpoints (weights_only)")
    add_trust_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_search)
