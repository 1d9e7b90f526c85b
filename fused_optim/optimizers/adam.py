"""Adam and AdamW, with amsgrad, maximize and L2 or decoupled weight decay (anchors: torch.optim.Adam/AdamW)."""
from __future__ import annotations

import torch

from .._base import FusedOptimizer
from .._tensors import check_betas, check_nonneg, new_step, scalar, zeros_like
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime

if runtime.available():
    import triton
    import triton.language as tl

    MAXIMIZE, AMSGRAD, WD, DECOUPLED = mt.flag_bits(4)

    @triton.jit
    def bias_corrections(step, beta1, beta2):
        """(step + 1, 1 - beta1^(step + 1), 1 - beta2^(step + 1)): the new step and Adam's bias corrections, fp64."""
        step = step + 1.0
        return step, 1.0 - tl.exp2(step * tl.log2(beta1)), 1.0 - tl.exp2(step * tl.log2(beta2))

    @triton.jit
    def _adam_scalars(step, t1, t2, t3, lr, beta1, beta2, eps, wd, h5, h6, h7, FLAGS: tl.constexpr):
        step, bc1, bc2 = bias_corrections(step, beta1, beta2)
        return step, t1, t2, t3, -lr / bc1, tl.sqrt(bc2), 1.0 - lr * wd, 0.0

    @triton.jit
    def decayed_grad(p, g, decay, wd, FLAGS: tl.constexpr):
        """maximize, then L2 (into g) or decoupled (p * decay, decay = 1 - lr * wd) weight decay. Shared by the
        Adam family, Adamax, NAdam, RAdam and ASGD (their FLAGS use these bits)."""
        if FLAGS & MAXIMIZE:
            g = -g
        if FLAGS & WD:
            if FLAGS & DECOUPLED:
                p = p * decay
            else:
                g = g + wd.to(tl.float32) * p
        return p, g

    @triton.jit
    def adam_moments(g, m, v, beta1, beta2):
        """First moment (lerp towards g) and second moment (EMA of g*g)."""
        m = m + (1.0 - beta1).to(tl.float32) * (g - m)
        v = v * beta2.to(tl.float32) + (1.0 - beta2).to(tl.float32) * g * g
        return m, v

    @triton.jit
    def _adam_update(p, g, m, v, vmax, s3, step_size, bc2_sqrt, decay, c3, lr, beta1, beta2, eps, wd, h5, h6, h7,
                     FLAGS: tl.constexpr):
        p, g = decayed_grad(p, g, decay, wd, FLAGS)
        m, v = adam_moments(g, m, v, beta1, beta2)
        if FLAGS & AMSGRAD:
            vmax = tl.maximum(vmax, v)
            denom = tl.sqrt(vmax) / bc2_sqrt + eps.to(tl.float32)
        else:
            denom = tl.sqrt(v) / bc2_sqrt + eps.to(tl.float32)
        p = p + step_size * (m / denom)
        return p, m, v, vmax, s3


def decayed_grads(params, grads, *, lr, weight_decay, maximize, decoupled=False):
    """maximize, then L2 weight decay (returns new grads) or decoupled decay (scales params in place), in torch's
    order. Shared by the Adam family, Adamax, NAdam, RAdam and ASGD. ``lr``: a float or a 0-d Tensor (whose dtype
    torch's scalar math runs in, as here)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(params, scalar(1 - lr * weight_decay))
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    return grads


def adam_moments_(exp_avgs, exp_avg_sqs, grads, beta1, beta2):
    """In place: exp_avg lerps towards grad by 1 - beta1, exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad^2.
    The betas: floats or 0-d Tensors (torch's scalar math in their dtype)."""
    torch._foreach_lerp_(exp_avgs, grads, scalar(1 - beta1))
    torch._foreach_mul_(exp_avg_sqs, scalar(beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, scalar(1 - beta2))


def timm_moments_(states, grads, second, beta1, beta2, second_key="exp_avg_sq"):
    """timm's Adam-style start (AdamP, Adahessian), in its op order: each state's Python-int step += 1, exp_avg =
    exp_avg * beta1 + (1 - beta1) * grad, state[second_key] = its * beta2 + (1 - beta2) * second^2 (second: the grads,
    or Adahessian's Hessian estimate). Returns (exp_avg list, second-moment list, new step numbers as floats)."""
    m = [st["exp_avg"] for st in states]
    v = [st[second_key] for st in states]
    for st in states:
        st["step"] += 1
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, grads, alpha=1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, second, second, value=1 - beta2)
    return m, v, [float(st["step"]) for st in states]


def begin_step(params, grads, states, *, lr, weight_decay, maximize, decoupled):
    """The start every Adam-family reference shares: advance the step counters, then the grads with maximize and
    weight decay applied. Returns (grads, exp_avg list, exp_avg_sq list, new step numbers as floats)."""
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    grads = decayed_grads(params, grads, lr=lr, weight_decay=weight_decay, maximize=maximize, decoupled=decoupled)
    return grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], [s.item() for s in steps]


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
        beta1, beta2 = group["betas"]
        adam_reference(params, grads, states, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                       decoupled=group["decoupled_weight_decay"])

    def _kernel_rule(self, group, variant=None):
        beta1, beta2 = map(scalar, group["betas"])
        flags = mt.pack((MAXIMIZE, group["maximize"]), (AMSGRAD, group["amsgrad"]), (WD, group["weight_decay"] != 0),
                        (DECOUPLED, group["decoupled_weight_decay"]))
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        rule = mt.Rule(_adam_update, _adam_scalars, flags,
                       dict(lr=scalar(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], wd=group["weight_decay"]))
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
