"""The one registry of optimizers: name -> class. Each optimizer module registers its class(es) on import."""
from __future__ import annotations

REGISTRY: dict[str, type] = {}


def register(cls):
    REGISTRY[cls.__name__.lower()] = cls
    return cls
