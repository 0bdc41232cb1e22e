"""M-SMoE: merging the experts inside one MoE model (spec 13)."""

from __future__ import annotations

import json

import pytest

import modalmerge
import torch

from modalmerge.procedures.moe import find_moe_blocks, merge_moe_model, recipe_for
from modalmerge.errors import MergeError
from modalmerge.methods import msmoe

from conftest import load_sd

VOCAB = 48


def tokens(seed: int = 0, n: int = 12, length: int = 8, batch: int = 4):
    """Calibration callable (`test_msmoe:tokens`)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, length), generator=g) for _ in range(0, n, batch)]


def tiny_mixtral(seed=0, experts=4):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=VOCAB, num_local_experts=experts, num_experts_per_tok=2,
                        max_position_embeddings=32)
    return MixtralForCausalLM(cfg).eval()


def tiny_qwen_moe(seed=0):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                         shared_expert_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB, num_experts=6, num_experts_per_tok=2,
                         max_position_embeddings=32)
    return Qwen2MoeForCausalLM(cfg).eval()


def expert_fn(gate_up, down, x):
    inner = down.shape[-1]
    h = gate_up @ x.T
    return (down @ (torch.nn.functional.silu(h[:inner]) * h[inner:])).T


def random_experts(e=3, inner=6, hidden=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * inner, hidden, generator=g), torch.randn(e, hidden, inner, generator=g)


def test_permutation_alignment_preserves_each_expert_and_recovers_a_shuffle():
    gate_up, down = random_experts()
    x = torch.randn(7, 5)
    # expert 1 is expert 0 with its hidden units shuffled (plus a little noise)
    shuffle = torch.randperm(6, generator=torch.Generator().manual_seed(4))
    gate_up[1], down[1] = msmoe.permute_expert(gate_up[0], down[0], shuffle)
    gate_up[1] += 0.01 * torch.randn(12, 5)
    perm = msmoe.align_permutation(gate_up, down, 0, 1)
    a, b = msmoe.permute_expert(gate_up[1], down[1], perm)
    assert torch.allclose(expert_fn(a, b, x), expert_fn(gate_up[1], down[1], x), atol=1e-6)  # same function
    assert torch.allclose(a, gate_up[0], atol=0.05) and torch.allclose(b, down[0])          # undoes the shuffle
    for e in range(3):  # any alignment is function-preserving
        p = msmoe.align_permutation(gate_up, down, 2, e)
        assert sorted(p.tolist()) == list(range(6))
        a, b = msmoe.permute_expert(gate_up[e], down[e], p)
        assert torch.allclose(expert_fn(a, b, x), expert_fn(gate_up[e], down[e], x), atol=1e-6)


def test_frequencies_grouping_and_merge_by_hand():
    # 4 tokens, 3 experts, top-1: expert 0 chosen twice, 1 once, 2 once
    logits = torch.tensor([[3.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.5, 0.0, 1.0]])
    f = msmoe.routing_frequencies(logits, 1)
    assert f.tolist() == [0.5, 0.25, 0.25]
    # two groups: centres 0 and 1 (ties to the lower index); expert 2 joins the centre whose
    # logit column is closer in cosine
    cols = torch.nn.functional.normalize(logits.T, dim=-1)
    closer = 0 if float(cols[2] @ cols[0]) > float(cols[2] @ cols[1]) else 1
    assignment = msmoe.group_experts(f, logits, 2)
    assert assignment == [0, 1, closer]
    gate_up, down = random_experts()
    gu, dn = msmoe.merge_experts(gate_up, down, f, assignment)
    members = [i for i in range(3) if assignment[i] == closer]
    ws = f[members] / f[members].sum()
    want_gu, want_dn = 0, 0
    for w, i in zip(ws, members):
        a, b = msmoe.permute_expert(gate_up[i], down[i], msmoe.align_permutation(gate_up, down, closer, i))
        want_gu, want_dn = want_gu + w * a, want_dn + w * b
    for i in members:
        assert torch.allclose(gu[i], want_gu.float(), atol=1e-6) and torch.allclose(dn[i], want_dn.float(), atol=1e-6)
    other = 1 - closer
    assert torch.equal(gu[other], gate_up[other]) and torch.equal(dn[other], down[other])  # a lone centre


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen_moe])
def test_merged_model_has_fewer_distinct_experts_and_the_same_router(build):
    model = build()
    routers = {b.name: b.router.weight.detach().clone() for b in find_moe_blocks(model)}
    experts = {b.name: b.router.weight.shape[0] for b in find_moe_blocks(model)}
    report = merge_moe_model(model, [{"input_ids": t} for t in tokens(n=16)], msmoe.MsmoeParams(num_experts=2))
    for b in find_moe_blocks(model):
        assert torch.equal(b.router.weight, routers[b.name])
        distinct = {tuple(b.experts.gate_up_proj[i].reshape(-1).tolist()) for i in range(experts[b.name])}
        assert len(distinct) == 2
    ep = report["expert_parameters"]
    assert ep["after_distinct"] < ep["before"] and abs(ep["reduction"] - (1 - 2 / max(experts.values()))) < 1e-9
    a = report["agreement"]
    assert a["tokens"] == 4 * 8 and 0 <= a["top1_agreement"] <= 1 and a["mean_kl"] >= 0


def test_keeping_every_expert_changes_nothing():
    model = tiny_mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = merge_moe_model(model, [{"input_ids": t} for t in tokens()], msmoe.MsmoeParams(num_experts=4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report["agreement"]["top1_agreement"] == 1.0 and report["expert_parameters"]["reduction"] == 0


def test_msmoe_command_writes_a_loadable_model_and_report(tmp_path, capsys):
    from transformers import MixtralForCausalLM

    from modalmerge.cli import main

    tiny_mixtral().save_pretrained(tmp_path / "moe")
    out = tmp_path / "merged"
    assert main(["msmoe", str(tmp_path / "moe"), "-o", str(out), "--calibration-callable", "test_msmoe:tokens",
                 "--trust-recipe-code",
                 "--experts", "3"]) == 0
    printed = capsys.readouterr().out
    assert "distinct expert parameters" in printed and "held-out agreement" in printed
    report = json.loads((out / "msmoe.json").read_text())
    assert [layer["kept"] for layer in report["layers"]] == [3, 3]
    merged = MixtralForCausalLM.from_pretrained(out)
    sd, orig = load_sd(out), load_sd(tmp_path / "moe")
    assert set(sd) == set(orig)
    gates = [k for k in sd if k.endswith("gate.weight")]
    assert gates and all(torch.equal(sd[k], orig[k]) for k in gates)
    assert merged(tokens()[0]).logits.shape == (4, 8, VOCAB)
    assert main(["msmoe", str(tmp_path / "moe"), "--calibration-callable", "test_msmoe:tokens", "--trust-recipe-code",
                 "--dry-run"]) == 0
    assert "memory" in capsys.readouterr().out


def test_msmoe_errors(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=VOCAB)).save_pretrained(tmp_path / "dense")
    with pytest.raises(MergeError, match="no MoE block"):
        modalmerge.merge(recipe_for(tmp_path / "dense", {"callable": "test_msmoe:tokens"}), tmp_path / "o",
                         trust_recipe_code=True)
    assert not (tmp_path / "o").exists()
    model = tiny_mixtral()
    with pytest.raises(MergeError, match="more than the 4 experts"):
        merge_moe_model(model, [{"input_ids": t} for t in tokens()], msmoe.MsmoeParams(num_experts=5))


# -- method msmoe in a recipe (`modalmerge merge`, modalmerge.merge) ---------------------------------

def _recipe(model, **extra):
    return {"method": "msmoe", "models": [str(model)], "params": {"num_experts": 3},
            "calibration": {"callable": "test_msmoe:tokens"}, **extra}


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe") / "moe"
    tiny_mixtral().save_pretrained(folder)
    return folder


def test_recipe_merge_writes_what_the_msmoe_command_writes(moe_folder, tmp_path, capsys):
    import yaml

    import modalmerge
    from modalmerge.cli import main

    assert main(["msmoe", str(moe_folder), "-o", str(tmp_path / "cmd"), "--calibration-callable",
                 "test_msmoe:tokens", "--trust-recipe-code", "--experts", "3"]) == 0
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_recipe(moe_folder)))
    assert main(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "cli"), "--trust-recipe-code"]) == 0
    printed = capsys.readouterr().out
    assert "distinct expert parameters (25.0% fewer)" in printed and "held-out agreement" in printed
    report = modalmerge.merge(_recipe(moe_folder), tmp_path / "api", trust_recipe_code=True)
    want_sd, want_report = load_sd(tmp_path / "cmd"), json.loads((tmp_path / "cmd" / "msmoe.json").read_text())
    for out in ("cli", "api"):
        sd = load_sd(tmp_path / out)
        assert set(sd) == set(want_sd) and all(torch.equal(sd[k], want_sd[k]) for k in sd)
        got = json.loads((tmp_path / out / "msmoe.json").read_text())
        # the held-out KL comes from forward passes, whose float sums depend on the thread count
        # (`merge` sets it, `msmoe` does not): equal to rounding
        assert got["agreement"].pop("mean_kl") == pytest.approx(want_report["agreement"]["mean_kl"], rel=1e-4, abs=1e-9)
        assert got == {**want_report, "agreement": {k: v for k, v in want_report["agreement"].items() if k != "mean_kl"}}
        assert (tmp_path / out / "config.json").read_text() == (tmp_path / "cmd" / "config.json").read_text()
        assert "method: msmoe" in (tmp_path / out / "README.md").read_text()
    assert report.statistics["experts"]["layers"] == want_report["layers"] and [x["kept"] for x in want_report["layers"]] == [3, 3]
    assert report.merged_tensors == 4 and report.merged_parameters == want_report["expert_parameters"]["before"]
    # the merge did merge: 3 distinct experts per layer, the router untouched (transformers saves
    # Mixtral's experts one by one, w1/w3/w2)
    orig = load_sd(moe_folder)
    for layer in range(2):
        pre = f"model.layers.{layer}.block_sparse_moe."
        experts = {tuple(torch.cat([want_sd[f"{pre}experts.{i}.{w}.weight"].reshape(-1) for w in ("w1", "w2", "w3")])
                         .tolist()) for i in range(4)}
        assert len(experts) == 3
        assert torch.equal(want_sd[pre + "gate.weight"], orig[pre + "gate.weight"])


def test_recipe_merge_keeps_the_model_dtype_unless_the_recipe_sets_one(tmp_path):
    import modalmerge

    tiny_mixtral().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    modalmerge.merge(_recipe(tmp_path / "bf16"), tmp_path / "a", trust_recipe_code=True)
    assert {v.dtype for v in load_sd(tmp_path / "a").values()} == {torch.bfloat16}
    modalmerge.merge(_recipe(tmp_path / "bf16", dtype="float32"), tmp_path / "b", trust_recipe_code=True)
    assert {v.dtype for v in load_sd(tmp_path / "b").values()} == {torch.float32}


def test_recipe_dry_run_says_the_memory_need_and_writes_nothing(moe_folder, tmp_path, capsys):
    import modalmerge
    from modalmerge.cli import main

    (tmp_path / "r.yaml").write_text(json.dumps(_recipe(moe_folder)))  # JSON is YAML
    assert main(["merge", str(tmp_path / "r.yaml"), "--dry-run", "-o", str(tmp_path / "out"), "--trust-recipe-code"]) == 0
    out = capsys.readouterr().out
    assert "loaded whole (not streaming)" in out and "memory" in out and "3 of 4 experts (top-2)" in out
    assert "25.0% fewer" in out and not (tmp_path / "out").exists()
    s = modalmerge.describe(modalmerge.plan(_recipe(moe_folder), trust_recipe_code=True))
    per_expert = 2 * 12 * 16 + 16 * 12  # gate_up [2I, H] + down [H, I], by hand
    assert s["whole_model"] and s["expert_parameters"] == {"before": 2 * 4 * per_expert,
                                                           "after_distinct": 2 * 3 * per_expert, "reduction": 0.25}
    n = sum(v.numel() for v in load_sd(moe_folder).values())
    assert s["parameters"] == n and s["estimated_peak_bytes"] >= 4 * n and s["output_bytes"] == 4 * n


def test_methods_lists_msmoe_with_its_parameters(capsys):
    from modalmerge.cli import main

    assert main(["methods", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["msmoe"]
    assert m["whole_model"] and m["base"] == "forbidden" and m["max_models"] == 1
    assert [p["name"] for p in m["params"]] == ["num_experts", "held_out"]


def _dense(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=VOCAB)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case, match", [
    ("two models", "takes at most 1 model"),
    ("base", "takes no base model: remove `base`"),
    ("dense", "msmoe found no MoE block"),
    ("no config", "from its config.json, which is not there"),
    ("too many experts", "num_experts 5 is more than the 4 experts of model.layers.0.mlp"),
    ("no calibration", "needs calibration data"),
    ("include", "remove `include` and `exclude`"),
    ("per-model params", "cannot be set per model"),
])
def test_recipe_errors(moe_folder, tmp_path, case, match):
    import modalmerge

    recipe = _recipe(moe_folder)
    if case == "two models":
        recipe["models"] = [str(moe_folder), {"path": str(moe_folder), "name": "again"}]
    elif case == "base":
        recipe["base"] = str(moe_folder)
    elif case == "dense":
        recipe["models"] = [str(_dense(tmp_path / "dense"))]
    elif case == "no config":
        (tmp_path / "bare").mkdir()
        (tmp_path / "bare" / "model.safetensors").write_bytes((moe_folder / "model.safetensors").read_bytes())
        recipe["models"] = [str(tmp_path / "bare")]
    elif case == "too many experts":
        recipe["params"] = {"num_experts": 5}
    elif case == "no calibration":
        del recipe["calibration"]
    elif case == "include":
        recipe["include"] = ["model.layers.0.*"]
    elif case == "per-model params":
        recipe["models"] = [{"path": str(moe_folder), "params": {"num_experts": 2}}]
    with pytest.raises(MergeError, match=match) as e:
        modalmerge.merge(recipe, tmp_path / "out", trust_recipe_code=True)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    if case not in ("two models", "base", "per-model params"):  # the plan is built: --dry-run checks too
        with pytest.raises(MergeError, match=match):
            modalmerge.describe(modalmerge.plan(recipe, trust_recipe_code=True))


def test_recipe_error_is_one_line_on_the_command_line(tmp_path, capsys):
    from modalmerge.cli import main

    (tmp_path / "r.yaml").write_text(json.dumps(_recipe(_dense(tmp_path / "dense"))))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "--trust-recipe-code"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model 'dense'") and "no MoE block" in err and err.count("\n") == 1


def test_msmoe_is_not_a_state_dict_method():
    from modalmerge.api import merge_state_dicts

    sd = {"w": torch.ones(2, 2)}
    with pytest.raises(MergeError, match="loads and runs a whole model folder"):
        merge_state_dicts("msmoe", [sd])


def test_benchmark_ablations_by_hand():
    """merge_experts without alignment and/or with uniform weights (the benchmark's baselines)."""
    gate_up, down = random_experts(e=4)
    freq = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    assignment = [3, 2, 2, 3]  # groups {1, 2} and {0, 3}
    gu, dn = msmoe.merge_experts(gate_up, down, freq, assignment, align=False, weighting="uniform")
    assert torch.allclose(gu[0], (gate_up[0] + gate_up[3]) / 2) and torch.equal(gu[0], gu[3])
    assert torch.allclose(dn[1], (down[1] + down[2]) / 2) and torch.equal(dn[1], dn[2])
    gu, dn = msmoe.merge_experts(gate_up, down, freq, assignment, align=False)
    assert torch.allclose(gu[1], (0.2 * gate_up[1] + 0.3 * gate_up[2]) / 0.5)
    assert torch.allclose(dn[3], (0.1 * down[0] + 0.4 * down[3]) / 0.5)
    gu, dn = msmoe.merge_experts(gate_up, down, freq, assignment, weighting="uniform")
    a, b = msmoe.permute_expert(gate_up[0], down[0], msmoe.align_permutation(gate_up, down, 3, 0))
    assert torch.allclose(gu[0], (a + gate_up[3]) / 2, atol=1e-6) and torch.allclose(dn[3], (b + down[3]) / 2, atol=1e-6)


def test_msmoe_has_no_tensor_kernel():
    from modalmerge.methods.registry import get_method

    with pytest.raises(MergeError, match="not tensor by tensor"):
        get_method("msmoe").kernel(None, msmoe.MsmoeParams(), {})
