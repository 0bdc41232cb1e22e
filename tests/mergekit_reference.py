"""mergekit 0.1.5 as a test-only reference: where it is, a mark for the tests that need it, and a
runner for many mergekit jobs in one subprocess.

mergekit lives in its own virtual environment (the README's "## Test" block makes `.mergekit-venv`),
because its pins (accelerate, datasets, tqdm, ...) are not ours: the tests only know the interpreter
named by MODALMERGE_MERGEKIT_PYTHON and talk to it through files. One subprocess runs every job of a
batch (tests/mergekit_driver.py), so mergekit and torch are imported once, not once per recipe.

Unset variable: the tests that need mergekit skip, naming the README lines that set it up. Set but
unusable (no such interpreter, no mergekit 0.1.5 in it): those tests fail, since CI sets it.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

ENV_VAR = "MODALMERGE_MERGEKIT_PYTHON"
DRIVER = Path(__file__).resolve().parent / "mergekit_driver.py"
# A relative interpreter path (the README's `.mergekit-venv/bin/python`) is relative to where pytest
# started, whatever folder a test moves to later.
STARTED_IN = Path.cwd()
BATCH_TIMEOUT_S = 1800

SETUP_HINT = ("mergekit 0.1.5 is not set up: MODALMERGE_MERGEKIT_PYTHON is unset. The README's '## Test' "
              "block sets it up: `python -m venv .mergekit-venv`, `.mergekit-venv/bin/pip install "
              "torch==2.13.0 mergekit==0.1.5`, then `MODALMERGE_MERGEKIT_PYTHON=.mergekit-venv/bin/python "
              "python -m pytest`")


class MergekitFailed(AssertionError):
    """A mergekit job (or the whole batch) failed; the message starts with mergekit's last error line."""


def mergekit_python() -> str | None:
    """The interpreter that has mergekit 0.1.5 (MODALMERGE_MERGEKIT_PYTHON), as an absolute path
    (not resolved through links: a venv's python is a link), or None when the variable is unset."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if os.sep not in value:
        return value  # a bare name: found on PATH
    return os.path.abspath(STARTED_IN / Path(value).expanduser())


requires_mergekit = pytest.mark.skipif(mergekit_python() is None, reason=SETUP_HINT)


def run_mergekit(jobs: list[dict], *, check: bool = True) -> list[str | None]:
    """Run mergekit jobs, in order, in one subprocess of mergekit_python(); per job None (done) or
    mergekit's error (its last error line first, then the end of its traceback).

    A job is {"kind": "yaml", "config": PATH, "out": PATH, "options": {MergeOptions fields}} (options
    optional; `quiet` is on unless given) or {"kind": "extract_lora", "model": PATH, "base": PATH,
    "out": PATH, "rank": R, "args": [more mergekit-extract-lora flags]} ("args" optional).
    With `check`, the first failed job raises MergekitFailed. A batch that cannot run at all (no
    interpreter, no mergekit 0.1.5) always raises."""
    python = mergekit_python()
    if python is None:
        raise MergekitFailed(SETUP_HINT)
    for i, job in enumerate(jobs):
        if job.get("kind") not in ("yaml", "extract_lora"):
            raise ValueError(f"mergekit job {i}: kind must be 'yaml' or 'extract_lora', not {job.get('kind')!r}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="mergekit-batch-") as work:
        jobs_file, results_file = Path(work) / "jobs.json", Path(work) / "results.json"
        jobs_file.write_text(json.dumps(jobs, default=str))  # paths as strings
        try:
            done = subprocess.run([python, str(DRIVER), str(jobs_file), str(results_file)], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=BATCH_TIMEOUT_S)
        except OSError as e:
            raise MergekitFailed(f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} cannot be run: {e}") from None
        if done.returncode != 0 or not results_file.exists():
            lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit status {done.returncode}"
            raise MergekitFailed(f"mergekit batch failed ({ENV_VAR}={os.environ.get(ENV_VAR)!r}): {last}\n"
                                 + "\n".join(lines[-20:]))
        results = json.loads(results_file.read_text())
    errors = [r["error"] for r in results]
    if check:
        for job, error in zip(jobs, errors):
            if error is not None:
                raise MergekitFailed(f"mergekit {job['kind']} job for {job['out']}: {error}")
    return errors
