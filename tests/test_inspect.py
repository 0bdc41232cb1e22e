"""`modalmerge inspect` on the tiny Llama family, against values computed directly in the test."""

import json
import math

import pytest
import torch

from conftest import load_sd
from modalmerge.checkpoint.safetensors_io import save_file
from modalmerge.cli import main


def run_json(capsys, *args) -> dict:
    assert main(["inspect", *map(str, args), "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def layer_group(name: str) -> str:
    if name.startswith("model.layers."):
        return f"layer {name.split('.')[2]}"
    return {"model.embed_tokens.weight": "embeddings", "model.norm.weight": "norms", "lm_head.weight": "head"}[name]


def test_norms_conflicts_and_cosines_match_a_dense_computation(llama_family, capsys):
    fam = llama_family
    out = run_json(capsys, fam["ft0"], fam["ft1"], fam["ft2"], "--base", fam["base"])
    base = load_sd(fam["base"])
    taus = [{k: v - base[k] for k, v in load_sd(fam[f"ft{i}"]).items()} for i in range(3)]
    assert out["models"] == ["ft0", "ft1", "ft2"]
    assert [g["group"] for g in out["groups"]] == ["embeddings", "layer 0", "layer 1", "norms", "head"]

    groups = {g["group"]: g for g in out["groups"]}
    groups["total"] = out["total"]
    for label, rep in groups.items():
        names = [n for n in base if label == "total" or layer_group(n) == label]
        assert rep["tensors"] == len(names)
        assert rep["params"] == sum(base[n].numel() for n in names)
        flat = torch.stack([torch.cat([t[n].reshape(-1) for n in names]).double() for t in taus])
        norms = flat.norm(dim=1)
        for i in range(3):
            assert rep["norms"][f"ft{i}"] == pytest.approx(float(norms[i]), rel=1e-6)
        base_norm = torch.cat([base[n].reshape(-1) for n in names]).double().norm()
        assert rep["base_norm"] == pytest.approx(float(base_norm), rel=1e-6)
        pos, neg = (flat > 0).any(0), (flat < 0).any(0)
        overlap = ((flat != 0).sum(0) >= 2).sum()
        assert rep["sign_conflict"] == pytest.approx(int((pos & neg).sum()) / int(overlap), abs=1e-12)
        cos = {(c["a"], c["b"]): c["value"] for c in rep["cosine"]}
        assert list(cos) == [("ft0", "ft1"), ("ft0", "ft2"), ("ft1", "ft2")]
        for i, j in [(0, 1), (0, 2), (1, 2)]:
            expected = float(flat[i] @ flat[j] / (norms[i] * norms[j]))
            assert cos[(f"ft{i}", f"ft{j}")] == pytest.approx(expected, abs=1e-9)
    # every element of independent random fine-tunes is non-zero: 3 signs agree with probability 1/4
    assert out["total"]["sign_conflict"] == pytest.approx(0.75, abs=0.02)


def test_base_itself_identical_and_opposite_finetunes(llama_family, tmp_path, capsys):
    fam = llama_family
    base, ft = load_sd(fam["base"]), load_sd(fam["ft0"])
    opposite = tmp_path / "opposite"
    opposite.mkdir()
    save_file({k: (2 * base[k] - ft[k]).contiguous() for k in base}, opposite / "model.safetensors")
    same = tmp_path / "same"
    same.mkdir()
    (same / "model.safetensors").write_bytes((fam["ft0"] / "model.safetensors").read_bytes())

    out = run_json(capsys, fam["ft0"], same, "--base", fam["base"])
    for rep in out["groups"] + [out["total"]]:
        assert rep["norms"]["ft0"] == rep["norms"]["same"] > 0
        assert rep["sign_conflict"] == 0
        assert rep["cosine"] == [{"a": "ft0", "b": "same", "value": pytest.approx(1.0, abs=1e-12)}]

    out = run_json(capsys, fam["ft0"], opposite, "--base", fam["base"])
    for rep in out["groups"] + [out["total"]]:
        assert rep["norms"]["opposite"] == pytest.approx(rep["norms"]["ft0"], rel=1e-5)
        assert rep["sign_conflict"] == 1.0
        assert rep["cosine"][0]["value"] == pytest.approx(-1.0, abs=1e-6)

    # the base as a model: no task vector, so nothing to conflict with and no cosine
    out = run_json(capsys, fam["base"], fam["ft0"], "--base", fam["base"])
    total = out["total"]
    assert total["norms"]["base"] == 0 and total["relative_norms"]["base"] == 0
    assert total["sign_conflict"] is None
    assert total["cosine"] == [{"a": "base", "b": "ft0", "value": None}]


def test_chunked_reads_give_the_same_numbers(llama_family):
    from modalmerge.checkpoint.sources import open_source
    from modalmerge.engine.inspect import inspect_models

    fam = llama_family
    base = open_source(fam["base"], label="base")
    models = [open_source(fam[f"ft{i}"], label=f"ft{i}") for i in range(3)]
    whole = inspect_models(base, models).to_dict()
    chunked = inspect_models(base, models, chunk_elems=1000).to_dict()
    assert whole["total"]["sign_conflict"] == chunked["total"]["sign_conflict"]
    for a, b in zip(whole["groups"] + [whole["total"]], chunked["groups"] + [chunked["total"]]):
        assert a["norms"] == pytest.approx(b["norms"], rel=1e-12)
        assert [c["value"] for c in a["cosine"]] == pytest.approx([c["value"] for c in b["cosine"]], abs=1e-12)


def test_include_exclude_and_text_table(llama_family, capsys):
    fam = llama_family
    out = run_json(capsys, fam["ft0"], "--base", fam["base"], "--include", "model.layers.*", "--exclude", "*mlp*")
    assert [g["group"] for g in out["groups"]] == ["layer 0", "layer 1"]
    assert out["total"]["sign_conflict"] is None and out["total"]["cosine"] == []
    assert out["total"]["tensors"] == 2 * 6  # q, k, v, o and two norms per block
    assert main(["inspect", str(fam["ft0"]), str(fam["ft1"]), "--base", str(fam["base"]), "--no-progress"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[3].split() == ["group", "params", "|tau|", "ft0", "|tau|", "ft1", "conflict", "cos", "ft0~ft1"]
    assert [ln.split()[0] for ln in lines[4:9]] == ["embeddings", "layer", "layer", "norms", "head"]
    assert lines[10].startswith("total")


def _one_line_error(capsys, argv, *fragments):
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_inspect_refuses_what_cannot_be_merged(llama_family, tmp_path, capsys):
    fam = llama_family
    base = load_sd(fam["base"])

    def save(name, sd):
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / name / "model.safetensors")
        return str(tmp_path / name)

    shapes = save("shapes", {**base, "lm_head.weight": torch.zeros(127, 32)})
    _one_line_error(capsys, ["inspect", shapes, "--base", str(fam["base"]), "--no-progress"],
                    "'lm_head.weight'", "[127, 32]", "'shapes'", "--exclude 'lm_head.weight'")
    # the fix the message gives works
    assert main(["inspect", shapes, "--base", str(fam["base"]), "--no-progress", "--json",
                 "--exclude", "lm_head.weight"]) == 0
    capsys.readouterr()
    missing = save("missing", {k: v for k, v in base.items() if k != "model.norm.weight"})
    _one_line_error(capsys, ["inspect", missing, "--base", str(fam["base"])], "'missing'", "'model.norm.weight'",
                    "--exclude")
    ints = save("ints", {**base, "model.norm.weight": torch.ones(32, dtype=torch.int32)})
    _one_line_error(capsys, ["inspect", ints, "--base", str(fam["base"])], "int32", "'model.norm.weight'")
    nan = {k: v.clone() for k, v in base.items()}
    nan["model.norm.weight"][3] = math.inf
    _one_line_error(capsys, ["inspect", save("nan", nan), "--base", str(fam["base"]), "--no-progress"],
                    "'nan'", "'model.norm.weight'", "NaN or Inf")
