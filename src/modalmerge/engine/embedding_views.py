"""A recipe's tokenizer settings applied to its opened models, before the plan is built.

With `tokenizer_source` / `tokenizer`, every input model (the base too) is replaced by a view
that presents its embedding and LM-head tensors in the output vocabulary
(checkpoint/vocabulary.py), so the plan and the executor see models of one shape and need not
know about vocabularies. Which tensors those are is architecture knowledge: the tensors the
architecture spec calls embeddings whose rows are the config's vocabulary size.

Without tokenizer settings, models whose vocabulary tensors differ in rows are refused here with
an error naming `tokenizer_source`, rather than with a shape mismatch later.

A `slices:` recipe (its models are layer stacks, checkpoint/layer_views.py) gets its vocabulary as
mergekit builds it: the tokenizer from every model the slices name and the recipe's base model;
each vocabulary tensor's missing rows filled from the models that tensor comes from (the first
slice's for the embeddings, the last slice's for the LM head), preferring the slice's base.

Procedures that do not stream a merge of folders take only what they can apply
(`check_tokenizer_fields`): the others refuse the field, naming the method and the reason.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.hub import reference_folder
from ..checkpoint.layer_views import LayerStack
from ..checkpoint.sources import TensorSource
from ..checkpoint.vocabulary import (Participant, TokenizerSettings, Vocabulary, VocabularyRows, build_vocabulary,
                                     config_vocab_size)
from ..errors import MergeError
from ..methods.registry import get_method
from .architectures import Describer, spec_for
from .plan import read_model_type
from .recipe import Recipe


# why a procedure cannot map its models' rows into a rebuilt vocabulary (`tokenizer_source`, `tokenizer`)
_NO_VOCABULARY = {
    "composed": "it splits each model folder into its language model and modality parts and keeps decoupled "
                "masks over the base model's own tensors (for `modalmerge extract` and the routed runtime), "
                "which a rebuilt vocabulary would no longer match",
    "sequential": "its continual/ state (the running delta that `modalmerge continual-add` extends later, "
                  "reading each new model in its own vocabulary) cannot be kept in a rebuilt vocabulary",
    "whole_model": "it loads one whole model folder and runs it on calibration data, then saves that model "
                   "and copies its tokenizer files as they are",
}
# procedures whose output folder is written by engine/sinks.FolderSink, which writes a chat template
_WRITES_TEMPLATE = ("streaming", "composed", "sequential")


def check_tokenizer_fields(recipe: Recipe, runs: str, method: str) -> None:
    """Refuse, before any work, a tokenizer field the method's procedure cannot apply: one line
    naming the field, the method and why."""
    settings = "tokenizer_source" if recipe.tokenizer_source is not None else \
        "tokenizer" if recipe.tokenizer is not None else None
    if settings and runs in _NO_VOCABULARY:
        raise MergeError(f"`{settings}` is not supported for method {method}: {_NO_VOCABULARY[runs]}; remove it, "
                         "or merge with models of one vocabulary")
    if recipe.chat_template is not None and runs not in _WRITES_TEMPLATE:
        raise MergeError(f"`chat_template` is not supported for method {method}: {_NO_VOCABULARY[runs]}; remove "
                         "it, and set the template in the output's tokenizer_config.json afterwards")


def tokenizer_settings(recipe: Recipe) -> TokenizerSettings | None:
    if recipe.tokenizer_source is not None and recipe.tokenizer is not None:
        raise MergeError("the recipe sets both `tokenizer_source` and `tokenizer`; keep one (`tokenizer.source` is "
                         "the same setting)")
    if recipe.tokenizer is not None:
        return recipe.tokenizer
    if recipe.tokenizer_source is not None:
        return TokenizerSettings(source=recipe.tokenizer_source)
    return None


def embedding_names(reference: TensorSource) -> list[str]:
    """The reference model's tensors the architecture spec calls embeddings (2-D or more)."""
    describer = Describer(spec_for(read_model_type(reference.folder)))
    return [n for n in reference.names()
            if len(reference.meta(n).shape) >= 2 and describer.describe(n, reference.meta(n).shape).kind == "embedding"]


def align_vocabularies(recipe: Recipe, base: TensorSource | None, models: list[TensorSource],
                       trust_remote_code: bool = False
                       ) -> tuple[TensorSource | None, list[TensorSource], Vocabulary | None]:
    """The inputs as the merge reads them, and the output vocabulary (None when the recipe sets
    neither tokenizer settings nor a chat template)."""
    settings = tokenizer_settings(recipe)
    reference = base if base is not None else models[0]
    inputs = ([base] if base is not None else []) + list(models)
    if settings is None:
        _check_same_vocabulary(reference, inputs)
    if settings is None and recipe.chat_template is None:
        return base, models, None
    method = get_method(recipe.method)
    check_tokenizer_fields(recipe, method.runs, method.name)
    refs = ([recipe.base] if base is not None else []) + [m.path for m in recipe.models]
    participants = [Participant(src.label, ref, src.folder) for src, ref in zip(inputs, refs)]
    base_ref = recipe.base or recipe.copy_files_from
    base_folder: Path | None = None
    if base_ref is None:
        base_index, prefer_base = 0, False           # mergekit: no base_model, its first model's tokenizer
    else:
        base_index = next((i for i, r in enumerate(refs) if r == base_ref), None)
        prefer_base = base_index is not None
        if base_index is None:
            base_folder = reference_folder(base_ref, "copy_files_from")
    donor = reference_folder(recipe.copy_files_from, "copy_files_from") if recipe.copy_files_from \
        else reference.folder
    vocabulary = build_vocabulary(settings, recipe.chat_template, participants, base_index, base_folder,
                                  prefer_base, donor, trust_remote_code)
    if not vocabulary.remaps:
        return base, models, vocabulary
    size, _ = config_vocab_size(reference.folder)
    if size is None:
        raise MergeError(f"model {reference.label!r}: its config.json gives no `vocab_size`, so its vocabulary "
                         "tensors cannot be found; add it")
    names = [n for n in embedding_names(reference) if reference.meta(n).shape[0] == size]
    if not names:
        raise MergeError(f"model {reference.label!r} has no embedding tensor with vocab_size ({size}) rows; "
                         "remove the tokenizer settings, or fix the config's vocab_size")
    rows = VocabularyRows(vocabulary, inputs, names)
    views = [rows.view(i) for i in range(len(inputs))]
    if base is not None:
        return views[0], views[1:], vocabulary
    return None, views, vocabulary


def _check_same_vocabulary(reference: TensorSource, inputs: list[TensorSource]) -> None:
    """Vocabulary tensors (embeddings with the config's vocab_size rows) of one row count."""
    size, _ = config_vocab_size(reference.folder)
    for name in embedding_names(reference) if size is not None else []:
        shape = reference.meta(name).shape
        if shape[0] != size:
            continue
        for src in inputs:
            if name in src:
                other = src.meta(name).shape
                if other[0] != shape[0] and other[1:] == shape[1:]:
                    raise MergeError(f"tensor {name!r} has {other[0]} vocabulary rows in model {src.label!r} but "
                                     f"{shape[0]} in {reference.label!r}: the models' vocabularies differ; set "
                                     "`tokenizer_source: union` (or base, or a model) in the recipe to map every "
                                     "model's rows into one vocabulary")


def align_slice_vocabularies(recipe: Recipe, base: LayerStack | None, models: list[LayerStack],
                             trust_remote_code: bool = False
                             ) -> tuple[TensorSource | None, list[TensorSource], Vocabulary | None]:
    """align_vocabularies for a layer stack (engine/slices.open_slices's views and its expanded
    recipe), as mergekit plans a `slices:` recipe: the output tokenizer is built from every model
    the slices name plus the recipe's base model (`copy_files_from`, mergekit's `base_model`: the
    tokenizer base; without one, the first slice's base or first source, where mergekit takes the
    first of a set in hash order); each vocabulary tensor's missing rows are filled from the
    models that tensor comes from (the first slice's for the embeddings, the last slice's for the
    head), preferring the slice's base, else the recipe's base model when it is one of them."""
    settings = tokenizer_settings(recipe)
    inputs: list[LayerStack] = ([base] if base is not None else []) + list(models)
    names = _stack_vocabulary_names(inputs[0])
    if settings is None:
        _check_same_rows(inputs, names)
        if recipe.chat_template is None:
            return base, models, None
    participants: list[Participant] = []
    index_of: dict[int, int] = {}    # id(opened model) -> participant
    for k, entry in enumerate(recipe.slices):
        refs = ([entry.base.path] if base is not None else []) + [s.path for s in entry.sources]
        for view, ref in zip(inputs, refs):
            src = view.pieces[k].source
            if id(src) not in index_of:
                index_of[id(src)] = len(participants)
                participants.append(Participant(src.label, ref, src.folder))
    top = recipe.copy_files_from
    base_index = 0
    if top is not None:
        found = [i for i, p in enumerate(participants) if p.reference == top]
        if not found:
            participants.append(Participant(Path(top).name or top, top, reference_folder(top, "copy_files_from")))
        base_index = found[0] if found else len(participants) - 1
    donor = reference_folder(top, "copy_files_from") if top else inputs[0].folder
    vocabulary = build_vocabulary(settings, recipe.chat_template, participants, base_index, None, False, donor,
                                  trust_remote_code, fill=False)
    if not vocabulary.remaps:
        return base, models, vocabulary
    if not names:
        raise MergeError(f"model {inputs[0].label!r} has no embedding tensor with its config's vocab_size rows; "
                         "remove the tokenizer settings, or fix the config's vocab_size")
    groups: dict[tuple[int, ...], list[str]] = {}   # the models a tensor comes from -> its names
    for name in names:
        groups.setdefault(tuple(index_of[id(view.origin(name)[0])] for view in inputs), []).append(name)
    views: list[TensorSource] = list(inputs)
    top_index = base_index if top is not None else None
    for indices, group in groups.items():
        prefer = 0 if base is not None else (indices.index(top_index) if top_index in indices else None)
        which = "first" if inputs[0].is_pre(group[0]) else "last"
        shown = ", ".join(repr(n) for n in group)
        filled = vocabulary.for_inputs(list(indices), prefer, f"the {which} slice's models, which "
                                       f"{'tensor' if len(group) == 1 else 'tensors'} {shown} "
                                       f"{'comes' if len(group) == 1 else 'come'} from")
        rows = VocabularyRows(filled, views, group)
        views = [rows.view(i) for i in range(len(inputs))]
        vocabulary.by_tensors.append((group, filled))
    if base is not None:
        return views[0], views[1:], vocabulary
    return None, views, vocabulary


def _stack_vocabulary_names(reference: LayerStack) -> list[str]:
    """The stack's embeddings outside its blocks whose rows are the vocab_size of the model they
    come from (the first slice's embeddings, the last slice's head)."""
    out = []
    for name in embedding_names(reference):
        src, own = reference.origin(name)
        size, _ = config_vocab_size(src.folder)
        if size is not None and src.meta(own).shape[0] == size:
            out.append(name)
    return out


def _check_same_rows(inputs: list[TensorSource], names: list[str]) -> None:
    for name in names:
        shape = inputs[0].meta(name).shape
        for src in inputs[1:]:
            other = src.meta(name).shape if name in src else shape
            if other[0] != shape[0]:
                raise MergeError(f"tensor {name!r} has {other[0]} vocabulary rows in model {src.label!r} but "
                                 f"{shape[0]} in {inputs[0].label!r}: the models' vocabularies differ; set "
                                 "`tokenizer_source: union` (or base, or a model) in the recipe to map every "
                                 "model's rows into one vocabulary")


def chat_template_vocabulary(recipe: Recipe, inputs: list[TensorSource], donor: Path | None,
                             trust_remote_code: bool = False) -> Vocabulary | None:
    """The output tokenizer of a procedure that keeps its models' vocabulary (the composed one):
    the donor's, with the recipe's chat template (None without one)."""
    if recipe.chat_template is None:
        return None
    participants = [Participant(src.label, None, src.folder) for src in inputs]
    return build_vocabulary(None, recipe.chat_template, participants, None, None, False, donor, trust_remote_code)
