"""LARS and LARC (anchor: timm.optim.Lars): SGD momentum on grads rescaled per tensor ("layer") by a trust ratio
of the weight and grad norms (You et al. 2017, arXiv 1708.03888; LARC: the ratio clipped at the learning rate).

Fused path, per param group: one launch of the shared per-tensor sums of squares over the grads and the params
(kernels/reduce.py: the C++/CUDA engine where built, else Triton), then one launch of the shared multi-tensor apply,
whose per-tensor scalar slots carry (||g||^2, ||p||^2, the grad scale); without adaptation (weight_decay == 0 and
not always_adapt) the apply alone. Over DTensor (FSDP2) shards: the sums over the local shards, one collective
between the two launches (fused_optim/_sharded.py), as on the reference path.
"""
from __future__ import annotations

import math

import torch

from .._base import FusedOptimizer
from .._sharded import full_norms
from .._tensors import check, scalar
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import reduce, runtime
from ..kernels.tables import TableCache
from .common import GRAD_BITS
from .sgd import momentum_launches, momentum_reference

# the apply's per-tensor scalar slots, in SCALARS' order: none is a state (the scale slot is written back unchanged)
_SLOTS = ("||g||^2", "||p||^2", "grad scale")

if runtime.available():
    import triton
    import triton.language as tl

    from .sgd import FIRST, MOMENTUM, NESTEROV, momentum_direction

    ADAPT, TRUST_CLIP = mt.flag_bits(2, first=GRAD_BITS + 3)  # after SGD's momentum bits

    @triton.jit
    def _lars_scalars(gg, pp, scale, t3, lr, momentum, dampening, wd, trust_coeff, eps, h6, h7, FLAGS: tl.constexpr):
        # the trust ratio (1 where either norm is 0), fp64; gg is the sum of squares of the scaled grad
        ratio = tl.cast(1.0, tl.float64)
        if FLAGS & ADAPT:
            w = tl.sqrt(pp)
            gn = tl.sqrt(gg) / scale
            ratio = tl.where((w > 0.0) & (gn > 0.0), trust_coeff * w / (gn + w * wd + eps), 1.0)
            if FLAGS & TRUST_CLIP:
                ratio = tl.minimum(ratio / lr, 1.0)
        return gg, pp, scale, t3, ratio, 0.0, 0.0, 0.0

    @triton.jit
    def _lars_update(p, g, buf, s1, s2, s3, ratio, c1, c2, c3, lr, momentum, dampening, wd, trust_coeff, eps, h6, h7,
                     FLAGS: tl.constexpr):
        if FLAGS & ADAPT:
            g = tl.fma(wd.to(p.dtype), p, g) * ratio.to(p.dtype)
        g, buf = momentum_direction(g, buf, momentum, dampening, FLAGS)
        p = tl.fma(g, -lr.to(p.dtype), p)
        return p, buf, s1, s2, s3


def lars_trust_ratio(w_norm, g_norm, *, trust_coeff, weight_decay, eps, trust_clip, lr):
    """timm's layer-wise ratio trust_coeff * |w| / (|g| + weight_decay * |w| + eps) (1 where either norm is 0),
    LARC: min(ratio / lr, 1); 0-d tensor math in the norms' dtype, as timm."""
    ratio = torch.where(w_norm > 0, torch.where(g_norm > 0, trust_coeff * w_norm / (g_norm + w_norm * weight_decay
                                                                                    + eps), 1.0), 1.0)
    return torch.clamp(ratio / lr, max=1.0) if trust_clip else ratio


def lars_reference(params, grads, states, *, lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps,
                   trust_clip, always_adapt, full_sums=None):
    """timm's LARS step on lists; states: the param states (momentum_buffer made on the first step). Over DTensor
    shards (local tensors): ``full_sums`` turns per-tensor sums over the shards into the full tensors' (None: whole
    tensors, timm's norms)."""
    if weight_decay != 0 or always_adapt:
        if full_sums is None:
            norms = [p.norm(2.0) for p in params], [g.norm(2.0) for g in grads]
        else:
            norms = full_norms(full_sums, params, grads)
        ratios = [lars_trust_ratio(w, g, trust_coeff=trust_coeff, weight_decay=weight_decay, eps=eps,
                                   trust_clip=trust_clip, lr=lr) for w, g in zip(*norms)]
        grads = torch._foreach_add(grads, params, alpha=weight_decay)  # p.grad is left as it is
        torch._foreach_mul_(grads, ratios)
    if momentum != 0:
        grads = momentum_reference(grads, states, momentum=momentum, dampening=dampening, nesterov=nesterov)
    torch._foreach_add_(params, grads, alpha=-lr)


@register
class Lars(FusedOptimizer):
    """LARS: SGD with momentum (dampening, Nesterov) whose grad g of each param tensor w is replaced by
    (g + weight_decay * w) * trust_coeff * |w| / (|g| + weight_decay * |w| + eps) (1 where |w| or |g| is 0),
    only where weight_decay != 0 unless ``always_adapt``; ``trust_clip`` (LARC) caps the ratio at lr (the step
    scale min(ratio / lr, 1)). Anchor: timm.optim.Lars (same signature, defaults, state and numbers; its
    ``foreach`` is accepted and ignored).

    Fused path: 2 launches per param group and step (1 without adaptation): the per-tensor sums of squares of
    grads and params in one launch (C++/CUDA engine; Triton where it is not built), then the shared multi-tensor
    kernel; +1 apply on the step where params first get a momentum buffer (it starts at their grad, as in timm).
    No host syncs (timm's trust ratio is device math too). With an exact fp32 master (master_weights,
    param_remainders) the weight norm is the master's, as on the reference path (over remainders: the Triton sums,
    which read the param and its remainder as one fp32 value)."""

    scalar_keys = ()
    elementwise = False  # per-tensor norms
    shardable = True  # (over DTensor shards: local sums, combined by full_sums)
    kernel_subvariants = (False, True)  # the `first` argument of _kernel_rule (AOT inventory compiles both)

    def __init__(self, params, lr=1.0, momentum=0, dampening=0, weight_decay=0, nesterov=False, trust_coeff=0.001,
                 eps=1e-8, trust_clip=False, always_adapt=False, foreach=None, *, fused=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt,
                        foreach=foreach)
        super().__init__(params, defaults, fused=fused)

    def _validate(self, group):
        # timm's wording; NaN and infinity are refused too (timm lets them through)
        momentum = group["momentum"]
        for label, value in (("learning rate", group["lr"]), ("momentum value", momentum),
                             ("weight_decay value", group["weight_decay"]), ("eps value", group["eps"])):
            check(0.0 <= value < math.inf, f"Invalid {label}: {value}")
        check(not group["nesterov"] or (momentum > 0 and group["dampening"] == 0),
              "Nesterov momentum requires a momentum and zero dampening")

    def _reference(self, group, params, grads, states):
        lars_reference(params, grads, states, lr=scalar(group["lr"]),
                       full_sums=None if self._shards is None else self._full_sums,
                       **{k: group[k] for k in ("momentum", "dampening", "weight_decay", "nesterov", "trust_coeff",
                                                "eps", "trust_clip", "always_adapt")})

    @staticmethod
    def _adapts(group) -> bool:
        return group["weight_decay"] != 0 or group["always_adapt"]

    def _kernel_rule(self, group, first=None):
        momentum = group["momentum"]
        flags = mt.pack((NESTEROV, group["nesterov"]), (MOMENTUM, momentum != 0), (FIRST, momentum != 0 and first),
                        (ADAPT, self._adapts(group)), (TRUST_CLIP, group["trust_clip"]))
        rule = mt.Rule(_lars_update, _lars_scalars, flags,
                       dict(lr=scalar(group["lr"]), momentum=momentum, dampening=group["dampening"],
                            wd=group["weight_decay"], trust_coeff=group["trust_coeff"], eps=group["eps"]))
        return rule, (("momentum_buffer",) if momentum != 0 else ()), (_SLOTS if self._adapts(group) else ())

    def _kernel_step(self, group, params, grads, states, grad_scale, found_inf):
        launches = (momentum_launches(params, states, self._new_state_buffer) if group["momentum"] != 0
                    else [(range(len(params)), None)])
        keys = ("momentum_buffer",) if group["momentum"] != 0 else ()
        params, grads, columns, masters, back = self._kernel_tensors_with_masters(params, grads, states, keys,
                                                                                  grad_scale)
        slots = ()
        if self._adapts(group):
            cache = self._kernel_caches.setdefault((id(group), "sumsq"), {})
            # one launch for both norms: grads scaled (the apply divides by the scale), params as they are; the
            # weight norm of the exact fp32 master where there is one, as the reference's
            weights, rems = params, None
            if masters and self.master_weights:
                weights = [p if m is None else m for p, m in zip(params, masters)]
            elif masters:
                rems = [None] * len(grads) + masters
            buf = reduce.sumsq(cache, grads + weights, None, found_inf, remainders=rems)
            if self._shards is not None:  # the shards' sums -> the full tensors' (in place: the slots view buf)
                pairs = buf.view(2, len(params))
                pairs.copy_(self._full_sums(pairs.t()).t())
            scale = grad_scale if grad_scale is not None else cache.setdefault("one", torch.ones(1, device=buf.device))
            # 0-d views of fixed buffers (the apply's tables stay valid), made once per buffer
            if cache.get("views", (None,))[:2] != (buf.data_ptr(), scale.data_ptr()):
                cache["views"] = (buf.data_ptr(), scale.data_ptr(), buf.unbind(), scale.view(()))
            norms, one_scale = cache["views"][2:]
            slots = (norms[:len(params)], norms[len(params):], [one_scale] * len(params))
        lr = group["lr"]
        for idx, first in launches:
            rule = self._kernel_rule(group, first)[0]
            ps, gs, *cols = ([xs[i] for i in idx] for xs in (params, grads, *columns, *slots))
            mt.apply(rule, self._kernel_caches.setdefault((id(group), first), TableCache()), ps, gs,
                     cols[:len(columns)], cols[len(columns):],
                     lr_tensor=lr if isinstance(lr, torch.Tensor) else None, grad_scale=grad_scale,
                     found_inf=found_inf, **self._precision_args(masters and [masters[i] for i in idx]),
                     **self._quant_args([states[i] for i in idx], keys))
        self._write_back(back)
