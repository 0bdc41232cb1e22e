"""TALL masks, Consensus, EMR (spec 6) and the decoupled folder: dense references written here,
hand-computed cases, chunking, bit-packed masks on disk, and `modalmerge extract`."""

import json

import pytest
import torch

from conftest import load_sd
from modalmerge import MergeError, merge, merge_state_dicts
from modalmerge.cli import main
from modalmerge.ops import unpack_bits


# -- inputs ---------------------------------------------------------------------------------
def dyadic_family(seed=0, n=3, shapes=None):
    """A base and n fine-tunes whose values are small dyadic numbers: task vectors are exact,
    and exact zero sums (the tie rule) and exact mask boundaries occur often."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"emb.weight": (40, 8), "l.weight": (24, 16), "l.bias": (16,), "n.weight": (8,)}
    base = {k: torch.randint(-8, 9, s, generator=g).float() / 8 for k, s in shapes.items()}
    models = [{k: v + torch.randint(-3, 4, v.shape, generator=g).float() / 16 for k, v in base.items()}
              for _ in range(n)]
    return base, models


def masks_of(sink, task, name, shape):
    return unpack_bits(sink.masks[f"{task}::{name}"], shape)


# -- dense references ------------------------------------------------------------------------
def dense_ties_vector(base, models, density, weights, scope="global"):
    """Unscaled TIES vector with disjoint sum, per tensor name."""
    names = list(base)
    T = len(models)
    deltas = {n: torch.stack([m[n] - base[n] for m in models]) for n in names}
    if density < 1:
        if scope == "global":
            for t in range(T):
                allv = torch.cat([deltas[n][t].reshape(-1).abs() for n in names])
                thr = torch.sort(allv, descending=True).values[int(density * allv.numel()) - 1]
                for n in names:
                    deltas[n][t][deltas[n][t].abs() < thr] = 0
        else:
            for n in names:
                for t in range(T):
                    d = deltas[n][t]  # ties at the k-th largest are kept, as ops.keep_top_fraction does
                    thr = torch.sort(d.reshape(-1).abs(), descending=True).values[int(density * d.numel()) - 1]
                    d[d.abs() < thr] = 0
    out = {}
    w = torch.tensor(weights)
    for n in names:
        x = deltas[n] * w.reshape((-1,) + (1,) * (deltas[n].dim() - 1))
        gamma = torch.sign(x.sum(0))
        gamma[gamma == 0] = 1.0 if x.sum() >= 0 else -1.0
        agree = (torch.sign(x) == gamma) & (x != 0)
        out[n] = (x * agree).sum(0)
    return out


def dense_tall(base, models, lambdas, shared="sum", density=0.2, weights=None, scope="global"):
    """(shared vector, {task index: mask}) per tensor name."""
    weights = weights or [1.0] * len(models)
    if shared == "sum":
        vec = {n: sum(w * (m[n] - base[n]) for w, m in zip(weights, models)) for n in base}
    else:
        vec = dense_ties_vector(base, models, density, weights, scope)
    masks = {n: [(m[n] - base[n]).abs() >= lam * (vec[n] - (m[n] - base[n])).abs()
                 for m, lam in zip(models, lambdas)] for n in base}
    return vec, masks


def dense_emr(base, models):
    """(τ_uni, masks, λ) with the whole-model λ_t."""
    T = len(models)
    num, den = [0.0] * T, [0.0] * T
    uni, masks = {}, {}
    for n in base:
        taus = torch.stack([m[n] - base[n] for m in models])
        s = taus.sum(0)
        sigma = torch.sign(s)
        sigma[s == 0] = 1.0 if taus.sum() >= 0 else -1.0
        agree = taus * sigma > 0
        uni[n] = sigma * (taus.abs() * agree).amax(0)
        masks[n] = list(agree)
        for t in range(T):
            num[t] += float(taus[t].abs().double().sum())
            den[t] += float((uni[n].abs() * agree[t]).double().sum())
    return uni, masks, [a / b for a, b in zip(num, den)]


def text_weights(base, vec, masks, scalars):
    return {n: base[n] + torch.stack([s * m.float() for s, m in zip(scalars, masks[n])]).mean(0) * vec[n]
            for n in base}


# -- hand-computed -----------------------------------------------------------------------------
def two_task_case():
    base = {"w": torch.zeros(6), "v": torch.zeros(2)}
    t1 = {"w": torch.tensor([1.0, 2.0, -1.0, 0.5, 0.0, 3.0]), "v": torch.tensor([-1.0, 2.0])}
    t2 = {"w": torch.tensor([1.0, -1.0, -1.0, 2.0, 0.0, -3.0]), "v": torch.tensor([-1.0, -2.0])}
    return base, {"a": t1, "b": t2}


def test_hand_computed_two_tasks():
    base, models = two_task_case()
    out, sink = merge_state_dicts("tall", models, base=base, return_decoupled=True)
    # τ_MTL = [2, 1, -2, 2.5, 0, 0]; m_a: |τ_a| >= 0.6|τ_b|, m_b: |τ_b| >= 0.6|τ_a|
    assert torch.equal(sink.shared["w"], torch.tensor([2.0, 1.0, -2.0, 2.5, 0.0, 0.0]))
    assert masks_of(sink, "a", "w", (6,)).tolist() == [True, True, True, False, True, True]
    assert masks_of(sink, "b", "w", (6,)).tolist() == [True, False, True, True, True, True]
    assert torch.allclose(out["w"], torch.tensor([2.0, 0.5, -2.0, 1.25, 0.0, 0.0]))
    assert [t["scalar"] for t in sink.manifest["tasks"]] == [1.0, 1.0]

    # consensus keeps entries both masks keep; α = 0.3 on a plain sum
    out = merge_state_dicts("consensus", models, base=base)
    assert torch.allclose(out["w"], torch.tensor([0.6, 0.0, -0.6, 0.0, 0.0, 0.0]))

    # EMR: w sums to 3.5 (ties to +), v to -2 (ties to −); σ_w = [+,+,−,+,+,+], σ_v = [−,−]
    out, sink = merge_state_dicts("emr", models, base=base, return_decoupled=True)
    assert torch.equal(sink.shared["w"], torch.tensor([1.0, 2.0, -1.0, 2.0, 0.0, 3.0]))
    assert torch.equal(sink.shared["v"], torch.tensor([-1.0, -2.0]))
    assert masks_of(sink, "a", "w", (6,)).tolist() == [True, True, True, True, False, True]
    assert masks_of(sink, "b", "w", (6,)).tolist() == [True, False, True, True, False, False]
    assert masks_of(sink, "a", "v", (2,)).tolist() == [True, False]
    assert masks_of(sink, "b", "v", (2,)).tolist() == [True, True]
    # λ_a = (7.5 + 3) / (9 + 1), λ_b = (8 + 3) / (4 + 3): over both tensors
    lam = [t["scalar"] for t in sink.manifest["tasks"]]
    assert lam == pytest.approx([1.05, 11 / 7], rel=1e-12)
    expected_v = torch.tensor([-(1.05 + 11 / 7) / 2, -2 * (11 / 7) / 2])
    assert torch.allclose(out["v"], expected_v, atol=1e-6)


# -- dense references, whole and chunked ------------------------------------------------------
@pytest.mark.parametrize("shared,scope", [("sum", "global"), ("ties", "global"), ("ties", "tensor")])
def test_tall_matches_dense_and_chunking(shared, scope):
    base, models = dyadic_family(1)
    lambdas = [0.5, 0.6, 0.3]  # 0.5: exact mask boundaries |τ_t| = λ|τ_MTL − τ_t| occur
    kw = dict(base=base, params={"shared": shared, "scope": scope, "density": 0.4}, weights=[1.0, 0.5, 2.0],
              model_params=[{"lambda": 0.5}, {}, {"lambda": 0.3}], exact_stats=True, return_decoupled=True)
    whole, ws = merge_state_dicts("tall", models, **kw)
    chunked, cs = merge_state_dicts("tall", models, chunk_elems=64, **kw)
    vec, masks = dense_tall(base, models, lambdas, shared, 0.4, [1.0, 0.5, 2.0], scope)
    ref = text_weights(base, vec, masks, [1.0] * 3)
    for n in base:
        assert torch.equal(whole[n], chunked[n]) and torch.equal(ws.shared[n], cs.shared[n]), n
        assert torch.allclose(whole[n], ref[n], atol=1e-6), n
        assert torch.allclose(ws.shared[n], vec[n], atol=1e-6), n
        for t in range(3):
            assert torch.equal(masks_of(ws, f"model_{t}", n, base[n].shape), masks[n][t]), (n, t)
            assert torch.equal(ws.masks[f"model_{t}::{n}"], cs.masks[f"model_{t}::{n}"])


@pytest.mark.parametrize("shared,min_agree,alpha", [("sum", 2, None), ("ties", 2, None), ("sum", 3, 0.7)])
def test_consensus_matches_dense_and_chunking(shared, min_agree, alpha):
    base, models = dyadic_family(2)
    params = {"shared": shared, "min_agree": min_agree, "density": 0.5}
    if alpha is not None:
        params["alpha"] = alpha
    kw = dict(base=base, params=params, model_params=[{}, {"lambda": 0.4}, {}], exact_stats=True)
    whole = merge_state_dicts("consensus", models, **kw)
    chunked = merge_state_dicts("consensus", models, chunk_elems=64, **kw)
    vec, masks = dense_tall(base, models, [0.6, 0.4, 0.6], shared, 0.5)
    scale = alpha if alpha is not None else {"sum": 0.3, "ties": 1.0}[shared]
    for n in base:
        keep = torch.stack(masks[n]).sum(0) >= min_agree
        ref = base[n] + scale * keep * vec[n]
        assert torch.equal(whole[n], chunked[n]), n
        assert torch.allclose(whole[n], ref, atol=1e-6), n


def test_emr_matches_dense_with_global_lambda_and_chunking():
    base, models = dyadic_family(3)
    whole, ws = merge_state_dicts("emr", models, base=base, return_decoupled=True)
    chunked, cs = merge_state_dicts("emr", models, base=base, chunk_elems=64, return_decoupled=True)
    uni, masks, lam = dense_emr(base, models)
    assert [t["scalar"] for t in ws.manifest["tasks"]] == pytest.approx(lam, rel=1e-12)
    assert [t["scalar"] for t in cs.manifest["tasks"]] == pytest.approx(lam, rel=1e-12)
    # the λ_t are whole-model ratios: no single tensor gives them
    n0 = "l.weight"
    one = [float((m[n0] - base[n0]).abs().sum()) / float((uni[n0].abs() * masks[n0][t]).sum())
           for t, m in enumerate(models)]
    assert one != pytest.approx(lam, rel=1e-3)
    ref = text_weights(base, uni, masks, lam)
    for n in base:
        assert torch.equal(ws.shared[n], uni[n]) and torch.equal(cs.shared[n], uni[n]), n
        assert torch.allclose(whole[n], ref[n], atol=1e-6) and torch.allclose(chunked[n], ref[n], atol=1e-6), n
        for t in range(3):
            assert torch.equal(masks_of(ws, f"model_{t}", n, base[n].shape), masks[n][t])
            assert torch.equal(masks_of(cs, f"model_{t}", n, base[n].shape), masks[n][t])


def test_parameters_and_defaults():
    from modalmerge.methods import get_method

    tall = get_method("tall").parse_params({})
    assert (tall.lam, tall.shared, tall.density, tall.scope) == (0.6, "sum", 0.2, "global")
    assert get_method("tall").decoupled and get_method("emr").decoupled and not get_method("consensus").decoupled
    c = get_method("consensus")
    assert c.parse_params({}).min_agree == 2
    assert c.parse_params({}).scale == 0.3 and c.parse_params({"shared": "ties"}).scale == 1.0
    assert c.parse_params({"alpha": 0.5, "shared": "ties"}).scale == 0.5
    assert get_method("emr").parse_params({}).model_dump() == {}
    with pytest.raises(MergeError, match="lambda"):
        get_method("tall").parse_params({"lambda": -1})
    with pytest.raises(MergeError, match="unknown parameter.*parameters are: none"):
        get_method("emr").parse_params({"lambda": 1})
    base, models = dyadic_family(4, n=2)
    with pytest.raises(MergeError, match="min_agree"):
        merge_state_dicts("consensus", models, base=base, model_params=[{"min_agree": 1}, {}])
    with pytest.raises(MergeError, match="min_agree 3 is more than the 2 models"):
        merge_state_dicts("consensus", models, base=base, params={"min_agree": 3})
    with pytest.raises(MergeError, match="at least 2"):
        merge_state_dicts("emr", models[:1], base=base)


# -- folders on disk and extract ---------------------------------------------------------------
def llama_inputs(family):
    base = load_sd(family["base"])
    models = [load_sd(family[f"ft{i}"]) for i in range(3)]
    return base, models


def run_merge(family, tmp_path, method, params=None, **kw):
    out = tmp_path / method
    recipe = {"method": method, "base": str(family["base"]), "params": params or {},
              "models": [{"path": str(family[f"ft{i}"]), "name": n} for i, n in enumerate(("vision", "audio", "code"))],
              "exclude": ["*norm*"]}
    merge(recipe, out, **kw)
    return out


def test_folder_masks_decode_to_reference(llama_family, tmp_path):
    from safetensors.torch import load_file

    # small chunks and small shards: masks are written chunk by chunk into several files
    out = run_merge(llama_family, tmp_path, "tall", {"lambda": 0.5}, chunk_elems=512, max_shard_bytes=4096)
    manifest = json.loads((out / "decoupled" / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["vision", "audio", "code"]
    assert manifest["format"] == "modalmerge-decoupled/1" and manifest["method"] == "tall"
    index = json.loads((out / "decoupled" / "masks.safetensors.index.json").read_text())
    packed = {}
    for f in sorted(set(index["weight_map"].values())):
        packed.update(load_file(out / "decoupled" / f))
    base, models = llama_inputs(llama_family)
    merged = [n for n in base if "norm" not in n]
    assert sorted(manifest["tensors"]) == sorted(merged)
    vec, masks = dense_tall({n: base[n] for n in merged}, models, [0.5] * 3)
    for n in merged:
        for t, task in enumerate(("vision", "audio", "code")):
            assert packed[f"{task}::{n}"].numel() == (base[n].numel() + 7) // 8
            assert torch.equal(unpack_bits(packed[f"{task}::{n}"], base[n].shape), masks[n][t]), (task, n)


@pytest.mark.parametrize("method", ["tall", "emr"])
def test_extract_equals_dense_reconstruction(llama_family, tmp_path, method, capsys):
    out = run_merge(llama_family, tmp_path, method, chunk_elems=512)
    base, models = llama_inputs(llama_family)
    merged = {n: base[n] for n in base if "norm" not in n}
    if method == "tall":
        vec, masks = dense_tall(merged, models, [0.6] * 3)
        scalars = [1.0] * 3
    else:
        vec, masks, scalars = dense_emr(merged, models)
    text = load_sd(out)
    for n in merged:
        assert torch.allclose(text[n], text_weights(merged, vec, masks, scalars)[n], atol=1e-6), n
    for t, task in enumerate(("vision", "audio", "code")):
        dest = tmp_path / f"{method}-{task}"
        flag = "--modality" if t == 1 else "--task"
        assert main(["extract", str(out), flag, task, "--output", str(dest), "--no-progress"]) == 0
        got = load_sd(dest)
        assert set(got) == set(base)
        for n in base:
            if n in merged:
                ref = base[n] + scalars[t] * masks[n][t] * vec[n]
                assert torch.allclose(got[n], ref, atol=1e-6), (task, n)
            else:
                assert torch.equal(got[n], base[n]), n  # copied tensors: the merged folder's own
        assert (dest / "config.json").exists() and not (dest / "decoupled").exists()
    if method == "tall":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tmp_path / "tall-code")
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)


def test_extract_bfloat16_from_sharded_folder(llama_family, tmp_path):
    from modalmerge.checkpoint.decoupled import extract_task

    recipe = {"method": "emr", "base": str(llama_family["base"]), "dtype": "bfloat16",
              "models": [{"path": str(llama_family[f"ft{i}"]), "name": f"t{i}"} for i in range(3)]}
    out = tmp_path / "emr-bf16"
    merge(recipe, out, max_shard_bytes=8192)
    assert (out / "decoupled" / "shared.safetensors.index.json").exists()
    assert (out / "decoupled" / "masks.safetensors.index.json").exists()
    dest = extract_task(out, "t2", tmp_path / "t2")
    got, text = load_sd(dest), load_sd(out)
    base, models = llama_inputs(llama_family)
    uni, masks, lam = dense_emr(base, models)
    for n in base:
        assert got[n].dtype == torch.bfloat16 and text[n].dtype == torch.bfloat16
        # θ_2 = W_text + (c_2 − c̄) ⊙ shared on the stored bf16 values, in float32, cast once
        c = [s * m.float() for s, m in zip(lam, masks[n])]
        shared = (uni[n].to(torch.bfloat16)).float()
        expected = (text[n].float() + (c[2] - torch.stack(c).mean(0)) * shared).to(torch.bfloat16)
        assert torch.allclose(got[n].float(), expected.float(), atol=1e-2), n
        ref = base[n] + lam[2] * masks[n][2] * uni[n]
        assert torch.allclose(got[n].float(), ref, atol=2e-2, rtol=1e-2), n


def test_extract_list_and_storage(llama_family, tmp_path, capsys):
    from modalmerge.checkpoint.decoupled import DecoupledFolder

    out = run_merge(llama_family, tmp_path, "tall")
    d = DecoupledFolder(out)
    base, models = llama_inputs(llama_family)
    merged = {n: base[n] for n in base if "norm" not in n}
    _, masks = dense_tall(merged, models, [0.6] * 3)
    total = sum(v.numel() for v in merged.values())
    for t, task in enumerate(d.task_names):
        assert d.mask_density(task) == pytest.approx(sum(int(masks[n][t].sum()) for n in merged) / total)
    capsys.readouterr()
    assert main(["extract", str(out), "--list"]) == 0
    text = capsys.readouterr().out
    assert all(task in text for task in ("vision", "audio", "code")) and "mask density" in text
    s = d.storage()
    assert s["standalone"] == 3 * s["text"] and s["decoupled"] == s["shared"] + s["masks"]
    # 1 bit per merged parameter and task: the masks file holds exactly that, besides its header
    masks_file = out / "decoupled" / "masks.safetensors"
    header = int.from_bytes(masks_file.read_bytes()[:8], "little")
    assert s["masks"] - 8 - header == 3 * sum((v.numel() + 7) // 8 for v in merged.values())
    # the per-tensor stream equals the reconstructed source
    src = d.source("audio")
    for name, value in d.reconstruct("audio"):
        assert torch.equal(value, src.read(name))


def test_extract_errors(llama_family, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = run_merge(llama_family, tmp_path, "tall")
    dest = tmp_path / "x"
    assert main(["extract", str(out), "--task", "nope", "-o", str(dest)]) == 1
    assert "no task 'nope'; its tasks are: vision, audio, code" in capsys.readouterr().err
    assert main(["extract", str(out), "-o", str(dest)]) == 1
    assert "needs --task" in capsys.readouterr().err
    assert not dest.exists()

    plain = tmp_path / "plain"
    merge({"method": "task_arithmetic", "base": str(llama_family["base"]), "models": [str(llama_family["ft0"])]},
          plain)
    assert main(["extract", str(plain), "--task", "vision", "-o", str(dest)]) == 1
    assert "is not a decoupled merge" in capsys.readouterr().err

    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(["extract", str(out), "--task", "vision", "-o", str(existing)]) == 1
    assert "already exists" in capsys.readouterr().err

    masks_file = out / "decoupled" / "masks.safetensors"
    packed = load_file(masks_file)
    del packed["audio::model.layers.1.mlp.up_proj.weight"]
    save_file(packed, masks_file)
    assert main(["extract", str(out), "--task", "audio", "-o", str(dest), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "mask of task 'audio' for tensor 'model.layers.1.mlp.up_proj.weight' is missing" in err
    assert not dest.exists() and not list(tmp_path.glob(".x.partial-*"))
