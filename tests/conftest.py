"""Shared test fixtures: tiny models that the tests build and save themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    """Tests write nowhere but their own temporary folders: modalmerge's caches (the kernels' build,
    benchmark checkpoints) go to a folder of this session's, removed at its end."""
    import tempfile

    config._modalmerge_cache = tempfile.mkdtemp(prefix="modalmerge-tests-cache-")
    os.environ["MODALMERGE_CACHE"] = config._modalmerge_cache
    # hypothesis keeps its own files (.hypothesis/ in the working folder by default) there too
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = os.path.join(config._modalmerge_cache, "hypothesis")


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(getattr(config, "_modalmerge_cache", ""), ignore_errors=True)


def random_state_dict(seed: int = 0, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {
        "embed.weight": (16, 8),
        "layers.0.linear.weight": (8, 8),
        "layers.0.linear.bias": (8,),
        "layers.0.norm.weight": (8,),
        "layers.1.linear.weight": (12, 8),
        "head.weight": (3, 8),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def finetunes(base: dict[str, torch.Tensor], n: int, scale: float = 0.1, seed: int = 100) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        out.append({k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()})
    return out


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def perturbed(model, seed: int, scale: float = 0.02):
    import copy

    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three fine-tunes saved as HF folders (float32)."""
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama()
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for i in range(3):
        p = root / f"ft{i}"
        perturbed(base, 10 + i).save_pretrained(p)
        paths[f"ft{i}"] = p
    return paths


def load_sd(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(f))
    return out


def cli_fails(capsys, argv: list[str], out: Path | None, *fragments: str) -> str:
    """The CLI contract: exit 1, one `error:` line, no traceback, nothing at the output path."""
    from modalmerge.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[0]


def run_mergekit_yaml(tmp_path, data: dict) -> dict[str, torch.Tensor]:
    """Merge a recipe mapping written as a YAML file (as a user runs it); the output's tensors."""
    import yaml
    from modalmerge import merge
    path = tmp_path / "mergekit.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "out"
    merge(path, out)
    return load_sd(out)


def assert_close(out, ref, what, tol=1e-6):
    """Same tensor names, each within `tol` of the reference."""
    assert set(out) == set(ref), what
    for name in ref:
        diff = (out[name] - ref[name]).abs().max().item()
        assert diff <= tol, f"{what}: {name} differs from the reference by {diff}"
