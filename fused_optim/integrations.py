"""fused_optim in other libraries' optimizer factories.

timm: ``register_timm()`` adds fused_optim's optimizers to timm's optimizer registry, so
``timm.optim.create_optimizer_v2(model, "foadamw", lr=1e-3, weight_decay=0.05, fused=True)`` builds
``fused_optim.AdamW``. timm's train script gets them through the launcher of this module:

    python -m fused_optim.integrations path/to/timm/train.py --opt foadamw --opt-kwargs fused=True ...

Hugging Face ``transformers.Trainer`` and Lightning need no hook: they take any ``torch.optim.Optimizer``
(see examples/hf_trainer.py and examples/lightning_module.py).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import runpy
import sys

from ._registry import REGISTRY

TIMM_PREFIX = "fo"
# fused_optim classes that re-implement timm.optim's class of the same name; all others re-implement torch.optim's
_TIMM_ANCHORED = {"Adafactor", "Adahessian", "AdamP", "SGDP", "NvNovoGrad"}


def _anchor_key(cls) -> tuple[str, str]:
    return ("timm" if cls.__name__ in _TIMM_ANCHORED else "torch", cls.__name__)


def _accepts(cls, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def register_timm(prefix: str = TIMM_PREFIX, registry=None) -> list[str]:
    """Register fused_optim's optimizers in timm's optimizer registry (default: the one ``create_optimizer_v2``
    uses) and return the names added.

    Every timm entry whose class fused_optim re-implements gets a twin named ``prefix + timm's name``, with the
    same flags and defaults and our class: ``fosgd`` is SGD with Nesterov momentum as timm's ``sgd``,
    ``fomomentum``, ``foadamw``, ``foradamw``, ``foadamp``, ``focadamp`` (cautious), ``foadafactor``,
    ``fonovograd`` (timm's novograd is NvNovoGrad), ... Our classes that timm does not register get
    ``prefix + our registry name`` if they take weight_decay, which timm's factory always passes (``foasgd``);
    Rprop, LBFGS and SparseAdam do not, and our paper NovoGrad would clash with timm's ``novograd``. Muon (torch's,
    2-D params only) is left out: timm's factory hands an optimizer every param, biases included.
    Calling it again is harmless; a name already taken by another optimizer raises ValueError.
    """
    if not prefix or "_" in prefix:
        # timm reads "a_b" as wrapper "a" (e.g. lookahead) around optimizer "b"
        raise ValueError(f"prefix must be non-empty and contain no '_'; got {prefix!r}")
    factory = importlib.import_module("timm.optim._optim_factory")
    registry = factory.default_registry if registry is None else registry
    ours = {_anchor_key(cls): cls for cls in REGISTRY.values()}
    infos, twinned = [], set()
    for name in registry.list_optimizers():
        info = registry.get_optimizer_info(name)
        anchor = info.opt_class
        if isinstance(anchor, str) or anchor in REGISTRY.values():  # lazily imported (apex, bitsandbytes); ours
            continue
        cls = ours.get((anchor.__module__.split(".")[0], anchor.__name__))
        if cls is not None:
            twinned.add(cls)
            infos.append(dataclasses.replace(info, name=prefix + name, opt_class=cls,
                                             description=f"fused_optim.{cls.__name__}: {info.description}"))
    taken = {info.name for info in infos}
    for key, cls in sorted(REGISTRY.items()):
        if (cls not in twinned and _accepts(cls, "weight_decay") and prefix + key not in taken
                and not cls.matrices_only):
            infos.append(factory.OptimInfo(name=prefix + key, opt_class=cls, description=f"fused_optim.{cls.__name__}",
                                           has_eps=_accepts(cls, "eps"), has_momentum=_accepts(cls, "momentum"),
                                           has_betas=_accepts(cls, "betas")))
    existing = {name: registry.get_optimizer_info(name) for name in registry.list_optimizers()}
    for info in infos:  # all checked before any is registered
        old = existing.get(info.name)
        if old is not None and old.opt_class not in REGISTRY.values():
            raise ValueError(f"timm optimizer name {info.name!r} is taken by {old.opt_class}; "
                             f"choose another prefix than {prefix!r}")
    for info in infos:
        if existing.get(info.name) != info:
            registry.register(info)
    return [info.name for info in infos]


def main(argv: list[str] | None = None):
    """Run a training script (e.g. timm's train.py) with fused_optim's optimizers registered in timm."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m fused_optim.integrations SCRIPT.py [script args ...]")
    register_timm()
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
