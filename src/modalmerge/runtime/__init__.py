"""Serving decoupled merges: token-routed layers over one composed model (see composed.py)."""

from .composed import TEXT, ComposedModel, load_composed

__all__ = ["TEXT", "ComposedModel", "load_composed"]
