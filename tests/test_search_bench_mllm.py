"""--eval bench-mllm (bench/mllm_eval.py): a search scored on the mini-MLLM benchmark's tasks, each
with its own projector, gives the benchmark's own validation accuracies."""

from __future__ import annotations

import pytest
from bench_search import check_grid_search_scores

from modalmerge.errors import MergeError


def test_bench_mllm_evaluator_scores_as_the_benchmark_does(tmp_path):
    """Two tiny fine-tunes cached as bench mllm caches them (llm + projector, one folder each); a grid search over
    task arithmetic's λ scored by --eval bench-mllm gives, per trial, mllm.Evaluator.accuracy on the
    validation split of the same merge."""
    import torch
    from transformers import BertConfig, BertModel

    from modalmerge.bench import mllm

    torch.set_num_threads(1)
    cfg = mllm.tiny_config(tasks=("image", "table"))
    torch.manual_seed(0)
    # bench mllm's tiny model's shape, with the pooler the real MiniLM folder has (search builds the
    # folder's BertModel, pooler included)
    base_llm = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=128)).eval()
    base_folder = tmp_path / "base"
    base_llm.save_pretrained(base_folder)
    mllm.tokenizer().save_pretrained(base_folder)
    base = mllm.llm_state(base_llm)
    tasks = mllm.build_tasks(cfg, None, False, None)

    prompter = mllm.Prompter(mllm.tokenizer())
    llms, projectors, folders = {}, {}, {}
    for task in cfg.tasks:  # bench mllm's own (tiny) fine-tunes, cached as it caches them
        key = cfg.training_key(task)
        llms[task], projectors[task], _ = mllm.cached_finetune(
            tmp_path / "cache", key, lambda task=task: mllm.finetune(base_llm, prompter, tasks[task], cfg))
        folders[task] = tmp_path / "cache" / key
    ev = mllm.Evaluator(base_llm, prompter, tasks, projectors)
    expected = {x: {t: ev.accuracy(mllm.run_merge("task_arithmetic", {"lambda": x}, llms, base, cfg.seed), t, "val")
                    for t in cfg.tasks} for x in (0.3, 1.0)}
    assert expected[0.3] != expected[1.0]  # the merge reaches the score: the check can tell the trials apart

    spec = "bench-mllm:" + ",".join(f"{t}={f}" for t, f in folders.items()) + f",val={cfg.caps[1]},seed={cfg.seed}"
    check_grid_search_scores(tmp_path, str(base_folder), {t: str(f / "llm.safetensors") for t, f in folders.items()},
                             spec, expected)


def test_bench_mllm_evaluator_bad_specs_are_one_line_errors(tmp_path):
    from modalmerge.bench.mllm_eval import EVALUATORS
    from modalmerge.procedures.search.evaluators import parse_eval

    for text, message in [("bench-mllm:", "name a task"), ("bench-mllm:video=x", "unknown task 'video'"),
                          ("bench-mllm:image", "write TASK=FOLDER"), ("bench-mllm:image=x,seed=one", "not a whole")]:
        with pytest.raises(MergeError, match=message) as caught:
            parse_eval(text, extra=EVALUATORS)
        assert "\n" not in str(caught.value)
    (tmp_path / "llm.safetensors").write_bytes(b"")  # a cache folder without its projector
    evaluator = parse_eval(f"bench-mllm:image={tmp_path}", extra=EVALUATORS)
    with pytest.raises(MergeError, match="projector.safetensors does not exist"):
        evaluator.load(None, None, 8, 64)
