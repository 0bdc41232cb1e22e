"""Further CLI commands, one module each; each exposes `register(subparsers)`."""

from . import bench, extract, inspect

COMMANDS: list = [
    inspect.register,
    extract.register,
    bench.register,
]
