"""The C extension modalmerge.ops.ckernels (the fused CPU kernels); everything else is in pyproject.toml.

Optional: where it cannot be built (no C compiler, or one without GNU C: kernels.c needs gcc or
clang), the install still succeeds and ops/fused.py runs the eager torch kernels instead.
"""

from setuptools import Extension, setup

OPS = "src/modalmerge/ops"

setup(ext_modules=[Extension(
    "modalmerge.ops.ckernels",
    sources=[f"{OPS}/ckernels.c", f"{OPS}/kernels.c"],
    depends=[f"{OPS}/kernels.h"],
    include_dirs=[OPS],
    # Portable: no -march=native (kernels.c picks AVX2 or AVX-512 when the module loads, where
    # gcc can build both). torch's IEEE semantics: no fast-math, and no fused multiply-adds,
    # which round once where torch rounds twice. -fno-trapping-math changes no value (no
    # floating-point traps are enabled); it lets gcc vectorise loops with selects (kernels.c).
    extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"],
    optional=True,
)])
