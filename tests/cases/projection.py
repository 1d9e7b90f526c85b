"""SGDP and AdamP against timm.optim.

SGDP / AdamP only project when the grad is nearly orthogonal to the weight, which random grads almost never are:
`projection_driver` makes each 2+-D grad, at random, orthogonal per row (channel projection), orthogonal for the
whole tensor only (layer projection), or clearly radial (no projection), and logs what the reference decides in
MODES so tests/optimizers/test_projection.py can assert that every kind happened on 2-D and 4-D weights.
"""
from collections import Counter

import torch

from anchors import timm_class
from cases import Case, step_all

from fused_optim.optimizers.projection import projection_mode

SHAPES = [(5, 3), (7,), (1,), (), (0,), (4, 3, 3, 3), (67, 33), (6, 2, 3, 3)]
SHAPES_2 = [(11,), (2, 9), (3, 4, 2, 2)]

MODES: Counter = Counter()  # (param dim, mode) -> count, over every projection_driver step


def _orthogonal(r, p, per_row):
    """r minus its component along p, per row (per_row) or over the whole tensor."""
    pv = p.reshape(p.shape[0], -1) if per_row else p.reshape(1, -1)
    rv = r.reshape(pv.shape)
    return (rv - pv * (rv * pv).sum(1, keepdim=True) / (pv * pv).sum(1, keepdim=True)).reshape(p.shape)


def projection_driver(opts, param_lists, step, gen):
    group_of = {id(p): g for g in opts[0].param_groups for p in g["params"]}
    grads = []
    for i, p in enumerate(param_lists[0]):
        r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.dim() > 1 and p.numel() > 0:
            q = p.detach().to("cpu", torch.float64)
            kind = int(torch.randint(0, 3, (), generator=gen))  # (the generic tests pass step 0 with new seeds)
            r = (r + q * (r.norm() / q.norm()) if kind == 0  # |cos| ~ 0.7 per row and per layer
                 else _orthogonal(r, q, per_row=kind == 1))
            group = group_of[id(p)]
            MODES[(p.dim(), projection_mode(q, r, group["delta"], group["eps"]))] += 1
        grads.append(r)
    step_all(opts, param_lists, grads)


CASES = [
    Case("SGDP", lambda: timm_class("sgdp", "SGDP"),
         configs=[{"lr": 0.1, "weight_decay": 0.1},
                  {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.05, "delta": 0.2, "wd_ratio": 0.3},
                  {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "caution": True}],
         group2={"lr": 0.02, "weight_decay": 0.0}, shapes=SHAPES, shapes2=SHAPES_2, driver=projection_driver,
         complex_ok=False, launches=2),
    Case("AdamP", lambda: timm_class("adamp", "AdamP"),
         configs=[{"lr": 0.01, "weight_decay": 0.1},
                  {"lr": 0.01, "betas": (0.8, 0.99), "nesterov": True, "weight_decay": 0.2, "wd_ratio": 0.5},
                  {"lr": 0.01, "weight_decay": 0.1, "caution": True, "eps": 1e-6}],
         group2={"lr": 3e-3, "delta": 0.05, "weight_decay": 0.0}, shapes=SHAPES, shapes2=SHAPES_2,
         driver=projection_driver, complex_ok=False, launches=2),
]
