"""MMER (spec 7): composition of multimodal models, masks, extraction, forgetting, storage."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import finetunes, load_sd, random_state_dict
from modalmerge.api import merge, merge_state_dicts
from modalmerge.checkpoint.decoupled import DecoupledFolder
from modalmerge.cli import main
from modalmerge.errors import MergeError
from modalmerge.methods.registry import get_method
from tiny_mllm import build_family, recipe

torch.set_num_threads(1)


def dense_ties(base, models, density=0.2, lam=1.0):
    """τ* = λ·TIES(τ; k = density, global trim, disjoint mean), per tensor name."""
    names = list(base)
    T = len(models)
    deltas = {n: torch.stack([m[n].float() - base[n].float() for m in models]) for n in names}
    if density < 1:
        for t in range(T):
            allv = torch.cat([deltas[n][t].reshape(-1).abs() for n in names])
            thr = torch.sort(allv, descending=True).values[int(density * allv.numel()) - 1]
            for n in names:
                deltas[n][t][deltas[n][t].abs() < thr] = 0
    out = {}
    for n in names:
        x = deltas[n]
        gamma = torch.sign(x.sum(0))
        gamma[gamma == 0] = 1.0 if x.sum() >= 0 else -1.0
        agree = (torch.sign(x) == gamma) & (x != 0)
        out[n] = lam * (x * agree).sum(0) / agree.sum(0).clamp(min=1)
    return out


def dense_mmer(base, models, density=0.2, lambdas=None, shared=None):
    """(τ*, masks[t][name]) with m_t = 1{|τ_t| ≥ λ_t·|τ* − τ_t|}."""
    shared = shared if shared is not None else dense_ties(base, models, density)
    lambdas = lambdas or [1.0] * len(models)
    masks = []
    for m, lam in zip(models, lambdas):
        masks.append({n: (m[n] - base[n]).abs() >= lam * (shared[n] - (m[n] - base[n])).abs() for n in base})
    return shared, masks


# -- the method on state dicts --------------------------------------------------------------------

def test_hand_computed_case():
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, -2.0, 0.5, 0.0])}, {"w": torch.tensor([3.0, 2.0, -0.5, 0.0])}]
    merged, sink = merge_state_dicts("mmer", models, base, {"base_params": {"density": 1.0}}, return_decoupled=True)
    # TIES, no trim: signs +, +(tie → tensor total +), +(tie) , 0; disjoint means 2, 2, 0.5, 0
    shared = torch.tensor([2.0, 2.0, 0.5, 0.0])
    assert torch.allclose(sink.shared["w"], shared)
    # m_0: |1| ≥ |2−1| yes; |−2| ≥ |2+2| no; |0.5| ≥ 0 yes; 0 ≥ 0 yes
    from modalmerge.ops import unpack_bits
    m0 = unpack_bits(sink.masks["model_0::w"], (4,))
    m1 = unpack_bits(sink.masks["model_1::w"], (4,))
    assert m0.tolist() == [True, False, True, True]
    assert m1.tolist() == [True, True, False, True]
    assert torch.allclose(merged["w"], (m0.float() + m1.float()) / 2 * shared)


def test_defaults_and_params():
    p = get_method("mmer").parse_params({})
    assert p.lam == 1.0 and p.base_method == "ties"
    b = p.base()
    assert (b.density, b.lam, b.aggregate, b.scope) == (0.2, 1.0, "mean", "global")
    with pytest.raises(MergeError, match="base_params.nope"):
        get_method("mmer").parse_params({"base_params": {"nope": 1}})
    with pytest.raises(MergeError, match="base_method"):
        get_method("mmer").parse_params({"base_method": "slerp"})


@pytest.mark.parametrize("chunk", [1 << 22, 16])
def test_masks_match_dense_reference(chunk):
    base = random_state_dict(3)
    models = finetunes(base, 3, seed=7)
    lambdas = [1.0, 0.5, 2.0]
    merged, sink = merge_state_dicts("mmer", models, base, {}, model_params=[{"lambda": x} for x in lambdas],
                                     exact_stats=True, chunk_elems=chunk, return_decoupled=True)
    shared, masks = dense_mmer(base, models, lambdas=lambdas)
    from modalmerge.ops import unpack_bits
    for n in base:
        assert torch.allclose(sink.shared[n], shared[n], atol=1e-6)
        got = [unpack_bits(sink.masks[f"model_{t}::{n}"], base[n].shape) for t in range(3)]
        for t in range(3):
            assert torch.equal(got[t], masks[t][n]), (n, t)
        mean = torch.stack([g.float() for g in got]).mean(0)
        assert torch.allclose(merged[n], base[n] + mean * shared[n], atol=1e-6)


def test_base_method_neuromerging():
    from modalmerge.methods.neuromerging import NeuroMergingParams

    base = random_state_dict(4)
    models = finetunes(base, 3, seed=11)
    _, ref_sink = merge_state_dicts("neuromerging", models, base, {}, exact_stats=True, return_decoupled=True)
    neuro = merge_state_dicts("neuromerging", models, base, {}, exact_stats=True)
    merged, sink = merge_state_dicts("mmer", models, base, {"base_method": "neuromerging"}, exact_stats=True,
                                     return_decoupled=True)
    tau = {n: neuro[n] - base[n] for n in base}
    shared, masks = dense_mmer(base, models, shared=tau)
    from modalmerge.ops import unpack_bits
    for n in base:
        assert torch.allclose(sink.shared[n], tau[n], atol=1e-6)
        for t in range(3):
            assert torch.equal(unpack_bits(sink.masks[f"model_{t}::{n}"], base[n].shape), masks[t][n])
    assert NeuroMergingParams().density == 0.2


# -- composition of multimodal models ------------------------------------------------------------

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("mmer") / "models")


@pytest.fixture(scope="module")
def composed(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("composed") / "out"
    report = merge(recipe(family, ("vision", "audio", "video", "math")), out, exact_stats=True)
    return out, report


TASKS = ("vision", "audio", "video", "math")


def test_composed_layout_and_masks(family, composed):
    out, report = composed
    base = family["base_sd"]
    shared, masks = dense_mmer(base, [family["llm"][t] for t in TASKS])
    d = DecoupledFolder(out)
    assert d.task_names == list(TASKS)
    # main weights: W_text under the base LLM's names, with the base's config
    main_sd = load_sd(out)
    assert set(main_sd) == set(base)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    for n in base:
        assert torch.allclose(d.shared.read(n), shared[n], atol=1e-6)
        mean = torch.stack([masks[t][n].float() for t in range(4)]).mean(0)
        assert torch.allclose(main_sd[n], base[n] + mean * shared[n], atol=1e-6)
        for t, task in enumerate(TASKS):
            assert torch.equal(d.mask(task, n), masks[t][n])
    # encoders and projectors unchanged, with the models' configs
    for task in ("vision", "audio", "video"):
        part = load_file(out / "modalities" / task / "model.safetensors")
        assert part.keys() == family["mm"][task].keys()
        assert all(torch.equal(part[k], v) for k, v in family["mm"][task].items())
        assert (out / "modalities" / task / "config.json").exists()
    assert not (out / "modalities" / "math").exists()
    # the base loads as the plain LLM
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)


def test_extract_is_the_original_layout(family, composed, tmp_path):
    out, _ = composed
    base = family["base_sd"]
    shared, masks = dense_mmer(base, [family["llm"][t] for t in TASKS])
    layouts = {
        "vision": lambda k: f"language_model.{k}",
        "audio": lambda k: f"language_model.{k}",
        "video": lambda k: k if k.startswith("lm_head.") else "model.language_model." + k[len("model."):],
        "math": lambda k: k,
    }
    for t, task in enumerate(TASKS):
        assert main(["extract", str(out), "--modality", task, "--output", str(tmp_path / task), "--no-progress"]) == 0
        sd = load_sd(tmp_path / task)
        assert set(sd) == {layouts[task](k) for k in base} | set(family["mm"][task])
        for k in base:
            want = base[k] + masks[t][k].float() * shared[k]
            assert torch.allclose(sd[layouts[task](k)], want, atol=1e-6), (task, k)
        for k, v in family["mm"][task].items():
            assert torch.equal(sd[k], v)
        cfg = json.loads((tmp_path / task / "config.json").read_text())
        assert cfg["model_type"] == {"vision": "llava", "audio": "qwen2_audio", "video": "llava", "math": "llama"}[task]
    # the text-only task's model loads like the original fine-tune
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "math")


def test_forgetting_new_task_keeps_old_masks(family, tmp_path):
    """A new text task re-merged with the old modalities: each keeps its own mask, and the
    task name selects it (the new one reconstructs closer to its fine-tune than the text weights)."""
    out = tmp_path / "re"
    merge(recipe(family, ("vision", "audio", "math")), out, exact_stats=True)
    d = DecoupledFolder(out)
    base = family["base_sd"]
    math = family["llm"]["math"]
    err_task = sum(float((d.read("math", n) - math[n]).abs().sum()) for n in base)
    err_text = sum(float((d.text.read(n) - math[n]).abs().sum()) for n in base)
    assert err_task < err_text
    shared, masks = dense_mmer(base, [family["llm"][t] for t in ("vision", "audio", "math")])
    for n in base:
        assert torch.equal(d.mask("math", n), masks[2][n])
        assert torch.equal(d.mask("vision", n), masks[0][n])
    assert d.manifest["tasks"][2].get("modality") is None


def test_storage_report(family, composed, capsys):
    out, report = composed
    s = report.statistics["storage"]
    manifest = json.loads((out / "decoupled" / "manifest.json").read_text())
    assert manifest["storage"] == s
    def size(glob):
        return sum(f.stat().st_size for f in out.glob(glob))
    assert s["text_weights"] == size("*.safetensors")
    assert s["shared"] == size("decoupled/shared*.safetensors")
    assert s["masks"] == size("decoupled/masks*.safetensors")
    assert s["modalities"] == size("modalities/*/*.safetensors")
    assert s["composed"] == s["text_weights"] + s["shared"] + s["masks"] + s["modalities"]
    n = sum(v.numel() for v in family["base_sd"].values())
    own = {t: sum(v.numel() for v in family["mm"][t].values()) for t in TASKS}
    assert s["separate_models"] == sum(4 * (n + own[t]) for t in TASKS)
    d = DecoupledFolder(out)
    shared_nnz = sum(int((d.shared.read(x) != 0).sum()) for x in d.tensors)
    assert abs(s["shared_density"] - shared_nnz / n) < 1e-12
    for task in TASKS:
        ones = sum(int(d.mask(task, x).sum()) for x in d.tensors)
        kept = sum(int((d.mask(task, x) & (d.shared.read(x) != 0)).sum()) for x in d.tensors)
        assert abs(s["mask_density"][task] - ones / n) < 1e-12
        assert abs(s["mask_density_of_shared"][task] - kept / shared_nnz) < 1e-12
    assert main(["extract", str(out), "--list"]) == 0
    text = capsys.readouterr().out
    assert "mask audio" in text and "separate models" in text


def test_sparse_shared_when_smaller(family, tmp_path, capsys):
    """A low density leaves τ* mostly zero: it is stored sparse and read back exactly."""
    import yaml

    r = recipe(family, ("vision", "audio"), base_params={"density": 0.05})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    assert main(["merge", str(path), "--output", str(tmp_path / "sp"), "--exact-stats", "--no-progress"]) == 0
    assert "tau*" in capsys.readouterr().out
    d = DecoupledFolder(tmp_path / "sp")
    assert d.manifest["shared_format"] == "sparse"
    assert not list((tmp_path / "sp" / "decoupled").glob("shared.safetensors"))
    base = family["base_sd"]
    shared, masks = dense_mmer(base, [family["llm"][t] for t in ("vision", "audio")], density=0.05)
    for n in base:
        assert torch.allclose(d.shared.read(n), shared[n], atol=1e-6)
        flat = d.shared.read(n, 3, 17)
        assert torch.allclose(flat, shared[n].reshape(-1)[3:17], atol=1e-6)
        assert torch.allclose(d.read("audio", n), base[n] + masks[1][n].float() * shared[n], atol=1e-6)


def test_errors(family, tmp_path):
    r = recipe(family, ("vision",))
    r["base"] = str(family["paths"]["math"].parent / "nope")
    with pytest.raises(MergeError, match="does not exist"):
        merge(r, tmp_path / "x")
    r = recipe(family, ("vision",))
    del r["base"]
    with pytest.raises(MergeError, match="needs a base"):
        merge(r, tmp_path / "x")
    # a model whose LLM is not the base's: tensor names do not map
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other")
    r = recipe(family, ("vision",))
    r["models"].append({"path": str(tmp_path / "other"), "name": "other"})
    with pytest.raises(MergeError, match="other"):
        merge(r, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_dry_run(family, tmp_path, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(family, ("vision", "math"))))
    assert main(["merge", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mmer" in out and "vision, math" in out
