"""Further CLI commands, one module each; each exposes `register(subparsers)`."""

from . import extract, inspect, msmoe

COMMANDS: list = [
    inspect.register,
    extract.register,
    msmoe.register,
]
