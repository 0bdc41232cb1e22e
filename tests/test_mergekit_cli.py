"""`modalmerge merge` as a mergekit user types it: `mergekit-yaml CONFIG OUT` with mergekit 0.1.5's
common flags (mergekit/options.py), each with mergekit's meaning or a one-line note, and a model
card that keeps the user's own recipe text."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from conftest import cli_fails, load_sd
from modalmerge import merge
from modalmerge.cli import build_parser, main, parse_shard_size
from modalmerge.engine.recipe import load_recipe, parse_recipe
from modalmerge.errors import MergeError
from modalmerge.version import __version__

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# a mergekit recipe as a user writes it: comments, key order and spacing are the user's
MERGEKIT_TEXT = """\
# my TIES merge (a comment the card must keep)
merge_method: ties
base_model: {base}
models:
  - model: {ft0}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.4, density: 0.5}}
parameters:
  normalize: true
dtype: float32
"""


@pytest.fixture(scope="module")
def family(llama_family, tmp_path_factory):
    """The tiny Llama family, its base with tokenizer files (mergekit copies the base's)."""
    root = tmp_path_factory.mktemp("mk_cli")
    base = root / "base"
    shutil.copytree(llama_family["base"], base)
    (base / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    (base / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (base / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    return {**llama_family, "base": base}


def write_mergekit(tmp_path, family, name: str = "mk.yaml"):
    path = tmp_path / name
    path.write_text(MERGEKIT_TEXT.format(base=family["base"], ft0=family["ft0"], ft1=family["ft1"]))
    return path


def run_cli(capsys, argv: list[str]) -> str:
    """Run `modalmerge ARGV`, expect success; returns stderr."""
    code = main([*argv, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def same_tensors(a, b) -> None:
    sa, sb = load_sd(a), load_sd(b)
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ---------------------------------------------------------------- the positional output


def test_positional_output_is_the_same_as_dash_o(family, tmp_path, capsys):
    recipe = write_mergekit(tmp_path, family)
    run_cli(capsys, ["merge", str(recipe), str(tmp_path / "positional")])
    run_cli(capsys, ["merge", str(recipe), "-o", str(tmp_path / "dash_o")])
    run_cli(capsys, ["merge", str(recipe), "--output", str(tmp_path / "both"), str(tmp_path / "both")])
    # as click lets mergekit-yaml take it: options between CONFIG and OUT
    run_cli(capsys, ["merge", str(recipe), "--copy-tokenizer", str(tmp_path / "after_flag")])
    same_tensors(tmp_path / "positional", tmp_path / "dash_o")
    same_tensors(tmp_path / "positional", tmp_path / "both")
    same_tensors(tmp_path / "positional", tmp_path / "after_flag")
    assert (tmp_path / "positional" / "config.json").exists()


def test_two_different_outputs_are_one_error(family, tmp_path, capsys):
    recipe = write_mergekit(tmp_path, family)
    out, other = tmp_path / "a", tmp_path / "b"
    cli_fails(capsys, ["merge", str(recipe), str(out), "-o", str(other)], out, "two output folders", "give one")
    assert not other.exists()


def test_a_third_word_is_still_unrecognised(family, tmp_path, capsys):
    recipe = write_mergekit(tmp_path, family)
    with pytest.raises(SystemExit) as e:
        main(["merge", str(recipe), str(tmp_path / "a"), str(tmp_path / "b")])
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_positional_output_with_dry_run_writes_nothing(family, tmp_path, capsys):
    recipe = write_mergekit(tmp_path, family)
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--dry-run"]) == 0
    assert str(out) in capsys.readouterr().out
    assert not out.exists()


# ---------------------------------------------------------------- --copy-tokenizer


def test_copy_tokenizer_is_the_default_and_no_copy_leaves_the_tokenizer_out(family, tmp_path, capsys):
    recipe = write_mergekit(tmp_path, family)
    run_cli(capsys, ["merge", str(recipe), str(tmp_path / "default")])
    run_cli(capsys, ["merge", str(recipe), str(tmp_path / "copy"), "--copy-tokenizer"])
    run_cli(capsys, ["merge", str(recipe), str(tmp_path / "nocopy"), "--no-copy-tokenizer"])
    for name in TOKENIZER_FILES:
        assert (tmp_path / "default" / name).read_bytes() == (family["base"] / name).read_bytes()
        assert (tmp_path / "copy" / name).exists()
        assert not (tmp_path / "nocopy" / name).exists(), name
    # the config is no tokenizer file: still copied, and the tensors are the same
    assert (tmp_path / "nocopy" / "config.json").exists()
    same_tensors(tmp_path / "default", tmp_path / "nocopy")


# ---------------------------------------------------------------- --out-shard-size


@pytest.mark.parametrize("text, size", [("5B", 5 * 10**9), ("500M", 500 * 10**6), ("20k", 20_000),
                                        ("20K", 20_000), ("1234", 1234), ("0", 0)])
def test_shard_sizes_are_read_as_mergekit_reads_them(text, size):
    assert parse_shard_size(text) == size


def test_out_shard_size_splits_the_output(family, tmp_path, capsys):
    recipe = write_mergekit(tmp_path, family)
    run_cli(capsys, ["merge", str(recipe), str(tmp_path / "one")])
    run_cli(capsys, ["merge", str(recipe), str(tmp_path / "small"), "--out-shard-size", "20k"])
    run_cli(capsys, ["merge", str(recipe), str(tmp_path / "unlimited"), "--out-shard-size", "0"])
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    assert [p.name for p in (tmp_path / "unlimited").glob("*.safetensors")] == ["model.safetensors"]
    shards = sorted((tmp_path / "small").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "small" / "model.safetensors.index.json").exists()
    biggest_tensor = max(t.numel() * t.element_size() for t in load_sd(tmp_path / "one").values())
    for shard in shards:  # mergekit's rule: a shard passes the size only with a single tensor in it
        assert shard.stat().st_size <= max(20_000, biggest_tensor) + 4096, shard.name
    same_tensors(tmp_path / "one", tmp_path / "small")


def test_a_bad_shard_size_is_one_error(family, tmp_path, capsys):
    recipe = write_mergekit(tmp_path, family)
    out = tmp_path / "out"
    cli_fails(capsys, ["merge", str(recipe), str(out), "--out-shard-size", "5X"], out,
              "--out-shard-size '5X'", "5B or 500M")


# ---------------------------------------------------------------- --cuda


def test_cuda_means_device_cuda(family, tmp_path, capsys):
    recipe = write_mergekit(tmp_path, family)
    assert main(["merge", str(recipe), "--dry-run", "--cuda"]) == 0
    assert "on cuda" in capsys.readouterr().out  # the kernels line: where the arithmetic runs
    assert main(["merge", str(recipe), "--dry-run", "--cuda", "--device", "cuda:0"]) == 0
    assert "on cuda:0" in capsys.readouterr().out
    assert main(["merge", str(recipe), "--dry-run", "--no-cuda"]) == 0
    assert "on cuda" not in capsys.readouterr().out


def test_cuda_and_another_device_are_one_error(family, tmp_path, capsys):
    recipe = write_mergekit(tmp_path, family)
    out = tmp_path / "out"
    cli_fails(capsys, ["merge", str(recipe), str(out), "--cuda", "--device", "cpu"], out, "--cuda", "disagree")


# ---------------------------------------------------------------- flags with nothing to do here


def test_flags_with_nothing_to_do_here_print_a_note_and_change_nothing(family, tmp_path, capsys):
    recipe = write_mergekit(tmp_path, family)
    cache = tmp_path / "lora_cache"
    run_cli(capsys, ["merge", str(recipe), str(tmp_path / "plain")])
    err = run_cli(capsys, ["merge", str(recipe), str(tmp_path / "noted"), "--lazy-unpickle", "--allow-crimes",
                           "--lora-merge-cache", str(cache)])
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 3, err
    for flag, why in [("--lazy-unpickle", "lazily"), ("--allow-crimes", "architectures"),
                      ("--lora-merge-cache", "each tensor")]:
        assert any(flag in n and why in n for n in notes), (flag, notes)
    assert not cache.exists()
    same_tensors(tmp_path / "plain", tmp_path / "noted")
    # their negations are the defaults: no note
    err = run_cli(capsys, ["merge", str(recipe), str(tmp_path / "negated"), "--no-lazy-unpickle",
                           "--no-allow-crimes"])
    assert "note:" not in err


def test_trust_remote_code_flags(family, tmp_path, capsys):
    parser = build_parser()
    assert parser.parse_args(["merge", "r.yaml", "--trust-remote-code"]).trust_remote_code is True
    assert parser.parse_args(["merge", "r.yaml"]).trust_remote_code is False
    assert parser.parse_args(["merge", "r.yaml", "--trust-remote-code",
                              "--no-trust-remote-code"]).trust_remote_code is False
    # as in mergekit, it only allows code; a merge that runs none is the same with it
    recipe = write_mergekit(tmp_path, family)
    run_cli(capsys, ["merge", str(recipe), str(tmp_path / "trusted"), "--trust-remote-code"])
    run_cli(capsys, ["merge", str(recipe), str(tmp_path / "plain")])
    same_tensors(tmp_path / "trusted", tmp_path / "plain")


# ---------------------------------------------------------------- the model card


def test_card_keeps_the_mergekit_text_the_version_and_the_translation(family, tmp_path, capsys):
    recipe = write_mergekit(tmp_path, family)
    out = tmp_path / "out"
    run_cli(capsys, ["merge", str(recipe), str(out)])
    card = (out / "README.md").read_text()
    assert recipe.read_text().rstrip("\n") in card  # verbatim, comment included
    assert f"modalmerge {__version__}" in card
    assert "## Native translation" in card and "method: ties" in card
    assert card.index(recipe.read_text().rstrip("\n")) < card.index("## Native translation")


def test_card_of_a_native_recipe_is_its_text_without_translation(family, tmp_path, capsys):
    text = (f"# averaged\nmethod: linear\nmodels:\n  - {family['ft0']}\n  - {family['ft1']}\n"
            f"copy_files_from: {family['base']}\n")
    recipe = tmp_path / "native.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    run_cli(capsys, ["merge", str(recipe), str(out)])
    card = (out / "README.md").read_text()
    assert text.rstrip("\n") in card and f"modalmerge {__version__}" in card
    assert "Native translation" not in card


def test_card_of_a_mapping_is_its_yaml_dump(family, tmp_path):
    out = tmp_path / "out"
    merge({"method": "linear", "models": [str(family["ft0"]), str(family["ft1"])]}, out)
    card = (out / "README.md").read_text()
    assert "method: linear" in card and f"modalmerge {__version__}" in card
    assert "Native translation" not in card


def test_a_mergekit_mapping_keeps_its_own_form_in_the_card(family, tmp_path):
    mapping = yaml.safe_load(MERGEKIT_TEXT.format(base=family["base"], ft0=family["ft0"], ft1=family["ft1"]))
    out = tmp_path / "out"
    merge(mapping, out)
    card = (out / "README.md").read_text()
    assert "merge_method: ties" in card and "## Native translation" in card
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == mapping


def test_mergekit_config_yml_is_the_recipe_as_written(family, tmp_path, capsys):
    # mergekit-yaml writes it beside its card; tools that read merges look for it
    recipe = write_mergekit(tmp_path, family)
    out = tmp_path / "out"
    run_cli(capsys, ["merge", str(recipe), str(out)])
    assert (out / "mergekit_config.yml").read_text() == recipe.read_text()
    native = tmp_path / "native"
    merge({"method": "linear", "models": [str(family["ft0"]), str(family["ft1"])]}, native)
    assert not (native / "mergekit_config.yml").exists()  # a native recipe is no mergekit config


def test_no_write_model_card(family, tmp_path, capsys):
    recipe = write_mergekit(tmp_path, family)
    run_cli(capsys, ["merge", str(recipe), str(tmp_path / "card"), "--write-model-card"])
    run_cli(capsys, ["merge", str(recipe), str(tmp_path / "nocard"), "--no-write-model-card"])
    assert (tmp_path / "card" / "README.md").exists()
    assert not (tmp_path / "nocard" / "README.md").exists()
    assert not (tmp_path / "nocard" / "mergekit_config.yml").exists()  # as mergekit: with the card only
    same_tensors(tmp_path / "card", tmp_path / "nocard")


def test_the_recipe_text_is_no_part_of_the_recipe(family, tmp_path):
    recipe = write_mergekit(tmp_path, family)
    loaded = load_recipe(recipe)
    assert loaded.source_text == recipe.read_text()
    assert loaded == parse_recipe(yaml.safe_load(recipe.read_text())).resolve_paths(recipe.parent)
    assert "source_text" not in loaded.model_dump() and "source_text" not in repr(loaded)
    with pytest.raises(MergeError, match="unknown field 'source_text'"):
        parse_recipe({"method": "linear", "models": ["a", "b"], "source_text": "x"})


# ---------------------------------------------------------------- where the flags do not apply


def test_output_flags_on_a_continual_merge_are_one_error(tmp_path, capsys):
    out = tmp_path / "out"
    for flag in ("--no-copy-tokenizer", "--no-write-model-card"):
        cli_fails(capsys, ["merge", "--continual", str(tmp_path / "prev"), "--add", str(tmp_path / "m"), "-o",
                           str(out), flag], out, flag)
    cli_fails(capsys, ["merge", "--continual", str(tmp_path / "prev"), "--add", str(tmp_path / "m"), "-o",
                       str(out), "--out-shard-size", "1M"], out, "--out-shard-size")


def test_output_options_of_a_method_that_writes_its_own_way_are_refused(family, tmp_path, capsys):
    # opcm (a sequential merge) writes its folder through the continual procedure
    recipe = tmp_path / "opcm.yaml"
    recipe.write_text(yaml.safe_dump({"method": "opcm", "base": str(family["base"]),
                                      "models": [str(family["ft0"]), str(family["ft1"])]}))
    out = tmp_path / "out"
    for flag in ("--no-copy-tokenizer", "--no-write-model-card"):
        cli_fails(capsys, ["merge", str(recipe), str(out), flag], out, "method opcm", flag)
    cli_fails(capsys, ["merge", str(recipe), str(out), "--out-shard-size", "1M"], out, "method opcm",
              "--out-shard-size")
