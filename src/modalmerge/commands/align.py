"""`modalmerge align`: permute a model's hidden units onto a reference (Git Re-Basin weight matching)."""

from __future__ import annotations


def cmd_align(args) -> int:
    from ..procedures.align import align_folders

    perms = align_folders(args.model, args.to, args.output, overwrite=args.overwrite, seed=args.seed,
                          max_rounds=args.max_rounds, allow_pickle=args.allow_pickle, residual=args.residual)
    moved = sum(int((p != p.sort().values).sum()) for p in perms.values())
    stream = "residual stream permuted" if args.residual else "residual stream left as it is"
    print(f"aligned {args.model} to {args.to}: {len(perms)} permutations ({stream}), {moved} units moved "
          f"-> {args.output}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "align", help="permute a model's hidden units to match a reference (Git Re-Basin)",
        description="Weight matching: find the permutations of the residual stream (one, shared by every block), "
                    "the MLP hidden units (one per layer) and the attention heads (per layer; with grouped-query "
                    "attention, the KV groups and the query heads inside each group) that make MODEL closest to "
                    "REFERENCE, and write the permuted model (it computes the same function) to OUTPUT, ready to "
                    "merge with the reference. For independently trained models. Supports llama-style (llama, "
                    "mistral, qwen2, qwen3, gemma, gemma2), bert-style (bert, roberta, xlm-roberta, electra) and "
                    "plain MLP checkpoints; the permutations found are written to OUTPUT/alignment.json.")
    p.add_argument("model", help="model folder to permute")
    p.add_argument("--to", required=True, metavar="REFERENCE", help="reference model folder")
    p.add_argument("--output", "-o", required=True, help="folder for the aligned model (written atomically)")
    p.add_argument("--no-residual", dest="residual", action="store_false",
                   help="leave the residual stream unpermuted: embeddings, norms, output heads and the "
                        "residual-side axis of every projection keep their order; only MLP units and attention "
                        "heads move. Needed for a checkpoint with a head or tensor the residual spec does not know")
    p.add_argument("--seed", type=int, default=0, help="seed of the coordinate-descent order (default 0)")
    p.add_argument("--max-rounds", type=int, default=100, help="coordinate-descent rounds at most (default 100)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--allow-pickle", action="store_true", help="load pickled .bin checkpoints (weights_only)")
    p.set_defaults(func=cmd_align)
