"""A recipe's tokenizer settings applied to its opened models, before the plan is built.

With `tokenizer_source` / `tokenizer`, every input model (the base too) is replaced by a view
that presents its embedding and LM-head tensors in the output vocabulary
(checkpoint/vocabulary.py), so the plan and the executor see models of one shape and need not
know about vocabularies. Which tensors those are is architecture knowledge: the tensors the
architecture spec calls embeddings whose rows are the config's vocabulary size.

Without tokenizer settings, models whose vocabulary tensors differ in rows are refused here with
an error naming `tokenizer_source`, rather than with a shape mismatch later.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.hub import reference_folder
from ..checkpoint.sources import TensorSource
from ..checkpoint.vocabulary import (Participant, TokenizerSettings, Vocabulary, VocabularyRows, build_vocabulary,
                                     config_vocab_size)
from ..errors import MergeError
from ..methods.registry import get_method
from .architectures import Describer, spec_for
from .plan import read_model_type
from .recipe import Recipe


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
    if method.runs != "streaming":
        field = "chat_template" if settings is None else "tokenizer_source"
        raise MergeError(f"`{field}` is not supported for method {method.name} (it writes its output its own "
                         "way); remove it")
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
