"""`modalmerge extract-lora`: a fine-tune's difference from its base as a PEFT LoRA adapter (truncated SVD)."""

from __future__ import annotations

from .options import set_threads


def cmd_extract_lora(args) -> int:
    from ..procedures.extract_lora import extract_lora, summary_lines
    from ..version import __version__

    set_threads(args.threads)
    report = extract_lora(args.model, args.base, args.output, rank=args.rank, energy=args.energy,
                          embeddings=args.embeddings, dtype=args.dtype, device=args.device, overwrite=args.overwrite,
                          allow_pickle=args.allow_pickle, progress=not args.no_progress, tool_version=__version__)
    print("\n".join(summary_lines(report)))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "extract-lora", help="approximate MODEL - BASE by a PEFT LoRA adapter (truncated SVD)",
        description="Write a PEFT LoRA adapter folder whose B·A approximates the task vector MODEL − BASE of each "
                    "linear layer: an exact SVD in float32 per matrix, truncated to --rank (or, with --energy, to "
                    "the smallest rank that keeps that fraction of the squared Frobenius norm), split as "
                    "A = √S·Vᵀ, B = U·√S. Embeddings and output heads that differ become embedding/linear LoRAs "
                    "with --embeddings, else modules_to_save; other tensors that differ (norms, biases) are saved "
                    "whole in modules_to_save. Streams one tensor at a time; the output is written atomically and "
                    "peft.PeftModel.from_pretrained(base_model, OUTPUT) loads it.")
    p.add_argument("model", metavar="MODEL", help="fine-tuned model folder (or hub id)")
    p.add_argument("--base", required=True, help="base model folder (or hub id) that MODEL was fine-tuned from")
    p.add_argument("--output", "-o", required=True, help="adapter folder to write (atomically)")
    p.add_argument("--rank", "-r", type=int, required=True, help="LoRA rank; with --energy, the largest rank")
    p.add_argument("--energy", type=float, metavar="FRACTION",
                   help="per-tensor rank: the smallest that keeps this fraction (0-1] of the squared Frobenius norm "
                        "of the task vector, at most --rank (written as PEFT's rank_pattern)")
    p.add_argument("--embeddings", action="store_true",
                   help="extract embeddings (lora_embedding_A/B) and output heads as LoRAs too, instead of saving "
                        "them whole in modules_to_save")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the adapter's tensors (default: each tensor's dtype in MODEL)")
    p.add_argument("--device", default="cpu", help="where the SVDs run: cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--allow-pickle", action="store_true", help="load pickled .bin checkpoints (weights_only)")
    p.add_argument("--threads", type=int, help="torch threads (default: the cores available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract_lora)
