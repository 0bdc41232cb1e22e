"""`modalmerge bench speed` end to end on a tiny shape, and its pieces."""

import json

import pytest
import torch

from conftest import load_sd
from modalmerge.bench.speed import Shape, build_checkpoints, floor, measure, parse_method, recipe_for
from modalmerge.cli import main

TINY = Shape(hidden=32, layers=2, vocab=64, models=2)


def test_checkpoints_are_llama_shaped_deterministic_and_cached(tmp_path):
    folders = build_checkpoints(TINY, tmp_path, log=lambda *a: None)
    assert list(folders) == ["base", "ft0", "ft1"]
    base, ft0 = load_sd(folders["base"]), load_sd(folders["ft0"])
    assert base["model.layers.1.mlp.down_proj.weight"].shape == (32, 128)
    assert base["lm_head.weight"].dtype == torch.bfloat16
    assert sum(t.numel() for t in base.values()) == TINY.parameters
    delta = (ft0["model.embed_tokens.weight"].float() - base["model.embed_tokens.weight"].float()).abs()
    assert 0 < delta.mean() < 0.2 * base["model.embed_tokens.weight"].float().abs().mean()
    # a second call builds nothing; another cache builds the same bytes
    stamp = (folders["ft1"] / "model.safetensors").stat().st_mtime_ns
    assert build_checkpoints(TINY, tmp_path, log=lambda *a: None) == folders
    assert (folders["ft1"] / "model.safetensors").stat().st_mtime_ns == stamp
    again = build_checkpoints(TINY, tmp_path / "other", log=lambda *a: None)
    assert (again["ft1"] / "model.safetensors").read_bytes() == (folders["ft1"] / "model.safetensors").read_bytes()


@pytest.mark.parametrize("overlap", [False, True])
def test_floor_reads_everything_and_writes_a_model_sized_output(tmp_path, overlap):
    folders = build_checkpoints(TINY, tmp_path, log=lambda *a: None)
    floor([str(p) for p in folders.values()], str(tmp_path / "out"), overlap=overlap)
    out, last = load_sd(tmp_path / "out"), load_sd(folders["ft1"])
    assert set(out) == set(last) and all(torch.equal(out[k], last[k]) for k in out)


def test_measure_reports_the_childs_own_peak_memory(tmp_path):
    grow = "import numpy; a = numpy.ones(50_000_000); print(a.sum())"  # 400 MB
    run = measure(["-c", grow], tmp_path / "log")
    small = measure(["-c", "pass"], tmp_path / "log")  # not the (large) pytest process's memory
    assert run.returncode == 0 and run.peak_rss > 4e8 and small.peak_rss < 1e8
    failed = measure(["-c", "raise SystemExit(3)"], tmp_path / "log")
    assert failed.returncode == 3 and failed.peak_rss > 0
    assert run.seconds > 0 and run.cpu_seconds > 0


def test_method_specs_become_recipes(tmp_path):
    assert parse_method("ties:scope=tensor,density=0.3") == ("ties", {"scope": "tensor", "density": 0.3})
    folders = {"base": tmp_path / "b", "ft0": tmp_path / "a"}
    r = recipe_for("task_arithmetic", folders)
    assert r["base"] == str(tmp_path / "b") and r["models"] == [str(tmp_path / "a")] and r["params"] == {"lambda": 0.3}


def test_bench_speed_cli_end_to_end(tmp_path, capsys):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    code = main(["bench", "speed", "--quick", "--hidden", "32", "--layers", "2", "--vocab", "64", "--models", "2",
                 "--methods", "task_arithmetic", "ties:scope=tensor", "--threads", "1",
                 "--cache", str(tmp_path / "cache"), "--out", str(out), "--markdown", str(md)])
    assert code == 0
    result = json.loads(out.read_text())
    names = [r["name"] for r in result["results"]]
    assert names == ["floor", "floor:overlapped", "task_arithmetic", "ties:scope=tensor"]
    for r in result["results"]:
        assert len(r["runs"]) == 1 and r["seconds"] > 0 and r["peak_rss_bytes"] > 1e7
    assert result["results"][0]["x_floor"] == 1.0 and result["results"][1]["x_overlapped_floor"] == 1.0
    assert "| task_arithmetic |" in md.read_text() and "| task_arithmetic |" in capsys.readouterr().out


def test_bench_speed_rejects_unknown_methods(tmp_path, capsys):
    assert main(["bench", "speed", "--quick", "--methods", "nope", "--cache", str(tmp_path)]) == 1
    assert "unknown method 'nope'" in capsys.readouterr().err
