"""Rprop: resilient backpropagation with per-element step sizes and maximize (anchor: torch.optim.Rprop)."""
from __future__ import annotations

import math

import torch

from .._base import FusedOptimizer
from .._tensors import check, new_step, scalar, zeros_like
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime
from .common import effective_grads, grad_flags

if runtime.available():
    import triton
    import triton.language as tl

    from .common import count_step, effective_grad

    @triton.jit
    def _rprop_update(p, g, prev, step_size, s2, s3, c0, c1, c2, c3, lr, etaminus, etaplus, size_min, size_max,
                      h5, h6, h7, FLAGS: tl.constexpr):
        g = effective_grad(p, g, 0.0, FLAGS)
        prod = g * prev
        # same sign as last step: grow; sign change: shrink and skip this element's move; a zero: keep
        factor = tl.where(prod > 0, etaplus.to(p.dtype), tl.where(prod < 0, etaminus.to(p.dtype), 1.0))
        step_size = tl.minimum(tl.maximum(step_size * factor, size_min.to(p.dtype)), size_max.to(p.dtype))
        g = tl.where(prod < 0, 0.0, g)
        direction = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        p = p - direction * step_size
        return p, g, step_size, s2, s3


def _pair(group, key):
    v = group[key]
    check(isinstance(v, (tuple, list)) and len(v) == 2, f"Invalid {key}: {v!r} (expected a pair of floats)")
    return scalar(v[0]), scalar(v[1])


@register
class Rprop(FusedOptimizer):
    """Rprop (resilient backpropagation): per-element step sizes, multiplied by etas[1] while the grad keeps its
    sign and by etas[0] when it flips (clamped to step_sizes); only the grad's sign moves the param.
    Anchor: torch.optim.Rprop.

    Fused path: 1 launch of the shared multi-tensor kernel per param group and step."""
    nonnegative_states = ("step_size",)

    def __init__(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), *, capturable=False, foreach=None,
                 maximize=False, differentiable=False, fused=None):
        defaults = dict(lr=lr, etas=etas, step_sizes=step_sizes, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, capturable=capturable, fused=fused)
        super().__init__(params, defaults, fused=fused)

    def _validate(self, group):
        lr = scalar(group["lr"])
        check(0.0 <= lr < math.inf, f"Invalid learning rate: {group['lr']}")
        etaminus, etaplus = _pair(group, "etas")
        check(0.0 < etaminus < 1.0 < etaplus < math.inf, f"Invalid eta values: {etaminus}, {etaplus}")
        lo, hi = _pair(group, "step_sizes")
        check(0.0 <= lo <= hi, f"Invalid step_sizes values: {lo}, {hi}")  # hi may be inf: no upper bound

    def _init_state(self, p, group):
        # every element starts at step size lr (both halves of a complex element)
        lr = scalar(group["lr"])
        return {"step": new_step(p, group),
                "prev": zeros_like(p),
                "step_size": torch.full_like(p, complex(lr, lr) if p.is_complex() else lr,
                                             memory_format=torch.preserve_format)}

    def _reference(self, group, params, grads, states):
        etaminus, etaplus = _pair(group, "etas")
        lo, hi = _pair(group, "step_sizes")
        prevs = [st["prev"] for st in states]
        sizes = [st["step_size"] for st in states]
        torch._foreach_add_([st["step"] for st in states], 1)
        gs = effective_grads(grads, params, group["maximize"], 0)
        signs = torch._foreach_mul(gs, prevs)
        torch._foreach_sign_(signs)
        moves = []
        for g, s in zip(gs, signs):
            flip = s < 0
            # sign -> factor in place, in torch's order (a NaN stays NaN)
            s.masked_fill_(s > 0, etaplus).masked_fill_(flip, etaminus).masked_fill_(s == 0, 1)
            moves.append(g.masked_fill(flip, 0))  # after a sign change this element does not move
        torch._foreach_mul_(sizes, signs)
        torch._foreach_clamp_min_(sizes, lo)
        torch._foreach_clamp_max_(sizes, hi)
        torch._foreach_addcmul_(params, torch._foreach_sign(moves), sizes, value=-1)
        torch._foreach_copy_(prevs, moves)

    def _kernel_rule(self, group, variant=None):
        etaminus, etaplus = _pair(group, "etas")
        lo, hi = _pair(group, "step_sizes")
        rule = mt.Rule(_rprop_update, count_step, grad_flags(group),
                       dict(lr=scalar(group["lr"]), etaminus=etaminus, etaplus=etaplus, size_min=lo, size_max=hi))
        return rule, ("prev", "step_size"), ("step",)
