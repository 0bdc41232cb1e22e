"""Whole merges of tiny transformers models through the CLI, loaded back with transformers."""

import json

import torch
import yaml

from conftest import load_sd
from modalmerge.cli import main


def write_recipe(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_ties_merge_loads_in_transformers(llama_family, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path / "r.yaml", {
        "method": "ties", "base": str(llama_family["base"]),
        "models": [{"path": str(llama_family["ft0"]), "name": "a"}, str(llama_family["ft1"])],
        "params": {"density": 0.5, "scope": "tensor"}, "dtype": "bfloat16",
    })
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), "--output", str(out), "--no-progress"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([[1, 2, 3]])
    assert model(ids).logits.shape == (1, 3, 128)
    card = (out / "README.md").read_text()
    assert "ties" in card and "density: 0.5" in card
    assert (out / "config.json").exists()
    merged = load_sd(out)
    base = load_sd(llama_family["base"])
    assert set(merged) == set(base)


def test_dry_run_prints_plan_and_writes_nothing(llama_family, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", {
        "method": "ties", "base": str(llama_family["base"]),
        "models": [str(llama_family["ft0"]), str(llama_family["ft1"])],
    })
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), "--output", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "statistics: magnitudes (sampled) -> apply" in text and "peak memory" in text
    assert "kernels     fused C kernels" in text
    assert not out.exists()


def test_dry_run_says_which_kernels_run(llama_family, tmp_path, capsys, monkeypatch):
    models = [str(llama_family["ft0"]), str(llama_family["ft1"])]
    ties = write_recipe(tmp_path / "t.yaml", {"method": "ties", "base": str(llama_family["base"]), "models": models})
    linear = write_recipe(tmp_path / "l.yaml", {"method": "linear", "models": models})
    assert main(["merge", str(linear), "--dry-run"]) == 0
    assert "kernels     eager torch\n" in capsys.readouterr().out  # linear has no fused kernels
    assert main(["merge", str(ties), "--dry-run", "--device", "cuda"]) == 0
    assert "eager torch on cuda (the fused kernels are for the CPU)" in capsys.readouterr().out
    monkeypatch.setenv("MODALMERGE_FUSED", "0")
    assert main(["merge", str(ties), "--dry-run"]) == 0
    assert "eager torch (the fused kernels are off: MODALMERGE_FUSED=0)" in capsys.readouterr().out


def test_include_exclude_copy_from_base(llama_family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {
        "method": "task_arithmetic", "base": str(llama_family["base"]),
        "models": [str(llama_family["ft0"])], "params": {"lambda": 1.0},
        "include": ["model.layers.*"], "exclude": ["*norm*"],
    })
    out = tmp_path / "m"
    assert main(["merge", str(recipe), "-o", str(out), "--no-progress"]) == 0
    merged, base, ft = load_sd(out), load_sd(llama_family["base"]), load_sd(llama_family["ft0"])
    for name, value in merged.items():
        if name.startswith("model.layers.") and "norm" not in name:
            assert torch.allclose(value, ft[name], atol=1e-6), name
        else:
            assert torch.equal(value, base[name]), name


def test_sharded_output_and_sharded_input(llama_family, tmp_path):
    from modalmerge import merge

    out = tmp_path / "sharded"
    recipe = {"method": "linear", "models": [str(llama_family["ft0"]), str(llama_family["ft1"])]}
    merge(recipe, out, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    # the sharded folder is itself a valid input
    again = tmp_path / "again"
    merge({"method": "linear", "models": [str(out)]}, again)
    a, b = load_sd(out), load_sd(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deterministic_whatever_the_thread_count(llama_family, tmp_path):
    from modalmerge import merge

    recipe = {"method": "ties", "base": str(llama_family["base"]),
              "models": [str(llama_family["ft0"]), str(llama_family["ft1"]), str(llama_family["ft2"])]}
    torch.set_num_threads(1)
    merge(recipe, tmp_path / "one")
    torch.set_num_threads(2)
    merge(recipe, tmp_path / "two")
    a, b = load_sd(tmp_path / "one"), load_sd(tmp_path / "two")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_device_cuda(llama_family, tmp_path, capsys):
    # without a CUDA device: a one-line error and no output; with one: the CPU's tensors
    recipe = write_recipe(tmp_path / "r.yaml", {
        "method": "ties", "base": str(llama_family["base"]),
        "models": [str(llama_family["ft0"]), str(llama_family["ft1"])], "params": {"density": 0.5},
    })
    out = tmp_path / "gpu"
    code = main(["merge", str(recipe), "-o", str(out), "--device", "cuda", "--no-progress"])
    if not torch.cuda.is_available():
        assert code == 1 and not out.exists()
        assert "--device cuda was asked for, but torch sees no CUDA device; use --device cpu" in capsys.readouterr().err
        return
    assert code == 0
    assert main(["merge", str(recipe), "-o", str(tmp_path / "cpu"), "--no-progress"]) == 0
    gpu, cpu = load_sd(out), load_sd(tmp_path / "cpu")
    assert all(torch.allclose(gpu[k], cpu[k], atol=1e-5, rtol=1e-5) for k in cpu)  # float32; sums may reorder
