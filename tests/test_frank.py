"""FRANK's vision prior fitted from calibration data (`a: fit`, spec 12): the decay a against a
log-linear regression done by hand on the same model's attention weights, the merge against the
dense reference with that a, and the error paths. The data-free FRANK tests are in
test_family_datafree.py."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import yaml

from conftest import load_sd, perturbed
from modalmerge.api import merge, merge_state_dicts
from modalmerge.procedures.calibration import load_model, visual_attention_profile
from modalmerge.checkpoint.sources import open_source
from modalmerge.errors import MergeError
from modalmerge.methods.frank import fit_decay
from test_family_datafree import dense_frank

VOCAB, LAYERS, IMAGE_TOKEN = 64, 4, 60


def visual_batches(seed: int = 0, n: int = 6, length: int = 10, batch: int = 3, mode: str = "mask"):
    """Calibration callable (`test_frank:visual_batches`): random tokens with a run of visual
    positions per example (where it starts varies), left padding in one example of each batch.

    mode: "mask" gives visual_mask; "ids" marks the visual positions with IMAGE_TOKEN in input_ids
    instead; "none" marks nothing visual; "end" puts the visual run at the end (no text after);
    "bad_shape" gives a visual_mask one position short."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, batch):
        rows = min(batch, n - s)
        ids = torch.randint(1, IMAGE_TOKEN, (rows, length), generator=g)
        attn = torch.ones(rows, length, dtype=torch.long)
        attn[0, :2] = 0  # left padding
        vis = torch.zeros(rows, length, dtype=torch.bool)
        for r in range(rows):
            start = 2 + int(torch.randint(0, 3, (1,), generator=g))
            if mode == "end":
                vis[r, length - 3:] = True
            elif mode != "none":
                vis[r, start:start + 4] = True
        b = {"input_ids": ids, "attention_mask": attn}
        if mode == "ids":
            ids[vis] = IMAGE_TOKEN
        elif mode == "bad_shape":
            b["visual_mask"] = vis[:, :-1]
        else:
            b["visual_mask"] = vis
        out.append(b)
    return out


def peaky_llama(seed: int, image_token: int | None = None):
    """A tiny Llama whose random attention is far from uniform (large init), so s_l varies by layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    extra = {"image_token_index": image_token} if image_token is not None else {}
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      tie_word_embeddings=False, initializer_range=0.3, **extra)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base, vision (config names an image token), reasoning: one tiny Llama and two fine-tunes."""
    root = tmp_path_factory.mktemp("frank")
    base = peaky_llama(0, IMAGE_TOKEN)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for name, seed, scale in (("vision", 1, 0.05), ("reasoning", 2, 0.1)):
        perturbed(base, seed, scale).save_pretrained(root / name)
        paths[name] = root / name
    return paths


def hand_shares(model, batches, visual_of) -> list[float]:
    """s_l by explicit loops: per example with visual tokens and text after the last one, the mean
    over heads and text query positions of the attention summed over visual keys; then the mean
    over those examples."""
    per_example = []
    with torch.no_grad():
        for batch in batches:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_attentions=True)
            vis_all = visual_of(batch)
            for b in range(batch["input_ids"].shape[0]):
                valid = batch["attention_mask"][b].bool()
                keys = [k for k in range(len(valid)) if vis_all[b, k] and valid[k]]
                if not keys:
                    continue
                queries = [q for q in range(max(keys) + 1, len(valid)) if valid[q] and not vis_all[b, q]]
                if not queries:
                    continue
                row = []
                for att in out.attentions:
                    vals = [float(sum(att[b, h, q, k] for k in keys))
                            for h in range(att.shape[1]) for q in queries]
                    row.append(sum(vals) / len(vals))
                per_example.append(row)
    return [sum(r[l] for r in per_example) / len(per_example) for l in range(len(per_example[0]))]


def hand_fit(shares: list[float]) -> tuple[float, float]:
    slope, intercept = np.polyfit(np.arange(len(shares)), np.log(shares), 1)
    return -float(slope), float(intercept)


def eager(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()


def _recipe(family, a="fit", calibration="vision", **cal):
    """Calibration on the vision model's entry only (the reasoning model needs none), at the top
    (`calibration="top"`), or nowhere (`calibration=None`)."""
    spec = {"callable": "test_frank:visual_batches", "seed": 3, **cal}
    vision = {"path": str(family["vision"]), "params": {"role": "vision"}}
    r = {"method": "frank", "base": str(family["base"]), "params": {"a": a},
         "models": [{"path": str(family["reasoning"]), "params": {"role": "reasoning"}}, vision]}
    if calibration == "vision":
        vision["calibration"] = spec
    elif calibration == "top":
        r["calibration"] = spec
    return r


def llama_layer(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name).group(1))


# -- the fit ----------------------------------------------------------------------------------

def test_fit_decay_recovers_an_exact_exponential():
    a, c = fit_decay([math.exp(0.7 - 0.25 * l) for l in range(6)])
    assert a == pytest.approx(0.25, abs=1e-12) and c == pytest.approx(0.7, abs=1e-12)
    # rising attention: a negative a, and the prior still normalises without overflow
    a, _ = fit_decay([math.exp(40.0 * l) for l in range(3)])
    assert a == pytest.approx(-40.0)
    from modalmerge.methods.frank import vision_prior
    prior = vision_prior(-400.0, 3)
    assert sum(prior) == pytest.approx(1.0) and prior[2] == pytest.approx(1.0)


def test_fitted_a_is_the_log_linear_regression_of_the_attention(family, tmp_path):
    report = merge(_recipe(family), tmp_path / "out", trust_recipe_code=True)
    got = report.statistics["frank"]
    shares = hand_shares(eager(family["vision"]), visual_batches(seed=3), lambda b: b["visual_mask"])
    a, c = hand_fit(shares)
    assert got["a_from"] == "fit"
    assert np.allclose(got["visual_attention"], shares, rtol=1e-5)
    assert got["a"] == pytest.approx(a, abs=1e-5) and got["intercept"] == pytest.approx(c, abs=1e-5)
    assert max(shares) / min(shares) > 1.1  # the peaky model's attention really changes with depth

    # the merged tensors: the dense FRANK reference with that a (vision model second)
    out, base = load_sd(tmp_path / "out"), load_sd(family["base"])
    models = [load_sd(family["reasoning"]), load_sd(family["vision"])]
    ref = dense_frank(base, models, a, vision=1, layer_of=llama_layer, blocks=lambda n: ".layers." in n)
    assert set(out) == set(ref)
    for n in ref:
        assert torch.allclose(out[n], ref[n], atol=1e-6), n
    assert torch.equal(out["lm_head.weight"], models[1]["lm_head.weight"])


def test_image_token_ids_mark_the_visual_tokens(family):
    """Without visual_mask, input_ids equal to the config's image_token_index are the visual tokens."""
    model = load_model(open_source(family["vision"]), "", attn_implementation="eager")
    batches = visual_batches(seed=5, mode="ids")
    got = visual_attention_profile(model, batches)
    want = hand_shares(eager(family["vision"]), batches, lambda b: b["input_ids"] == IMAGE_TOKEN)
    assert np.allclose(got.numpy(), want, rtol=1e-6)


def test_llava_image_tokens_end_to_end(tmp_path):
    """A real LLaVA (CLIP tower, projector, Llama): pixel_values in the batch, image tokens in input_ids."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=8, patch_size=4, projection_dim=16),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                initializer_range=0.3),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-1)
    base = LlavaForConditionalGeneration(cfg).eval()
    for name, m in (("base", base), ("vision", perturbed(base, 1, 0.05)), ("reasoning", perturbed(base, 2, 0.1))):
        m.save_pretrained(tmp_path / name)
    [batch] = llava_batches()
    report = merge({"method": "frank", "base": str(tmp_path / "base"), "params": {"a": "fit"},
                    "models": [str(tmp_path / "vision"), str(tmp_path / "reasoning")],
                    "calibration": {"callable": "test_frank:llava_batches"}}, tmp_path / "out", trust_recipe_code=True)
    vision = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "vision"), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        att = vision(**batch, output_attentions=True).attentions
    assert len(att) == 3
    # every example: visual keys 1..4, text queries 5..8
    shares = [float(a[:, :, 5:, 1:5].sum(-1).mean()) for a in att]
    a, c = hand_fit(shares)
    got = report.statistics["frank"]
    assert np.allclose(got["visual_attention"], shares, rtol=1e-5)
    assert got["a"] == pytest.approx(a, abs=1e-5)
    # the dense reference: LLM blocks merged, tower, projector, embeddings and head the vision model's
    out = load_sd(tmp_path / "out")
    sds = [load_sd(tmp_path / n) for n in ("base", "vision", "reasoning")]
    ref = dense_frank(sds[0], sds[1:], a, vision=0, layer_of=llama_layer,
                      blocks=lambda n: n.startswith("language_model.model.layers."))
    assert set(out) == set(ref) and any(n.startswith("vision_tower.") for n in ref)
    for n in ref:
        assert torch.allclose(out[n], ref[n], atol=1e-6), n


def llava_batches():
    """Calibration callable (`test_frank:llava_batches`): two images, each 4 image tokens after one text token."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, IMAGE_TOKEN, (2, 9), generator=g)
    ids[:, 1:5] = IMAGE_TOKEN  # 4 patches of an 8x8 image with 4x4 patches, CLS dropped
    return [{"input_ids": ids, "pixel_values": torch.randn(2, 3, 8, 8, generator=g)}]


def test_statistics_given_in_memory():
    """merge_state_dicts takes the profile as data; only the vision model's row is read."""
    base = {f"layers.{l}.w": torch.zeros(3) for l in range(3)} | {"head.w": torch.zeros(2)}
    v = {k: torch.full_like(t, 0.5) for k, t in base.items()}
    r = {k: torch.full_like(t, -1.0) for k, t in base.items()}
    shares = [0.4, 0.2, 0.05]
    row = torch.tensor([shares])
    data = {"visual_attention": [{k: torch.zeros(1, 3) for k in base}, {k: row for k in base}]}
    out = merge_state_dicts("frank", [r, v], base, {"a": "fit"}, data=data,
                            model_params=[{"role": "reasoning"}, {"role": "vision"}])
    a, _ = hand_fit(shares)
    ref = dense_frank(base, [r, v], a, vision=1, layer_of=llama_layer, blocks=lambda n: n.startswith("layers."))
    for n in base:
        assert torch.allclose(out[n], ref[n], atol=1e-6), n


def test_numeric_a_is_reported_and_needs_no_data(family, tmp_path):
    report = merge(_recipe(family, a=0.3, calibration=None), tmp_path / "out")
    s = report.statistics["frank"]
    assert s["a"] == 0.3 and s["a_from"] == "parameter" and "visual_attention" not in s
    e = [math.exp(-0.3 * l) for l in range(LAYERS)]
    assert s["vision_prior"] == pytest.approx([x / sum(e) for x in e])


# -- errors -----------------------------------------------------------------------------------

def test_fit_without_calibration_data_is_a_clear_error(family, tmp_path):
    with pytest.raises(MergeError, match=r"'vision'.*`a: fit`.*needs calibration data.*or give `a` as a number"):
        merge(_recipe(family, calibration=None), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    base = {"layers.0.w": torch.zeros(2), "layers.1.w": torch.zeros(2)}
    with pytest.raises(MergeError, match="`a: fit`.*needs calibration data"):
        merge_state_dicts("frank", [base, base], base, {"a": "fit"})
    with pytest.raises(MergeError, match=r"params\.a"):
        merge_state_dicts("frank", [base, base], base, {"a": "fitted"})


@pytest.mark.parametrize("mode,message", [
    ("none", "has no visual tokens"),
    ("end", "no calibration example has text tokens after its visual tokens"),
    ("bad_shape", r"marked over \[3, 9\] positions but the model attends over \[batch, seq\] = \[3, 10\]"),
])
def test_unusable_visual_data_is_a_clear_error(family, tmp_path, mode, message):
    with pytest.raises(MergeError, match=message):
        merge(_recipe(family, mode=mode), tmp_path / "out", trust_recipe_code=True)
    assert not (tmp_path / "out").exists()


def test_no_way_to_tell_visual_tokens_is_a_clear_error(tmp_path):
    """A model whose config names no image token, and batches without visual_mask."""
    peaky_llama(0).save_pretrained(tmp_path / "m")
    model = load_model(open_source(tmp_path / "m"), "model 'm'", attn_implementation="eager")
    batches = [{k: v for k, v in b.items() if k != "visual_mask"} for b in visual_batches()]
    with pytest.raises(MergeError, match="model 'm': cannot tell which calibration tokens are visual"):
        visual_attention_profile(model, batches, "model 'm'")


def test_sdpa_model_without_attention_weights_is_a_clear_error(family):
    model = load_model(open_source(family["vision"]), "model 'v'")  # sdpa: no attention weights
    if model.config._attn_implementation == "eager":
        pytest.skip("this transformers build loads eager attention by default")
    with pytest.raises(MergeError, match="returned no attention weights"):
        visual_attention_profile(model, visual_batches(), "model 'v'")


def test_fit_decay_errors():
    with pytest.raises(MergeError, match="at least 2 decoder layers"):
        fit_decay([0.3])
    with pytest.raises(MergeError, match="no attention at layer 1"):
        fit_decay([0.3, 0.0, 0.1])


# -- dry run ----------------------------------------------------------------------------------

def test_dry_run_shows_the_data_pass_memory(family, tmp_path, capsys):
    from modalmerge.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(family)))
    assert main(["merge", str(path), "--dry-run", "--trust-recipe-code"]) == 0
    out = capsys.readouterr().out
    assert "data pass   visual_attention (" in out and "vision model only" in out and "data memory ~" in out
    assert "statistics: frank" in out
    path.write_text(yaml.safe_dump(_recipe(family, a=0.2, calibration=None)))
    assert main(["merge", str(path), "--dry-run"]) == 0
    assert "data pass" not in capsys.readouterr().out
    path.write_text(yaml.safe_dump(_recipe(family, calibration=None)))
    assert main(["merge", str(path), "--dry-run"]) == 1
    assert "`a: fit`" in capsys.readouterr().err


def test_merge_prints_the_fitted_decay(family, tmp_path, capsys):
    from modalmerge.cli import _statistics_lines, main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(family)))
    assert main(["merge", str(path), "--output", str(tmp_path / "out"), "--no-progress", "--trust-recipe-code"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("frank: "))
    assert "a_from fit" in line and "intercept" in line
    # long lists stay in the API's report; scalars, words and short lists are printed
    assert _statistics_lines({"frank": {"a": 0.25, "a_from": "fit", "visual_attention": [0.1] * 20},
                              "emr": {"lambdas": [1.5, 0.75]}, "storage": {"total": 3}}) == \
        ["frank: a 0.25, a_from fit", "emr: lambdas [1.5, 0.75]"]
