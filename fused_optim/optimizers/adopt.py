"""ADOPT: Adam with the grad normalised by the previous second moment, clipped, before the momentum; L2 or
decoupled (optionally corrected) weight decay, timm's caution and maximize (anchor: timm.optim.Adopt)."""
from __future__ import annotations

import torch

from .._tensors import check, new_step, scalar, zeros_like
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from .common import (GRAD_BITS, adam_hyper, cautious_updates, effective_grads, reference_hypers, step_params_,
                     whole_tensors)
from .lion import TimmCautious, corrected_max_lr, max_lr_snapshot

if runtime.available():
    import triton
    import triton.language as tl

    from .common import MAXIMIZE, WD, caution_mask, caution_scale, cautious, effective_grad, lerp

    DECAY, CORRECTED, CLIP, CAUTION = mt.flag_bits(4, first=GRAD_BITS)

    @triton.jit
    def _adopt_scalars(step, mask_mean, t2, t3, lr, beta1, beta2, eps, wd, clip_exp, max_lr, h7,
                       FLAGS: tl.constexpr):
        # (step + 1, first step?, clip value (step - 1)^clip_exp, decoupled decay's alpha, caution's divisor);
        # mask_mean: the statistics pass's mean of the cautious mask (caution only)
        step = step + 1.0
        wd_scale = lr
        if FLAGS & CORRECTED:
            wd_scale = lr * lr / max_lr
        clip = tl.exp2(clip_exp * tl.log2(tl.maximum(step - 1.0, 1.0)))  # (step 1 takes no update)
        return (step, mask_mean, t2, t3, tl.where(step == 1.0, 1.0, 0.0), clip, -wd_scale * wd,
                caution_scale(mask_mean))

    @triton.jit
    def _adopt_direction(p, g, m, v, clip, beta1, eps, wd, FLAGS: tl.constexpr):
        # (grad with maximize and L2 decay, new exp_avg): what the update and the caution statistics share
        g = effective_grad(p, g, wd, FLAGS)
        normed = g / tl.maximum(tl.sqrt(v), eps.to(p.dtype))
        if FLAGS & CLIP:
            normed = tl.minimum(tl.maximum(normed, -clip), clip)
        return g, lerp(m, normed, 1.0 - beta1)

    @triton.jit
    def _adopt_update(p, g, m, v, s2, s3, first, clip, decay, scale, lr, beta1, beta2, eps, wd, clip_exp, max_lr, h7,
                      FLAGS: tl.constexpr):
        g, m_new = _adopt_direction(p, g, m, v, clip, beta1, eps, wd, FLAGS)
        u = m_new
        if FLAGS & CAUTION:
            u = cautious(m_new, g, scale)
        p_new = p
        if FLAGS & DECAY:
            p_new = tl.fma(p, decay, p)  # p + (-lr * wd) * p, timm's add with alpha
        p_new = tl.fma(u, (-lr).to(p.dtype), p_new)
        v_new = v * beta2.to(p.dtype) + (1.0 - beta2).to(p.dtype) * g * g
        # a tensor's first step only starts the second moment: v = g^2
        first = first != 0
        return tl.where(first, p, p_new), tl.where(first, m, m_new), tl.where(first, v + g * g, v_new), s2, s3

    @triton.jit
    def _adopt_caution_stats(p, g, m, v, s2, s3, first, clip, decay, scale, lr, beta1, beta2, eps, wd, clip_exp,
                             max_lr, h7, FLAGS: tl.constexpr):
        g, m_new = _adopt_direction(p, g, m, v, clip, beta1, eps, wd, FLAGS)
        return caution_mask(m_new, g)


def adopt_reference(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, clip_exp, decoupled, caution,
                    maximize, max_lr=None, shards=None):
    """ADOPT in timm's op order, per tensor step t: on a tensor's first step only exp_avg_sq = g^2; then decoupled
    decay p -= s * weight_decay * p (s = lr, or lr**2 / max_lr when corrected), normed = g / max(sqrt(exp_avg_sq), eps)
    clamped to +-(t - 1)^clip_exp, exp_avg lerps towards it by 1 - beta1, p -= lr * exp_avg (masked by caution), and
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g^2. g: the grad with maximize and L2 weight decay. ``shards``:
    the sharded.Layout of FSDP2 params given as their local shards (caution's mask mean is over each whole tensor)."""
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    grads = effective_grads(grads, params, maximize, 0 if decoupled else weight_decay)
    exp_avgs, exp_avg_sqs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
    t = [s.item() for s in steps]
    first = [i for i, s in enumerate(t) if s == 1]
    if first:
        torch._foreach_addcmul_([exp_avg_sqs[i] for i in first], [grads[i] for i in first], [grads[i] for i in first])
        later = [i for i, s in enumerate(t) if s != 1]
        params, grads, exp_avgs, exp_avg_sqs, t = ([x[i] for i in later] for x in (params, grads, exp_avgs,
                                                                                   exp_avg_sqs, t))
        shards = shards and shards.pick(later)  # (steps are alike on every rank: the same tensors everywhere)
        if not params:
            return
    if weight_decay != 0 and decoupled:
        wd_scale = lr ** 2 / max_lr if max_lr is not None else lr
        if isinstance(wd_scale, torch.Tensor):
            torch._foreach_add_(params, torch._foreach_mul(params, -wd_scale * weight_decay))
        else:
            torch._foreach_add_(params, params, alpha=-wd_scale * weight_decay)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_maximum_(denom, eps)
    normed = torch._foreach_div(grads, denom)
    if clip_exp is not None:
        clip = [(s - 1) ** clip_exp for s in t]
        torch._foreach_maximum_(normed, [-c for c in clip])
        torch._foreach_minimum_(normed, clip)
    torch._foreach_lerp_(exp_avgs, normed, 1 - beta1)
    updates = cautious_updates(exp_avgs, grads, *whole_tensors(shards, grads)) if caution else exp_avgs
    step_params_(params, updates, lr)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)


@register
class Adopt(TimmCautious):
    """ADOPT (Taniguchi et al. 2024, "ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate",
    arXiv:2411.02853): the grad is normalised by the square root of the PREVIOUS second moment (at least eps),
    clipped to +-(step - 1)^clip_exp (``clip_exp=None``: unclipped), then averaged into exp_avg, which is the update;
    a tensor's first step only initialises exp_avg_sq = g^2. Weight decay is L2 (into the grad) or, with
    ``decoupled``, p -= lr * weight_decay * p (``corrected_weight_decay``: lr**2 / max_lr instead of lr, max_lr = the
    constructor's lr); ``caution`` (timm: the update where it agrees in sign with the grad, divided by that mask's
    per-tensor mean, at least 1e-3) and ``maximize``. State: ``step`` (0-d tensor), ``exp_avg``, ``exp_avg_sq``.
    Anchor: timm.optim.Adopt (timm's factory names ``adopt``, ``adoptw``: decoupled, ``adoptc``: corrected, and their
    cautious ``c`` forms).

    Fused path: 1 launch of the shared multi-tensor kernel per param group and step (with caution: see
    TimmCautious)."""
    nonnegative_states = ("exp_avg_sq",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, clip_exp=0.333, weight_decay=0.0,
                 decoupled=False, corrected_weight_decay=False, *, caution=False, foreach=None, maximize=False,
                 capturable=False, differentiable=False, fused=None):
        if isinstance(lr, torch.Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip_exp=clip_exp,
                        decoupled=decoupled, corrected_weight_decay=corrected_weight_decay,
                        max_lr_snapshot=None, caution=caution, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable)
        self._validate(defaults)
        defaults["max_lr_snapshot"] = max_lr_snapshot(lr, corrected_weight_decay)
        super().__init__(params, defaults, fused=fused)

    def _validate(self, group):
        super()._validate(group)
        check(0.0 <= scalar(group["eps"]) < float("inf"), f"Invalid epsilon value: {group['eps']}")

    def _init_state(self, p, group):
        step = new_step(p, group)
        if torch.get_default_dtype() == torch.float64 and step.device.type == "cpu":
            step = step.double()  # timm's scalar dtype
        return {"step": step, "exp_avg": zeros_like(p), "exp_avg_sq": zeros_like(p)}

    def _reference(self, group, params, grads, states):
        adopt_reference(params, grads, states, **reference_hypers(group, "eps", "clip_exp", "decoupled", "caution",
                                                                  max_lr=corrected_max_lr(group)), shards=self._shards)

    def _kernel_rule(self, group, variant=None):
        wd = group["weight_decay"] != 0
        decoupled, clip_exp = group["decoupled"], group["clip_exp"]
        flags = mt.pack((MAXIMIZE, group["maximize"]), (WD, wd and not decoupled), (DECAY, wd and decoupled),
                        (CORRECTED, group["corrected_weight_decay"]), (CLIP, clip_exp is not None),
                        (CAUTION, group["caution"]))
        rule = mt.Rule(_adopt_update, _adopt_scalars, flags,
                       adam_hyper(group, clip_exp=0.0 if clip_exp is None else clip_exp,
                                  max_lr=group["max_lr_snapshot"]),
                       stats=_adopt_caution_stats if group["caution"] else None)
        return rule, ("exp_avg", "exp_avg_sq"), ("step",)
