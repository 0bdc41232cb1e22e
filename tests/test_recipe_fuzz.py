"""Property-based fuzzing of the recipe parser: whatever text or data a recipe holds, parsing it
ends, soon, in a Recipe or a MergeError, never in another exception."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modalmerge.engine.recipe import load_recipe, parse_recipe, parse_yaml
from modalmerge.errors import MergeError
from modalmerge.methods.registry import METHODS, get_method

# texts are cheap to make: thousands; nested data is slow to generate: fewer (seconds in all)
FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
FUZZ_DATA = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)

FIELDS = ["method", "base", "models", "params", "include", "exclude", "dtype", "seed", "copy_files_from", "parts",
          "calibration", "source_format", "merge_method", "base_model", "parameters", "slices", "out_dtype",
          "tokenizer_source", "model", "path", "name", "weight", "density", "lambda", "optimizer_state",
          "normalize", "rescale", "callable", "file", "layers"]
METHOD_NAMES = list(METHODS) + ["ties", "dare_ties", "della", "linear", "slerp", "breadcrumbs", "nope"]

# pieces of YAML syntax, so that random texts reach deep into the parser, not just its first check
TOKENS = ["\n", "  ", "- ", ": ", "{", "}", "[", "]", ", ", "&a ", "*a", "&b ", "*b", "<<: ", "? ", "!!str ",
          "!!int ", "!!binary ", "!!set ", "!!python/object:os.system ", "|", ">", "'", '"', "#", "---", "...",
          "%YAML 1.1", "\t", "1e999", "0x1f", "2024-13-45", "2001-12-14t21:59:43.10-05:00", "~", "null", "true",
          "9" * 60, ".nan", "-.inf", "\\u0000", "\x00", "\ufeff", "é", "🙂"] + FIELDS + METHOD_NAMES

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12),
                    st.sampled_from(FIELDS + METHOD_NAMES), st.binary(max_size=8))
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8), st.integers(), st.booleans(), st.none())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


def parse_text(text: str) -> None:
    try:
        data = parse_yaml(text, "recipe")
        recipe = parse_recipe(data, "recipe")
        get_method(recipe.method).parse_params(recipe.params)
    except MergeError as e:
        assert "\n" not in str(e)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=40))
def test_yaml_like_texts_give_a_recipe_or_a_merge_error(pieces):
    parse_text("".join(pieces))


@FUZZ
@given(st.text(max_size=300))
def test_random_texts_give_a_recipe_or_a_merge_error(text):
    parse_text(text)


def recipe_or_one_line_error(data) -> None:
    """Parsing gives a recipe whose parameters validate, or a one-line MergeError: nothing else."""
    try:
        recipe = parse_recipe(data, "recipe")
        get_method(recipe.method).parse_params(recipe.params)
    except MergeError as e:
        assert "\n" not in str(e)


@FUZZ_DATA
@given(st.dictionaries(keys, values, max_size=8))
def test_random_mappings_give_a_recipe_or_a_merge_error(data):
    recipe_or_one_line_error(data)


@FUZZ_DATA
@given(st.sampled_from(["merge_method", "method"]), st.sampled_from(METHOD_NAMES), values, values, values)
def test_random_recipes_of_either_format_give_a_recipe_or_a_merge_error(key, method, models, params, extra):
    native = key == "method"
    recipe_or_one_line_error({key: method, "models": models, "params" if native else "parameters": params,
                              "base" if native else "base_model": extra})


@FUZZ_DATA
@given(values)
def test_dumped_data_round_trips_or_is_refused(data):
    """Valid YAML of any shape (as yaml itself writes it) through load_recipe's parser."""
    try:
        text = yaml.safe_dump({"method": "ties", "models": data})
    except yaml.YAMLError:
        return
    parse_text(text)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.binary(max_size=2048))
def test_random_bytes_in_a_recipe_file_are_a_merge_error(tmp_path_factory, raw):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_bytes(raw)
    try:
        load_recipe(path)
    except MergeError as e:
        assert "\n" not in str(e)
