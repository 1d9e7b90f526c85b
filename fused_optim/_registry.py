"""The one registry of optimizers: name -> class. Each optimizer module registers its class(es) on import; the
registration also appends the shared keyword documentation (_docs.py) to the class's docstring."""
from __future__ import annotations

from ._docs import document

REGISTRY: dict[str, type] = {}


def register(cls):
    REGISTRY[cls.__name__.lower()] = cls
    return document(cls)
