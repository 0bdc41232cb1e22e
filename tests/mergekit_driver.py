"""Runs a batch of mergekit 0.1.5 jobs in mergekit's own interpreter (tests/mergekit_reference.py
starts it): `python mergekit_driver.py JOBS.json RESULTS.json`.

mergekit is imported once and called through its Python API, the same calls its command lines make:
MergeConfiguration + run_merge + MergeOptions (mergekit-yaml) and the mergekit-extract-lora command.
Each job's failure is recorded (mergekit's last error line, then the end of its traceback) and the
next job runs; RESULTS.json gets one entry per job. This file imports nothing of modalmerge or of the
tests, since it runs in another environment.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

# Python puts this script's folder (tests/) first on sys.path; nothing there is for mergekit.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

EXPECTED_VERSION = "0.1.5"


def last_error_line(error: BaseException) -> str:
    """The exception's type and its last meaningful line (pydantic ends with a link, skipped)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("For further information visit")] or [""]
    return f"{type(error).__name__}: {lines[-1]}".rstrip(": ")


def run_yaml_job(job: dict) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config_source = Path(job["config"]).read_text(encoding="utf-8")
    config = MergeConfiguration.model_validate(yaml.safe_load(config_source))
    options = MergeOptions(**{"quiet": True, **job.get("options", {})})
    options.apply_global_options()
    run_merge(config, job["out"], options=options, config_source=config_source)


def run_extract_lora_job(job: dict) -> None:
    from mergekit.scripts.extract_lora import main as extract_lora_command

    args = ["--model", job["model"], "--base-model", job["base"], "--out-path", job["out"],
            "--max-rank", str(job["rank"]), *map(str, job.get("args", []))]
    extract_lora_command.main(args=args, standalone_mode=False, prog_name="mergekit-extract-lora")


RUNNERS = {"yaml": run_yaml_job, "extract_lora": run_extract_lora_job}


def main(jobs_path: str, results_path: str) -> int:
    from importlib import import_module
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("mergekit")
    except PackageNotFoundError:
        sys.exit(f"RuntimeError: {sys.executable} has no mergekit; install mergekit=={EXPECTED_VERSION} in it")
    if found != EXPECTED_VERSION:
        sys.exit(f"RuntimeError: this interpreter has mergekit {found}; the tests compare with {EXPECTED_VERSION}")
    import_module("mergekit.merge")  # fails here, once, when mergekit cannot be imported

    results = []
    for job in json.loads(Path(jobs_path).read_text()):
        start = time.perf_counter()
        try:
            RUNNERS[job["kind"]](job)
            error = None
        except Exception as e:  # one job's failure is that job's result
            tail = "".join(traceback.format_exception(e)).rstrip().splitlines()[-12:]
            error = last_error_line(e) + "\n" + "\n".join(tail)
        results.append({"error": error, "seconds": round(time.perf_counter() - start, 3)})
    Path(results_path).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
