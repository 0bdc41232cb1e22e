"""Further CLI commands, one module each; each exposes `register(subparsers)`."""

from . import align, bench, demo, extract, extract_lora, generate, inspect, msmoe, search

COMMANDS: list = [
    inspect.register,
    extract.register,
    extract_lora.register,
    generate.register,
    align.register,
    msmoe.register,
    search.register,
    bench.register,
    demo.register,
]
