"""Further CLI commands, one module each; each exposes `register(subparsers)`."""

from . import inspect

COMMANDS: list = [inspect.register]
