"""Adadelta with weight decay and maximize (anchor: torch.optim.Adadelta)."""
from __future__ import annotations

import torch

from .._base import FusedOptimizer
from .._tensors import check, check_nonneg, new_step, scalar, zeros_like
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from .common import effective_grads, grad_flags

if runtime.available():
    import triton
    import triton.language as tl

    from ..kernels.access import div_rn, sqrt_rn  # IEEE-rounded in either compute dtype
    from .common import count_step, effective_grad

    @triton.jit
    def _adadelta_update(p, g, sq, acc, s2, s3, c0, c1, c2, c3, lr, rho, one_minus_rho, eps, wd, h5, h6, h7,
                         FLAGS: tl.constexpr):
        g = effective_grad(p, g, wd, FLAGS)
        r = rho.to(p.dtype)
        w = one_minus_rho.to(p.dtype)
        e = eps.to(p.dtype)
        sq = tl.fma(w * g, g, sq * r)
        delta = div_rn(sqrt_rn(acc + e), sqrt_rn(sq + e)) * g
        acc = tl.fma(w * delta, delta, acc * r)
        p = tl.fma(-lr.to(p.dtype), delta, p)
        return p, sq, acc, s2, s3


@register
class Adadelta(FusedOptimizer):
    """Adadelta: per-element steps from running averages (rho) of the squared grads and of the squared updates,
    scaled by lr, with L2 weight decay and maximize. Anchor: torch.optim.Adadelta.

    Fused path: 1 launch of the shared multi-tensor kernel per param group and step."""
    nonnegative_states = ("square_avg", "acc_delta")

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *, capturable=False,
                 maximize=False, differentiable=False, fused=None):
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        capturable=capturable, foreach=foreach, differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, fused=fused)

    def _validate(self, group):
        check_nonneg(lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"])
        check(0.0 <= group["rho"] <= 1.0, f"Invalid rho value: {group['rho']}")

    def _init_state(self, p, group):
        return {"step": new_step(p, group),
                "square_avg": zeros_like(p),
                "acc_delta": zeros_like(p)}

    def _reference(self, group, params, grads, states):
        lr, rho, eps = scalar(group["lr"]), group["rho"], group["eps"]
        torch._foreach_add_([st["step"] for st in states], 1)
        gs = effective_grads(grads, params, group["maximize"], group["weight_decay"])
        sq = [st["square_avg"] for st in states]
        acc = [st["acc_delta"] for st in states]
        torch._foreach_mul_(sq, rho)
        torch._foreach_addcmul_(sq, gs, gs, value=1 - rho)
        std = torch._foreach_add(sq, eps)
        torch._foreach_sqrt_(std)
        delta = torch._foreach_add(acc, eps)
        torch._foreach_sqrt_(delta)
        torch._foreach_div_(delta, std)
        torch._foreach_mul_(delta, gs)
        torch._foreach_mul_(acc, rho)
        torch._foreach_addcmul_(acc, delta, delta, value=1 - rho)
        torch._foreach_add_(params, delta, alpha=-lr)

    def _kernel_rule(self, group, variant=None):
        rho = group["rho"]
        # 1 - rho is formed on the host like torch's (the kernel may see rho already rounded to fp32)
        rule = mt.Rule(_adadelta_update, count_step, grad_flags(group),
                       dict(lr=scalar(group["lr"]), rho=rho, one_minus_rho=1 - rho, eps=group["eps"],
                            wd=group["weight_decay"]))
        return rule, ("square_avg", "acc_delta"), ("step",)
