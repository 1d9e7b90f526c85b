"""RMSprop, plain or centered, with momentum, weight decay and maximize (anchor: torch.optim.RMSprop)."""
from __future__ import annotations

import torch

from .._base import FusedOptimizer
from .._tensors import check, check_nonneg, new_step, scalar, zeros_like
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from .common import GRAD_BITS, effective_grads, grad_flags

if runtime.available():
    import triton
    import triton.language as tl

    from ..kernels.access import div_rn, sqrt_rn  # IEEE-rounded in either compute dtype
    from .common import count_step, effective_grad, lerp

    CENTERED, MOMENTUM = mt.flag_bits(2, first=GRAD_BITS)

    @triton.jit
    def _rmsprop_update(p, g, sq, s1, s2, s3, c0, c1, c2, c3, lr, alpha, one_minus_alpha, eps, wd, momentum, h6,
                        h7, FLAGS: tl.constexpr):
        # states: square_avg, then grad_avg if centered, then momentum_buffer if momentum
        g = effective_grad(p, g, wd, FLAGS)
        w = one_minus_alpha.to(p.dtype)
        neg_lr = -lr.to(p.dtype)
        sq = tl.fma(w * g, g, sq * alpha.to(p.dtype))
        if FLAGS & CENTERED:
            s1 = lerp(s1, g, w)
            avg = sqrt_rn(tl.fma(-s1, s1, sq)) + eps.to(p.dtype)
        else:
            avg = sqrt_rn(sq) + eps.to(p.dtype)
        if FLAGS & MOMENTUM:
            if FLAGS & CENTERED:
                s2 = s2 * momentum.to(p.dtype) + div_rn(g, avg)
                p = tl.fma(neg_lr, s2, p)
            else:
                s1 = s1 * momentum.to(p.dtype) + div_rn(g, avg)
                p = tl.fma(neg_lr, s1, p)
        else:
            p = p + div_rn(neg_lr * g, avg)
        return p, sq, s1, s2, s3


def _state_keys(group):
    return ("square_avg",) + (("grad_avg",) if group["centered"] else ()) + (
        ("momentum_buffer",) if group["momentum"] > 0 else ())


@register
class RMSprop(FusedOptimizer):
    """RMSprop: the grad divided by the root of a running average of its square (alpha), optionally centered
    (minus the squared running mean) and with momentum, L2 weight decay and maximize. Anchor: torch.optim.RMSprop.

    Fused path: 1 launch of the shared multi-tensor kernel per param group and step."""
    nonnegative_states = ("square_avg",)

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, *, fused=None):
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, fused=fused)

    def _validate(self, group):
        check_nonneg(lr=group["lr"], eps=group["eps"], momentum=group["momentum"],
                     weight_decay=group["weight_decay"])
        # alpha > 1 would make square_avg negative (torch only rejects alpha < 0)
        check(0.0 <= group["alpha"] <= 1.0, f"Invalid alpha value: {group['alpha']}")

    def _init_state(self, p, group):
        st = {"step": new_step(p, group)}
        for k in _state_keys(group):
            st[k] = zeros_like(p)
        return st

    def _reference(self, group, params, grads, states):
        lr, alpha, eps, momentum = scalar(group["lr"]), group["alpha"], group["eps"], group["momentum"]
        torch._foreach_add_([st["step"] for st in states], 1)
        gs = effective_grads(grads, params, group["maximize"], group["weight_decay"])
        sq = [st["square_avg"] for st in states]
        torch._foreach_mul_(sq, alpha)
        torch._foreach_addcmul_(sq, gs, gs, value=1 - alpha)
        if group["centered"]:
            ga = [st["grad_avg"] for st in states]
            torch._foreach_lerp_(ga, gs, 1 - alpha)
            avg = torch._foreach_addcmul(sq, ga, ga, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(sq)
        torch._foreach_add_(avg, eps)
        if momentum > 0:
            bufs = [st["momentum_buffer"] for st in states]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_addcdiv_(bufs, gs, avg)
            torch._foreach_add_(params, bufs, alpha=-lr)
        else:
            torch._foreach_addcdiv_(params, gs, avg, value=-lr)

    def _kernel_rule(self, group, variant=None):
        alpha = group["alpha"]
        # 1 - alpha is formed on the host like torch's: from alpha rounded to fp32 it would be off by ~1e-6
        flags = grad_flags(group) | mt.pack((CENTERED, group["centered"]), (MOMENTUM, group["momentum"] > 0))
        rule = mt.Rule(_rmsprop_update, count_step, flags,
                       dict(lr=scalar(group["lr"]), alpha=alpha, one_minus_alpha=1 - alpha, eps=group["eps"],
                            wd=group["weight_decay"], momentum=group["momentum"]))
        return rule, _state_keys(group), ("step",)
