"""Further CLI commands, one module each; each exposes `register(subparsers)`."""

from . import align, bench, demo, extract, inspect, msmoe

COMMANDS: list = [
    inspect.register,
    extract.register,
    align.register,
    msmoe.register,
    bench.register,
    demo.register,
]
