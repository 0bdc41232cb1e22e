"""`bench mllm --setting collide`: greedy decoding with the KV cache, exact-answer scoring, a routed
prompt of one task equal to that task's materialised model, and a tiny run end to end."""

import json
import math

import pytest
import torch

from modalmerge.bench import mllm, mllm_collide
from modalmerge.cli import main

from shared_data import DATA, needs_data

transformers = pytest.importorskip("transformers")


def tiny_decoder(seed=0, vocab=40):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def test_greedy_with_the_cache_equals_recomputing_the_whole_sequence():
    llm = tiny_decoder()
    emb = llm.get_input_embeddings()
    x = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[:, 1:3] = 0                      # a left-padded block inside the prompt
    got = mllm_collide.greedy(llm, x, mask, 4)
    want, seq, m = [], x, mask
    with torch.no_grad():
        for _ in range(4):
            tok = llm(inputs_embeds=seq, attention_mask=m).logits[:, -1].argmax(-1)
            want.append(tok)
            seq = torch.cat([seq, emb(tok)[:, None]], 1)
            m = torch.cat([m, torch.ones(3, 1, dtype=torch.long)], 1)
    assert torch.equal(got, torch.stack(want, 1))


def test_exact_needs_the_answer_then_its_end():
    eos = 9
    table = torch.tensor([[5, eos, -100], [6, 7, eos]])     # answers "5" and "6 7", each then EOS
    gen = torch.tensor([[5, eos, 3], [5, 3, 3], [6, 7, eos], [6, 7, 7], [6, eos, eos]])
    y = torch.tensor([0, 0, 1, 1, 1])
    assert mllm_collide.exact(gen, table, y).tolist() == [True, False, True, False, False]


def test_routed_prompt_of_one_task_generates_as_that_tasks_model(tmp_path):
    # the composed folder served by modalmerge.runtime: BOS and question on the text weights, the
    # block on task a's; with text_mask="present" (prefill and decode) every token runs on a's
    # weights, so the answer equals that of a's materialised model θ_0 + m_a ⊙ τ*
    from modalmerge.runtime import TEXT

    base_llm = tiny_decoder()
    base = mllm.llm_state(base_llm)
    g = torch.Generator().manual_seed(1)
    llms = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b")}
    composer = mllm.Composer(base_llm, llms, tmp_path)
    composed = composer.compose("mmer", {}, ["a", "b"], seed=0)
    assert isinstance(composed.llm, transformers.Qwen2ForCausalLM)
    merged = mllm.run_merge("mmer", {}, llms, base, seed=0)
    reference = tiny_decoder()
    reference.load_state_dict(merged.task("a"), strict=False)

    x = torch.randn(2, 9, 16)
    mask = torch.ones(2, 9, dtype=torch.long)
    groups = torch.full((2, 9), TEXT)
    groups[:, 1:5] = composed.task_index("a")
    step = torch.full((2, 1), TEXT)
    got = mllm_collide.greedy(composed.llm, x, mask, 3,
                              prefill=lambda: composed.route(groups, text_mask="present"),
                              decode=lambda: composed.route(step, text_mask="present", present=["a"]))
    assert torch.equal(got, mllm_collide.greedy(reference, x, mask, 3))
    # and the extracted standalone model is the masked reconstruction
    assert mllm_collide.extracted_equal_masked(tmp_path / "composed-mmer", merged, ["a", "b"]) == {"a": True,
                                                                                                  "b": True}


@needs_data
@pytest.mark.slow
def test_bench_mllm_collide_tiny_end_to_end(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["bench", "mllm", "--setting", "collide", "--tiny", "--tasks", "image", "table", "text", "--data-dir",
            str(DATA), "--cache", str(cache), "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    result = json.loads((out / "mllm-collide.json").read_text())
    assert result["seeds"] == [0] and (out / "seed-0.json").is_file()
    run = result["per_seed"][0]
    names = ["image", "table", "text"]
    assert run["tasks_run"] == names and run["decoder"]["class"] == "Qwen2ForCausalLM"
    # the text task is TREC's questions, as tokens, answered in its own words
    assert run["tasks"]["text"]["answers"] == mllm_collide.ANSWERS["text"]
    assert run["decoder"]["trec_sentences_left_out"] > 5000      # the base never read the text task
    rows = {r["row"]: r for r in run["rows"]}
    for label in ["Individual: image", "Individual: table", "Individual: text",
                  "Individual models (each on its own task)", "Base LLM (projectors from fine-tuning)",
                  *[mllm.LABELS[m] for m in mllm_collide.CollideConfig().methods]]:
        assert label in rows
    for r in run["rows"]:
        assert set(r["acc"]) == set(names) and all(0 <= v <= 1 for v in r["acc"].values())
        for n in names:   # the answers are generated text, compared with the expected words
            assert r["samples"][n] and all(isinstance(s["generated"], str) for s in r["samples"][n])
            assert all(s["expected"] in mllm_collide.ANSWERS[n] for s in r["samples"][n])
        if r["perplexity"] is not None:
            assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
    pairs = {f"{a}+{b}" for a in names for b in names if a != b}
    mmer = rows["MMER"]
    assert set(mmer["mixed"]) == pairs and set(mmer["mixed_present"]) == set(mmer["mixed_text_asked"]) == pairs
    assert all(0 <= v <= 1 for v in mmer["mixed"].values())
    # every row with mixed inputs also scores them with the asked block second
    assert all(set(r["mixed_second"]) == pairs for r in run["rows"] if "mixed" in r)
    assert mmer["extracted_equal_masked"] == {n: True for n in names}
    assert all(0 <= v["mass_left_at_base"] <= 1 and v["relative_error"] >= 0 for v in mmer["reconstruction"].values())
    assert all(0 < v <= 1 for v in mmer["mask_density"].values())
    assert rows["TALL masks"]["params"]["lambda"].keys() == set(names)
    assert "Own task vector TIES-trimmed to k 0.2 (nothing merged)" in rows
    assert run["forgetting"]["rows"][0]["old_retention"] in (1.0, None)
    # the summary over seeds: every row, with mean/min/max
    summary = {r["row"]: r for r in result["summary"]["rows"]}
    assert summary.keys() == rows.keys()
    s = summary["TIES"]["acc"]["image"]
    assert s["n"] == 1 and s["min"] == s["mean"] == s["max"] == rows["TIES"]["acc"]["image"]
    md = (out / "mllm-collide.md").read_text()
    assert "| MMER |" in md and "Single-seed noise" in md and (out / "mllm-collide.png").stat().st_size > 1000
    # a second run fine-tunes nothing: the decoder and the fine-tunes come from the cache
    assert main(argv) == 0
    again = json.loads((out / "mllm-collide.json").read_text())["per_seed"][0]
    assert again["decoder"]["training"]["cached"] and all(t.get("cached") for t in again["training"].values())
    assert [r["acc"] for r in again["rows"]] == [r["acc"] for r in run["rows"]]
    assert "modalmerge.runtime" in capsys.readouterr().out


def test_small_setting_refuses_collides_options(capsys):
    assert main(["bench", "mllm", "--tasks", "text", "--no-cache", "--out", "/nonexistent"]) == 1
    assert "text task is in --setting collide only" in capsys.readouterr().err
    assert main(["bench", "mllm", "--seeds", "0", "1", "--no-cache", "--out", "/nonexistent"]) == 1
    assert "--seeds is for --setting collide" in capsys.readouterr().err


def test_mixed_batches_put_the_asked_block_where_asked():
    """The default alternates by batch (asked first in even batches); asked_first False puts the
    asked block second in every batch, with the same inputs and labels."""
    from types import SimpleNamespace

    split = lambda n: SimpleNamespace(x=torch.arange(n)[:, None], y=torch.arange(n))  # noqa: E731
    ev = SimpleNamespace(
        tasks={"a": SimpleNamespace(test=split(10)), "b": SimpleNamespace(test=split(7))}, projs={}, batch=4,
        prompts=SimpleNamespace(block=lambda emb, task, x, proj: (task, x[:, 0].tolist())), asked_first=None)
    batches = lambda: list(mllm_collide.Evaluator.mixed_batches(ev, "a", "b", 8, 0, None))  # noqa: E731
    default = batches()
    assert [which for _, which, _ in default] == [["a", "b"], ["b", "a"]]
    ev.asked_first = False
    second = batches()
    assert [which for _, which, _ in second] == [["b", "a"], ["b", "a"]]
    for (blocks_d, which_d, y_d), (blocks_s, _, y_s) in zip(default, second):
        assert torch.equal(y_d, y_s) and sorted(blocks_d) == sorted(blocks_s)   # the same inputs
