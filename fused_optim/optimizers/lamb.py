"""LAMB (anchor: timm.optim.Lamb, NVIDIA's FusedLAMB variant; You et al. 2019, arXiv 1904.00962): Adam's direction
rescaled per tensor ("layer") by the trust ratio |w| / |update|, after a global grad-norm clip over every group.
The fused path is kernels/lamb.py's kernel family."""
from __future__ import annotations

import math

import torch

from .._base import FusedOptimizer
from .._sharded import full_norms, layout
from .._tensors import check, check_betas, local, scalar
from .._registry import register
from ..kernels import lamb as kl
from ..kernels import reduce
from ..kernels.tables import TableCache
from .common import OwnKernels, amp_unscale_, cautious_updates, whole_tensors
from .lion import max_lr_snapshot

__all__ = ["Lamb", "lamb_clip", "lamb_trust_ratio", "lamb_reference"]


def _scalar_dtype() -> torch.dtype:
    # timm's group step: float64 under a float64 default dtype, else float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def lamb_clip(grads, max_grad_norm, full_sums=None):
    """(|g|, timm's global clip factor max(|g| / max_grad_norm, 1)), 0-d tensors, |g| the norm of all the grads; or
    None. Over DTensor shards (the local grads): ``full_sums`` combines the shards' squared norms."""
    if max_grad_norm is None or not grads:
        return None
    norms = torch.stack(torch._foreach_norm(grads)) if full_sums is None else full_norms(full_sums, grads)[0]
    norm = torch.linalg.vector_norm(norms)
    return norm, (norm / max_grad_norm).clamp_(min=1.0)


def lamb_trust_ratio(w_norm, u_norm, trust_clip: bool):
    """|w| / |update| (1 where either is 0); LAMBC (trust_clip): at most 1."""
    ratio = torch.where(w_norm > 0, torch.where(u_norm > 0, w_norm / u_norm, 1.0), 1.0)
    return torch.clamp(ratio, max=1.0) if trust_clip else ratio


def lamb_reference(params, grads, exp_avgs, exp_avg_sqs, clip, *, lr, beta1, beta2, step, bias_correction,
                   grad_averaging, eps, weight_decay, decoupled_scale, trust_clip, always_adapt, caution,
                   shards=None):
    """timm's LAMB step of one group, each tensor's ops in its order (the tensors go through each stage together, so
    that the statistics over whole tensors are one collective each over shards). ``step``: the group's new step
    count; ``clip``: lamb_clip's factor or None; ``decoupled_scale``: None for weight decay in the update, else the
    decay's lr (lr, or lr**2 / max_lr). ``shards``: the sharded.Layout of FSDP2 params given as their local shards
    (its full_sums turns per-tensor sums over the shards into the full tensors'; None: whole tensors, timm's ops)."""
    bc1, bc2 = (1 - beta1 ** step, 1 - beta2 ** step) if bias_correction else (1.0, 1.0)
    beta3 = 1 - beta1 if grad_averaging else 1.0
    if clip is not None:
        grads = [g / clip for g in grads]  # p.grad is left as it is
    updates = []
    for g, m, v in zip(grads, exp_avgs, exp_avg_sqs):
        if beta3 == 1 - beta1:
            m.lerp_(g, beta3)
        else:
            m.mul_(beta1).add_(g, alpha=beta3)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        updates.append((m / bc1).div_((v.sqrt() / bc2 ** 0.5).add_(eps)))
    if caution:  # Cautious Optimizers (arXiv 2411.16085): drop the components that disagree with the grad
        updates = cautious_updates(updates, grads, *whole_tensors(shards, updates))
    if weight_decay != 0:
        for p, u in zip(params, updates):
            if decoupled_scale is not None:
                p.add_(p, alpha=-decoupled_scale * weight_decay)
            else:
                u.add_(p, alpha=weight_decay)
    if weight_decay != 0 or always_adapt:
        norms = (([p.norm(2.0) for p in params], [u.norm(2.0) for u in updates]) if shards is None
                 else full_norms(shards.full_sums, params, updates))
        for u, w_norm, u_norm in zip(updates, *norms):
            u.mul_(lamb_trust_ratio(w_norm, u_norm, trust_clip))
    for p, u in zip(params, updates):
        p.add_(u, alpha=-lr)


@register
class Lamb(OwnKernels, FusedOptimizer):
    """LAMB: Adam's bias-corrected direction m^ / (sqrt(v^) + eps) (``grad_averaging``: m averages (1 - beta1) g,
    else sums g) plus L2 weight decay (or, ``decoupled_decay``, p *= 1 - lr * weight_decay, with
    ``corrected_weight_decay`` lr**2 / max_lr, max_lr the constructor's lr), scaled per tensor by the trust ratio
    |w| / |update| (1 where either is 0; ``trust_clip`` (LAMBC): at most 1), only where weight_decay != 0 unless
    ``always_adapt``. Before the step every grad is divided by max(|g| / max_grad_norm, 1), |g| the norm of all
    groups' grads (``max_grad_norm=None``: no clipping; p.grad is left unclipped; ``last_grad_norm``: |g|, a 0-d
    tensor, after each step). ``caution``: timm's cautious
    masking of the direction. Anchor: timm.optim.Lamb (same signature, defaults, state and numbers: ``step`` is a
    param-group entry, a float32 0-d tensor, on the params' device on the fused path; ``foreach`` is accepted and
    ignored).

    Fused path, per param group and dtype combination: 1 launch (the trust ratio's statistics and the update as the
    two phases of one persistent cooperative launch; 2 launches where the device refuses one; the update alone
    without adaptation or caution), plus, with max_grad_norm, 2 launches per step for all groups together (the
    per-tensor sums of squares on the C++/CUDA engine, or Triton where it is not built, and the clip factor). No
    host syncs (timm's step reads the group step on the host). Over DTensor (FSDP2) dim-0 shards, both paths: the
    statistics over the local shards, summed across them by one collective each (fused: between the two phases, run
    as 2 launches; the clip's between its 2 launches). The lean options run in the same launches: the statistics
    read the exact fp32 masters and the dequantized moments, the apply stores params, remainders and moments
    rounded (stochastically where asked) or quantized in whole 256-element blocks."""
    nonnegative_states = ("exp_avg_sq",)

    scalar_keys = ()
    elementwise = False  # per-tensor norms
    shardable = True  # (over DTensor shards: local sums, combined by full_sums)
    precision_in_kernel = True  # the lean options run inside the launches (statistics on the exact fp32 masters)
    float64_in_kernel = False  # its kernel's statistics and coefficients are fp32: float64 params use the reference
    supports_complex = False  # timm squares complex grads as complex numbers: no real-view equivalent
    kernel_variants = ()  # no generic-kernel rule: kernels/lamb.py lists this kernel's AOT entries

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 grad_averaging=True, max_grad_norm=1.0, trust_clip=False, always_adapt=False, caution=False,
                 decoupled_decay=False, corrected_weight_decay=False, foreach=None, *, fused=None):
        max_lr = max_lr_snapshot(lr, corrected_weight_decay)
        check(max_grad_norm is None or (isinstance(max_grad_norm, (int, float)) and 0 < max_grad_norm < math.inf),
              f"Invalid max_grad_norm value: {max_grad_norm}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, trust_clip=trust_clip,
                        always_adapt=always_adapt, caution=caution, decoupled_decay=decoupled_decay,
                        corrected_weight_decay=corrected_weight_decay, max_lr_snapshot=max_lr, foreach=foreach)
        super().__init__(params, defaults, fused=fused)
        self._clip = None  # this step's clip factor (device scalar), made by _clip_grads

    def _validate(self, group):
        # timm's wording; NaN and infinity are refused too (timm lets them through)
        for label, value in (("learning rate", group["lr"]), ("epsilon", group["eps"]),
                             ("weight_decay", group["weight_decay"])):
            check(0.0 <= value < math.inf, f"Invalid {label}: {value}")
        check_betas(group["betas"])

    def _init_state(self, p, group):
        return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    @staticmethod
    def _decoupled_scale(group):
        if not group["decoupled_decay"]:
            return None
        lr = scalar(group["lr"])
        return lr ** 2 / group["max_lr_snapshot"] if group["corrected_weight_decay"] else lr

    # timm clips by the norm of every group's grads and advances every group's step, with or without grads: both
    # are done here, once per step, before the groups' updates
    def _clip_grads(self, work, grad_scale, found_inf):
        grads = [g for _, _, gs in work for g in gs]
        mgn = self.defaults["max_grad_norm"]
        # over DTensor (FSDP2) shards: the local grads, the squared norms of all of them summed across the shards
        shards = layout([p for _, ps, _ in work for p in ps])
        full_sums = None if shards is None else shards.full_sums
        if shards is not None:
            grads = list(map(local, grads))
        if all(self._kernel_path(group, ps) for group, ps, _ in work if ps):
            self._clip = None
            if mgn is not None and grads:
                out = reduce.clip_scale(self._kernel_caches.setdefault("clip", {}), grads, mgn, grad_scale, eps=0.0,
                                        full_sums=full_sums)
                self.last_grad_norm, self._clip = out[0], out[1:]
            for group, ps, _ in work:
                if not group["params"]:
                    continue
                dev = ps[0].device if ps else group["params"][0].device
                step = group.get("step")
                if step is None or step.device != dev or step.dtype != torch.float32:
                    group["step"] = step = (torch.zeros((), device=dev) if step is None
                                            else step.to(device=dev, dtype=torch.float32))
                if not ps:  # the kernels advance the others', unless AMP skips the step
                    step.add_(1.0 if found_inf is None else (found_inf.to(dev) == 0).float().view(()))
            return grad_scale, False
        if amp_unscale_(grads, grad_scale, found_inf):
            return None, True
        self.last_grad_norm, self._clip = lamb_clip(grads, mgn, full_sums) or (None, None)
        for group, _, _ in work:
            group.setdefault("step", torch.zeros((), dtype=_scalar_dtype())).add_(1)
        return None, False

    def _reference(self, group, params, grads, states):
        beta1, beta2 = group["betas"]
        lamb_reference(params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                       None if self._clip is None else self._clip.to(grads[0].device), lr=scalar(group["lr"]),
                       beta1=beta1, beta2=beta2, step=group["step"].item(), eps=group["eps"],
                       weight_decay=group["weight_decay"], decoupled_scale=self._decoupled_scale(group),
                       shards=self._shards,
                       **{k: group[k] for k in ("bias_correction", "grad_averaging", "trust_clip", "always_adapt",
                                                "caution")})

    @staticmethod
    def lamb_spec(group) -> kl.Spec:
        """The kernel family's description of this group's step."""
        beta1, beta2 = group["betas"]
        wd, decoupled = group["weight_decay"], group["decoupled_decay"]
        scale = Lamb._decoupled_scale(group)
        return kl.Spec(lr=scalar(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                       l2=0.0 if decoupled else wd, decay=scale * wd if decoupled else 0.0,
                       bias_correction=group["bias_correction"], grad_averaging=group["grad_averaging"],
                       caution=group["caution"], adapt=wd != 0 or group["always_adapt"],
                       trust_clip=group["trust_clip"])

    def _kernel_step(self, group, params, grads, states, grad_scale, found_inf):
        # (DTensor params: their local shards, self._shards their Layout; complex params: refused before)
        keys = ("exp_avg", "exp_avg_sq")
        params, grads, (m, v), masters, back = self._kernel_tensors_with_masters(params, grads, states, keys,
                                                                                 grad_scale)
        clip = self._clip
        if clip is not None and clip.device != params[0].device:
            clip = clip.to(params[0].device)
        kl.step(self.lamb_spec(group), self._kernel_caches.setdefault(id(group), TableCache()), params, grads,
                list(zip(m, v)), group["step"], grad_scale, clip, found_inf, shards=self._shards,
                **self._precision_args(masters), **self._quant_args(states, keys))
        self._write_back(back)
