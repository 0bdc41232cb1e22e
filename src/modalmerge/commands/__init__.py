"""Further CLI commands, one module each; each exposes `register(subparsers)`."""

from . import bench

COMMANDS: list = [bench.register]
