"""Build optimizers from names and configs, in the spirit of timm's ``create_optimizer_v2``.

    opt = fused_optim.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, fused=True)
    opt = fused_optim.from_config(model, {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9})

Names are case-insensitive and ignore '_' and '-': every registered class name plus timm-style aliases
(``sgd``/``nesterov`` = SGD with Nesterov momentum, ``momentum`` = SGD with plain momentum, ...). Given a model,
biases, norm weights (every param with fewer than 2 dims) and names in ``no_weight_decay`` go in a group without
weight decay, as timm does.

``muon`` is torch.optim.Muon's algorithm (2-D params only): timm's factory maps 'muon' to timm's own Muon, which
also runs AdamW on the 1-D params; here give those to another optimizer.
"""
from __future__ import annotations

import inspect
from typing import Iterable

import torch

from ._registry import REGISTRY

# alias -> (registered name, extra default kwargs)
ALIASES = {
    "sgd": ("sgd", {"nesterov": True}),
    "nesterov": ("sgd", {"nesterov": True}),
    "momentum": ("sgd", {"nesterov": False}),
    "sgdnesterov": ("sgd", {"nesterov": True}),
    "adamwfused": ("adamw", {"fused": True}),
    "sparse": ("sparseadam", {}),
    # timm's Lion / ADOPT variants: c... cautious, ...w decoupled decay, ...c corrected decoupled decay
    "clion": ("lion", {"caution": True}), "lionc": ("lion", {"corrected_weight_decay": True}),
    "clionc": ("lion", {"caution": True, "corrected_weight_decay": True}),
    "adoptw": ("adopt", {"decoupled": True}), "adoptc": ("adopt", {"decoupled": True, "corrected_weight_decay": True}),
    "cadopt": ("adopt", {"caution": True}), "cadoptw": ("adopt", {"decoupled": True, "caution": True}),
    "cadoptc": ("adopt", {"decoupled": True, "caution": True, "corrected_weight_decay": True}),
    # timm's LAMB / LARS variants
    "lambc": ("lamb", {"trust_clip": True}),
    "lambw": ("lamb", {"decoupled_decay": True}),
    "lambcw": ("lamb", {"trust_clip": True, "decoupled_decay": True}),
    "lambcd": ("lamb", {"decoupled_decay": True, "corrected_weight_decay": True}),
    "clamb": ("lamb", {"caution": True}),
    "clambw": ("lamb", {"caution": True, "decoupled_decay": True}),
    "larc": ("lars", {"trust_clip": True}),
    "nlars": ("lars", {"nesterov": True}),
    "nlarc": ("lars", {"nesterov": True, "trust_clip": True}),
}
_SGD_FAMILY = {"sgd", "sgdp", "lars"}  # classes that take timm's momentum default


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def optimizer_names() -> list[str]:
    return sorted(set(REGISTRY) | set(ALIASES))


def resolve(name: str):
    """(class, extra kwargs) for an optimizer name or alias; ValueError listing the valid names otherwise."""
    key = _key(name)
    if key in ALIASES:
        target, extra = ALIASES[key]
        return REGISTRY[target], dict(extra)
    if key in REGISTRY:
        return REGISTRY[key], {}
    raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(optimizer_names())}")


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float, no_weight_decay: Iterable[str] = ()):
    """Two groups: decayed weights, and biases / norm weights / listed names without weight decay."""
    skip = set(no_weight_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def create_optimizer(model_or_params, opt: str = "sgd", lr: float | None = None, weight_decay: float = 0.0,
                     momentum: float = 0.9, *, filter_bias_and_bn: bool = True, no_weight_decay: Iterable[str] = (),
                     **kwargs):
    """Create a fused_optim optimizer by name. Unknown options raise TypeError listing the valid ones."""
    cls, extra = resolve(opt)
    valid = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params")]
    kw = {**extra, **kwargs}
    if lr is not None:
        kw["lr"] = lr
    if "weight_decay" in valid:
        kw["weight_decay"] = weight_decay
    elif weight_decay:
        raise TypeError(f"{cls.__name__} has no weight_decay option")
    if _key(cls.__name__) in _SGD_FAMILY:
        kw.setdefault("momentum", momentum)
    unknown = sorted(set(kw) - set(valid))
    if unknown:
        raise TypeError(f"{cls.__name__} got unknown option(s) {unknown}; valid options: {', '.join(valid)}")
    if isinstance(model_or_params, torch.nn.Module):
        if filter_bias_and_bn and kw.get("weight_decay", 0):
            params = param_groups_weight_decay(model_or_params, kw["weight_decay"], no_weight_decay)
        else:
            params = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = model_or_params
    return cls(params, **kw)


def from_config(model_or_params, config: dict):
    """Create an optimizer from a training config dict (e.g. a YAML/JSON section):
    ``{"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "fused": true}`` (``opt`` or ``name`` also work
    for the name; lists are turned into tuples, e.g. betas)."""
    cfg = dict(config)
    names = [k for k in ("optimizer", "opt", "name") if k in cfg]
    if len(names) != 1:
        raise ValueError(f"config must name the optimizer under exactly one of 'optimizer', 'opt', 'name'; got {config}")
    name = cfg.pop(names[0])
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return create_optimizer(model_or_params, name, **cfg)
