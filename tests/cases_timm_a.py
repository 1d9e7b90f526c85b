"""SGDP, AdamP and Adahessian against timm.optim.

SGDP / AdamP only project when the grad is nearly orthogonal to the weight, which random grads almost never are:
`projection_driver` makes each 2+-D grad, at random, orthogonal per row (channel projection), orthogonal for the
whole tensor only (layer projection), or clearly radial (no projection), and logs what the reference decides in
MODES so tests/test_timm_a.py can assert that every kind happened on 2-D and 4-D weights.
Adahessian differentiates the grads: `hessian_driver` runs a real loss with create_graph=True.
"""
from collections import Counter

import torch
import torch.nn.functional as F

from anchors import timm_class
from cases import Case

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
    for opt, params in zip(opts, param_lists):
        for p, g in zip(params, grads):
            p.grad = g.to(dtype=p.dtype, device=p.device)
        opt.step()


def hessian_driver(opts, param_lists, step, gen):
    """loss = sum c p^2 / 2 + sin(a p) b / 4 + tanh of a conv2d / matmul through 4-D / 2-D weights (small inputs),
    same data for all, grads from autograd with create_graph=True. The Hessian diagonal stays within ~[0.6, 2.4]
    (Hutchinson noise from the coupling terms included): near-zero estimates would make 1/|h| amplify rounding
    chaotically and no fp32 comparison would mean anything. timm's z generator is not in the state dict, so every
    optimizer's generator is reseeded alike each step (a loaded checkpoint then draws what the original draws)."""
    data = []
    for p in param_lists[0]:
        a, b = (torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(2))
        c = torch.rand(p.shape, generator=gen, dtype=torch.float64) + 1
        x = (torch.randn((2, p.shape[1], 5, 5), generator=gen, dtype=torch.float64) if p.dim() == 4 else
             torch.randn((3, p.shape[1]), generator=gen, dtype=torch.float64) if p.dim() == 2 else None)
        data.append((a, b, c, None if x is None else 0.1 * x))
    seed = int(torch.randint(0, 2 ** 31 - 1, (), generator=gen))
    for opt, params in zip(opts, param_lists):
        loss = 0.0
        for p, (a, b, c, x) in zip(params, data):
            a, b, c = (t.to(p.dtype).to(p.device) for t in (a, b, c))
            loss = loss + (c * p * p / 2 + torch.sin(a * p) * b / 4).sum()
            if x is not None:
                x = x.to(p.dtype).to(p.device)
                loss = loss + torch.tanh(F.conv2d(x, p) if p.dim() == 4 else x @ p.t()).sum()
        for p, g in zip(params, torch.autograd.grad(loss, params, create_graph=True)):
            p.grad = g
        opt.generator.manual_seed(seed)
        opt.step()


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
    # kernel=False: the generic kernel tests step() on plain grads (no graph) and with AMP arguments, which
    # Adahessian refuses; tests/test_timm_a.py checks its fused path with this driver instead.
    # update_each > 1 is tested there too: p.hess is not in the state dict, so a reloaded run re-estimates early.
    Case("Adahessian", lambda: timm_class("adahessian", "Adahessian"),
         configs=[{}, {"lr": 0.05, "betas": (0.8, 0.99), "weight_decay": 0.01, "hessian_power": 0.5,
                       "n_samples": 2, "avg_conv_kernel": True}],
         group2={"lr": 0.02, "eps": 1e-4}, shapes=SHAPES, shapes2=SHAPES_2, driver=hessian_driver, kernel=False,
         complex_ok=False, requires_grad=True),
]
