"""WIDEN, metrics-weighted averaging, FRANK and per-layer schedules, against dense references."""

import json
import math

import pytest
import torch

from conftest import finetunes, load_sd, random_state_dict
from modalmerge import merge_state_dicts
from modalmerge.api import merge
from modalmerge.errors import MergeError
from modalmerge.methods import schedules
from modalmerge.methods.registry import METHODS
from modalmerge.methods.widen import scores, within_model_rank

SHAPES = {
    "embed.weight": (16, 8),
    "layers.0.linear.weight": (8, 8),
    "layers.0.linear.bias": (8,),
    "layers.1.linear.weight": (12, 8),
    "layers.2.linear.weight": (12, 12),
    "layers.3.norm.weight": (12,),
    "head.weight": (3, 12),
}


# -- schedules --------------------------------------------------------------------------------

def test_schedule_values_hand_computed():
    assert schedules.value_at([0.0, 1.0], 0, 5) == 0.0
    assert schedules.value_at([0.0, 1.0], 2, 5) == pytest.approx(0.5)
    assert schedules.value_at([0.0, 1.0], 4, 5) == 1.0
    assert schedules.value_at([0.0, 1.0, 0.0], 1, 3) == 1.0
    assert schedules.value_at([0.0, 1.0, 0.0], 1, 5) == pytest.approx(0.5)  # pos 0.5 between 0 and 1
    assert schedules.value_at([0.3, 0.9], None, 5) == 0.3                  # no layer: the first value


def _layer_lambda(name, values, num_layers=4):
    import re
    m = re.search(r"layers\.(\d+)\.", name)
    return schedules.value_at(values, int(m.group(1)) if m else None, num_layers)


def test_task_arithmetic_lambda_gradient():
    base = random_state_dict(0, SHAPES)
    models = finetunes(base, 2)
    grad = [0.1, 0.7]
    out = merge_state_dicts("task_arithmetic", models, base, {"lambda": {"layers": grad}})
    for n in base:
        lam = _layer_lambda(n, grad)
        ref = base[n] + lam * sum(m[n] - base[n] for m in models)
        assert torch.allclose(out[n], ref, atol=1e-6), n


def test_ties_lambda_and_density_gradient_chunked():
    from test_basic_methods import dense_ties
    base = random_state_dict(1, SHAPES)
    models = finetunes(base, 3)
    grad = [1.0, 0.2, 0.5]
    out = merge_state_dicts("ties", models, base, {"lambda": {"layers": grad}, "density": 0.3,
                                                   "scope": "tensor"})
    unit = dense_ties(base, models, 0.3, scope="tensor")
    for n in base:
        lam = _layer_lambda(n, grad)
        assert torch.allclose(out[n], base[n] + lam * (unit[n] - base[n]), atol=1e-6), n
    # global scope, chunked: the kernel sees the resolved lambda on every chunk
    out = merge_state_dicts("ties", models, base, {"lambda": {"layers": grad}, "density": 0.3},
                            exact_stats=True, chunk_elems=16)
    unit = dense_ties(base, models, 0.3)
    for n in base:
        lam = _layer_lambda(n, grad)
        assert torch.allclose(out[n], base[n] + lam * (unit[n] - base[n]), atol=1e-6), n


def test_schedule_errors_and_mergekit_gradient(tmp_path):
    base = random_state_dict(0, SHAPES)
    models = finetunes(base, 2)
    with pytest.raises(MergeError, match="layers"):
        merge_state_dicts("task_arithmetic", models, base, {"lambda": {"layers": []}})
    from modalmerge.engine.recipe import parse_recipe
    r = parse_recipe({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "x"}],
                      "parameters": {"lambda": [0.1, 0.5]}})
    assert r.params["lambda"] == {"layers": [0.1, 0.5]}


# -- WIDEN ------------------------------------------------------------------------------------

def test_widen_rank_and_scores_hand_computed():
    r = within_model_rank(torch.tensor([[0.3, 0.1, 0.2, 0.0]]))
    assert r.tolist() == [[0.75, 0.25, 0.5, 0.0]]
    ranks = torch.tensor([[0.0, 0.5], [0.5, 0.0]])
    s = scores(ranks, t=1.0, s=1.0)
    # means 0.25 per model: ranks 0.5 exceed it → 1.0; others keep the softmax value
    e = math.exp(0) / (math.exp(0) + math.exp(0.5))
    assert torch.allclose(s, torch.tensor([[e, 1.0], [1.0, e]]), atol=1e-7)


def dense_widen(base, models, t=1.0, s=1.0, transpose=("embed.weight", "head_x")):
    out = {}
    n_models = len(models)

    def rank(x):  # x [N, J]
        r = torch.zeros_like(x)
        for i in range(x.shape[0]):
            order = sorted(range(x.shape[1]), key=lambda j: (float(x[i, j]), j))
            for pos, j in enumerate(order):
                r[i, j] = pos / x.shape[1]
        return r

    def score(r):
        sm = torch.softmax(r, dim=0)
        for i in range(r.shape[0]):
            for j in range(r.shape[1]):
                if r[i, j] > t * r[i].mean():
                    sm[i, j] = s
        return sm

    for n in base:
        b = base[n]
        if b.dim() == 1:
            d = torch.stack([m[n] - b for m in models])
            w = score(rank(d.abs()))
            out[n] = b + (w * d).sum(0)
            continue
        tr = n in transpose
        B = b.T if tr else b
        Ms = [m[n].T if tr else m[n] for m in models]
        dm, dd = [], []
        for M in Ms:
            dm.append((M.norm(dim=0) - B.norm(dim=0)).abs())
            dd.append(1 - torch.nn.functional.cosine_similarity(M, B, dim=0))
        w = 0.5 * (score(rank(torch.stack(dm))) + score(rank(torch.stack(dd))))
        merged = B + sum(w[i][None, :] * (Ms[i] - B) for i in range(n_models))
        out[n] = merged.T if tr else merged
    return out


@pytest.mark.parametrize("t,s", [(1.0, 1.0), (1.5, 0.5)])
def test_widen_matches_dense_reference(t, s):
    base = random_state_dict(2, SHAPES)
    models = [finetunes(base, 1, 0.05, seed=5)[0], finetunes(base, 1, 0.3, seed=6)[0]]
    out = merge_state_dicts("widen", models, base, {"t": t, "s": s}, chunk_elems=16)
    ref = dense_widen(base, models, t, s)
    for n in base:
        assert torch.allclose(out[n], ref[n], atol=1e-6), n


def test_widen_end_to_end_llama(llama_family, tmp_path):
    out = tmp_path / "w"
    merge({"method": "widen", "base": str(llama_family["base"]),
           "models": [str(llama_family["ft0"]), str(llama_family["ft1"])]}, out)
    sd = load_sd(out)
    base, ft = load_sd(llama_family["base"]), [load_sd(llama_family[f"ft{i}"]) for i in range(2)]
    ref = dense_widen(base, ft, transpose=("model.embed_tokens.weight", "lm_head.weight"))
    for n in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight",
              "lm_head.weight"):
        assert torch.allclose(sd[n], ref[n], atol=1e-5), n
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)


# -- metrics-weighted -------------------------------------------------------------------------

def test_metrics_weighted_loss_and_step_hand_computed():
    base = random_state_dict(3)
    models = finetunes(base, 3)
    out = merge_state_dicts("metrics_weighted", models, params={"p": 1.0},
                            model_params=[{"loss": 1.0}, {"loss": 0.5}, {"loss": 2.0}])
    w = [1.0, 2.0, 0.5]
    for n in base:
        ref = sum(wi * m[n] for wi, m in zip(w, models)) / 3.5
        assert torch.allclose(out[n], ref, atol=1e-6)
    out = merge_state_dicts("metrics_weighted", models, params={"metric": "step", "p": 2.0},
                            model_params=[{"step": 100}, {"step": 200}, {"step": 300}], chunk_elems=16)
    for n in base:
        ref = (1 * models[0][n] + 4 * models[1][n] + 9 * models[2][n]) / 14
        assert torch.allclose(out[n], ref, atol=1e-6)
    out = merge_state_dicts("metrics_weighted", models, params={"p": 0.0},
                            model_params=[{"loss": 1.0}, {"loss": 0.5}, {"loss": 2.0}])
    for n in base:
        assert torch.allclose(out[n], sum(m[n] for m in models) / 3, atol=1e-6)


def test_metrics_weighted_missing_metric_is_an_error():
    base = random_state_dict(3)
    with pytest.raises(MergeError, match="model_1.*loss"):
        merge_state_dicts("metrics_weighted", finetunes(base, 2), model_params=[{"loss": 1.0}, {}])


def _trainer_state(folder, step, history):
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))


def test_metrics_from_trainer_state_and_lora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from conftest import tiny_llama

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    paths, deltas = [], []
    for i, (step, loss) in enumerate([(100, 2.0), (200, 1.0)]):
        m = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i * 7 + len(name))) * 0.1)
        d = tmp_path / f"checkpoint-{step}"
        m.save_pretrained(d)
        _trainer_state(d, step, [{"step": step - 50, "loss": 9.0}, {"step": step, "loss": 3.0},
                                 {"step": step, "eval_loss": loss}])
        paths.append(d)
        deltas.append(m.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default").detach())
    out = tmp_path / "avg"
    merge({"method": "metrics_weighted", "base": str(tmp_path / "base"), "models": [str(p) for p in paths]}, out)
    sd = load_sd(out)
    b = load_sd(tmp_path / "base")
    name = "model.layers.0.self_attn.q_proj.weight"
    w = [0.5 / 1.5, 1.0 / 1.5]   # 1/loss: eval_loss 2.0 and 1.0 at each checkpoint's step
    assert torch.allclose(sd[name], b[name] + w[0] * deltas[0] + w[1] * deltas[1], atol=1e-6)
    from modalmerge.engine.metrics import trainer_metrics
    assert trainer_metrics(paths[1]) == {"step": 200.0, "loss": 1.0}
    _trainer_state(tmp_path, 300, [{"step": 250, "eval_loss": 0.7}, {"step": 300, "loss": 0.9}])
    assert trainer_metrics(tmp_path) == {"step": 300.0, "loss": 0.9}


# -- FRANK ------------------------------------------------------------------------------------

def dense_frank(base, models, a, vision=0, layer_of=None, blocks=None):
    layers = sorted({layer_of(n) for n in base if blocks(n)})
    L = max(layers) + 1
    prior = [math.exp(-a * j) for j in range(L)]
    prior = [x / sum(prior) for x in prior]
    sq = {l: [sum(float(((m[n] - base[n]) ** 2).sum()) for n in base if blocks(n) and layer_of(n) == l)
              for m in models] for l in layers}
    out = {}
    for n in base:
        if not blocks(n):
            out[n] = models[vision][n]
            continue
        l = layer_of(n)
        w = [prior[l] if t == vision else 1 - prior[l] for t in range(len(models))]
        mass = [wt * s for wt, s in zip(w, sq[l])]
        out[n] = base[n] + sum(mt / sum(mass) * (m[n] - base[n]) for mt, m in zip(mass, models))
    return out


def test_frank_matches_dense_reference():
    import re
    base = random_state_dict(4, SHAPES)
    models = [finetunes(base, 1, 0.1, seed=1)[0], finetunes(base, 1, 0.3, seed=2)[0]]
    layer_of = lambda n: int(re.search(r"layers\.(\d+)\.", n).group(1))
    blocks = lambda n: n.startswith("layers.")
    for a, roles, vision in [(0.1, [{}, {}], 0), (1.0, [{"role": "reasoning"}, {"role": "vision"}], 1)]:
        out = merge_state_dicts("frank", models, base, {"a": a}, model_params=roles, chunk_elems=16)
        ref = dense_frank(base, models, a, vision, layer_of, blocks)
        for n in base:
            assert torch.allclose(out[n], ref[n], atol=1e-6), n
    with pytest.raises(MergeError, match="role: vision"):
        merge_state_dicts("frank", models, base, model_params=[{"role": "vision"}, {"role": "vision"}])


def test_frank_hand_computed_two_layers():
    base = {"layers.0.w": torch.zeros(2), "layers.1.w": torch.zeros(2), "enc.w": torch.zeros(2)}
    v = {"layers.0.w": torch.tensor([1.0, 0.0]), "layers.1.w": torch.tensor([1.0, 0.0]), "enc.w": torch.ones(2)}
    r = {"layers.0.w": torch.tensor([0.0, 2.0]), "layers.1.w": torch.tensor([0.0, 2.0]), "enc.w": -torch.ones(2)}
    out = merge_state_dicts("frank", [v, r], base, {"a": math.log(3.0)})
    # prior: w_V = [3/4, 1/4]; layer 0: 3/4·1 vs 1/4·4 → λ = [3/7, 4/7]; layer 1: 1/4·1 vs 3/4·4 → [1/13, 12/13]
    assert torch.allclose(out["layers.0.w"], torch.tensor([3 / 7, 8 / 7]), atol=1e-6)
    assert torch.allclose(out["layers.1.w"], torch.tensor([1 / 13, 24 / 13]), atol=1e-6)
    assert torch.equal(out["enc.w"], torch.ones(2))


def test_frank_end_to_end_llama_parts(llama_family, tmp_path):
    out = tmp_path / "f"
    merge({"method": "frank", "base": str(llama_family["base"]), "params": {"a": 0.5},
           "models": [{"path": str(llama_family["ft0"]), "params": {"role": "vision"}}, str(llama_family["ft1"])],
           "parts": {"encoder": "model.layers.1.self_attn.*"}}, out)
    sd, v = load_sd(out), load_sd(llama_family["ft0"])
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              "model.layers.1.self_attn.q_proj.weight"):
        assert torch.equal(sd[n], v[n]), n
    assert not torch.equal(sd["model.layers.0.mlp.up_proj.weight"], v["model.layers.0.mlp.up_proj.weight"])


def test_new_methods_listed():
    for name in ("widen", "metrics_weighted", "frank"):
        assert name in METHODS
