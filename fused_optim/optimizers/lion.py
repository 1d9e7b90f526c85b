"""Lion: the sign of an interpolated momentum, with decoupled (optionally corrected) weight decay, timm's caution and
maximize (anchor: timm.optim.Lion)."""
from __future__ import annotations

import math

import torch

from .._base import FusedOptimizer
from .._tensors import check, check_betas, check_nonneg, scalar, zeros_like
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from .common import GRAD_BITS, cautious_updates, grad_flags, reference_hypers, step_params_, whole_tensors

if runtime.available():
    import triton
    import triton.language as tl

    from .common import caution_mask, caution_scale, cautious, decayed_grad, lerp

    CAUTION, CORRECTED = mt.flag_bits(2, first=GRAD_BITS)

    @triton.jit
    def _sign(x):
        return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x)).to(x.dtype)  # (0 and NaN stay)

    @triton.jit
    def _lion_direction(p, g, m, decay, beta1, wd, FLAGS: tl.constexpr):
        # (decayed p, grad, sign(lerp(m, g, 1 - beta1))): what the update and the caution statistics share
        p, g = decayed_grad(p, g, decay, wd, FLAGS)
        return p, g, _sign(lerp(m, g, 1.0 - beta1))

    @triton.jit
    def _lion_scalars(mask_mean, t1, t2, t3, lr, beta1, beta2, wd, max_lr, h5, h6, h7, FLAGS: tl.constexpr):
        # mask_mean: the statistics pass's mean of the cautious mask (caution only)
        wd_scale = lr
        if FLAGS & CORRECTED:
            wd_scale = lr * lr / max_lr
        return mask_mean, t1, t2, t3, 1.0 - wd_scale * wd, caution_scale(mask_mean), 0.0, 0.0

    @triton.jit
    def _lion_update(p, g, m, s1, s2, s3, decay, scale, c2, c3, lr, beta1, beta2, wd, max_lr, h5, h6, h7,
                     FLAGS: tl.constexpr):
        p, g, u = _lion_direction(p, g, m, decay, beta1, wd, FLAGS)
        if FLAGS & CAUTION:
            u = cautious(u, g, scale)
        p = tl.fma(u, (-lr).to(p.dtype), p)  # add with alpha=-lr
        m = lerp(m, g, 1.0 - beta2)
        return p, m, s1, s2, s3

    @triton.jit
    def _lion_caution_stats(p, g, m, s1, s2, s3, decay, scale, c2, c3, lr, beta1, beta2, wd, max_lr, h5, h6, h7,
                            FLAGS: tl.constexpr):
        p, g, u = _lion_direction(p, g, m, decay, beta1, wd, FLAGS)
        return caution_mask(u, g)


def max_lr_snapshot(lr, corrected_weight_decay: bool) -> float:
    """The constructor's lr as a float: the max lr of corrected weight decay (lr ** 2 / max_lr), as timm keeps it."""
    max_lr = scalar(lr)
    check(not corrected_weight_decay or max_lr > 0,
          f"Corrected weight decay requires a positive max lr, got {max_lr}. Construct the optimizer with the "
          f"peak lr.")
    return max_lr


def corrected_max_lr(group):
    """The max_lr a reference takes: the snapshot with corrected weight decay, else None (decay scaled by lr)."""
    return group["max_lr_snapshot"] if group["corrected_weight_decay"] else None


def check_lr(lr) -> None:
    """timm's learning-rate check (NaN and inf refused too)."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("learning rate must be a scalar or scalar tensor.")
    check(0.0 <= scalar(lr) < math.inf, f"Invalid learning rate: {lr}")


def lion_reference(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, caution, maximize, max_lr=None,
                   shards=None):
    """Lion in timm's op order: decoupled decay p *= 1 - s * weight_decay (s = lr, or lr**2 / max_lr when corrected),
    update = sign(lerp(exp_avg, grad, 1 - beta1)) (masked by caution), p -= lr * update, then exp_avg lerps towards
    grad by 1 - beta2. ``lr``: a float or a 0-d Tensor (its coefficients in its dtype, like timm). ``shards``: the
    sharded.Layout of FSDP2 params given as their local shards (caution's mask mean is over each whole tensor)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:  # (timm multiplies by exactly 1 without weight decay)
        wd_scale = lr if max_lr is None else lr ** 2 / max_lr
        torch._foreach_mul_(params, 1 - wd_scale * weight_decay)
    updates = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
    torch._foreach_sign_(updates)
    if caution:
        updates = cautious_updates(updates, grads, *whole_tensors(shards, updates))
    step_params_(params, updates, lr)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)


class TimmCautious(FusedOptimizer):
    """What the timm optimizers with ``caution`` share (Lion, Adopt): timm's checks of lr, betas and weight decay,
    and, while some group is cautious, FSDP2 shards stepped as a reduction (the mask's mean is over each whole
    tensor: the local counts are summed over the shards, on both paths).

    Fused path with caution: the one launch runs the apply's statistics pass first (the mask's per-tensor mean)
    behind a grid barrier: 1 persistent cooperative launch, 2 launches where the device refuses cooperative launches
    or over FSDP2 dim-0 shards (the mask's counts summed over the shards between them: one collective)."""

    shardable = True

    @property
    def elementwise(self) -> bool:
        return not any(g["caution"] for g in self.param_groups)

    def _validate(self, group):
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonneg(weight_decay=group["weight_decay"])


@register
class Lion(TimmCautious):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675): the update is
    the sign of exp_avg interpolated towards the grad by 1 - beta1; exp_avg then moves towards the grad by
    1 - beta2. Decoupled weight decay p *= 1 - lr * weight_decay (``corrected_weight_decay``: lr**2 / max_lr instead
    of lr, max_lr = the constructor's lr), ``caution`` (timm: the update where it agrees in sign with the grad,
    divided by that mask's per-tensor mean, at least 1e-3) and ``maximize``. State: ``exp_avg`` only (no step).
    Anchor: timm.optim.Lion.

    Fused path: 1 launch of the shared multi-tensor kernel per param group and step (with caution: see
    TimmCautious)."""

    scalar_keys = ()

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, caution=False,
                 corrected_weight_decay=False, maximize=False, foreach=None, *, fused=None):
        check_lr(lr)
        check_betas(betas)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, caution=caution,
                        corrected_weight_decay=corrected_weight_decay,
                        max_lr_snapshot=max_lr_snapshot(lr, corrected_weight_decay), foreach=foreach,
                        maximize=maximize)
        super().__init__(params, defaults, fused=fused)

    def _init_state(self, p, group):
        return {"exp_avg": zeros_like(p)}

    def _reference(self, group, params, grads, states):
        lion_reference(params, grads, [st["exp_avg"] for st in states],
                       **reference_hypers(group, "caution", max_lr=corrected_max_lr(group)), shards=self._shards)

    def _kernel_rule(self, group, variant=None):
        beta1, beta2 = (scalar(b) for b in group["betas"])
        flags = grad_flags(group, decoupled=True) | mt.pack((CAUTION, group["caution"]),
                                                             (CORRECTED, group["corrected_weight_decay"]))
        rule = mt.Rule(_lion_update, _lion_scalars, flags,
                       dict(lr=scalar(group["lr"]), beta1=beta1, beta2=beta2, wd=group["weight_decay"],
                            max_lr=group["max_lr_snapshot"]),
                       stats=_lion_caution_stats if group["caution"] else None)
        return rule, ("exp_avg",), ()
