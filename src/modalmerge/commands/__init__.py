"""Further CLI commands, one module each; each exposes `register(subparsers)`."""

from . import extract

COMMANDS: list = [
    extract.register,
]
