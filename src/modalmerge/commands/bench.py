"""`modalmerge bench …`: benchmarks, each with a --quick mode that CI runs."""

from __future__ import annotations

from . import bench_text


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (text)", description="Benchmarks; each has a --quick mode.")
    bench = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    bench_text.register_text(bench)
