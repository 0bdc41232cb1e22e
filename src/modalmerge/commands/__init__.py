"""Further CLI commands, one module each; each exposes `register(subparsers)`."""

from . import extract, inspect

COMMANDS: list = [
    inspect.register,
    extract.register,
]
