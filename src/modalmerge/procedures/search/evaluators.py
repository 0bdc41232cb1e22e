"""Evaluators of a merged model (`--eval`), and the model skeleton they evaluate.

    perplexity:FILE         a causal LM on a text file, one document per line
                            (metrics perplexity and loss; objective perplexity, minimised)
    accuracy:FILE           a sequence classifier on `label<TAB>text` lines, the label a name of the
                            model's config (id2label) or a class number (accuracy and loss; accuracy,
                            maximised)
    python:MODULE:FUNCTION  a callable (model, tokenizer) -> {metric: value}; it is code the user
                            names, so it is imported only with --trust-recipe-code
    lm_eval:TASK[,TASK]     lm-evaluation-harness tasks (an optional package)
    PREFIX:...              an evaluator the caller registers (`extra`: prefix -> "module:factory",
                            imported in each worker): the command layer adds the benchmarks' tasks
                            (bench/text_eval.py: bench-text:TASK=FOLDER), which this layer may not import

An evaluator reads its data once per worker (`load`), then scores each trial's model
(`evaluate`); the built-in ones go through their data in batches and report the objective after
each batch, so that a trial whose first batches are already hopeless is stopped (trial.PruneRule).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from typing import Any, Callable, Mapping

from ...checkpoint.safetensors_io import read_regular
from ...errors import MergeError, one_line

MAX_DATA_BYTES = 256 << 20
LM_EVAL_EXTRA = "pip install 'modalmerge[lm-eval]'"
# the direction of the metrics the built-in evaluators give
DIRECTIONS = {"perplexity": "minimize", "loss": "minimize", "accuracy": "maximize"}
CAUSAL_LM, SEQUENCE_CLASSIFICATION = "causal language model", "sequence classifier"

Report = Callable[[str, int, float], None]  # (metric, step, value): may raise Pruned


class Pruned(Exception):
    """A trial stopped early: its objective at `step` was worse than the finished trials' median."""

    def __init__(self, metric: str, step: int, value: float):
        super().__init__(f"{metric} {value:.4g} at step {step}")
        self.metric, self.step, self.value = metric, step, value


class Evaluator:
    """An --eval: what it reads, what model it needs, what it measures."""

    spec: str = ""
    objective: str | None = None   # its main metric (None: the user must name one with --objective)
    task: str | None = None        # the model head it needs (None: the folder's own architecture)

    def files(self) -> list[tuple[str, str]]:
        """(label, path) of each file it reads: the output may be none of them."""
        return []

    def load(self, tokenizer, config, batch_size: int, max_length: int) -> None:
        """Read and tokenize the data, once per worker."""

    def evaluate(self, model, tokenizer, report: Report) -> dict[str, float]:
        raise NotImplementedError


def parse_eval(text: str, trust_recipe_code: bool = False, extra: Mapping[str, str] | None = None) -> Evaluator:
    """An --eval value as its evaluator (files are read later, by load). `extra`: evaluators the
    caller registers, prefix -> "module:factory", factory(text, rest after the prefix) -> Evaluator."""
    kind, _, rest = text.partition(":")
    if extra and kind in extra:
        return registered(extra[kind], text, rest)
    if kind in ("perplexity", "accuracy"):
        if not rest:
            raise MergeError(f"--eval {text}: name the data file, e.g. --eval {kind}:valid.txt")
        return Perplexity(text, rest) if kind == "perplexity" else Accuracy(text, rest)
    if kind == "python":
        module, _, function = rest.rpartition(":")
        if not module or not function:
            raise MergeError(f"--eval {text}: write python:MODULE:FUNCTION, e.g. python:my_evals:score")
        if not trust_recipe_code:
            raise MergeError(f"--eval {text} imports and runs {module}.{function}; allow it with --trust-recipe-code")
        return PythonCallable(text, module, function)
    if kind == "lm_eval":
        tasks = [t for t in rest.split(",") if t]
        if not tasks:
            raise MergeError(f"--eval {text}: name the tasks, e.g. --eval lm_eval:hellaswag,arc_easy")
        if importlib.util.find_spec("lm_eval") is None:
            raise MergeError(f"--eval {text} needs lm-evaluation-harness, which is not installed: {LM_EVAL_EXTRA}")
        return LmEval(text, tasks)
    more = "".join(f", {k}:..." for k in extra or {})
    raise MergeError(f"--eval {one_line(text, 80)}: unknown evaluator {one_line(kind, 40)!r}; use perplexity:FILE, "
                     f"accuracy:FILE, python:MODULE:FUNCTION{more} or lm_eval:TASK[,TASK]")


def registered(target: str, text: str, rest: str) -> Evaluator:
    """The evaluator of a registered prefix: its factory ("module:name", chosen by the calling code,
    not by the recipe or the user) imported and called."""
    module, _, name = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name, None)
    except ImportError as e:
        raise MergeError(f"--eval {one_line(text, 80)}: cannot import {module} ({one_line(e, 120)})") from None
    if not callable(factory):
        raise MergeError(f"--eval {one_line(text, 80)}: the registered evaluator {target} is not importable")
    evaluator = factory(text, rest)
    if not isinstance(evaluator, Evaluator):
        raise MergeError(f"--eval {one_line(text, 80)}: {target} gave {type(evaluator).__name__}, not an Evaluator")
    return evaluator


def read_lines(path: str, what: str) -> list[str]:
    """A data file's non-empty lines (a regular UTF-8 file of bounded size)."""
    raw = read_regular(path, MAX_DATA_BYTES, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergeError(f"{path}: byte {e.start} is not UTF-8 text; {what} is a UTF-8 text file") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise MergeError(f"{path}: no lines; {what} needs at least one")
    return lines


class Perplexity(Evaluator):
    objective = "perplexity"
    task = CAUSAL_LM

    def __init__(self, spec: str, path: str):
        self.spec, self.path = spec, path
        self.batches: list[tuple[Any, Any]] = []

    def files(self):
        return [(f"--eval {self.spec}", self.path)]

    def load(self, tokenizer, config, batch_size, max_length):
        import torch

        docs = read_lines(self.path, "a perplexity file (one document per line)")
        max_length = fitting_length(config, max_length)
        ids = [tokenizer(d, truncation=True, max_length=max_length)["input_ids"] for d in docs]
        ids = [x for x in ids if len(x) >= 2]
        if not ids:
            raise MergeError(f"{self.path}: no line has two tokens or more; perplexity needs text to predict")
        for i in range(0, len(ids), batch_size):
            chunk = ids[i:i + batch_size]
            width = max(len(x) for x in chunk)
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, x in enumerate(chunk):
                input_ids[row, :len(x)] = torch.tensor(x)
                mask[row, :len(x)] = 1
            self.batches.append((input_ids, mask))

    def evaluate(self, model, tokenizer, report):
        import torch

        device = next(model.parameters()).device
        total, count = 0.0, 0
        with torch.inference_mode():
            for step, (input_ids, mask) in enumerate(self.batches):
                input_ids, mask = input_ids.to(device), mask.to(device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
                targets, kept = input_ids[:, 1:], mask[:, 1:].bool()
                nll = torch.nn.functional.cross_entropy(logits[kept], targets[kept], reduction="sum")
                total += nll.item()
                count += int(kept.sum())
                report("perplexity", step, _exp(total / count))
        return {"perplexity": _exp(total / count), "loss": total / count}


class Accuracy(Evaluator):
    objective = "accuracy"
    task = SEQUENCE_CLASSIFICATION

    def __init__(self, spec: str, path: str):
        self.spec, self.path = spec, path
        self.batches: list[tuple[dict, Any]] = []

    def files(self):
        return [(f"--eval {self.spec}", self.path)]

    def load(self, tokenizer, config, batch_size, max_length):
        import torch

        what = "an accuracy file (label<TAB>text lines)"
        max_length = fitting_length(config, max_length)
        lines = read_lines(self.path, what)
        names = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        classes = getattr(config, "num_labels", len(names))
        labels, texts = [], []
        for number, line in enumerate(lines, 1):
            label, tab, text = line.partition("\t")
            if not tab:
                raise MergeError(f"{self.path}: line {number} has no tab; write `label<TAB>text`")
            if label in names:
                labels.append(names[label])
            elif label.strip().lstrip("-").isdigit() and 0 <= int(label) < classes:
                labels.append(int(label))
            else:
                known = ", ".join(list(names)[:8]) or f"0..{classes - 1}"
                raise MergeError(f"{self.path}: line {number}: label {one_line(label, 40)!r} is none of the model's "
                                 f"labels ({known}); fix the line")
            texts.append(text)
        for i in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True,
                                return_tensors="pt")
            self.batches.append((dict(encoded), torch.tensor(labels[i:i + batch_size])))

    def evaluate(self, model, tokenizer, report):
        import torch

        device = next(model.parameters()).device
        right, seen, loss = 0, 0, 0.0
        with torch.inference_mode():
            for step, (encoded, labels) in enumerate(self.batches):
                logits = model(**{k: v.to(device) for k, v in encoded.items()}).logits.float()
                labels = labels.to(device)
                loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
                right += int((logits.argmax(-1) == labels).sum())
                seen += len(labels)
                report("accuracy", step, right / seen)
        return {"accuracy": right / seen, "loss": loss / seen}


class PythonCallable(Evaluator):
    """A user's function (model, tokenizer) -> {metric: value}, imported inside the worker."""

    def __init__(self, spec: str, module: str, function: str):
        self.spec, self.module, self.function = spec, module, function
        self.call: Callable | None = None

    def load(self, tokenizer, config, batch_size, max_length):
        try:
            module = importlib.import_module(self.module)
        except ImportError as e:
            raise MergeError(f"--eval {self.spec}: cannot import {self.module!r} ({one_line(e, 120)}); put it on "
                             "PYTHONPATH") from None
        self.call = getattr(module, self.function, None)
        if not callable(self.call):
            raise MergeError(f"--eval {self.spec}: {self.module} has no function {self.function!r}")

    def evaluate(self, model, tokenizer, report):
        import torch

        with torch.inference_mode():
            out = self.call(model, tokenizer)
        if not isinstance(out, dict) or not all(isinstance(k, str) for k in out):
            raise MergeError(f"{self.module}.{self.function} returned {type(out).__name__}, not a mapping "
                             "{metric name: number}")
        return {k: _number(v, k) for k, v in out.items()}


class LmEval(Evaluator):
    """lm-evaluation-harness tasks on the merged model (metrics named TASK/METRIC, e.g. arc_easy/acc)."""

    task = CAUSAL_LM

    def __init__(self, spec: str, tasks: list[str]):
        self.spec, self.tasks = spec, tasks
        self.objective = f"{tasks[0]}/acc"
        self.batch_size = 8

    def load(self, tokenizer, config, batch_size, max_length):
        self.batch_size = batch_size

    def evaluate(self, model, tokenizer, report):
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size),
                                  tasks=self.tasks)
        out = {}
        for task, metrics in (results or {}).get("results", {}).items():
            for key, value in metrics.items():
                metric = key.split(",")[0]
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric:
                    out[f"{task}/{metric}"] = float(value)
        return out


def load_model(folder: str | Path, task: str | None, *, device: str = "cpu", trust_remote_code: bool = False,
               merged_names: list[str] = ()):
    """The model skeleton (its weights are replaced by every trial's merge) and the tokenizer of the
    reference folder: a causal LM or a sequence classifier when the evaluators need one, else the
    class the folder's config names."""
    try:
        import transformers
    except ModuleNotFoundError:
        raise MergeError("evaluating a merged model needs transformers: pip install 'modalmerge[hf]'") from None
    folder = str(folder)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise MergeError(f"{folder}: cannot read its config.json ({one_line(e, 120)}); the search evaluates a "
                         "Hugging Face model folder") from None
    auto = {CAUSAL_LM: transformers.AutoModelForCausalLM,
            SEQUENCE_CLASSIFICATION: transformers.AutoModelForSequenceClassification}.get(task)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    try:
        if auto is not None:
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
        elif architecture and hasattr(transformers, architecture):
            model = getattr(transformers, architecture)(config)
        else:
            model = transformers.AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise MergeError(f"{folder}: cannot build a {task or 'model'} from its config ({one_line(e, 120)})") from None
    names = set(merged_names)
    needed = {n for n, _ in model.named_parameters()}
    if names and not needed <= names:
        lacking = sorted(needed - names)[0]
        raise MergeError(f"{folder} is a {architecture or config.model_type} whose tensors do not make a "
                         f"{task or type(model).__name__} (no {lacking!r}); choose an --eval for this kind of model")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise MergeError(f"{folder}: no usable tokenizer ({one_line(e, 120)}); the evaluation needs the tokenizer "
                         "files beside the model") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batches of several lengths need one
    return model.to(device).eval(), tokenizer


def fitting_length(config, max_length: int) -> int:
    """Tokens per line: at most `max_length`, and no more than the model has positions for."""
    positions = getattr(config, "max_position_embeddings", None)
    return min(max_length, positions) if isinstance(positions, int) and positions > 0 else max_length


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MergeError(f"metric {name!r} is {one_line(repr(value), 60)}, not a number") from None
