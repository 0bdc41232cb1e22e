"""Further CLI commands, one module each; each exposes `register(subparsers)`."""

from . import bench, demo, extract, inspect

COMMANDS: list = [
    inspect.register,
    extract.register,
    bench.register,
    demo.register,
]
