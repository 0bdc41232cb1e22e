"""`modalmerge bench …`: benchmarks, one subcommand each, each with a --quick mode for CI."""

from __future__ import annotations


def register(sub) -> None:
    from .bench_mllm import register_mllm

    p = sub.add_parser("bench", help="benchmarks (mllm)", description="Benchmarks; each has a --quick mode.")
    bench = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    register_mllm(bench)
