"""Adamax: Adam with an infinity-norm second moment, with weight decay and maximize (anchor: torch.optim.Adamax)."""
from __future__ import annotations

import torch

from .._tensors import new_step, scalar, zeros_like
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from .adam import AdamFamily
from .common import adam_hyper, decayed_grads, grad_flags

if runtime.available():
    import triton
    import triton.language as tl

    # Adam's SCALARS already gives what Adamax needs: the new step and c0 = -lr / (1 - beta1^step).
    from .common import adam_scalars, decayed_grad  # L2 weight decay only: DECOUPLED is never set

    @triton.jit
    def _adamax_update(p, g, m, u, s2, s3, step_size, c1, c2, c3, lr, beta1, beta2, eps, wd, h5, h6, h7,
                       FLAGS: tl.constexpr):
        p, g = decayed_grad(p, g, 1.0, wd, FLAGS)
        m = m + (1.0 - beta1).to(p.dtype) * (g - m)
        u = tl.maximum(u * beta2.to(p.dtype), tl.abs(g) + eps.to(p.dtype))
        p = p + step_size * (m / u)
        return p, m, u, s2, s3


@register
class Adamax(AdamFamily):
    """Adamax: Adam with an infinity-norm second moment, u = max(beta2 * u, |g| + eps), with L2 weight decay and
    maximize. Anchor: torch.optim.Adamax.

    Fused path: 1 launch of the shared multi-tensor kernel per param group and step."""
    nonnegative_states = ("exp_inf",)

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, foreach=None, *,
                 maximize=False, differentiable=False, capturable=False, fused=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, capturable=capturable, fused=fused)
        super().__init__(params, defaults, fused=fused)

    def _init_state(self, p, group):
        return {"step": new_step(p, group), "exp_avg": zeros_like(p),
                "exp_inf": zeros_like(p)}

    def _reference(self, group, params, grads, states):
        lr = group["lr"]  # a Tensor lr: torch's step size is computed in its dtype
        beta1, beta2 = (scalar(b) for b in group["betas"])
        steps = [st["step"] for st in states]
        m = [st["exp_avg"] for st in states]
        u = [st["exp_inf"] for st in states]
        torch._foreach_add_(steps, 1)
        grads = decayed_grads(params, grads, lr=lr, weight_decay=group["weight_decay"], maximize=group["maximize"])
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(u, beta2)
        norm = torch._foreach_abs(grads)
        torch._foreach_add_(norm, group["eps"])
        torch._foreach_maximum_(u, norm)
        torch._foreach_addcdiv_(params, m, u, [scalar(-lr / (1 - beta1 ** s.item())) for s in steps])

    def _kernel_rule(self, group, variant=None):
        rule = mt.Rule(_adamax_update, adam_scalars, grad_flags(group), adam_hyper(group))
        return rule, ("exp_avg", "exp_inf"), ("step",)
