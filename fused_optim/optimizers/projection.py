"""SGDP and AdamP (anchors: timm.optim.SGDP / AdamP; paper: arXiv 2006.08217), with timm's cautious variant: SGD /
Adam whose direction loses its radial component where the weight looks scale invariant (Note [projection decision]
in fused_optim/kernels/README.md). The fused path is kernels/projection.py's kernel family."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.optim.optimizer import required

from .._base import FusedOptimizer
from .._tensors import check, check_betas, check_nonneg, scalar, scalars_on_device
from .._registry import register
from ..kernels import projection as kp
from ..kernels import runtime
from ..kernels.projection import CHANNEL, LAYER, NONE
from ..kernels.tables import TableCache
from .common import OwnKernels, timm_moments_
from .projection_shards import project_shards

__all__ = ["SGDP", "AdamP", "NONE", "CHANNEL", "LAYER", "projection_mode", "project", "sgdp_reference",
           "adamp_reference"]


# ---- reference math (timm's op order) -------------------------------------------------------------------------
def _rows(x: torch.Tensor, mode: int) -> torch.Tensor:
    return x.reshape(x.size(0), -1) if mode == CHANNEL else x.reshape(1, -1)


def projection_mode(p: torch.Tensor, g: torch.Tensor, delta: float, eps: float) -> int:
    """NONE, CHANNEL or LAYER: the first view (channel, then layer) where grad and weight are nearly orthogonal."""
    if p.dim() <= 1 or p.numel() == 0:
        return NONE
    for mode in (CHANNEL, LAYER):
        pv, gv = _rows(p, mode), _rows(g, mode)
        cos = F.cosine_similarity(gv, pv, dim=1, eps=eps).abs()
        if cos.max() < delta / math.sqrt(pv.size(1)):
            return mode
    return NONE


def _cautious(perturb: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Zero the components that disagree in sign with ref, rescaled by the kept fraction (at least 1e-3)."""
    keep = (perturb * ref > 0).to(perturb.dtype)
    return perturb * keep.div_(keep.mean().clamp_(min=1e-3))


def project(p, g, perturb, *, delta, wd_ratio, eps, caution):
    """(projected perturb, weight-decay ratio) for one tensor: timm's projection, cautious masking included."""
    mode = projection_mode(p, g, delta, eps)
    if mode == NONE:
        return (_cautious(perturb, g) if caution else perturb), 1.0
    shape = (-1,) + (1,) * (p.dim() - 1)
    p_n = p / _rows(p, mode).norm(p=2, dim=1).add_(eps).reshape(shape)

    def radial(x):  # the component of x along the unit weight, per row
        return p_n * _rows(p_n * x, mode).sum(dim=1).reshape(shape)

    perturb = perturb - radial(perturb)
    if caution:  # mask against the tangential part of the grad, then project again (the mask breaks tangency)
        perturb = _cautious(perturb, g - radial(g))
        perturb = perturb - radial(perturb)
    return perturb, wd_ratio


def _project_all(params, grads, perturbs, shards=None, **kw):
    if shards is not None:
        return project_shards(params, grads, perturbs, shards, **kw)
    out = [project(p, g, d, **kw) for p, g, d in zip(params, grads, perturbs)]
    return [o[0] for o in out], [o[1] for o in out]


def sgdp_reference(params, grads, bufs, *, lr, momentum, dampening, weight_decay, nesterov, eps, delta, wd_ratio,
                   caution, shards=None):
    """timm's SGDP step on lists; bufs: the momentum buffers (updated in place). shards: see project_shards."""
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads, alpha=1 - dampening)
    if nesterov:  # g + momentum * buf, rounded like timm (no fused multiply-add)
        perturbs = torch._foreach_mul(bufs, momentum)
        torch._foreach_add_(perturbs, grads)
    else:
        perturbs = [b.clone() for b in bufs]
    perturbs, ratios = _project_all(params, grads, perturbs, shards, delta=delta, wd_ratio=wd_ratio, eps=eps,
                                    caution=caution)
    for p, d, ratio in zip(params, perturbs, ratios):
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay * ratio / (1 - momentum))
        p.add_(d, alpha=-lr)


def adamp_reference(params, grads, states, *, lr, betas, eps, weight_decay, delta, wd_ratio, nesterov, caution,
                    shards=None):
    """timm's AdamP step on lists; states: the param states (step, exp_avg, exp_avg_sq; updated in place).
    shards: see project_shards."""
    beta1, beta2 = betas
    m, v, steps = timm_moments_(states, grads, grads, beta1, beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** s) for s in steps])
    torch._foreach_add_(denom, eps)
    if nesterov:  # beta1 * m + (1 - beta1) * g, rounded like timm
        num = torch._foreach_mul(m, beta1)
        torch._foreach_add_(num, torch._foreach_mul(grads, 1 - beta1))
    else:
        num = m
    perturbs, ratios = _project_all(params, grads, torch._foreach_div(num, denom), shards, delta=delta,
                                    wd_ratio=wd_ratio,
                                    eps=eps, caution=caution)
    for p, d, ratio, s in zip(params, perturbs, ratios, steps):
        if weight_decay > 0:
            p.mul_(1 - lr * weight_decay * ratio)
        p.add_(d, alpha=-lr / (1 - beta1 ** s))


# ---- the kernel's math: this step's direction and per-tensor coefficients (kernels/projection.py's Spec) --------
if runtime.available():
    import triton
    import triton.language as tl

    from .common import adam_moments, bias_corrections

    @triton.jit
    def _sgdp_coefs(step, lr, eps, momentum, dampening):
        return step, -lr, 1.0  # no step count, no bias correction

    @triton.jit
    def _adamp_coefs(step, lr, eps, beta1, beta2):
        step, bc1, bc2 = bias_corrections(step, beta1, beta2)
        return step, -lr / bc1, tl.sqrt(bc2)

    @triton.jit
    def _sgdp_direction(g, buf, s1, bc2_sqrt, eps, momentum, dampening, NESTEROV: tl.constexpr):
        buf = buf * momentum.to(g.dtype) + (1.0 - dampening).to(g.dtype) * g
        d = buf
        if NESTEROV:
            d = g + momentum.to(g.dtype) * buf
        return d, buf, s1

    @triton.jit
    def _adamp_direction(g, m, v, bc2_sqrt, eps, beta1, beta2, NESTEROV: tl.constexpr):
        m, v = adam_moments(g, m, v, beta1, beta2)
        denom = tl.sqrt(v) / bc2_sqrt + eps.to(g.dtype)
        num = m
        if NESTEROV:
            num = beta1.to(g.dtype) * m + (1.0 - beta1).to(g.dtype) * g
        return num / denom, m, v


# ---- the optimizers -------------------------------------------------------------------------------------------
class _Projected(OwnKernels, FusedOptimizer):
    """What SGDP and AdamP share: validation and the fused path."""
    supports_complex = False
    elementwise = False  # per-row / per-tensor reductions (FSDP2 shards: project_shards)
    shardable = True
    kernel_layout = "rows"  # per-row statistics: rows must be blocks of storage (see FusedOptimizer)
    precision_in_kernel = True  # the lean options run inside the launches (statistics on the exact fp32 masters)
    float64_in_kernel = False  # the C++ engine's row statistics are fp32: float64 params use the reference path
    kernel_variants = ()  # no generic-kernel rule: kernels/projection.py lists this kernel's AOT entries

    def _validate(self, group):
        check_nonneg(lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"], delta=group["delta"],
                     wd_ratio=group["wd_ratio"])

    @staticmethod
    def projection_spec(group) -> kp.Spec:
        """The kernel family's description of this group's step."""
        raise NotImplementedError

    def _kernel_step(self, group, params, grads, states, grad_scale, found_inf):
        spec = self.projection_spec(group)
        if spec.adam:
            scalars_on_device(states, ("step",), params[0].device, keep_f64=False)  # its kernels read fp32
        steps = [st["step"] for st in states] if spec.adam else None
        # (no complex params here: refused before; DTensor params: their local shards from here on)
        params, grads, columns, masters, back = self._kernel_tensors_with_masters(params, grads, states,
                                                                                  spec.state_keys, grad_scale)
        kp.step(spec, self._kernel_caches.setdefault(id(group), TableCache()), params, grads,
                list(map(list, zip(*columns))), steps, grad_scale, found_inf, self._shards,
                **self._precision_args(masters), **self._quant_args(states, spec.state_keys))
        self._write_back(back)


@register
class SGDP(_Projected):
    """SGDP: SGD with momentum (dampening, Nesterov, weight decay) whose step loses its radial component where a
    weight looks scale invariant: if the grad is nearly orthogonal to the weight, per output channel (every row's
    |cos| < delta / sqrt(row length)) or else for the whole tensor (|cos| < delta / sqrt(numel)), the direction d
    becomes d - p_n <p_n, d> (p_n: the row's or tensor's unit weight) and weight decay is scaled by wd_ratio; only
    tensors of 2+ dims are candidates (Heo et al. 2021, arXiv 2006.08217). ``caution``: timm's cautious masking.
    Anchor: timm.optim.SGDP (like it, ``lr`` has no default).

    Fused path: 2 launches per param group, step and dtype combination, with or without caution, whatever the
    number of tensors: the per-row projection statistics and decision (C++/CUDA engine, or Triton where it is not
    built; none when no tensor has 2+ dims), then the apply (with caution, the cautious statistics and the apply
    as phases of one persistent launch). timm decides on the host, a sync per tensor; this step never syncs.
    DTensor (FSDP2) dim-0 shards: the statistics that span rows combined by one collective (two with caution) on
    either path: the reference on the local shards (``project_shards``, a host sync for the decision), or the
    kernels with their decision split around the collective, no host sync (2 launches; 3 with caution); float64
    params take the reference path (the statistics are fp32). The lean options run in the same launches: the
    statistics read the exact fp32 masters and the dequantized states (Triton's pass, not the engine, with either
    master or int8 codes), the apply stores params, remainders and states rounded or quantized."""

    scalar_keys = ()

    def __init__(self, params, lr=required, momentum=0, dampening=0, weight_decay=0, nesterov=False, eps=1e-8,
                 delta=0.1, wd_ratio=0.1, caution=False, *, fused=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        eps=eps, delta=delta, wd_ratio=wd_ratio, caution=caution)
        super().__init__(params, defaults, fused=fused)

    def _validate(self, group):
        super()._validate(group)
        check_nonneg(momentum=group["momentum"], dampening=group["dampening"])
        check(group["weight_decay"] == 0 or group["momentum"] < 1,
              f"Invalid momentum value: {group['momentum']} (weight decay divides by 1 - momentum)")

    def _init_state(self, p, group):
        return {"momentum": torch.zeros_like(p)}

    def _reference(self, group, params, grads, states):
        sgdp_reference(params, grads, [st["momentum"] for st in states], lr=scalar(group["lr"]), shards=self._shards,
                       **{k: group[k] for k in ("momentum", "dampening", "weight_decay", "nesterov", "eps", "delta",
                                                "wd_ratio", "caution")})

    @staticmethod
    def projection_spec(group):
        momentum, wd = group["momentum"], group["weight_decay"]
        return kp.Spec(direction=_sgdp_direction, coefs=_sgdp_coefs, state_keys=("momentum",), adam=False,
                       lr=scalar(group["lr"]), eps=group["eps"], delta=group["delta"], wd_ratio=group["wd_ratio"],
                       wd=wd / (1 - momentum) if wd != 0 else 0.0, h=(momentum, group["dampening"]),
                       nesterov=group["nesterov"], caution=group["caution"], decay=wd != 0)


@register
class AdamP(_Projected):
    """AdamP: Adam (bias-corrected moments, optional Nesterov momentum) whose step direction loses its radial
    component where a weight looks scale invariant, per output channel or else for the whole tensor (the same
    test as SGDP: |cos(p, g)| < delta / sqrt(length)), with weight decay scaled by wd_ratio there; only tensors
    of 2+ dims are candidates (Heo et al. 2021, arXiv 2006.08217). ``caution``: timm's cautious masking.
    Anchor: timm.optim.AdamP (``step`` a Python int as in timm; the fused path keeps a float32 0-d device tensor).

    Fused path: SGDP's, 2 launches per param group, step and dtype combination, with or without caution, whatever
    the number of tensors (the projection statistics and decision, then the apply); it never syncs. DTensor (FSDP2)
    dim-0 shards and float64 params: as SGDP."""
    anchor_numbers = {"step": int}  # timm's
    nonnegative_states = ("exp_avg_sq",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, delta=0.1, wd_ratio=0.1,
                 nesterov=False, caution=False, *, fused=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio,
                        nesterov=nesterov, caution=caution)
        super().__init__(params, defaults, fused=fused)

    def _validate(self, group):
        super()._validate(group)
        check_betas(group["betas"])

    def _init_state(self, p, group):
        # timm counts steps in a Python int (the fused path keeps a float32 device tensor instead)
        return {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def _reference(self, group, params, grads, states):
        adamp_reference(params, grads, states, lr=scalar(group["lr"]), shards=self._shards,
                        **{k: group[k] for k in ("betas", "eps", "weight_decay", "delta", "wd_ratio", "nesterov",
                                                 "caution")})

    @staticmethod
    def projection_spec(group):
        return kp.Spec(direction=_adamp_direction, coefs=_adamp_coefs, state_keys=("exp_avg", "exp_avg_sq"),
                       adam=True, lr=scalar(group["lr"]), eps=group["eps"], delta=group["delta"],
                       wd_ratio=group["wd_ratio"], wd=group["weight_decay"], h=group["betas"],
                       nesterov=group["nesterov"], caution=group["caution"], decay=group["weight_decay"] > 0)
