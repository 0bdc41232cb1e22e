"""Text generation from a composed (MMER) model, one prompt holding text, images and audio clips.

The prompt is built piece by piece: text with the composed folder's tokenizer; each image or clip
with its modality's processor, which writes the family's placeholder token once per feature row,
and with the family's own towers and projectors (runtime/multimodal.py), whose rows go to those
positions. The group ids are the modality's task index at its placeholder tokens and -1 (text)
everywhere else. The prefill runs under `composed.route(group_ids)`, so each modality's tokens
go through θ_0 + m_g ⊙ τ* and the text through the text weights; decoding then runs on the text
weights with the KV cache and no routing, at the plain model's speed (with
`text_mask="present"`, on the mean mask of the modalities in the prompt, patched in once).

A modality served by the user's own encoder and projector (not a transformers family: no
processor in the composed folder) is given as `features`: (task, rows [n, hidden]) pairs, rows
already in the language model's embedding space. Each block's rows take n positions of their own
with that task's group id, in the order given, after the tokenizer's BOS and before everything
else.

Where the text holds a modality's placeholder (`<image>` for LLaVA, `<|AUDIO|>` for Qwen2-Audio:
the processor's own token), each occurrence takes the next image or clip in order; a text without
any puts all images, then all clips, before the text. One prompt at a time (batch 1). Families
whose language model takes 3-D (mrope) positions (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V,
Qwen2.5-Omni) and Phi-4-multimodal (towers inside its language model) are refused with one
MergeError line (runtime/multimodal.py).
"""

from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..checkpoint.vocabulary import load_tokenizer
from ..errors import MergeError
from .multimodal import MEDIA, PROCESSOR_FILES, Modality, media_of

if TYPE_CHECKING:
    from .composed import ComposedModel

TEXT = -1  # the group id of text tokens (exported as modalmerge.runtime.TEXT)


@dataclass
class Prompt:
    """A built prompt: token ids and group ids [1, seq], and the feature rows that replace the
    embeddings at the positions `features_at` [1, seq] (True at every placeholder token)."""

    input_ids: torch.Tensor
    group_ids: torch.Tensor
    features_at: torch.Tensor
    features: torch.Tensor


@dataclass
class Generation:
    """What `generate` answered: the new text, its token ids, the prompt it was given, and the
    logits of the first new token (the prefill's last position, [vocab])."""

    text: str
    token_ids: list[int]
    prompt: Prompt
    first_logits: torch.Tensor


def text_tokenizer(composed: "ComposedModel") -> Any:
    """The composed folder's tokenizer (the base's, copied by the merge); else the first
    modality processor's."""
    if composed.text_tokenizer is not None:
        return composed.text_tokenizer
    root = composed.folder.path
    tok = None
    if any((root / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = load_tokenizer(root, f"composed model {root}", composed.trust_remote_code)
    else:
        for task in composed.tasks:
            if composed.modality_folder(task) is not None:
                proc = composed.modality(task, with_model=False).processor
                tok = getattr(proc, "tokenizer", None)
                if tok is not None:
                    break
    if tok is None:
        raise MergeError(f"{root}: no tokenizer (tokenizer.json / tokenizer_config.json) in the composed folder or "
                         "its modalities; copy the base model's tokenizer files there")
    composed.text_tokenizer = tok
    return tok


def serving_tasks(composed: "ComposedModel", media: dict[str, Sequence[Any]],
                  tasks: dict[str, str] | None = None) -> dict[str, Modality]:
    """For each media kind given (non-empty), the modality task that takes it: `tasks[kind]`, else
    the only task whose processor handles that kind."""
    tasks = dict(tasks or {})
    unknown = set(tasks) - set(MEDIA)
    if unknown:
        raise MergeError(f"tasks: unknown media kind {sorted(unknown)[0]!r}; use {', '.join(MEDIA)}")
    out: dict[str, Modality] = {}
    wanted = [k for k, items in media.items() if items]
    if not wanted:
        return out
    found: dict[str, list[Modality]] = {k: [] for k in wanted}
    no_processor: dict[str, list[str]] = {k: [] for k in wanted}
    for task in composed.tasks:
        if composed.modality_folder(task) is None:
            continue
        m = composed.modality(task, with_model=False)
        for kind in media_of(m.config, m.processor):
            if kind not in found:
                continue
            if m.processor is None:
                no_processor[kind].append(task)
            else:
                found[kind].append(m)
    for kind in wanted:
        label = kind if kind != "audio" else "audio clip"
        if kind in tasks:
            choice = [m for m in found[kind] if m.task == tasks[kind]]
            if not choice:
                raise MergeError(f"tasks: {tasks[kind]!r} takes no {kind}s; tasks that do: "
                                 f"{', '.join(m.task for m in found[kind]) or 'none'}")
        else:
            choice = found[kind]
        if not choice:
            if no_processor[kind]:
                task = no_processor[kind][0]
                raise MergeError(f"modality {task!r} takes {kind}s but {composed.modality_folder(task)} has no "
                                 f"processor; copy the source model's {PROCESSOR_FILES} there")
            raise MergeError(f"a {label} was given but composed model {composed.folder.path} has no {kind} modality "
                             f"(tasks: {', '.join(composed.tasks)})")
        if len(choice) > 1:
            raise MergeError(f"tasks {', '.join(m.task for m in choice)} all take {kind}s: choose one with "
                             f"tasks={{{kind!r}: ...}}")
        out[kind] = composed.modality(choice[0].task)
    ids = {kind: m.placeholders[kind][1] for kind, m in out.items()}
    if len(set(ids.values())) < len(ids):
        raise MergeError(f"the placeholder tokens of {', '.join(f'{k} ({m.task})' for k, m in out.items())} share "
                         "one token id; their tokens cannot be told apart")
    return out


def _special_prefix(tok: Any) -> list[int]:
    """The ids the tokenizer puts before a text (a BOS), found by tokenizing one word both ways."""
    with_special = tok("a")["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def feature_blocks(composed: "ComposedModel", features: Any) -> list[tuple[str, torch.Tensor]]:
    """`features` as checked (task, rows [n, hidden]) pairs: a mapping or a sequence of pairs."""
    items = list(features.items()) if hasattr(features, "items") else list(features or [])
    hidden = composed.llm.get_input_embeddings().embedding_dim
    out = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise MergeError("features: give (task, rows) pairs or a {task: rows} mapping")
        task, rows = item
        if task not in composed.tasks:
            raise MergeError(f"features: {task!r} is not a task of the composed model ({', '.join(composed.tasks)})")
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[1] != hidden or not len(rows):
            shape = list(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise MergeError(f"features[{task!r}]: rows must be a [n, {hidden}] tensor (n ≥ 1, the language "
                             f"model's hidden size), got {shape}")
        if not torch.isfinite(rows).all():
            raise MergeError(f"features[{task!r}]: the rows hold NaN or infinite values")
        out.append((task, rows))
    return out


def build_prompt(composed: "ComposedModel", text: str = "", images: Sequence[Any] = (), audios: Sequence[Any] = (),
                 *, features: Any = (), tasks: dict[str, str] | None = None,
                 add_special_tokens: bool = True) -> Prompt:
    """The prompt's ids, group ids and feature rows (see the module docstring)."""
    blocks = feature_blocks(composed, features)
    media = {"image": list(images or []), "audio": list(audios or [])}
    serving = serving_tasks(composed, media, tasks)
    tok = text_tokenizer(composed)
    token_of = {m.placeholders[kind][0]: kind for kind, m in serving.items()}
    counts = {kind: sum(text.count(t) for t, k in token_of.items() if k == kind) for kind in serving}
    lead = ""
    for kind, m in serving.items():
        placeholder = m.placeholders[kind][0]
        if counts[kind] == 0:
            lead += placeholder * len(media[kind])
        elif counts[kind] != len(media[kind]):
            raise MergeError(f"the text holds {counts[kind]} {placeholder!r} but {len(media[kind])} {kind}(s) were "
                             f"given; write one {placeholder!r} per {kind}, or none to put them all first")
    text = lead + text
    pieces = re.split("(" + "|".join(map(re.escape, sorted(token_of, key=len, reverse=True))) + ")", text) \
        if token_of else [text]
    ids: list[torch.Tensor] = [torch.tensor(_special_prefix(tok) if add_special_tokens else [], dtype=torch.long)]
    groups: list[torch.Tensor] = [torch.full((ids[0].numel(),), TEXT, dtype=torch.long)]
    where: list[torch.Tensor] = [torch.zeros(ids[0].numel(), dtype=torch.bool)]
    rows: list[torch.Tensor] = []
    taken = {kind: 0 for kind in serving}
    dtype = next(composed.llm.parameters()).dtype
    filler = getattr(tok, "pad_token_id", None) or 0   # an id under the rows: embedded, then replaced
    for task, block in blocks:
        n = block.shape[0]
        ids.append(torch.full((n,), filler, dtype=torch.long))
        groups.append(torch.full((n,), composed.task_index(task), dtype=torch.long))
        where.append(torch.ones(n, dtype=torch.bool))
        rows.append(block.to(dtype))
    for piece in pieces:
        if not piece:
            continue
        kind = token_of.get(piece)
        if kind is None:
            part = torch.tensor(tok(piece, add_special_tokens=False)["input_ids"], dtype=torch.long)
            ids.append(part)
            groups.append(torch.full((part.numel(),), TEXT, dtype=torch.long))
            where.append(torch.zeros(part.numel(), dtype=torch.bool))
            continue
        m = serving[kind]
        part, feats, positions = m.encode(kind, media[kind][taken[kind]], dtype)
        taken[kind] += 1
        ids.append(part.cpu())
        groups.append(torch.where(positions.cpu(), m.index, TEXT))
        where.append(positions.cpu())
        rows.append(feats)
    input_ids = torch.cat(ids).unsqueeze(0)
    if input_ids.numel() == 0:
        raise MergeError("the prompt is empty: give a text, an image, an audio clip or features")
    vocab = composed.llm.get_input_embeddings().num_embeddings
    if int(input_ids.max()) >= vocab:
        raise MergeError(f"token id {int(input_ids.max())} of the prompt is outside the composed LLM's vocabulary "
                         f"({vocab}); the processors' tokenizers do not match the base's")
    hidden = composed.llm.get_input_embeddings().embedding_dim
    features = torch.cat(rows) if rows else torch.zeros(0, hidden, dtype=dtype)
    return Prompt(input_ids, torch.cat(groups).unsqueeze(0), torch.cat(where).unsqueeze(0), features)


def _cache_name(llm) -> str:
    """`cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def _cache_of(out) -> Any:
    for name in ("cache", "past_key_values"):
        value = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if value is not None:
            return value
    return None


def prefill(composed: "ComposedModel", prompt: Prompt, text_mask: str = "all") -> tuple[torch.Tensor, Any]:
    """(logits of the first new token [vocab], the KV cache): one routed forward over the prompt."""
    llm = composed.llm
    device = composed.device
    group_ids = prompt.group_ids.to(device)
    input_ids = prompt.input_ids.to(device)
    kwargs = {"use_cache": True}
    if int(group_ids[0, -1]) == TEXT and "logits_to_keep" in inspect.signature(llm.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the last position is text: the head's routing needs no other row
    with torch.no_grad(), composed.route(group_ids, text_mask=text_mask):
        # text tokens embedded on the text weights (routed: "present" changes them too)
        embeds = llm.get_input_embeddings()(input_ids)
        at = prompt.features_at.to(device)
        if prompt.features.numel():
            embeds = embeds.masked_scatter(at.unsqueeze(-1), prompt.features.to(device, embeds.dtype))
        out = llm(inputs_embeds=embeds, **kwargs)
    return out.logits[0, -1], _cache_of(out)


def _eos_ids(composed: "ComposedModel", tok: Any, eos_token_id) -> set[int]:
    # the generation config's, else the model config's, else the tokenizer's
    for source in (getattr(composed.llm, "generation_config", None), composed.llm.config, tok):
        if eos_token_id is None:
            eos_token_id = getattr(source, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id}


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator | None) -> int:
    if not do_sample:
        return int(logits.argmax())
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = logits.float().unsqueeze(0) / max(temperature, 1e-6)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(composed: "ComposedModel", text: str = "", images: Sequence[Any] = (), audios: Sequence[Any] = (), *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, eos_token_id: int | list[int] | None = None,
             text_mask: str = "all", tasks: dict[str, str] | None = None, features: Any = (),
             add_special_tokens: bool = True) -> Generation:
    """Generate text from one prompt of text, images (what the vision modality's processor takes:
    PIL images, arrays) and audio clips (1-D float arrays at the feature extractor's sampling
    rate), and `features`: (task, rows) from the user's own encoders (module docstring).
    Greedy by default; `do_sample` with `temperature`, `top_k`, `top_p` and `seed`.
    `tasks` picks the modality task for a media kind where several take it ({"image": "vision"})."""
    if max_new_tokens < 1:
        raise MergeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
        raise MergeError("sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")
    tok = text_tokenizer(composed)
    prompt = build_prompt(composed, text, images, audios, features=features, tasks=tasks,
                          add_special_tokens=add_special_tokens)
    logits, cache = prefill(composed, prompt, text_mask)
    first = logits.detach().float().cpu()
    eos = _eos_ids(composed, tok, eos_token_id)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    present = sorted({composed.tasks[int(g)] for g in prompt.group_ids.unique().tolist() if g != TEXT})
    # decoding runs on the text weights: the stored ones, or the mean over the modalities present
    # patched in once for the whole loop
    text_weights = composed.route(torch.full((1, 1), TEXT), text_mask="present", present=present) \
        if text_mask == "present" and present else contextlib.nullcontext()
    cache_kw = _cache_name(composed.llm)
    new: list[int] = []
    with torch.no_grad(), text_weights:
        while True:
            token = _choose(logits, do_sample, temperature, top_k, top_p, generator)
            new.append(token)
            if token in eos or len(new) >= max_new_tokens:
                break
            out = composed.llm(input_ids=torch.tensor([[token]], device=composed.device), use_cache=True,
                               **{cache_kw: cache})
            logits, cache = out.logits[0, -1], _cache_of(out)
    return Generation(tok.decode(new, skip_special_tokens=True), new, prompt, first)
