"""RAdam: Adam with the variance rectification term, with L2 or decoupled weight decay and maximize
(anchor: torch.optim.RAdam)."""
from __future__ import annotations

import torch

from .._tensors import scalar
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from .adam import AdamFamily
from .common import adam_hyper, adam_moments_, begin_step, grad_flags

if runtime.available():
    import triton
    import triton.language as tl

    from .common import adam_start, bias_corrections

    @triton.jit
    def _radam_scalars(step, t1, t2, t3, lr, beta1, beta2, eps, wd, h5, h6, h7, FLAGS: tl.constexpr):
        step, bc1, bc2 = bias_corrections(step, beta1, beta2)
        beta2_t = tl.exp2(step * tl.log2(beta2))  # beta2^step itself, as torch (1 - bc2 would round)
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho_t = rho_inf - 2.0 * step * beta2_t / bc2
        # the branch is per tensor (its own step). Unrectified, the term is undefined (sqrt < 0, rho_inf == 4): it is
        # computed on safe stand-ins and not used
        rectified = rho_t > 5.0
        num = tl.where(rectified, (rho_t - 4.0) * (rho_t - 2.0) * rho_inf, 1.0)
        den = tl.where(rectified, (rho_inf - 4.0) * (rho_inf - 2.0) * rho_t, 1.0)
        step_size = lr / bc1 * tl.sqrt(num / den)
        return step, t1, t2, t3, step_size, tl.sqrt(bc2), tl.where(rectified, 1.0, 0.0), 1.0 - lr * wd

    @triton.jit
    def _radam_update(p, g, m, v, s2, s3, step_size, bc2_sqrt, rectified, decay, lr, beta1, beta2, eps, wd, h5, h6,
                      h7, FLAGS: tl.constexpr):
        p, g, m, v = adam_start(p, g, m, v, decay, wd, beta1, beta2, FLAGS)
        adaptive = tl.where(rectified != 0.0, bc2_sqrt / (tl.sqrt(v) + eps.to(p.dtype)), 1.0)
        p = p - step_size * m * adaptive
        return p, m, v, s2, s3


@register
class RAdam(AdamFamily):
    """RAdam: Adam with the variance rectification term (un-adapted momentum steps while the variance estimate is
    not tractable, rho_t <= 5), with L2 or decoupled weight decay and maximize. Anchor: torch.optim.RAdam.

    Fused path: 1 launch of the shared multi-tensor kernel per param group and step (the rectification branch is
    taken per tensor on the device)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, decoupled_weight_decay=False,
                 *, foreach=None, maximize=False, capturable=False, differentiable=False, fused=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        capturable=capturable, decoupled_weight_decay=decoupled_weight_decay,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, fused=fused)

    def _reference(self, group, params, grads, states):
        lr, eps = scalar(group["lr"]), group["eps"]
        beta1, beta2 = (scalar(b) for b in group["betas"])
        # a Tensor lr: torch scales the param-sized tensors by its value, so only the decoupled decay (1 - lr * wd,
        # computed in lr's dtype) sees the Tensor
        grads, m, v, t = begin_step(params, grads, states, lr=group["lr"], weight_decay=group["weight_decay"],
                                    maximize=group["maximize"], decoupled=group["decoupled_weight_decay"])
        adam_moments_(m, v, grads, beta1, beta2)
        bc2 = [1 - beta2 ** s for s in t]
        rho_inf = 2 / (1 - beta2) - 1
        rho = [rho_inf - 2 * s * (beta2 ** s) / b for s, b in zip(t, bc2)]
        # p -= exp_avg * c, with c = lr / bc1 (unrectified) or lr * rect * sqrt(bc2) / (bc1 * (sqrt(v) + eps))
        # (rectified, rho_t > 5): torch's foreach formulation, six passes
        bc1 = [1 - beta1 ** s for s in t]
        rect = [((r - 4) * (r - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * r)) ** 0.5 if r > 5.0 else 0.0
                for r in rho]
        unrect_step = [0.0 if rc > 0 else -lr / b1 for rc, b1 in zip(rect, bc1)]
        rect_step = [(b2 ** 0.5) * (lr * rc / b1) * -1 for b2, rc, b1 in zip(bc2, rect, bc1)]
        coef = torch._foreach_sqrt(v)
        torch._foreach_add_(coef, eps)
        torch._foreach_div_(coef, rect_step)
        torch._foreach_reciprocal_(coef)
        torch._foreach_add_(coef, unrect_step)
        torch._foreach_addcmul_(params, m, coef)

    def _kernel_rule(self, group, variant=None):
        rule = mt.Rule(_radam_update, _radam_scalars, grad_flags(group, group["decoupled_weight_decay"]),
                       adam_hyper(group))
        return rule, ("exp_avg", "exp_avg_sq"), ("step",)
