"""Further CLI commands, one module each; each exposes `register(subparsers)`."""

from . import align, bench, demo, extract, extract_lora, inspect, msmoe, search

COMMANDS: list = [
    inspect.register,
    extract.register,
    extract_lora.register,
    align.register,
    msmoe.register,
    search.register,
    bench.register,
    demo.register,
]
