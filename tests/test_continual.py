"""OPCM continual merging: streaming steps against a dense reference, for several orders, and
adding models one at a time to a folder without the earlier ones."""

import json
import math
import shutil

import pytest
import torch

from conftest import load_sd, perturbed, tiny_llama
from modalmerge import merge_state_dicts
from modalmerge.api import continual_merge, merge
from modalmerge.cli import main
from modalmerge.errors import MergeError
from modalmerge.methods.opcm import split_rank


def dense_opcm(base, models, alpha, projected):
    """Spec 10 over whole in-memory models, written out directly."""
    delta = {n: models[0][n].double() - base[n].double() for n in base}
    lam = 1.0
    norms = [math.sqrt(sum(float((d ** 2).sum()) for d in delta.values()))]
    for m in models[1:]:
        tau = {n: m[n].double() - base[n].double() for n in base}
        new = {}
        for n in base:
            if n in projected:
                u, s, vh = torch.linalg.svd(delta[n], full_matrices=True)
                c = torch.cumsum(s, 0) / s.sum()
                r = next((i for i in range(len(s)) if c[i] > alpha), len(s))
                p = u.T @ tau[n] @ vh.T
                for i in range(min(p.shape)):
                    p[i, i] = 0
                p[:r, :r] = 0
                new[n] = lam * delta[n] + u @ p @ vh
            else:
                new[n] = lam * delta[n] + tau[n]
        norms.append(math.sqrt(sum(float((t ** 2).sum()) for t in tau.values())))
        lam = math.sqrt(sum(float((d ** 2).sum()) for d in new.values())) / (sum(norms) / len(norms))
        delta = {n: d / lam for n, d in new.items()}
    return {n: (base[n].double() + delta[n]).float() for n in base}, lam, norms


def test_split_rank_hand_computed():
    assert split_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.5) == 1   # cumsum 0.4, 0.7 > 0.5
    assert split_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.3) == 0
    assert split_rank(torch.tensor([1.0, 1.0]), 1.0) == 2             # never exceeds: the whole block
    assert split_rank(torch.zeros(3), 0.5) == 0


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("opcm")
    base = tiny_llama(1)
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for i in range(4):
        perturbed(base, 40 + i, scale=0.02 * (i + 1)).save_pretrained(root / f"m{i}")
        paths[f"m{i}"] = root / f"m{i}"
    return paths


def _projected(sd):
    # the llama spec's 2-D linear weights: every 2-D tensor except the embeddings and the LM head
    return {n for n, v in sd.items() if v.dim() == 2 and "embed" not in n and "lm_head" not in n}


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1]])
def test_opcm_merge_matches_dense_reference_in_any_order(family, tmp_path, order):
    out = tmp_path / "merged"
    merge({"method": "opcm", "base": str(family["base"]), "params": {"alpha": 0.5},
           "models": [str(family[f"m{i}"]) for i in order]}, out)
    base = load_sd(family["base"])
    models = [load_sd(family[f"m{i}"]) for i in order]
    ref, lam, norms = dense_opcm(base, models, 0.5, _projected(base))
    sd = load_sd(out)
    for n in base:
        assert torch.allclose(sd[n], ref[n], atol=1e-5), n
    state = json.loads((out / "continual" / "manifest.json").read_text())
    assert state["lambda"] == pytest.approx(lam, rel=1e-6)
    assert state["norms"] == pytest.approx(norms, rel=1e-6)
    assert [m["name"] for m in state["models"]] == [f"m{i}" for i in order]
    assert state["base"] == str(family["base"].absolute())


def test_continual_add_without_earlier_models(family, tmp_path):
    # the earlier models live in a folder that is deleted before the later ones are added
    gone = tmp_path / "gone"
    gone.mkdir()
    for i in (0, 1):
        shutil.copytree(family[f"m{i}"], gone / f"m{i}")
    merge({"method": "opcm", "base": str(family["base"]), "params": {"alpha": 0.3},
           "models": [str(gone / "m0"), str(gone / "m1")]}, tmp_path / "s2")
    shutil.rmtree(gone)
    continual_merge(tmp_path / "s2", family["m2"], tmp_path / "s3")
    # into a new folder: the previous merge is an input, never replaced (tests/test_output_safety.py)
    assert main(["merge", "--continual", str(tmp_path / "s3"), "--add", str(family["m3"]), "--output",
                 str(tmp_path / "s4"), "--no-progress", "--name", "last"]) == 0
    base = load_sd(family["base"])
    models = [load_sd(family[f"m{i}"]) for i in range(4)]
    ref, lam, _ = dense_opcm(base, models, 0.3, _projected(base))
    sd = load_sd(tmp_path / "s4")
    for n in base:
        assert torch.allclose(sd[n], ref[n], atol=1e-5), n
    state = json.loads((tmp_path / "s4" / "continual" / "manifest.json").read_text())
    assert [m["name"] for m in state["models"]] == ["m0", "m1", "m2", "last"]
    assert state["lambda"] == pytest.approx(lam, rel=1e-6)
    assert "(name last)" in (tmp_path / "s4" / "README.md").read_text()
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "s4")


def test_continual_errors(family, tmp_path):
    with pytest.raises(MergeError, match="not a continual merge"):
        continual_merge(family["m0"], family["m1"], tmp_path / "x")
    merge({"method": "opcm", "base": str(family["base"]), "models": [str(family["m0"])]}, tmp_path / "one")
    with pytest.raises(MergeError, match="already in the merge"):
        continual_merge(tmp_path / "one", family["m0"], tmp_path / "y")
    with pytest.raises(MergeError, match="one at a time"):
        merge_state_dicts("opcm", [load_sd(family["m0"])], load_sd(family["base"]))
    assert main(["merge", "--continual", str(tmp_path / "one"), "--output", str(tmp_path / "z")]) == 1
    # one model: the merge is that model, λ = 1
    assert torch.allclose(load_sd(tmp_path / "one")["lm_head.weight"], load_sd(family["m0"])["lm_head.weight"])
