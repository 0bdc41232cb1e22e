"""Tokenizers and vocabularies of a merge, with mergekit 0.1.5's semantics.

Models whose vocabularies differ (a fine-tune that added tokens) can be merged once their
embedding and LM-head rows are put into one output vocabulary:

- `tokenizer_source: base | union | <model>` (or `tokenizer: {source, tokens, pad_to_multiple_of}`)
  picks the output tokenizer: the base model's (cut to its config's `vocab_size`), the union of
  every model's tokens, or one model's own;
- each input model's vocabulary tensors are seen in that vocabulary (`VocabularyView`): its own row
  where it has the token, otherwise a row filled as mergekit fills it — copied from the one model
  that has the token, from the base when several have it and the base is one of them, their mean
  when the base is not, zero when none has it; `tokens: {tok: {source, force}}` overrides that per
  token, and tokens no tokenizer has are appended to the vocabulary;
- the output folder gets the built tokenizer (with the recipe's `chat_template`) and config.json
  gets the new vocabulary size, rounded up to `pad_to_multiple_of` (the padding rows are each
  model's mean row, as mergekit pads).

In a `slices:` recipe each vocabulary tensor is filled from the models it comes from
(`Vocabulary.for_inputs`), as mergekit fills it; `Vocabulary.summary` is what --dry-run shows.

Rows are compared by token, never by id. mergekit orders the union's new tokens by iterating
hash maps, so its ids change from run to run; here they come in a fixed order: the base's
vocabulary first (its ids kept), then each other model's new regular tokens in that model's id
order, models in recipe order, then the added (special) tokens in the same order.

Tokenizers are loaded with transformers from the model folders, offline, running no code from the
folders unless the user trusts it. Rows are gathered one row block at a time: memory stays that of
a block per model, never the whole matrices of every model.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import MergeError, one_line
from .safetensors_io import TensorMeta
from .sources import TensorSource, load_json

# mergekit's named chat templates (mergekit/_data/chat_templates). Their texts are mergekit's,
# under LGPL-3.0; this Apache-2.0 package does not ship copies, so a name is refused with the way out.
MERGEKIT_CHAT_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")

_BLOCK_ELEMS = 1 << 22   # elements per row block when a whole vocabulary tensor is walked
_GAP_ROWS = 16           # rows read through when gathering: fewer, larger reads


# ------------------------------------------------------------------------------ recipe settings

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelTokenSource(_Strict):
    """A token's row taken from a model's own row of another token (by id or by text)."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of `token_id` and `token`")
        return self


class ZeroSource(_Strict):
    kind: Literal["zero"]


class TokenSettings(_Strict):
    """Where a token's row comes from for the models that lack it (for all models with `force`)."""

    source: Union[str, ModelTokenSource, ZeroSource]
    force: bool = False


class TokenizerSettings(_Strict):
    """mergekit's `tokenizer:` block."""

    source: str = "union"            # union | base | a model reference
    tokens: dict[str, TokenSettings] | None = None
    pad_to_multiple_of: int | None = Field(default=None, gt=0)

    def with_models(self, fix: Callable[[str], str]) -> "TokenizerSettings":
        """The same settings with every model reference passed through `fix` (paths made relative
        to the recipe's folder)."""
        def fix_source(s):
            if isinstance(s, str):
                return fix(s)
            if isinstance(s, ModelTokenSource):
                return s.model_copy(update={"model": fix(s.model)})
            return s
        tokens = None if self.tokens is None else {
            k: v.model_copy(update={"source": fix_source(v.source)}) for k, v in self.tokens.items()}
        return self.model_copy(update={"source": self.source if self.source in ("union", "base") else fix(self.source),
                                       "tokens": tokens})


def settings_from_mergekit(value: Any, where: str, reference: Callable[[Any, str, str], str]) -> dict[str, Any]:
    """mergekit's `tokenizer:` mapping in native form: model references (`reference`, the recipe's
    own translation of mergekit's ModelReference) written as reference strings."""
    if not isinstance(value, dict):
        raise MergeError(f"{where}: `tokenizer` must be a mapping {{source, tokens, pad_to_multiple_of}}; fix it")
    out = dict(value)
    src = out.get("source", "union")
    if src not in ("union", "base"):
        out["source"] = reference(src, where, "tokenizer.source")
    tokens = out.get("tokens")
    if isinstance(tokens, dict):
        fixed = {}
        for tok, cfg in tokens.items():
            if isinstance(cfg, dict) and "source" in cfg:
                s = cfg["source"]
                if isinstance(s, dict) and s.get("kind") == "model_token" and "model" in s:
                    s = {**s, "model": reference(s["model"], where, f"tokenizer.tokens[{tok}].source.model")}
                elif not (isinstance(s, dict) and "kind" in s) and s is not None:
                    s = reference(s, where, f"tokenizer.tokens[{tok}].source")
                cfg = {**cfg, "source": s}
            fixed[tok] = cfg
        out["tokens"] = fixed
    return out


# ------------------------------------------------------------------------------ models' tokenizers

@dataclass
class Participant:
    """An input of the merge, as the vocabulary sees it."""

    label: str
    reference: str | None      # the recipe's reference string (to match `tokens` sources)
    folder: Path | None        # where its config and tokenizer files are


def load_tokenizer(folder: Path | None, who: str, trust_remote_code: bool):
    """A model folder's tokenizer, loaded by transformers offline (no code from the folder runs
    unless trusted); one error line when it cannot be loaded."""
    import transformers

    if folder is None or not folder.is_dir():
        raise MergeError(f"{who}: no model folder to read a tokenizer from; the tokenizer settings need model "
                         "folders with tokenizer files")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                                          local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a folder it cannot read
        hint = " (it names its own code: add --trust-remote-code if you trust it)" \
            if "trust_remote_code" in str(e) else ""
        raise MergeError(f"{who} ({folder}): cannot load its tokenizer ({type(e).__name__}: {one_line(e, 120)})"
                         f"{hint}; add tokenizer files (tokenizer.json, tokenizer_config.json) to the folder") from None


def has_tokenizer_files(folder: Path | None) -> bool:
    return folder is not None and any(
        any(folder.glob(pattern)) for pattern in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def config_vocab_size(folder: Path | None) -> tuple[int | None, tuple[str, ...]]:
    """The vocabulary size config.json declares, and where (`vocab_size`, or a multimodal model's
    `text_config.vocab_size`)."""
    if folder is None or not (folder / "config.json").is_file():
        return None, ("vocab_size",)
    cfg = load_json(folder / "config.json", "model config", "fix or replace it")
    if isinstance(cfg, dict) and isinstance(cfg.get("vocab_size"), int):
        return cfg["vocab_size"], ("vocab_size",)
    text = cfg.get("text_config") if isinstance(cfg, dict) else None
    if isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
        return text["vocab_size"], ("text_config", "vocab_size")
    return None, ("vocab_size",)


def _stripped(tokenizer, vocab_size: int | None, who: str, trust_remote_code: bool):
    """The base tokenizer without the tokens at ids >= the model's vocab_size (as mergekit cuts it:
    the entries dropped from the vocabulary, the added tokens and the BPE merges that use them)."""
    import transformers

    vocab = tokenizer.get_vocab()
    size = vocab_size or len(vocab)
    unused = {t for t, i in vocab.items() if i >= size}
    if not unused:
        return tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        if not path.is_file():
            raise MergeError(f"{who}: its tokenizer has tokens past the config's vocab_size ({size}) and is no fast "
                             "tokenizer (no tokenizer.json), so it cannot be cut to the model's vocabulary")
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise MergeError(f"{who}: its tokenizer has tokens past the config's vocab_size ({size}) and is of type "
                             f"{model.get('type')!r}; only BPE tokenizers can be cut to the model's vocabulary "
                             "(as in mergekit): use another model as the tokenizer base")
        data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < size]
        model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in unused}

        def keep(m) -> bool:
            parts = m.split(" ") if isinstance(m, str) else list(m)
            return not any(p in unused for p in parts)
        model["merges"] = [m for m in model.get("merges", []) if keep(m)]
        path.write_text(json.dumps(data), encoding="utf-8")
        cut = transformers.AutoTokenizer.from_pretrained(tmp, trust_remote_code=trust_remote_code,
                                                         local_files_only=True)
        cut.chat_template = tokenizer.chat_template
        return cut


def _copy(tokenizer, trust_remote_code: bool):
    """A fresh copy of a tokenizer (saved and reloaded), so that adding tokens leaves it as it was."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return transformers.AutoTokenizer.from_pretrained(tmp, trust_remote_code=trust_remote_code,
                                                          local_files_only=True)


def _union(base_tok, toks: list[tuple[Any, int]], trust_remote_code: bool):
    """mergekit's union tokenizer: the base's, plus every other token below each model's vocab size;
    regular tokens first, then added ones, in a fixed order (see the module docstring)."""
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in toks:
        added_here = {info.content: (i, info) for i, info in tok.added_tokens_decoder.items()}
        for text, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size and text not in added_here:
                regular.setdefault(text)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i < size:
                added.setdefault(info.content, info)
    out = _copy(base_tok, trust_remote_code)
    base_vocab = base_tok.get_vocab()
    new = [text for text in regular if text not in added and text not in base_vocab]
    if new:
        out.add_tokens(new)       # in order, as one at a time
    if added:
        out.add_tokens(list(added.values()))
    return out


# ------------------------------------------------------------------------------ the output vocabulary

# how a token's row is filled for the models that lack it (or for all, when forced)
_KEEP, _ROW, _MEAN, _ZERO = 0, 1, 2, 3


@dataclass
class Vocabulary:
    """The merge's output tokenizer and, when the vocabulary is rebuilt, each input's rows in it."""

    tokenizer: Any                                   # a transformers tokenizer, saved into the output
    size: int = 0                                    # output rows (padded)
    tokens: list[str] = field(default_factory=list)  # output vocabulary by id
    permutations: torch.Tensor | None = None         # [inputs, tokens]: each input's own id, or -1
    forced: torch.Tensor | None = None               # [tokens] bool
    fill: torch.Tensor | None = None                 # [tokens] _KEEP/_ROW/_MEAN/_ZERO
    fill_input: torch.Tensor | None = None           # [tokens] the input a _ROW row comes from
    fill_row: torch.Tensor | None = None             # [tokens] and its row there
    size_key: tuple[str, ...] = ("vocab_size",)
    labels: list[str] = field(default_factory=list)
    # what the fill of another set of inputs needs (for_inputs): the settings, every participant, its tokenizer
    settings: TokenizerSettings | None = None
    participants: list[Participant] = field(default_factory=list)
    tokenizers: list[Any] = field(default_factory=list)
    source: str = ""                                 # base | union | the model reference (for --dry-run)
    # a layer stack's tensors filled from their own models (engine/embedding_views.py): (names, their fill)
    by_tensors: list[tuple[list[str], "Vocabulary"]] = field(default_factory=list)
    appended: list[str] = field(default_factory=list)   # `tokens` no tokenizer had
    template_note: str | None = None                     # which chat template was written

    @property
    def remaps(self) -> bool:
        return self.permutations is not None

    def for_inputs(self, indices: list[int], prefer: int | None, tensors: str) -> "Vocabulary":
        """The same output vocabulary seen by some participants only, `indices` in their order,
        their missing rows filled among themselves (`prefer`: the position of the base among them).
        mergekit fills each vocabulary tensor from the models that tensor is merged from: in a
        `slices:` recipe, the first slice's models for the embeddings, the last slice's for the
        head. `tensors` names those tensors in errors."""
        picked = [self.participants[i] for i in indices]
        v = replace(self, permutations=self.permutations[indices], labels=[p.label for p in picked],
                    participants=picked, tokenizers=[self.tokenizers[i] for i in indices], by_tensors=[])
        _assign_fill(v, self.settings, picked, v.tokenizers, prefer, tensors)
        return v

    def summary(self) -> dict[str, Any]:
        """What --dry-run shows of the output vocabulary (`summary_lines` prints it)."""
        source = self.source if self.source in ("", "base", "union") else f"model {Path(self.source).name}"
        out: dict[str, Any] = {"source": source or None, "chat_template": self.template_note}
        if not self.remaps:
            return out
        out.update(size=self.size, tokens=len(self.tokens), padding=self.size - len(self.tokens),
                   pad_to_multiple_of=self.settings.pad_to_multiple_of, appended=list(self.appended),
                   overrides={t: _override_text(c) for t, c in (self.settings.tokens or {}).items()})
        fills = []
        for names, v in self.by_tensors or [([], self)]:
            held = (v.permutations >= 0).sum(dim=0)
            # a copied row: from the base where several models hold the token, else from its one owner
            kind = torch.where(v.fill == _ROW, torch.where(held > 1, -2, -1), v.fill)
            named = torch.zeros(len(v.tokens), dtype=torch.bool)
            for text in self.settings.tokens or {}:
                named[v.tokens.index(text)] = True
            models = {}
            for j, label in enumerate(v.labels):
                lacking = v.permutations[j] < 0   # forced rows: the `tokens` line says them
                counts = {"recipe": int((lacking & named).sum())}
                for what, code in (("owner", -1), ("base", -2), ("mean", _MEAN), ("zero", _ZERO)):
                    counts[what] = int((lacking & ~named & (kind == code)).sum())
                models[label] = {"lacks": int(lacking.sum()), **counts}
            fills.append({"tensors": names, "models": models})
        out["fills"] = fills
        return out

    def write(self, folder: Path) -> None:
        """Save the tokenizer into an output folder (in place of copied tokenizer files) and, when
        the vocabulary was rebuilt, set config.json's vocabulary size."""
        self.tokenizer.save_pretrained(str(folder))
        config = folder / "config.json"
        if self.remaps and config.is_file():
            data = json.loads(config.read_text(encoding="utf-8"))
            target = data
            for key in self.size_key[:-1]:
                target = target.setdefault(key, {})
            target[self.size_key[-1]] = self.size
            config.write_text(json.dumps(data, indent=2), encoding="utf-8")


def build_vocabulary(settings: TokenizerSettings | None, chat_template: str | None, inputs: list[Participant],
                     base_index: int | None, base_folder: Path | None, prefer_base: bool,
                     donor_folder: Path | None, trust_remote_code: bool = False, fill: bool = True
                     ) -> Vocabulary | None:
    """The output vocabulary of a merge (None when the recipe sets neither a tokenizer nor a chat
    template). `inputs`: every model the merge reads; `base_index`: the input whose tokenizer is
    the base one (mergekit's base model, else its first model), or None when `base_folder` is no
    input; `prefer_base`: a token several inputs hold is filled from the base's row (mergekit does
    so when the recipe names a base model); `donor_folder`: the model whose tokenizer files and
    config the output gets; `fill`: assign every token's fill over all of `inputs` (off when each
    tensor is filled from its own models, `Vocabulary.for_inputs`)."""
    if settings is None:
        if chat_template is None:
            return None
        tokenizer = load_tokenizer(donor_folder, "the model whose tokenizer is copied", trust_remote_code)
        note = set_chat_template(tokenizer, chat_template, inputs, base_folder, trust_remote_code)
        return Vocabulary(tokenizer, template_note=note)
    if base_index is not None:
        base_folder = inputs[base_index].folder
    base_who = f"model {inputs[base_index].label!r}" if base_index is not None else f"base model ({base_folder})"
    base_size, _ = config_vocab_size(base_folder)
    base_tok = _stripped(load_tokenizer(base_folder, base_who, trust_remote_code), base_size, base_who,
                         trust_remote_code)
    toks, sizes = [], []
    for i, p in enumerate(inputs):
        if i == base_index or not has_tokenizer_files(p.folder):
            tok = base_tok  # mergekit: a model without a tokenizer is taken to have the base's
        else:
            tok = load_tokenizer(p.folder, f"model {p.label!r}", trust_remote_code)
        size, _ = config_vocab_size(p.folder)
        toks.append(tok)
        sizes.append(size if size is not None else len(tok.get_vocab()))
    if settings.source == "base":
        out = _copy(base_tok, trust_remote_code)
    elif settings.source == "union":
        # the base first, then the others in recipe order
        order = [(base_tok, base_size or len(base_tok.get_vocab()))]
        order += [(t, s) for j, (t, s) in enumerate(zip(toks, sizes)) if j != base_index]
        out = _union(base_tok, order, trust_remote_code)
    else:
        out = load_tokenizer(_folder_of(settings.source, inputs), f"tokenizer source {settings.source!r}",
                             trust_remote_code)
    appended = [text for text in settings.tokens or {} if text not in out.get_vocab()]
    for text in appended:
        out.add_tokens(text)
    vocab = out.get_vocab()
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise MergeError("the output tokenizer's token ids are not 0..N-1 without gaps; use another tokenizer source")
    tokens = [""] * n
    for text, i in vocab.items():
        tokens[i] = text
    perm = torch.full((len(inputs), n), -1, dtype=torch.long)
    for j, (tok, size) in enumerate(zip(toks, sizes)):
        own = tok.get_vocab()
        for i, text in enumerate(tokens):
            k = own.get(text)
            if k is not None and k < size:
                perm[j, i] = k
    size = n
    pad = settings.pad_to_multiple_of
    if pad and size % pad:
        size += pad - size % pad
    for text, cfg in (settings.tokens or {}).items():   # a named source is a model of the merge
        if not isinstance(cfg.source, ZeroSource):
            _input_index(cfg.source if isinstance(cfg.source, str) else cfg.source.model, inputs, text)
    vocabulary = Vocabulary(out, size, tokens, perm, size_key=config_vocab_size(donor_folder)[1],
                            labels=[p.label for p in inputs], settings=settings, participants=list(inputs),
                            tokenizers=toks, source=settings.source, appended=appended)
    if fill:
        _assign_fill(vocabulary, settings, inputs, toks, base_index if prefer_base else None)
    if chat_template is not None:
        vocabulary.template_note = set_chat_template(out, chat_template, inputs, base_folder, trust_remote_code)
    return vocabulary


def _folder_of(reference: str, inputs: list[Participant]) -> Path:
    for p in inputs:
        if reference in (p.reference, p.label) and p.folder is not None:
            return p.folder
    from .hub import reference_folder
    return reference_folder(reference, "tokenizer source")


def _input_index(reference: str, inputs: list[Participant], token: str) -> int:
    for j, p in enumerate(inputs):
        if reference in (p.reference, p.label):
            return j
    raise MergeError(f"tokenizer.tokens[{one_line(token, 60)!r}]: source model {one_line(reference, 80)!r} is not "
                     "one of the merge's models; name one of them (its path or name)")


def _assign_fill(v: Vocabulary, settings: TokenizerSettings, inputs: list[Participant], toks: list,
                 base_index: int | None, tensors: str | None = None) -> None:
    """mergekit's assignment of each token's fill: the recipe's own for the tokens it names; else
    the one owner's row, the base's, the holders' mean, or zero. `tensors`: the tensors these
    inputs are the models of, when they are not all of the merge's (a slice's models)."""
    n = len(v.tokens)
    present = v.permutations >= 0
    count = present.sum(dim=0)
    v.fill = torch.full((n,), _MEAN, dtype=torch.long)
    v.fill_input = torch.full((n,), -1, dtype=torch.long)
    v.fill_row = torch.full((n,), -1, dtype=torch.long)
    v.forced = torch.zeros(n, dtype=torch.bool)
    owner = present.long().argmax(dim=0)
    one = count == 1
    v.fill[one] = _ROW
    v.fill_input[one] = owner[one]
    v.fill[count == 0] = _ZERO
    if base_index is not None:
        by_base = (count > 1) & present[base_index]
        v.fill[by_base] = _ROW
        v.fill_input[by_base] = base_index
    rows = v.permutations.gather(0, v.fill_input.clamp(min=0)[None])[0]
    v.fill_row = torch.where(v.fill == _ROW, rows, v.fill_row)
    index = {t: i for i, t in enumerate(v.tokens)}
    for text, cfg in (settings.tokens or {}).items():
        i = index[text]
        v.forced[i] = cfg.force
        where = f"tokenizer.tokens[{one_line(text, 60)!r}]"
        if isinstance(cfg.source, ZeroSource):
            v.fill[i] = _ZERO
            continue
        model = cfg.source if isinstance(cfg.source, str) else cfg.source.model
        if tensors is not None and not any(model in (p.reference, p.label) for p in inputs):
            if cfg.force or not bool(present[:, i].all()):   # as mergekit: only a row that is needed
                raise MergeError(f"{where}: its source model {one_line(model, 80)!r} is not among {tensors} "
                                 f"({', '.join(p.label for p in inputs)}); name one of them")
            continue
        j = _input_index(model, inputs, text)
        if isinstance(cfg.source, str):
            row = int(v.permutations[j, i])
            if row < 0 and (cfg.force or not bool(present[:, i].all())):
                raise MergeError(f"{where}: model {inputs[j].label!r} has no token {one_line(text, 60)!r} to copy "
                                 "its row from; name another source")
        elif cfg.source.token_id is not None:
            row = cfg.source.token_id
        else:
            row = toks[j].get_vocab().get(cfg.source.token)
            if row is None:
                raise MergeError(f"{where}: model {inputs[j].label!r} has no token {one_line(cfg.source.token, 60)!r}; "
                                 "name a token of its vocabulary")
        v.fill[i], v.fill_input[i], v.fill_row[i] = _ROW, j, row
    # all inputs have it, nothing forced: each keeps its own row
    v.fill[present.all(dim=0) & ~v.forced] = _KEEP


def _override_text(cfg: TokenSettings) -> str:
    src = cfg.source
    if isinstance(src, ZeroSource):
        text = "zero"
    elif isinstance(src, str):
        text = f"from {Path(src).name or src}"
    else:
        own = src.token if src.token is not None else f"#{src.token_id}"
        text = f"from {Path(src.model).name or src.model}'s {own}"
    return text + (" (forced)" if cfg.force else "")


_FILL_WORDS = {"recipe": "as `tokens` says", "owner": "copied from their one owner", "base": "from the base",
               "mean": "the holders' mean", "zero": "zero"}


def summary_lines(s: dict[str, Any]) -> list[str]:
    """Vocabulary.summary() as --dry-run's short block."""
    pad = "            "
    template = f"; chat template {s['chat_template']}" if s.get("chat_template") else ""
    if s.get("source") is None:
        return [f"vocabulary  the copied tokenizer's{template}"]
    padding = f" + {s['padding']} padding (to a multiple of {s['pad_to_multiple_of']}, each model's mean row)" \
        if s["padding"] else ""
    lines = [f"vocabulary  {s['source']}: {s['size']} rows = {s['tokens']} tokens{padding}{template}"]
    if s["overrides"] or s["appended"]:
        told = ", ".join(f"{t!r} {how}" for t, how in s["overrides"].items())
        added = f"; appended {', '.join(repr(t) for t in s['appended'])}" if s["appended"] else ""
        lines.append(f"{pad}tokens: {told}{added}")
    for group in s["fills"]:
        where = f"{', '.join(group['tensors'])}: " if group["tensors"] else ""
        parts = []
        for label, c in group["models"].items():
            how = ", ".join(f"{c[k]} {words}" for k, words in _FILL_WORDS.items() if c[k])
            parts.append(f"{label} lacks {c['lacks']}" + (f" ({how})" if how else ""))
        lines.append(f"{pad}{where}{'; '.join(parts)}")
    return lines


def set_chat_template(tokenizer, value: str, inputs: list[Participant], base_folder: Path | None,
                      trust_remote_code: bool) -> str:
    """mergekit's `chat_template`: `auto` (the template most input models share; none found: the
    tokenizer keeps its own), inline Jinja, or one of mergekit's names (not shipped: refused).
    Returns which template was written, in words (for --dry-run)."""
    if value == "auto":
        found, holders = [], {}
        folders = [base_folder] + [p.folder for p in inputs]
        for folder in dict.fromkeys(f for f in folders if f is not None):
            try:
                template = load_tokenizer(folder, "model", trust_remote_code).chat_template
            except MergeError:
                continue
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
                holders.setdefault(template.strip(), folder.name)
        if not found:
            return "auto: no model has one, none written" if not tokenizer.chat_template else \
                "auto: no model has one, the tokenizer's own kept"
        best, count = Counter(found).most_common(1)[0]
        tokenizer.chat_template = best
        return f"auto: {holders[best]}'s ({count} of {len(found)} models with a template have it)"
    if len(value) < 256 and "\n" not in value and "{" not in value:
        if value in MERGEKIT_CHAT_TEMPLATES:
            raise MergeError(f"chat_template {value!r} is one of mergekit's named templates "
                             f"({', '.join(MERGEKIT_CHAT_TEMPLATES)}), whose texts are LGPL-3.0 and not shipped "
                             "here; paste the template's Jinja text as `chat_template`, or use `auto`")
        raise MergeError(f"chat_template {one_line(value, 60)!r} is neither `auto` nor a Jinja template; give the "
                         "template's text")
    if len(value) < 20 or "{" not in value:
        raise MergeError(f"chat_template {one_line(value, 60)!r} is not a valid Jinja template; give the template's "
                         "text, or `auto`")
    tokenizer.chat_template = value
    return f"the recipe's ({len(value)} characters)"


# ------------------------------------------------------------------------------ inputs in the vocabulary

class VocabularyRows:
    """Every input's vocabulary tensors in the output vocabulary, one row block at a time."""

    def __init__(self, vocabulary: Vocabulary, sources: list[TensorSource], names: list[str]):
        self.v, self.sources, self.names = vocabulary, sources, set(names)
        self._defaults: OrderedDict = OrderedDict()   # (name, r0, r1) -> filled rows of that block
        self._pad_mean: dict[tuple[int, str], torch.Tensor] = {}
        # the executor reads in a prefetch thread while statistics may read in the main one
        self._lock = threading.RLock()
        n = len(vocabulary.tokens)
        for name in names:
            shapes = [s.meta(name).shape if name in s else None for s in sources]
            for label, src, shape in zip(vocabulary.labels, sources, shapes):
                if shape is None:
                    raise MergeError(f"model {label!r} has no tensor {name!r}; the vocabulary needs it in every model")
                if shape[1:] != shapes[0][1:]:
                    raise MergeError(f"tensor {name!r} has shape {list(shape)} in model {label!r} but "
                                     f"{list(shapes[0])} in {vocabulary.labels[0]!r}: only its vocabulary rows may "
                                     "differ; merge models of one architecture")
            for j, shape in enumerate(shapes):
                if n and int(vocabulary.permutations[j].max()) >= shape[0]:
                    raise MergeError(f"tensor {name!r} of model {vocabulary.labels[j]!r} has {shape[0]} rows, fewer "
                                     "than its tokenizer's tokens below the config's vocab_size; fix the config's "
                                     "vocab_size or the checkpoint")
            for j, shape in enumerate(shapes):
                mine = (vocabulary.fill_input == j) & (vocabulary.fill != _KEEP)
                if mine.any() and int(vocabulary.fill_row[mine].max()) >= shape[0]:
                    raise MergeError(f"a `tokenizer.tokens` source row ({int(vocabulary.fill_row[mine].max())}) is "
                                     f"past the {shape[0]} rows of tensor {name!r} in model "
                                     f"{vocabulary.labels[j]!r}; name a row it has")

    def view(self, index: int) -> "VocabularyView":
        return VocabularyView(self, index)

    def _dtype(self, name: str) -> torch.dtype:
        dtype = self.sources[0].meta(name).dtype
        for s in self.sources[1:]:
            dtype = torch.promote_types(dtype, s.meta(name).dtype)
        return dtype

    def _gather(self, j: int, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of input j's own tensor, read in runs of nearby rows."""
        src = self.sources[j]
        shape = src.meta(name).shape
        row = 1
        for s in shape[1:]:
            row *= s
        uniq, inverse = torch.unique(ids, return_inverse=True)
        if uniq.numel() == 0:
            return torch.empty((0, *shape[1:]), dtype=src.meta(name).dtype)
        breaks = (torch.nonzero(uniq[1:] - uniq[:-1] > _GAP_ROWS).flatten() + 1).tolist()
        pieces = []
        for run in torch.tensor_split(uniq, breaks):
            a, b = int(run[0]), int(run[-1]) + 1
            block = src.read(name, a * row, b * row).reshape(b - a, *shape[1:])
            pieces.append(block[run - a])
        return torch.cat(pieces)[inverse]

    def _filled(self, name: str, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's tokens that need a filled row (positions in the block) and those rows."""
        key = (name, r0, r1)
        if key in self._defaults:
            self._defaults.move_to_end(key)
            return self._defaults[key]
        v = self.v
        fill = v.fill[r0:r1]
        need = torch.nonzero(fill != _KEEP).flatten()
        shape = self.sources[0].meta(name).shape
        dtype = self._dtype(name)
        rows = torch.zeros((need.numel(), *shape[1:]), dtype=dtype)
        kinds = fill[need]
        ids = need + r0
        for j in range(len(self.sources)):
            mine = (kinds == _ROW) & (v.fill_input[ids] == j)
            if mine.any():
                rows[mine] = self._gather(j, name, v.fill_row[ids[mine]]).to(dtype)
        mean = kinds == _MEAN
        if mean.any():
            held = v.permutations[:, ids[mean]]          # [inputs, tokens]
            acc = torch.zeros((int(mean.sum()), *shape[1:]), dtype=dtype)
            for j in range(len(self.sources)):           # summed in input order, as mergekit adds
                has = held[j] >= 0
                if has.any():
                    acc[has] = acc[has] + self._gather(j, name, held[j][has]).to(dtype)
            counts = (held >= 0).sum(dim=0).to(dtype).reshape(-1, *([1] * (len(shape) - 1)))
            rows[mean] = acc / counts
        self._defaults[key] = (need, rows)
        while len(self._defaults) > 4:
            self._defaults.popitem(last=False)
        return need, rows

    def rows(self, j: int, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of input j's tensor `name` in the output vocabulary."""
        with self._lock:
            return self._rows(j, name, r0, r1)

    def _rows(self, j: int, name: str, r0: int, r1: int) -> torch.Tensor:
        v = self.v
        src = self.sources[j]
        meta = src.meta(name)
        n = len(v.tokens)
        out = torch.empty((r1 - r0, *meta.shape[1:]), dtype=meta.dtype)
        t1 = min(r1, n)
        if r0 < t1:
            own = v.permutations[j, r0:t1]
            keep = (own >= 0) & ~v.forced[r0:t1]
            at = torch.nonzero(keep).flatten()
            if at.numel():
                out[at] = self._gather(j, name, own[at])
            need, filled = self._filled(name, r0, t1)
            lacking = ~keep[need]
            if lacking.any():
                out[need[lacking]] = filled[lacking].to(meta.dtype)
        if r1 > n:
            out[max(r0, n) - r0:] = self._mean_row(j, name).to(meta.dtype)
        return out

    def _mean_row(self, j: int, name: str) -> torch.Tensor:
        """Input j's mean row over the vocabulary (mergekit's padding rows), one block at a time."""
        key = (j, name)
        if key not in self._pad_mean:
            n = len(self.v.tokens)
            step = self.block_rows(name)
            total = None
            for a in range(0, n, step):
                part = self.rows(j, name, a, min(a + step, n)).to(torch.float64).sum(dim=0)
                total = part if total is None else total + part
            self._pad_mean[key] = total / n
        return self._pad_mean[key]

    def block_rows(self, name: str) -> int:
        row = 1
        for s in self.sources[0].meta(name).shape[1:]:
            row *= s
        return max(1, _BLOCK_ELEMS // max(row, 1))


class VocabularyView(TensorSource):
    """One input model with its vocabulary tensors seen in the output vocabulary; its other
    tensors are its own."""

    def __init__(self, rows: VocabularyRows, index: int):
        self._rows, self._index = rows, index
        self.inner = rows.sources[index]
        self.label, self.path = self.inner.label, self.inner.path

    @property
    def folder(self) -> Path | None:
        return self.inner.folder

    def names(self):
        return self.inner.names()

    def meta(self, name):
        meta = self.inner.meta(name)
        if name not in self._rows.names:
            return meta
        return TensorMeta((self._rows.v.size, *meta.shape[1:]), meta.dtype)

    def read(self, name, start=0, stop=None):
        if name not in self._rows.names:
            return self.inner.read(name, start, stop)
        shape = self.meta(name).shape
        rows = self._rows
        if start == 0 and stop is None:
            step = rows.block_rows(name)
            return torch.cat([rows.rows(self._index, name, a, min(a + step, shape[0]))
                              for a in range(0, shape[0], step)])
        row = 1
        for s in shape[1:]:
            row *= s
        r0, r1 = start // row, -(-stop // row)
        block = rows.rows(self._index, name, r0, r1).reshape(-1)
        return block[start - r0 * row: stop - r0 * row]
