"""Recipes from someone else: no code runs without consent, parsing is bounded, types are strict,
and a field the method does not apply is an error. Every failure is one `error:` line, exit 1,
no traceback, nothing at --output."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import modalmerge
from conftest import cli_fails as fails, finetunes, random_state_dict
from modalmerge.checkpoint.safetensors_io import save_file
from modalmerge.cli import main
from modalmerge.errors import MergeError

CALLED = "modalmerge-test-callable-was-called"


# -- the calibration callables these recipes name ------------------------------------------------

def batches(n: int = 4, marker: str | None = None):
    """A calibration callable; writes `marker` when called, so a test can tell it never ran."""
    if marker:
        Path(marker).write_text(CALLED)
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 20, (2, 5), generator=g), "labels": torch.tensor([0, 1])}
            for _ in range(n // 2)]


def not_iterable():
    return 42


def raises():
    raise RuntimeError("no data today")


def raises_while_iterating():
    yield {"input_ids": torch.ones(1, 3, dtype=torch.long)}
    raise ValueError("the generator broke")


# -- helpers -------------------------------------------------------------------------------------

def save_model(folder: Path, sd: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def fam(tmp_path):
    base = random_state_dict(0)
    a, b = finetunes(base, 2)
    return {n: save_model(tmp_path / n, sd) for n, sd in (("base", base), ("a", a), ("b", b))}


def native(fam, method="ties", **over):
    data = {"method": method, "base": str(fam["base"]),
            "models": [{"path": str(fam["a"]), "name": "a"}, {"path": str(fam["b"]), "name": "b"}]}
    data.update(over)
    return data


def write(tmp_path: Path, data, name="r.yaml") -> Path:
    p = tmp_path / name
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def merge_fails(capsys, tmp_path, data, *fragments, extra=()) -> str:
    out = tmp_path / "out"
    return fails(capsys, ["merge", str(write(tmp_path, data)), "-o", str(out), "--no-progress", *extra], out,
                 *fragments)


# -- 4. no code without consent ------------------------------------------------------------------

def callable_recipe(fam, tmp_path, method="fisher", target="test_recipe_safety:batches"):
    return native(fam, method, calibration={"callable": target, "marker": str(tmp_path / "called")})


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_calibration_callable_needs_trust_recipe_code(fam, tmp_path, capsys, dry_run):
    extra = ("--dry-run",) if dry_run else ()
    merge_fails(capsys, tmp_path, callable_recipe(fam, tmp_path), "model 'a'", "test_recipe_safety:batches",
                "--trust-recipe-code", extra=extra)
    assert not (tmp_path / "called").exists()  # refused before it was imported or called


def test_os_system_in_a_recipe_is_never_run(fam, tmp_path, capsys):
    marker = tmp_path / "pwned"
    data = native(fam, "regmean", calibration={"callable": "os:system", "command": f"touch {marker}"})
    merge_fails(capsys, tmp_path, data, "'os:system'", "--trust-recipe-code")
    assert not marker.exists()


def test_a_trusted_callable_is_accepted(fam, tmp_path, capsys):
    r = write(tmp_path, callable_recipe(fam, tmp_path))
    assert main(["merge", str(r), "--dry-run", "--trust-recipe-code"]) == 0
    assert "data pass   fisher" in capsys.readouterr().out
    p = modalmerge.plan(callable_recipe(fam, tmp_path), trust_recipe_code=True)
    assert p.trust_recipe_code and not p.trust_remote_code


def test_the_python_api_needs_trust_recipe_code_too(fam, tmp_path):
    with pytest.raises(MergeError, match="trust_recipe_code=True"):
        modalmerge.merge(callable_recipe(fam, tmp_path), tmp_path / "out")
    with pytest.raises(MergeError, match="trust_recipe_code=True"):
        modalmerge.plan(callable_recipe(fam, tmp_path))
    assert not (tmp_path / "out").exists() and not (tmp_path / "called").exists()


def test_msmoe_calibration_callable_needs_trust_recipe_code(fam, tmp_path, capsys):
    fails(capsys, ["msmoe", str(fam["a"]), "--calibration-callable", "test_recipe_safety:batches", "--dry-run"],
          None, "--trust-recipe-code")


def test_load_batches_refuses_an_untrusted_callable():
    from modalmerge.procedures.calibration import CalibrationSpec, load_batches

    spec = CalibrationSpec.model_validate({"callable": "test_recipe_safety:batches"})
    with pytest.raises(MergeError, match="trust-recipe-code"):
        load_batches(spec)
    assert len(load_batches(spec, trust_recipe_code=True)) == 2


def auto_map_config(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom-thing", "architectures": ["CustomThingModel"],
        "auto_map": {"AutoConfig": "modeling_custom.CustomConfig", "AutoModel": "modeling_custom.CustomThingModel"}}))


def test_remote_code_in_a_model_folder_needs_trust_remote_code(fam, tmp_path, capsys):
    auto_map_config(fam["b"])
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": [1, 2, 3], "label": 0}) for _ in range(2)))
    r = native(fam, "fisher", calibration={"file": str(data), "loader": "tokens"})
    for extra in ((), ("--dry-run",)):
        merge_fails(capsys, tmp_path, r, "model 'b'", "auto_map", "--trust-remote-code", extra=extra)
    with pytest.raises(MergeError, match="trust_remote_code=True"):
        modalmerge.plan(r)
    # with the flag the trust check is passed (the folder's code itself is not there: dry run only)
    assert main(["merge", str(write(tmp_path, r)), "--dry-run", "--trust-remote-code"]) == 0
    assert modalmerge.plan(r, trust_remote_code=True).trust_remote_code
    # a method that does not load the model with transformers does not run the code: no flag needed
    assert main(["merge", str(write(tmp_path, native(fam, "ties"))), "--dry-run"]) == 0


def test_load_composed_refuses_remote_code(tmp_path):
    from modalmerge.procedures.calibration import check_remote_code, remote_code_file

    auto_map_config(tmp_path)
    assert remote_code_file(tmp_path) == "config.json"
    with pytest.raises(MergeError, match="--trust-remote-code"):
        check_remote_code(tmp_path, "model 'x'", trusted=False)
    check_remote_code(tmp_path, "model 'x'", trusted=True)
    import inspect

    from modalmerge.runtime.composed import load_composed
    assert inspect.signature(load_composed).parameters["trust_remote_code"].default is False


# -- calibration callables that misbehave: one line naming the callable ---------------------------

@pytest.mark.parametrize("target,message", [
    ("not_iterable", "returned a int, not an iterable of batches"),
    ("raises", "raised RuntimeError (no data today)"),
    ("raises_while_iterating", "raised ValueError (the generator broke) while giving batches"),
])
def test_a_misbehaving_callable_is_one_line(fam, tmp_path, capsys, target, message):
    data = native(fam, "fisher", calibration={"callable": f"test_recipe_safety:{target}"})
    merge_fails(capsys, tmp_path, data, f"'test_recipe_safety:{target}'", message, extra=("--trust-recipe-code",))


# -- 6. recipes are parsed with bounds -----------------------------------------------------------

ALIAS_BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)])


def test_an_alias_bomb_is_refused(fam, tmp_path, capsys):
    # 9^9 (387 million) values once expanded; refused from the node graph before any is built
    data = yaml.safe_dump(native(fam)) + "calibration:\n  callable: x:y\n  " + ALIAS_BOMB.replace("\n", "\n  ")
    merge_fails(capsys, tmp_path, data, "aliases", "expand")
    merge_fails(capsys, tmp_path, data, "aliases", extra=("--dry-run",))


def test_aliases_within_bounds_still_work(fam, tmp_path, capsys):
    text = (f"method: ties\nbase: &base {fam['base']}\nmodels: [{fam['a']}, {fam['b']}]\n"
            "params: &p {density: 0.5}\ncopy_files_from: *base\n")
    r = write(tmp_path, text)
    assert main(["merge", str(r), "--dry-run"]) == 0
    assert '"density": 0.5' in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder"])
def test_a_recipe_that_is_not_a_regular_file_is_refused_without_hanging(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "r.yaml"
        os.mkfifo(path)
    elif kind == "dev_zero":
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero here")
    else:
        path = tmp_path
    # a subprocess, so that a regression hangs no longer than the timeout
    run = subprocess.run([sys.executable, "-m", "modalmerge", "merge", str(path), "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in run.stderr
    assert ("a folder" if kind == "folder" else "not a regular file") in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_recipe_over_the_size_limit_is_refused(tmp_path, capsys):
    from modalmerge.engine.recipe import MAX_RECIPE_BYTES

    r = write(tmp_path, "# " + "x" * MAX_RECIPE_BYTES + "\nmethod: ties\n")
    fails(capsys, ["merge", str(r), "--dry-run"], None, "bytes, more than the")


@pytest.mark.parametrize("text", ["[" * 20000 + "]" * 20000, "{a: " * 20000 + "1" + "}" * 20000,
                                  "".join(f"{' ' * i}k{i}:\n" for i in range(400)) + " " * 400 + "v"],
                         ids=["sequences", "mappings", "block"])
def test_deep_nesting_is_refused(tmp_path, capsys, text):
    fails(capsys, ["merge", str(write(tmp_path, text)), "--dry-run"], None, "nested more than")


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_are_one_line(tmp_path, capsys, seed):
    data = random.Random(seed).randbytes(4096)
    fails(capsys, ["merge", str(write(tmp_path, data)), "-o", str(tmp_path / "out")], tmp_path / "out", "recipe")


@pytest.mark.parametrize("text,fragment", [
    ("method: ties\nmethod: linear\nmodels: [a]\n", "appears twice"),
    ("a: !!python/object/apply:os.system [touch x]\n", "invalid YAML"),
    ("method: ties\nmodels: [a]\nseed: 2024-13-45\n", "invalid YAML value"),
    ("\x00method: ties\n", "not allowed in YAML"),
    ("a: &a [*a]\n", "recursive alias"),
    ("", "not a recipe"),
])
def test_odd_yaml_is_one_line(tmp_path, capsys, text, fragment):
    fails(capsys, ["merge", str(write(tmp_path, text)), "--dry-run"], None, fragment)
    assert not (tmp_path / "x").exists()


# -- strict types ---------------------------------------------------------------------------------

@pytest.mark.parametrize("over,fragment", [
    ({"params": {"density": True}}, "density"),
    ({"params": {"density": "0.5"}}, "density"),
    ({"params": {"lambda": False}}, "lambda"),
    ({"seed": "3"}, "seed"),
    ({"seed": 3.5}, "seed"),
    ({"models": [{"path": "x", "weight": True}, {"path": "y"}]}, "weight"),
    ({"models": [{"path": "x", "weight": "2"}, {"path": "y"}]}, "weight"),
    ({"models": [{"path": "x", "name": 7}, {"path": "y"}]}, "name"),
])
def test_types_are_strict(fam, tmp_path, capsys, over, fragment):
    merge_fails(capsys, tmp_path, native(fam, **over), fragment)


def test_per_model_bool_for_a_number_is_refused(fam, tmp_path, capsys):
    data = native(fam)
    data["models"][0]["params"] = {"density": True}
    merge_fails(capsys, tmp_path, data, "density")


def test_mergekit_bool_density_and_string_flags_are_refused(fam, tmp_path, capsys):
    mk = {"merge_method": "ties", "base_model": str(fam["base"]),
          "models": [{"model": str(fam["a"]), "parameters": {"density": True, "weight": 1.0}}]}
    merge_fails(capsys, tmp_path, mk, "density")
    mk["models"][0]["parameters"]["density"] = 0.5
    mk["parameters"] = {"normalize": "yes"}
    merge_fails(capsys, tmp_path, mk, "'normalize' must be true or false")


# -- fields the method does not use -----------------------------------------------------------------

@pytest.mark.parametrize("case,fragments", [
    ("top calibration on ties", ("`calibration` is not used by method ties",)),
    ("model calibration on ties", ("model 'a'", "`calibration` is not used by method ties")),
    ("optimizer_state on ties", ("model 'a'", "`optimizer_state` is not used")),
    ("parts on ties", ("`parts` is not used by method ties",)),
    ("weight on slerp", ("model 'a'", "`weight` is not used by method slerp")),
    ("calibration on a frank without fit", ("`calibration` is not used by method frank",)),
    ("top calibration shadowed", ("top-level `calibration` is not used",)),
    ("source_format", ("'source_format'",)),
])
def test_a_field_the_method_does_not_use_is_an_error(fam, tmp_path, capsys, case, fragments):
    cal = {"file": "d.jsonl"}
    data = native(fam)
    if case == "top calibration on ties":
        data["calibration"] = cal
    elif case == "model calibration on ties":
        data["models"][0]["calibration"] = cal
    elif case == "optimizer_state on ties":
        data["models"][0]["optimizer_state"] = "v.safetensors"
    elif case == "parts on ties":
        data["parts"] = {"llm": "layers.*"}
    elif case == "weight on slerp":
        data = native(fam, "slerp", base=None)
        data["models"][0]["weight"] = 0.3
    elif case == "calibration on a frank without fit":
        data = native(fam, "frank", params={"a": 0.3}, calibration=cal)
    elif case == "top calibration shadowed":
        data = native(fam, "fisher", calibration=cal)
        for m in data["models"]:
            m["calibration"] = cal
    elif case == "source_format":
        data["source_format"] = "mergekit"
    merge_fails(capsys, tmp_path, data, *fragments)


# tokenizer_source, tokenizer and chat_template are applied now (issue 13, item 1: tests/test_tokenizer_merge.py)
@pytest.mark.parametrize("field,value", [("name", "stage1")])
def test_mergekit_fields_not_implemented_are_errors(fam, tmp_path, capsys, field, value):
    mk = {"merge_method": "ties", "base_model": str(fam["base"]),
          "models": [{"model": str(fam["a"]), "parameters": {"density": 0.5, "weight": 1.0}}], field: value}
    msg = merge_fails(capsys, tmp_path, mk, f"mergekit field {field!r}")
    if field != "name":
        assert "not implemented yet; remove it" in msg and ("tokenizer" in msg or "chat template" in msg)


def test_mergekit_arithmetic_dtype_is_not_ignored(fam, tmp_path, capsys):
    mk = {"merge_method": "ties", "base_model": str(fam["base"]), "dtype": "bfloat16", "out_dtype": "float16",
          "models": [{"model": str(fam["a"]), "parameters": {"density": 0.5, "weight": 1.0}}]}
    merge_fails(capsys, tmp_path, mk, "mergekit `dtype` 'bfloat16'", "computes in float32")
    mk["dtype"] = "float32"  # what modalmerge does anyway
    assert main(["merge", str(write(tmp_path, mk)), "--dry-run"]) == 0


def test_mergekit_model_entry_fields_are_checked(fam, tmp_path, capsys):
    mk = {"merge_method": "ties", "base_model": str(fam["base"]),
          "models": [{"model": str(fam["a"]), "parameters": {"density": 0.5}, "lora": "x"}]}
    merge_fails(capsys, tmp_path, mk, "unknown field 'lora'")
    mk["models"] = [{"model": {"path": str(fam["a"])}}]
    merge_fails(capsys, tmp_path, mk, "must be a model path")
    mk["models"] = [{"model": str(fam["a"]), "parameters": ["density", 0.5]}]
    merge_fails(capsys, tmp_path, mk, "must be a mapping")


# -- 7. model names that become folder names ---------------------------------------------------------

@pytest.fixture(scope="module")
def mllm(tmp_path_factory):
    from tiny_mllm import build_family

    return build_family(tmp_path_factory.mktemp("names") / "models")


@pytest.mark.parametrize("names,fragment", [
    (("..", "audio"), "'..'"),
    (("a/b", "audio"), "'a/b'"),
    ((".hidden", "audio"), "'.hidden'"),
    (("x" * 101, "audio"), "at most 100"),
    (("Vision", "vision"), "differ only in case"),
])
def test_mmer_model_names_are_checked_before_any_work(mllm, tmp_path, capsys, names, fragment):
    from tiny_mllm import recipe

    data = recipe(mllm, ("vision", "audio"))
    for entry, name in zip(data["models"], names):
        entry["name"] = name
    msg = merge_fails(capsys, tmp_path, data, fragment)
    assert "name" in msg
    merge_fails(capsys, tmp_path, data, fragment, extra=("--dry-run",))


@pytest.mark.parametrize("method", ["tall", "emr"])
def test_decoupled_model_names_are_checked(fam, tmp_path, method):
    with pytest.raises(MergeError, match="differ only in case"):
        modalmerge.plan(native(fam, method, models=[{"path": str(fam["a"]), "name": "Math"},
                                                    {"path": str(fam["b"]), "name": "math"}]))
    with pytest.raises(MergeError, match="'a b'"):
        modalmerge.plan(native(fam, method, models=[{"path": str(fam["a"]), "name": "a b"},
                                                    {"path": str(fam["b"]), "name": "b"}]))
    # a plain, safe name still works, and a non-decoupled method keeps any name
    modalmerge.plan(native(fam, method))
    modalmerge.plan(native(fam, "ties", models=[{"path": str(fam["a"]), "name": "a b"},
                                                {"path": str(fam["b"]), "name": "b"}]))
