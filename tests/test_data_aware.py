"""Data-aware methods (spec 13): the calibration hook, Fisher merging, RegMean, OTA, AdaMerging."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from modalmerge.api import merge, merge_state_dicts
from modalmerge.procedures.calibration import (
    CalibrationSpec,
    fisher_diagonal,
    gram_matrices,
    load_batches,
    load_model,
)
from modalmerge.checkpoint.sources import open_source
from modalmerge.errors import MergeError

from conftest import finetunes, load_sd, random_state_dict

VOCAB, LABELS = 40, 3


def calib_batches(seed: int = 0, n: int = 8, length: int = 5, batch: int = 4, labels: bool = True):
    """The calibration callable the recipes name (`test_data_aware:calib_batches`)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, batch):
        b = {"input_ids": torch.randint(1, VOCAB, (min(batch, n - s), length), generator=g)}
        if labels:
            b["labels"] = torch.randint(0, LABELS, (b["input_ids"].shape[0],), generator=g)
        out.append(b)
    return out


def tiny_bert(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16, num_labels=LABELS,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def bert_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    paths = {}
    base = tiny_bert(0)
    base.save_pretrained(root / "base")
    paths["base"] = root / "base"
    for i in range(2):
        m = tiny_bert(0)
        g = torch.Generator().manual_seed(50 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / f"ft{i}")
        paths[f"ft{i}"] = root / f"ft{i}"
    return paths


class Softmax(torch.nn.Module):
    """A linear classifier with a transformers-like output (`.logits`)."""

    def __init__(self, w):
        super().__init__()
        self.lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w)

    def forward(self, x):
        return SimpleNamespace(logits=self.lin(x))


# -- the calibration hook ------------------------------------------------------------------

def test_fisher_diagonal_of_a_softmax_classifier_by_hand():
    # ∂ log softmax(Wx)_y / ∂W = (e_y − p) xᵀ, so F = mean over examples of ((e_y − p) xᵀ)²
    g = torch.Generator().manual_seed(0)
    w, x, y = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g), torch.tensor([0, 2, 1, 1, 0, 2])
    f = fisher_diagonal(Softmax(w), [{"x": x[:3], "labels": y[:3]}, {"x": x[3:], "labels": y[3:]}])
    p = torch.softmax(x @ w.T, dim=-1)
    expect = (((torch.eye(3)[y] - p).unsqueeze(2) * x.unsqueeze(1)) ** 2).mean(0)
    assert torch.allclose(f["lin.weight"], expect, atol=1e-6)
    # without labels: the exact expectation over the classes, Σ_y p_y ((e_y − p) xᵀ)²
    f = fisher_diagonal(Softmax(w), [{"x": x}])
    expect = sum(p[:, c, None, None] * (((torch.eye(3)[c] - p).unsqueeze(2) * x.unsqueeze(1)) ** 2)
                 for c in range(3)).mean(0)
    assert torch.allclose(f["lin.weight"], expect, atol=1e-6)


def test_gram_matrices_skip_padding():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 2)

        def forward(self, x, attention_mask=None):
            return SimpleNamespace(logits=self.a(x))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    grams = gram_matrices(Net(), [{"x": x, "attention_mask": mask}])
    rows = x[mask > 0]
    assert torch.allclose(grams["a.weight"], rows.T @ rows / 5, atol=1e-6)


def test_calibration_from_a_callable_and_a_token_file(tmp_path):
    spec = CalibrationSpec.model_validate({"callable": "test_data_aware:calib_batches", "n": 10, "max_examples": 6})
    batches = load_batches(spec, trust_recipe_code=True)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]  # capped at max_examples
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"input_ids": list(range(1, k + 2)), "label": k % 3}) for k in range(5)))
    spec = CalibrationSpec.model_validate({"file": str(f), "loader": "tokens", "batch_size": 2, "max_length": 3})
    batches = load_batches(spec)
    assert [b["input_ids"].shape for b in batches] == [(2, 2), (2, 3), (1, 3)]
    assert batches[0]["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert batches[1]["labels"].tolist() == [2, 0]
    with pytest.raises(ValueError):
        CalibrationSpec.model_validate({"file": "a", "callable": "b:c"})


# -- Fisher merging ------------------------------------------------------------------------

def _fisher_dense(models, fishers, weights, floor, norms=None):
    out = {}
    for k in models[0]:
        fs = [f[k] / (norms[t] if norms else 1) for t, f in enumerate(fishers)]
        fs = [w * f.clamp_min(floor) for w, f in zip(weights, fs)]
        out[k] = sum(f * m[k] for f, m in zip(fs, models)) / sum(fs)
    return out


def test_fisher_matches_dense_reference():
    base = random_state_dict(0)
    models = finetunes(base, 3)
    g = torch.Generator().manual_seed(7)
    fishers = [{k: torch.rand(v.shape, generator=g) ** 3 for k, v in base.items()} for _ in models]
    fishers[0]["head.weight"].zero_()  # the floor decides there
    weights = [1.0, 2.0, 0.5]
    got = merge_state_dicts("fisher", models, weights=weights, data={"fisher": fishers})
    want = _fisher_dense(models, fishers, weights, 1e-6)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    # normalised per model by the whole-model L2 norm
    norms = [sum(float(v.double().square().sum()) for v in f.values()) ** 0.5 for f in fishers]
    got = merge_state_dicts("fisher", models, params={"normalize_fisher": True, "floor": 1e-3},
                            data={"fisher": fishers}, chunk_elems=16)
    want = _fisher_dense(models, fishers, [1.0] * 3, 1e-3, norms)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_fisher_with_equal_fishers_is_the_average_and_hand_case():
    a = {"w": torch.tensor([1.0, 2.0, 3.0])}
    b = {"w": torch.tensor([3.0, 0.0, 5.0])}
    same = {"w": torch.tensor([0.5, 4.0, 2.0])}
    got = merge_state_dicts("fisher", [a, b], data={"fisher": [same, same]})
    assert torch.allclose(got["w"], torch.tensor([2.0, 1.0, 4.0]))
    # F_a = [3, 1, 0 (floor)], F_b = [1, 1, 2]: (3·1 + 1·3)/4, (2 + 0)/2, 5
    got = merge_state_dicts("fisher", [a, b], data={"fisher": [{"w": torch.tensor([3.0, 1.0, 0.0])},
                                                                {"w": torch.tensor([1.0, 1.0, 2.0])}]})
    assert torch.allclose(got["w"], torch.tensor([1.5, 1.0, 5.0]), atol=1e-5)
    # a tensor without Fisher (not a trained parameter) is the weighted average
    got = merge_state_dicts("fisher", [a, b], weights=[3.0, 1.0], data={"fisher": [{}, {}]})
    assert torch.allclose(got["w"], (3 * a["w"] + b["w"]) / 4)


# -- RegMean -------------------------------------------------------------------------------

def test_regmean_single_layer_is_least_squares_of_stacked_data():
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(3, 5, generator=g) for _ in range(2)]
    xs = [torch.randn(20, 5, generator=g) for _ in range(2)]
    grams = [{"l.weight": x.T @ x / 20} for x in xs]
    got = merge_state_dicts("regmean", [{"l.weight": w, "l.bias": torch.full((3,), float(i))}
                                        for i, w in enumerate(ws)],
                            params={"alpha": 1.0}, data={"gram": grams})
    # min_W Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖²: least squares over the stacked inputs and targets
    X = torch.cat(xs).double()
    Y = torch.cat([x @ w.T for x, w in zip(xs, ws)]).double()
    want = torch.linalg.lstsq(X, Y).solution.T
    assert torch.allclose(got["l.weight"].double(), want, atol=1e-5)
    assert torch.allclose(got["l.bias"], torch.full((3,), 0.5))  # other tensors averaged


def test_regmean_matches_dense_reference_with_alpha_weights_and_dead_inputs():
    base = random_state_dict(0)
    models = finetunes(base, 3)
    g = torch.Generator().manual_seed(9)
    grams = []
    for _ in models:
        d = {}
        for k, v in base.items():
            if v.dim() == 2:
                x = torch.randn(30, v.shape[1], generator=g)
                x[:, 0] = 0  # an input never active: its column is the weighted average
                d[k] = x.T @ x / 30
        grams.append(d)
    weights = [1.0, 0.5, 2.0]
    got = merge_state_dicts("regmean", models, weights=weights, data={"gram": grams})
    lam = torch.tensor(weights, dtype=torch.float64)
    for k, v in base.items():
        avg = sum(w * m[k].double() for w, m in zip(weights, models)) / lam.sum()
        if v.dim() != 2:
            assert torch.allclose(got[k].double(), avg, atol=1e-6), k
            continue
        gt = [grams[t][k].double() for t in range(3)]
        gt = [0.95 * G + 0.05 * torch.diag(torch.diagonal(G)) for G in gt]
        lhs = sum(w * G for w, G in zip(weights, gt))
        rhs = sum(w * G @ m[k].double().T for w, G, m in zip(weights, gt, models))
        lhs[0, :], lhs[:, 0], lhs[0, 0] = 0, 0, 1
        rhs[0] = avg[:, 0]
        want = torch.linalg.solve(lhs, rhs).T
        assert torch.allclose(got[k].double(), want, atol=1e-5), k


# -- through model folders and the recipe's calibration hook -------------------------------

def _recipe(bert_family, method, params=None, **extra):
    return {"method": method, "base": str(bert_family["base"]),
            "models": [{"path": str(bert_family["ft0"]),
                        "calibration": {"callable": "test_data_aware:calib_batches", "seed": 1}},
                       {"path": str(bert_family["ft1"])}],
            "calibration": {"callable": "test_data_aware:calib_batches", "seed": 2},
            "params": params or {}, **extra}


@pytest.mark.parametrize("method,kind,collect", [("fisher", "fisher", fisher_diagonal),
                                                  ("regmean", "gram", gram_matrices)])
def test_folder_merge_gathers_statistics_from_calibration(bert_family, tmp_path, method, kind, collect):
    merge(_recipe(bert_family, method), tmp_path / "out", trust_recipe_code=True)
    got = load_sd(tmp_path / "out")
    stats = [collect(load_model(open_source(bert_family[f"ft{i}"]), ""), calib_batches(seed=1 + i))
             for i in range(2)]
    want = merge_state_dicts(method, [load_sd(bert_family["ft0"]), load_sd(bert_family["ft1"])],
                             base=load_sd(bert_family["base"]), data={kind: stats})
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    if method == "regmean":
        assert "bert.encoder.layer.0.attention.self.query.weight" in stats[0]


def test_missing_calibration_is_a_clear_error(bert_family, tmp_path):
    r = _recipe(bert_family, "fisher")
    del r["calibration"]
    with pytest.raises(MergeError, match="ft1.*needs calibration data"):
        merge(r, tmp_path / "out", trust_recipe_code=True)
    assert not (tmp_path / "out").exists()
    r = _recipe(bert_family, "fisher")
    r["calibration"] = {"callable": "no_such_module:f"}
    with pytest.raises(MergeError, match="cannot import calibration callable"):
        merge(r, tmp_path / "out", trust_recipe_code=True)


@pytest.mark.parametrize("method,kind", [("regmean", "gram"), ("fisher", "fisher"), ("adamerging", "adamerging")])
def test_dry_run_shows_the_data_pass_memory(bert_family, tmp_path, capsys, method, kind):
    from modalmerge.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(bert_family, method)))
    assert main(["merge", str(path), "--dry-run", "--trust-recipe-code"]) == 0
    out = capsys.readouterr().out
    assert f"data pass   {kind} (" in out and "data memory ~" in out
    r = _recipe(bert_family, method)
    del r["calibration"]
    path.write_text(yaml.safe_dump(r))
    assert main(["merge", str(path), "--dry-run", "--trust-recipe-code"]) == 1
    assert "needs calibration data" in capsys.readouterr().err


# -- OTA / Fast Fisher Grafting ------------------------------------------------------------

def _ota_dense(base, models, moments, density, eps=1e-8, weights=None):
    weights = weights or [1.0] * len(models)
    keys = list(base)
    taus = [{k: m[k] - base[k] for k in keys} for m in models]
    sal = [{k: v[k] * tau[k] ** 2 for k in keys} for v, tau in zip(moments, taus)]
    thr = []
    for s in sal:
        flat = torch.cat([s[k].reshape(-1) for k in keys])
        k = int(density * flat.numel())
        thr.append(torch.sort(flat, descending=True).values[k - 1])
    out = {}
    for k in keys:
        om = [w * (v[k].sqrt() + eps) * (s[k] >= th).float() for w, v, s, th in zip(weights, moments, sal, thr)]
        tot = sum(om)
        merged = sum(o * tau[k] for o, tau in zip(om, taus)) / torch.where(tot > 0, tot, torch.ones_like(tot))
        out[k] = base[k] + torch.where(tot > 0, merged, torch.zeros_like(merged))
    return out


def test_ota_hand_case():
    base = {"w": torch.zeros(4)}
    a, b = {"w": torch.tensor([1.0, 2.0, -1.0, 0.5])}, {"w": torch.tensor([3.0, -2.0, 1.0, 0.1])}
    va, vb = {"w": torch.tensor([4.0, 0.01, 1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0, 0.0, 0.0])}
    # saliency a: [4, .04, 1, 0] keeps entries 0, 2; b: [9, 4, 0, 0] keeps 0, 1 (density 0.5)
    got = merge_state_dicts("ota", [a, b], base=base, params={"density": 0.5, "epsilon": 0.0},
                            data={"exp_avg_sq": [va, vb]}, exact_stats=True)
    # entry 0: ω = (2, 1) -> (2·1 + 1·3)/3; entry 1: only b; entry 2: only a; entry 3: masked everywhere
    assert torch.allclose(got["w"], torch.tensor([5 / 3, -2.0, -1.0, 0.0]), atol=1e-6)


def test_ota_matches_dense_reference_chunked():
    base = random_state_dict(0)
    models = finetunes(base, 3)
    g = torch.Generator().manual_seed(5)
    moments = [{k: torch.rand(v.shape, generator=g) ** 2 for k, v in base.items()} for _ in models]
    got = merge_state_dicts("ota", models, base=base, params={"density": 0.3}, data={"exp_avg_sq": moments},
                            exact_stats=True, chunk_elems=16, weights=[1.0, 2.0, 1.0])
    want = _ota_dense(base, models, moments, 0.3, weights=[1.0, 2.0, 1.0])
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_ota_reads_optimizer_state_files(bert_family, tmp_path):
    from safetensors.torch import save_file

    base = load_sd(bert_family["base"])
    models = [load_sd(bert_family[f"ft{i}"]) for i in range(2)]
    moments = [{k: torch.rand(v.shape) ** 2 for k, v in base.items()} for _ in models]
    save_file(moments[0], tmp_path / "v0.safetensors")
    names = list(base)
    # a torch optimizer state dict, states keyed by parameter index in the model's order
    torch.save({"state": {i: {"exp_avg_sq": moments[1][n]} for i, n in enumerate(names)},
                "param_groups": [{"params": list(range(len(names)))}]}, tmp_path / "optimizer.pt")
    recipe = {"method": "ota", "base": str(bert_family["base"]), "params": {"density": 0.5},
              "models": [{"path": str(bert_family["ft0"]), "optimizer_state": str(tmp_path / "v0.safetensors")},
                         {"path": str(bert_family["ft1"]), "optimizer_state": str(tmp_path / "optimizer.pt")}]}
    with pytest.raises(MergeError, match="pickled optimizer state; pass --allow-pickle"):
        merge(recipe, tmp_path / "out")
    merge(recipe, tmp_path / "out", allow_pickle=True, exact_stats=True)
    want = merge_state_dicts("ota", models, base=base, params={"density": 0.5}, data={"exp_avg_sq": moments},
                             exact_stats=True)
    got = load_sd(tmp_path / "out")
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    del moments[0][names[3]]
    save_file(moments[0], tmp_path / "v0.safetensors")
    with pytest.raises(MergeError, match=f"has no entry for tensor '{names[3]}'"):
        merge(recipe, tmp_path / "out2", allow_pickle=True)


# -- AdaMerging ----------------------------------------------------------------------------

def test_adamerging_kernel_matches_dense_reference_chunked():
    base = random_state_dict(0)
    models = finetunes(base, 2)
    g = torch.Generator().manual_seed(2)
    coefs = [{k: torch.rand(1, generator=g) for k in base} for _ in models]
    got = merge_state_dicts("adamerging", models, base=base, data={"adamerging": coefs}, chunk_elems=16)
    for k in base:
        want = base[k] + sum(c[k] * (m[k] - base[k]) for c, m in zip(coefs, models))
        assert torch.allclose(got[k], want, atol=1e-6), k


def _entropy_of(folder, batches):
    from modalmerge.procedures.adamerging_fit import prediction_entropy

    model = load_model(open_source(folder), "")
    with torch.no_grad():
        return sum(float(prediction_entropy(model(input_ids=b["input_ids"]).logits)) for b in batches)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_learns_coefficients_that_lower_entropy(bert_family, tmp_path, granularity):
    recipe = _recipe(bert_family, "adamerging", {"granularity": granularity, "steps": 0})
    for m in recipe["models"]:
        m.pop("calibration", None)
    recipe["calibration"] = {"callable": "test_data_aware:calib_batches", "labels": False}
    # no steps: the coefficients stay at init, i.e. task arithmetic with λ = 0.3
    merge(recipe, tmp_path / "init", trust_recipe_code=True)
    ta = merge_state_dicts("task_arithmetic", [load_sd(bert_family[f"ft{i}"]) for i in range(2)],
                           base=load_sd(bert_family["base"]), params={"lambda": 0.3})
    got = load_sd(tmp_path / "init")
    assert all(torch.allclose(got[k], ta[k], atol=1e-6) for k in ta)

    from modalmerge.api import plan
    from modalmerge.procedures.calibration import adamerging_coefficients

    recipe["params"].update(steps=5, lr=0.1)
    p = plan(recipe, trust_recipe_code=True)
    coefs = adamerging_coefficients(p, [calib_batches(labels=False)] * 2)
    values = torch.stack([torch.cat(list(c.values())) for c in coefs])
    assert bool(((values >= 0) & (values <= 1)).all()) and not torch.allclose(values, torch.full_like(values, 0.3))
    assert (values.unique().numel() <= 2) == (granularity == "task")
    merge(recipe, tmp_path / "fit", trust_recipe_code=True)
    want = merge_state_dicts("adamerging", [load_sd(bert_family[f"ft{i}"]) for i in range(2)],
                             base=load_sd(bert_family["base"]), data={"adamerging": coefs})
    got = load_sd(tmp_path / "fit")
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    batches = calib_batches(labels=False)
    assert _entropy_of(tmp_path / "fit", batches) < _entropy_of(tmp_path / "init", batches)
