"""Anchor optimizers to compare against: torch.optim, and timm.optim modules imported without timm's __init__.

timm's package __init__ imports torchvision, which does not import beside the CPU torch build; its optimizer
modules need only torch. We register bare `timm` and `timm.optim` package modules so the real __init__ never runs.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def timm_module(name: str):
    """Import timm.optim.<name> (e.g. 'adamp') without running timm's __init__; None if timm is absent."""
    spec = importlib.util.find_spec("timm") if "timm" not in sys.modules else None
    if "timm" not in sys.modules:
        if spec is None:
            return None
        root = spec.submodule_search_locations[0]
        for pkg, path in (("timm", root), ("timm.optim", f"{root}/optim")):
            mod = types.ModuleType(pkg)
            mod.__path__ = [path]
            sys.modules[pkg] = mod
    return importlib.import_module(f"timm.optim.{name}")


def timm_class(module: str, cls: str):
    mod = timm_module(module)
    return getattr(mod, cls) if mod is not None else None
