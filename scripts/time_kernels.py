"""Time the fused C kernels (modalmerge.ops.ckernels) on one [models, elements] block, one thread:
the installed build, or builds of it given as .so files (to compare build flags).

    PYTHONPATH=src python scripts/time_kernels.py                      # the installed build
    PYTHONPATH=src python scripts/time_kernels.py a/ckernels*.so b/ckernels*.so

Prints each kernel's median of --repeat runs in milliseconds, one row per build.
"""

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from modalmerge.ops import fused

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load(path: str):
    spec = importlib.util.spec_from_file_location("ckernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_ms(fn, repeat: int) -> float:
    fn()  # warm: pages touched, code loaded
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("builds", nargs="*", help="ckernels .so files (default: the installed module)")
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--elements", type=int, default=1 << 22)
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    n = a.elements
    base = torch.randn(n, generator=g).to(DTYPES[a.dtype])
    models = [(base.float() + 0.02 * torch.randn(n, generator=g)).to(base.dtype) for _ in range(a.models)]
    thr = torch.full((a.models,), 0.01)
    w = torch.ones(a.models)
    total = fused.trimmed_total(base, models, thr, w) if fused.usable() else torch.randn(n, generator=g)
    keys = torch.zeros(n, dtype=torch.int16)
    cuts = [20000, 30000, 31000, 32000]
    kernels = {
        "trimmed_total": lambda: fused.trimmed_total(base, models, thr, w),
        "disjoint mean": lambda: fused.disjoint_merge(base, models, thr, w, total, -1.0, "mean"),
        "disjoint max": lambda: fused.disjoint_merge(base, models, thr, w, total, -1.0, "max"),
        "weighted_delta_sum": lambda: fused.weighted_delta_sum(base, models, w),
        "magnitude_keys (4 cuts)": lambda: keys.copy_(fused.magnitude_keys(base, models[0], cuts)[0]),
        "count_at_least (4 cuts)": lambda: fused.count_at_least(keys, cuts),
        "boundary_low_counts": lambda: fused.boundary_low_counts(base, models[0], 0x3C00),
    }
    builds = a.builds or [None]
    print(f"[{a.models}, {n}] {a.dtype}, 1 thread, median of {a.repeat} (ms)")
    # a build's column: its folder's name (a/ckernels….so → a)
    print("kernel".ljust(26) + "".join(f"{Path(b).parent.name if b else 'installed':>12}" for b in builds))
    rows = {name: [] for name in kernels}
    for build in builds:
        if build is not None:
            fused.ckernels = load(build)  # this script's process only
        print(f"# {build or 'installed'}: {fused.note()}")
        for name, fn in kernels.items():
            rows[name].append(median_ms(fn, a.repeat))
    for name, times in rows.items():
        print(name.ljust(26) + "".join(f"{t:>12.1f}" for t in times))


if __name__ == "__main__":
    main()
