"""`--eval bench-text:TASK=FOLDER[,TASK=FOLDER...][,val=N][,seed=S]`: a search scored as `modalmerge
bench text` scores its validation rows.

The text benchmark fine-tunes one sentence classifier per sentconv task (encoder + mean pooling +
linear head) and keeps each in a cache folder: encoder.safetensors (what a recipe merges, the
encoder folder being the base) and head.safetensors (the task's head, which is not merged). This
evaluator puts each named task's head on the merged encoder and measures accuracy on that task's
validation split, the same seeded subset the benchmark chooses its hyperparameters on (`val`
examples per task, default 300, the quick mode's 64; `seed`, default 0). Metrics: `accuracy`, the
mean over the tasks (the objective, maximised), and `accuracy/TASK` for each.

It lives in bench/ (the data, the classifier) and reaches the search through the hook of
procedures/search/evaluators.py: commands/search.py registers EVALUATORS, which names this class by
module and name, so each worker imports it there.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MergeError, one_line
from ..procedures.search.evaluators import Evaluator, Report
from . import sentconv
from .text_classifier import Classifier, TextBenchConfig, accuracy, batches

HEAD_FILE = "head.safetensors"
EVAL_BATCH = 128  # the benchmark's evaluation batch


class BenchTextEvaluator(Evaluator):
    objective = "accuracy"
    task = None  # the reference folder's own class: the bare encoder the benchmark merges

    def __init__(self, spec: str, rest: str):
        self.spec = spec
        defaults = TextBenchConfig()
        self.val_examples, self.seed = defaults.val_examples, defaults.seed
        self.max_length = defaults.max_length
        self.folders: dict[str, Path] = {}
        for item in (x for x in rest.split(",") if x):
            key, eq, value = item.partition("=")
            if not eq or not value:
                raise MergeError(f"--eval {one_line(spec, 120)}: {one_line(item, 60)!r}: write TASK=FOLDER (a bench "
                                 "text fine-tune folder), val=N or seed=S")
            if key in ("val", "seed"):
                if not value.isdigit():
                    raise MergeError(f"--eval {one_line(spec, 120)}: {key}={one_line(value, 20)} is not a whole number")
                setattr(self, "val_examples" if key == "val" else "seed", int(value))
            elif key in sentconv.TASKS:
                self.folders[key] = Path(value)
            else:
                raise MergeError(f"--eval {one_line(spec, 120)}: unknown task {one_line(key, 40)!r}; the text "
                                 f"benchmark's tasks are {', '.join(sentconv.TASKS)}")
        if not self.folders:
            raise MergeError(f"--eval {one_line(spec, 120)}: name a task and its fine-tune folder, e.g. "
                             "--eval bench-text:sst2=CACHE/sst2-KEY,trec=CACHE/trec-KEY")
        self.data_folder = sentconv.sentconv_dir(sentconv.default_data_dir())
        self.classifiers: dict[str, Classifier] = {}
        self.val: dict[str, list] = {}

    def files(self):
        heads = [(f"--eval {self.spec}: head of {t}", str(f / HEAD_FILE)) for t, f in self.folders.items()]
        data = [(f"--eval {self.spec}: data", str(self.data_folder / name))
                for t in self.folders for name in sentconv.TASKS[t].files.values()]
        return heads + data

    def load(self, tokenizer, config, batch_size, max_length):
        from safetensors.torch import load_file

        sentconv.check_files(self.data_folder, list(self.folders))
        self.heads = {}
        for t, folder in self.folders.items():
            path = folder / HEAD_FILE
            if not path.is_file():
                raise MergeError(f"--eval {self.spec}: {path} does not exist; give the folder of a bench text "
                                 "fine-tune (it holds encoder.safetensors and head.safetensors)")
            self.heads[t] = load_file(str(path))
            d = sentconv.load_task(self.data_folder, t, self.seed)
            val = sentconv.subsample(d.val, self.val_examples, self.seed, f"{t}/val-eval")
            self.val[t] = batches(tokenizer, val, self.max_length, EVAL_BATCH, sort=True)
            classes = self.heads[t].get("weight")
            if classes is None or classes.shape[0] != d.num_labels:
                raise MergeError(f"--eval {self.spec}: {path} is no {t} head ({d.num_labels} classes, a "
                                 "linear layer's weight and bias); give that task's own fine-tune folder")

    def evaluate(self, model, tokenizer, report: Report) -> dict[str, float]:
        out = {}
        for step, t in enumerate(self.val):
            if t not in self.classifiers:  # the skeleton is the same object every trial: built once
                device = next(model.parameters()).device
                self.classifiers[t] = Classifier(model, self.heads[t]["weight"].shape[0])
                self.classifiers[t].head.load_state_dict(self.heads[t])
                self.classifiers[t].head.to(device)
                self.val[t] = [tuple(x.to(device) for x in batch) for batch in self.val[t]]
            out[f"accuracy/{t}"] = accuracy(self.classifiers[t], self.val[t])
            report("accuracy", step, sum(out.values()) / len(out))
        return {"accuracy": sum(out.values()) / len(out), **out}


# what commands/search.py registers: --eval prefix -> "module:class" (imported in each worker)
EVALUATORS = {"bench-text": f"{BenchTextEvaluator.__module__}:{BenchTextEvaluator.__qualname__}"}
