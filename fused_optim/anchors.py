"""The optimizers fused_optim reproduces (its anchors) and how each one must be driven.

Anchors: torch.optim's class of the same name, timm.optim's for SGDP, AdamP, Adafactor, NvNovoGrad, Adahessian, Lion
and Adopt (``fused_optim.Adafactor`` is timm's Adafactor, not ``torch.optim.Adafactor``, a different algorithm), and for
NovoGrad, which has no external anchor (timm dropped it), our own reference path in float64.

timm's package ``__init__`` imports torchvision, which does not import beside the CPU torch build; its optimizer
modules need only torch. ``timm_module`` registers bare ``timm`` and ``timm.optim`` package modules so the real
``__init__`` never runs. timm is optional: the helpers return None (``timm_class``) or raise a clear error
(``anchor``) when it is missing.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
import types
import warnings

import torch

# class name -> (timm.optim module, class)
TIMM = {"SGDP": ("sgdp", "SGDP"), "AdamP": ("adamp", "AdamP"), "Adafactor": ("adafactor", "Adafactor"),
        "NvNovoGrad": ("nvnovograd", "NvNovoGrad"), "Adahessian": ("adahessian", "Adahessian"),
        "Lion": ("lion", "Lion"), "Adopt": ("adopt", "Adopt")}
TIMM.update(Lamb=("lamb", "Lamb"), Lars=("lars", "Lars"))
REFERENCE_ANCHORED = {"NovoGrad"}  # no external anchor: the reference path in float64

# how a step must be driven, by class name (ours and the anchor share it)
CLOSURE = {"LBFGS"}            # step(closure)
CREATE_GRAPH = {"Adahessian"}  # loss.backward(create_graph=True): the step differentiates the grads
SPARSE_GRADS = {"SparseAdam"}  # only sparse grads, e.g. from nn.Embedding(sparse=True)

# options for short runs on small problems: an lr where the anchor has no default (SGDP), and a short LBFGS step
# (its default 100-entry history and 20 iterations per step take minutes under Triton's interpreter)
SHORT_RUN_OPTIONS = {"SGDP": {"lr": 0.1}, "LBFGS": {"history_size": 4, "max_iter": 5}}


def timm_module(name: str):
    """Import timm.optim.<name> (e.g. 'adamp') without running timm's __init__; None if timm is absent."""
    if "timm" not in sys.modules:
        spec = importlib.util.find_spec("timm")
        if spec is None:
            return None
        root = spec.submodule_search_locations[0]
        for pkg, path in (("timm", root), ("timm.optim", f"{root}/optim")):
            mod = types.ModuleType(pkg)
            mod.__path__ = [path]
            sys.modules[pkg] = mod
    return importlib.import_module(f"timm.optim.{name}")


def timm_class(module: str, cls: str):
    """timm.optim.<module>.<cls>, or None if timm is absent."""
    mod = timm_module(module)
    return getattr(mod, cls) if mod is not None else None


def optimizer_class(name: str) -> type:
    """The fused_optim class a factory name or alias builds (case-insensitive, timm-style aliases); ValueError
    listing the valid names otherwise. Asks the factory itself, the one place that knows the aliases (a probe
    built with fused=False, which every device accepts, an lr, which SGDP requires, and a matrix, which Muon requires)."""
    import fused_optim

    return type(fused_optim.create_optimizer([torch.zeros(1, 1, requires_grad=True)], name, lr=0.1,
                                                fused=False))


def anchor(name: str):
    """(anchor class, dtype to run it in, description) for one of our class names. The anchor takes the same
    constructor arguments as ours. RuntimeError if the anchor is timm's and timm is not installed."""
    if name in TIMM:
        cls = timm_class(*TIMM[name])
        if cls is None:
            raise RuntimeError(f"{name}'s anchor is timm.optim.{TIMM[name][1]}, and timm is not installed "
                               f"(pip install --no-deps timm)")
        return cls, torch.float32, f"timm.optim.{TIMM[name][1]}"
    import fused_optim

    ours = getattr(fused_optim, name)
    if name in REFERENCE_ANCHORED:
        return (functools.partial(ours, fused=False), torch.float64,
                f"fused_optim.{name}(fused=False) in float64 (no external anchor)")
    return getattr(torch.optim, name), torch.float32, f"torch.optim.{name}"


def hyperparameters(opt, cls) -> dict:
    """The constructor arguments of ``cls`` that ``opt`` was built with (its defaults), ``fused`` left out: an
    anchor built with them runs the same algorithm as ``opt``."""
    accepted = inspect.signature(cls).parameters
    return {k: v for k, v in opt.defaults.items() if k in accepted and k != "fused"}


def take_step(opt, loss_fn, run=None):
    """One step of ``opt`` on ``loss_fn()`` (a fresh scalar loss), driven the way its algorithm needs: through a
    closure (LBFGS) or with the grads' graph kept (Adahessian). ``run(step)`` calls ``step()``, the optimizer step
    itself (closure calls included for LBFGS), e.g. to time it. Returns the loss (the first closure call's)."""
    name = type(opt).__name__
    first = []

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        with warnings.catch_warnings():  # the grads' graph is the point; zero_grad() breaks the cycle it warns of
            warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph=True")
            loss.backward(create_graph=name in CREATE_GRAPH)
        first.append(loss.detach())
        return loss

    run = run or (lambda step: step())
    if name in CLOSURE:
        run(lambda: opt.step(closure))
    else:
        closure()
        run(opt.step)
    return first[0]
