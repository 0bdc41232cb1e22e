"""`modalmerge generate`: text from a composed (MMER) folder, one prompt of text, images and audio
clips (runtime/generate.py does the work)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MergeError


def read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise MergeError(f"--image {path}: not a readable image ({e})") from e


def read_audio(path: str, rate: int):
    """A mono float32 clip at `rate` Hz from a PCM .wav (resampled linearly when its rate
    differs) or a .npy array (taken to be at `rate` already)."""
    import wave

    import numpy as np

    p = Path(path)
    try:
        if p.suffix.lower() == ".npy":
            clip = np.load(p, allow_pickle=False)
            if clip.ndim != 1:
                raise MergeError(f"--audio {path}: a .npy clip must be 1-D (samples), got shape {list(clip.shape)}")
            return clip.astype(np.float32)
        with wave.open(str(p), "rb") as w:
            width, channels, source_rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            frames = w.readframes(w.getnframes())
    except (OSError, EOFError, ValueError, wave.Error) as e:
        raise MergeError(f"--audio {path}: not a readable PCM .wav or .npy clip ({e})") from e
    kinds = {1: (np.uint8, 128.0, 128.0), 2: (np.int16, 0.0, 32768.0), 4: (np.int32, 0.0, 2147483648.0)}
    if width not in kinds:
        raise MergeError(f"--audio {path}: {8 * width}-bit samples; use 8, 16 or 32-bit PCM")
    dtype, offset, scale = kinds[width]
    clip = (np.frombuffer(frames, dtype=dtype).astype(np.float32) - offset) / scale
    clip = clip.reshape(-1, channels).mean(axis=1)
    if source_rate != rate and clip.size:
        n = max(1, round(clip.size * rate / source_rate))
        clip = np.interp(np.linspace(0, clip.size - 1, n), np.arange(clip.size), clip).astype(np.float32)
    return clip


def _tasks(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        kind, sep, task = pair.partition("=")
        if not sep or not kind or not task:
            raise MergeError(f"--task {pair!r}: write KIND=TASK, e.g. --task image=vision")
        out[kind] = task
    return out


def cmd_generate(args) -> int:
    from ..runtime.composed import load_composed
    from ..runtime.generate import serving_tasks

    tasks = _tasks(args.task)
    images = [read_image(p) for p in args.image]  # a missing file fails before the model loads
    composed = load_composed(args.folder, device=args.device, trust_remote_code=args.trust_remote_code)
    audios = []
    if args.audio:
        rate = serving_tasks(composed, {"audio": args.audio}, tasks)["audio"].processor.feature_extractor.sampling_rate
        audios = [read_audio(p, rate) for p in args.audio]
    out = composed.generate(args.text, images=images, audios=audios, max_new_tokens=args.max_new_tokens,
                            do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, text_mask=args.text_mask, tasks=tasks)
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids,
                          "prompt_tokens": int(out.prompt.input_ids.shape[1])}))
    else:
        print(out.text)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text from a composed (MMER) model: text, images and audio in one prompt",
        description="Load a composed (MMER) folder and generate from one prompt: each image and audio clip goes "
                    "through its modality's processor, towers and projector, its tokens through that modality's "
                    "own masked weights in the prefill; decoding runs on the text weights with the KV cache. In "
                    "the text, each modality's placeholder (<image>, <|AUDIO|>: the processor's token) takes the "
                    "next image or clip; with none, all images then all clips go first.")
    p.add_argument("folder", help="a composed folder (modalmerge merge with method mmer)")
    p.add_argument("--text", default="", help="the prompt's text")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable)")
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="a PCM .wav (resampled to the feature extractor's rate) or a 1-D .npy clip (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="at most this many new tokens (default 32)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    p.add_argument("--text-mask", choices=("all", "present"), default="all",
                   help="text weights: the mean mask over all tasks (the stored weights) or over the modalities "
                        "in the prompt")
    p.add_argument("--task", action="append", default=[], metavar="KIND=TASK",
                   help="the task that takes a media kind where several do, e.g. image=vision")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print the text, token ids and prompt length as JSON")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow folders with custom modelling code (config auto_map) to be loaded by transformers")
    p.set_defaults(func=cmd_generate)
