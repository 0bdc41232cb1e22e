"""User mistakes through the CLI: one `error:` line naming what is wrong and the fix, a non-zero
exit, no traceback, and nothing at (or half-written next to) --output."""

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml

from conftest import finetunes, load_sd, random_state_dict
from modalmerge.checkpoint.safetensors_io import save_file
from modalmerge.cli import main
from modalmerge.methods.registry import METHODS


def save_model(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    return folder


@pytest.fixture
def family(tmp_path):
    """A base and two fine-tunes (tiny random state dicts) saved as folders."""
    base = random_state_dict(0)
    a, b = finetunes(base, 2)
    return {"base": base, "a": a, "b": b, "root": tmp_path,
            "paths": {n: save_model(tmp_path / n, sd) for n, sd in (("base", base), ("a", a), ("b", b))}}


def recipe(tmp_path: Path, data, name="r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def ties_recipe(fam, **over):
    data = {"method": "ties", "base": str(fam["paths"]["base"]),
            "models": [{"path": str(fam["paths"]["a"]), "name": "a"}, {"path": str(fam["paths"]["b"]), "name": "b"}]}
    data.update(over)
    return data


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def fails(capsys, argv: list[str], out: Path, *fragments: str) -> str:
    """Run the CLI, check the failure contract, return the message."""
    code = main(argv + ["--no-progress"] if argv[0] == "merge" else argv)
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    if out is not None:
        assert not out.exists()
        assert leftovers(out) == []
    return lines[0]


def merge_argv(r: Path, out: Path, *extra: str) -> list[str]:
    return ["merge", str(r), "--output", str(out), *extra]


def test_mismatched_tensor_names(family, capsys):
    b = dict(family["b"])
    b["layers.1.renamed.weight"] = b.pop("layers.1.linear.weight")
    save_model(family["root"] / "b2", b)
    r = recipe(family["root"], ties_recipe(family, models=[str(family["paths"]["a"]), str(family["root"] / "b2")]))
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "'b2'", "layers.1.linear.weight", "exclude")


def test_extra_tensor_in_a_model(family, capsys):
    b = dict(family["b"], **{"extra.weight": torch.ones(2)})
    save_model(family["root"] / "b2", b)
    r = recipe(family["root"], ties_recipe(family, models=[str(family["root"] / "b2")]))
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "'b2'", "'extra.weight'", "exclude")


def test_mismatched_shapes(family, capsys):
    b = dict(family["b"], **{"head.weight": torch.zeros(4, 8)})
    save_model(family["root"] / "b2", b)
    r = recipe(family["root"], ties_recipe(family, models=[str(family["paths"]["a"]), str(family["root"] / "b2")]))
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "'head.weight'", "[4, 8]", "[3, 8]", "'b2'", "exclude")


def test_ties_without_base(family, capsys):
    data = ties_recipe(family)
    del data["base"]
    r = recipe(family["root"], data)
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "ties", "needs a base", "add `base:")


@pytest.mark.parametrize("where", ["model", "base"])
def test_integer_tensor_where_another_model_has_float(family, capsys, where):
    tensors = dict(family["b" if where == "model" else "base"])
    tensors["layers.0.linear.bias"] = torch.arange(8)
    save_model(family["root"] / "odd", tensors)
    data = ties_recipe(family)
    if where == "model":
        data["models"] = [str(family["paths"]["a"]), str(family["root"] / "odd")]
    else:
        data["base"] = str(family["root"] / "odd")
    r = recipe(family["root"], data)
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "'layers.0.linear.bias'", "int64", "exclude")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_an_input(family, capsys, bad):
    b = dict(family["b"])
    b["layers.0.linear.weight"] = b["layers.0.linear.weight"].clone()
    b["layers.0.linear.weight"][2, 3] = bad
    save_model(family["root"] / "b2", b)
    r = recipe(family["root"], ties_recipe(family, models=[str(family["paths"]["a"]),
                                                           {"path": str(family["root"] / "b2"), "name": "bad"}]))
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "'bad'", "'layers.0.linear.weight'", "NaN or Inf", "exclude")


def test_truncated_safetensors(family, capsys):
    f = family["paths"]["b"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-20])
    r = recipe(family["root"], ties_recipe(family))
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, str(f), "truncated", "re-download")


@pytest.mark.parametrize("garbage", [b"\xff" * 64, struct.pack("<Q", 12) + b"{not json!!}"])
def test_corrupt_header(family, capsys, garbage):
    f = family["paths"]["a"] / "model.safetensors"
    f.write_bytes(garbage)
    r = recipe(family["root"], ties_recipe(family))
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, str(f), "corrupt", "re-download")


def test_unknown_method(family, capsys):
    r = recipe(family["root"], ties_recipe(family, method="tiez"))
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "'tiez'", "modalmerge methods", "ties")


def test_unknown_parameter(family, capsys):
    r = recipe(family["root"], ties_recipe(family, params={"densty": 0.5}))
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "ties", "densty", "density")


def test_bad_parameter_value(family, capsys):
    r = recipe(family["root"], ties_recipe(family, params={"density": 1.5}))
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "ties", "density", "1")


def test_bad_per_model_parameter_value(family, capsys):
    data = ties_recipe(family)
    data["models"][1]["params"] = {"density": -1}
    r = recipe(family["root"], data)
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "models[b]", "density")


def test_invalid_yaml(family, capsys):
    r = recipe(family["root"], "method: ties\nmodels: [a, b\nbase: x\n")
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, str(r), "invalid YAML", "line")


def test_recipe_without_models(family, capsys):
    r = recipe(family["root"], {"method": "ties", "base": str(family["paths"]["base"])})
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, str(r), "models", "add")


def test_recipe_with_unknown_field(family, capsys):
    r = recipe(family["root"], ties_recipe(family, paramz={"density": 0.5}))
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, str(r), "paramz", "params")


def test_missing_model_path(family, capsys):
    r = recipe(family["root"], ties_recipe(family, models=[str(family["root"] / "nowhere")]))
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "nowhere", "does not exist", "check the path")


def test_pickled_bin_needs_allow_pickle(family, capsys):
    folder = family["root"] / "pickled"
    folder.mkdir()
    torch.save(family["b"], folder / "pytorch_model.bin")
    data = ties_recipe(family, models=[str(family["paths"]["a"]), str(folder)], params={"density": 1.0})
    r = recipe(family["root"], data)
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "pytorch_model.bin", "--allow-pickle", "safetensors")
    # allowed, it loads (weights_only) and merges like the safetensors copy of the same model
    assert main(merge_argv(r, out, "--allow-pickle", "--no-progress")) == 0
    ref = family["root"] / "ref"
    r2 = recipe(family["root"], ties_recipe(family, params={"density": 1.0}), name="r2.yaml")
    assert main(merge_argv(r2, ref, "--no-progress")) == 0
    a, b = load_sd(out), load_sd(ref)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_output_exists_without_overwrite(family, capsys):
    out = family["root"] / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = recipe(family["root"], ties_recipe(family))
    fails(capsys, merge_argv(r, out), None, str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(out) == []


def test_adapter_target_not_in_base(family, capsys):
    adapter = family["root"] / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.layers.0.missing.lora_A.weight": torch.ones(2, 8),
               "base_model.model.layers.0.missing.lora_B.weight": torch.ones(8, 2)},
              adapter / "adapter_model.safetensors")
    r = recipe(family["root"], ties_recipe(family, models=[str(family["paths"]["a"]),
                                                           {"path": str(adapter), "name": "lora"}]))
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "'lora'", "'layers.0.missing.weight'", "the base the adapter was trained on")


def test_two_models_with_the_same_name(family, capsys):
    data = ties_recipe(family)
    data["models"][1]["name"] = "a"
    r = recipe(family["root"], data)
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "'a'", "distinct `name`")


# -- atomicity: a merge that fails midway leaves nothing behind --------------------------------

def _last_tensor_nan(family) -> Path:
    b = dict(family["b"])
    last = list(b)[-1]
    b[last] = b[last].clone()
    b[last][0, 0] = float("nan")
    return save_model(family["root"] / "b_nan", b)


def test_failure_in_the_last_tensor_leaves_no_output(family, capsys, monkeypatch):
    written = []
    from modalmerge.engine import sinks

    real = sinks.FolderSink.write

    def spy(self, name, tensor, start=0):
        written.append(name)
        return real(self, name, tensor, start)

    monkeypatch.setattr(sinks.FolderSink, "write", spy)
    bad = _last_tensor_nan(family)
    # task arithmetic has no statistics pass: the NaN is met only after the other tensors were written
    r = recipe(family["root"], {"method": "task_arithmetic", "base": str(family["paths"]["base"]),
                                "models": [str(family["paths"]["a"]), str(bad)]})
    out = family["root"] / "out"
    fails(capsys, merge_argv(r, out), out, "'b_nan'", "'head.weight'", "NaN or Inf")
    assert len(written) == len(family["base"]) - 1


def test_failed_overwrite_keeps_the_old_output(family, capsys):
    out = family["root"] / "out"
    r = recipe(family["root"], ties_recipe(family))
    assert main(merge_argv(r, out, "--no-progress")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = _last_tensor_nan(family)
    r2 = recipe(family["root"], {"method": "task_arithmetic", "base": str(family["paths"]["base"]),
                                 "models": [str(family["paths"]["a"]), str(bad)]}, name="r2.yaml")
    fails(capsys, merge_argv(r2, out, "--overwrite"), None, "'b_nan'", "NaN or Inf")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out) == []


def test_interrupt_midway_leaves_no_output(family, capsys, monkeypatch):
    method = METHODS["task_arithmetic"]
    calls = []
    real = method.kernel

    def interrupted(group, params, stats):
        calls.append(group.name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(group, params, stats)

    monkeypatch.setattr(method, "kernel", interrupted)
    r = recipe(family["root"], {"method": "task_arithmetic", "base": str(family["paths"]["base"]),
                                "models": [str(family["paths"]["a"])]})
    out = family["root"] / "out"
    assert main(merge_argv(r, out, "--no-progress")) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert len(calls) == 4
    assert not out.exists() and leftovers(out) == []
