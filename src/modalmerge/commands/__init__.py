"""Further CLI commands, one module each; each exposes `register(subparsers)`."""

from . import align, extract, inspect, msmoe

COMMANDS: list = [
    inspect.register,
    extract.register,
    align.register,
    msmoe.register,
]
