"""Time the same merge several times in one process (the first run may read its inputs from
disk; later ones show the steady speed from the page cache). MODALMERGE_FUSED=0 compares
the eager kernels.

    PYTHONPATH=src python scripts/merge_repeat.py ties --cache ~/.cache/modalmerge/bench/llama-h1024-l24-v32000-i4096-bf16-v1
"""

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

import modalmerge


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method")
    ap.add_argument("--params", default="{}", help="method parameters as JSON")
    ap.add_argument("--cache", required=True, help="a `modalmerge bench speed` checkpoint folder (base, ft0, ...)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache).expanduser()
    models = sorted(p for p in cache.iterdir() if p.name.startswith("ft"))
    recipe = {"method": args.method, "base": str(cache / "base"), "models": [str(m) for m in models],
              "params": json.loads(args.params)}
    out = Path(tempfile.mkdtemp(prefix="modalmerge-repeat-")) / "out"
    try:
        for i in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            t0, cpu0 = time.perf_counter(), _cpu_seconds()
            report = modalmerge.merge(recipe, output=out)
            print(f"run {i + 1}: {time.perf_counter() - t0:.2f} s, cpu {_cpu_seconds() - cpu0:.1f} s "
                  f"(statistics {report.seconds['statistics']:.2f} s, apply {report.seconds['apply']:.2f} s)")
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
