"""`modalmerge extract`: one task's (or modality's) standalone model out of a decoupled merge."""

from __future__ import annotations

from ..errors import MergeError
from ..units import human_bytes as _human


def cmd_extract(args) -> int:
    from ..checkpoint.decoupled import DecoupledFolder, extract_task

    if args.list:
        d = DecoupledFolder(args.folder)
        width = max(len("task"), *(len(n) for n in d.task_names))
        print(f"method {d.method}, {len(d.tensors)} merged tensors")
        print(f"{'task':<{width}}  {'scalar':>8}  {'mask density':>12}")
        for name, scalar in d.tasks:
            print(f"{name:<{width}}  {scalar:>8.4f}  {100 * d.mask_density(name):>11.2f}%")
        if "storage" in d.manifest:
            from ..procedures.mmer import storage_lines
            for name, entry in ((t["name"], t) for t in d.manifest["tasks"]):
                parts = entry.get("modality")
                print(f"  {name}: " + (f"encoder/projector in {parts['dir']}" if parts else "text-only task"))
            print("\n".join(storage_lines(d.manifest["storage"])))
            return 0
        s = d.storage()
        print(f"storage: merged weights {_human(s['text'])}, shared vector {_human(s['shared'])}, masks "
              f"{_human(s['masks'])}; {len(d.tasks)} standalone models would take {_human(s['standalone'])}")
        return 0
    if not args.task:
        raise MergeError("extract needs --task NAME (or --list to see the tasks)")
    if not args.output:
        raise MergeError("extract needs --output DIR for the task's model")
    out = extract_task(args.folder, args.task, args.output, overwrite=args.overwrite,
                       progress=not args.no_progress)
    print(f"extracted task {args.task!r} -> {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "extract", help="materialise one task's model from a decoupled merge (tall, emr, mmer)",
        description="Rebuild one task's (or modality's) standalone model from a decoupled merge folder: the "
                    "merged weights plus that task's mask of the shared vector. The output is an ordinary "
                    "model folder (written atomically) that transformers loads.")
    p.add_argument("folder", help="output folder of a decoupled merge (has decoupled/manifest.json)")
    p.add_argument("--task", "--modality", dest="task", metavar="NAME", help="task (modality) to extract")
    p.add_argument("--output", "-o", help="folder for the task's model")
    p.add_argument("--list", action="store_true", help="list the tasks, their mask densities and storage sizes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)
