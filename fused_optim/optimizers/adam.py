"""Adam and AdamW, with amsgrad, maximize and L2 or decoupled weight decay (anchors: torch.optim.Adam/AdamW)."""
from __future__ import annotations

import torch

from .._base import FusedOptimizer
from .._tensors import check_betas, check_nonneg, new_step, scalar, zeros_like
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from .common import GRAD_BITS, adam_hyper, adam_moments_, begin_step, grad_flags, reference_hypers

if runtime.available():
    import triton
    import triton.language as tl

    from .common import adam_scalars, adam_start

    (AMSGRAD,) = mt.flag_bits(1, first=GRAD_BITS)

    @triton.jit
    def _adam_update(p, g, m, v, vmax, s3, step_size, bc2_sqrt, decay, c3, lr, beta1, beta2, eps, wd, h5, h6, h7,
                     FLAGS: tl.constexpr):
        p, g, m, v = adam_start(p, g, m, v, decay, wd, beta1, beta2, FLAGS)
        if FLAGS & AMSGRAD:
            vmax = tl.maximum(vmax, v)
            denom = tl.sqrt(vmax) / bc2_sqrt + eps.to(p.dtype)
        else:
            denom = tl.sqrt(v) / bc2_sqrt + eps.to(p.dtype)
        p = p + step_size * (m / denom)
        return p, m, v, vmax, s3


def adam_reference(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled):
    """Adam / AdamW on lists (foreach ops). Shared by Adam, AdamW and the Adam half of AdamP-like optimizers.
    lr and the betas may be 0-d Tensors: the per-tensor coefficients are then computed in their dtype, as torch's
    single-tensor Adam does, and handed to the foreach ops as numbers."""
    grads, m, v, t = begin_step(params, grads, states, lr=lr, weight_decay=weight_decay, maximize=maximize,
                                decoupled=decoupled)
    adam_moments_(m, v, grads, beta1, beta2)
    bc1 = [1 - beta1 ** s for s in t]
    bc2_sqrt = [(1 - beta2 ** s) ** 0.5 for s in t]
    if amsgrad:
        vmax = [st["max_exp_avg_sq"] for st in states]
        torch._foreach_maximum_(vmax, v)
        denom = torch._foreach_sqrt(vmax)
    else:
        denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [scalar(b) for b in bc2_sqrt])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, [scalar(-lr / b) for b in bc1])


class AdamFamily(FusedOptimizer):
    """What Adam, Adamax, NAdam and RAdam share: hyper-parameter checks and the two moment buffers."""
    extra_nonneg: tuple = ()  # further hyper-parameters that must be finite and >= 0
    nonnegative_states = ("exp_avg_sq", "max_exp_avg_sq")

    def _validate(self, group):
        check_nonneg(lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"],
                     **{k: group[k] for k in self.extra_nonneg})
        check_betas(group["betas"])

    def _init_state(self, p, group):
        return {"step": new_step(p, group), "exp_avg": zeros_like(p), "exp_avg_sq": zeros_like(p)}


@register
class Adam(AdamFamily):
    """Adam: bias-corrected running averages of the grad and its square (betas), with L2 weight decay (decoupled,
    as AdamW, with decoupled_weight_decay=True), optional AMSGrad and maximize. Anchor: torch.optim.Adam.

    Fused path: 1 launch of the shared multi-tensor kernel per param group and step."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, fused=fused)

    def _init_state(self, p, group):
        st = super()._init_state(p, group)
        if group["amsgrad"]:
            st["max_exp_avg_sq"] = zeros_like(p)
        return st

    def _reference(self, group, params, grads, states):
        adam_reference(params, grads, states,
                       **reference_hypers(group, "eps", "amsgrad", decoupled=group["decoupled_weight_decay"]))

    def _kernel_rule(self, group, variant=None):
        flags = grad_flags(group, group["decoupled_weight_decay"]) | mt.pack((AMSGRAD, group["amsgrad"]))
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        rule = mt.Rule(_adam_update, adam_scalars, flags, adam_hyper(group))
        return rule, keys, ("step",)


@register
class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (p *= 1 - lr * weight_decay before the update; default 1e-2),
    optional AMSGrad and maximize. Anchor: torch.optim.AdamW.

    Fused path: 1 launch of the shared multi-tensor kernel per param group and step."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)
