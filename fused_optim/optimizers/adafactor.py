"""Adafactor (anchor: timm.optim.Adafactor; Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear
Memory Cost").

Second moment: factored into row and column means of g^2 + eps for params with two dims > min_dim_size_to_factor
(dims 0, 1 of a conv weight, else the last two), element-wise otherwise. Relative step size when lr=None, update RMS
clipping, optional first moment (betas[0]), timm's cautious masking. The fused path is the dedicated kernel family
kernels/adafactor.py ("Note [adafactor passes]" in kernels/README.md): at most 2 launches per group and dtype
(over FSDP2 shards: one per pass).
"""
from __future__ import annotations

import functools
import math

import torch

from .. import _sharded as sharded
from .._base import FusedOptimizer
from .._tensors import LOW_PRECISION, check, check_nonneg, local, scalar, scalars_on_device
from .._registry import register
from ..kernels import adafactor as af, quant
from .common import KeptStateDtypes, OwnKernels


def factored_dims(shape, min_size):
    """(A dim, B dim) to factor the second moment over, or None: dims 0 and 1 when a >2-D param has both larger than
    min_size (conv weights: out, in channels), else the last two when both are larger (timm's heuristic)."""
    nd = len(shape)
    if nd > 2 and shape[0] > min_size and shape[1] > min_size:
        return 0, 1
    if nd >= 2 and shape[-2] > min_size and shape[-1] > min_size:
        return nd - 2, nd - 1
    return None


def _rms(t):
    return t.norm(2) / (t.numel() ** 0.5)


def adafactor_lr(group, step, rms):
    """timm's step size: lr, or when relative (lr=None) min(1e-2 (warmup: 1e-6 * step), 1 / sqrt(step)), scaled by
    max(eps_scale, RMS(p)) with scale_parameter. Written to group['lr'] as timm does (the last param's value)."""
    if not group["relative_step"]:
        return group["lr"]
    lr = min(1e-6 * step if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(step))
    if group["scale_parameter"]:
        lr = lr * (rms if rms > group["eps_scale"] else group["eps_scale"])  # max(eps_scale, rms), rms's type
    group["lr"] = lr
    return lr


def adafactor_reference(group, params, grads, states):
    """Tensor by tensor, in timm's op order (fp32 math for fp16/bf16 params, states kept in fp32)."""
    beta1 = group["beta1"]
    for p, g, st in zip(params, grads, states):
        grad = g.float() if g.dtype in LOW_PRECISION else g
        for k in af.MOMENT_KEYS:
            if k in st:
                st[k] = st[k].to(grad)  # a loaded checkpoint may hold another dtype or device
        w = p.float() if p.dtype in LOW_PRECISION else p
        st["step"] += 1
        step = float(st["step"])
        st["RMS"] = _rms(w)
        lr = adafactor_lr(group, step, st["RMS"])
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        sq = grad.square().add_(group["eps"])
        dims = factored_dims(grad.shape, group["min_dim_size_to_factor"])
        if dims is not None:
            da, db = dims
            rows, cols = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
            rows.lerp_(sq.mean(dim=db), 1.0 - beta2t)
            cols.lerp_(sq.mean(dim=da), 1.0 - beta2t)
            # rows are normalised by their mean, so r x c estimates the mean square of each element
            r = (rows / rows.mean(dim=da, keepdim=True)).rsqrt_().unsqueeze(db)
            update = torch.mul(r, cols.unsqueeze(da).rsqrt()).mul_(grad)
        else:
            v = st["exp_avg_sq"]
            v.lerp_(sq, 1.0 - beta2t)
            update = v.rsqrt().mul_(grad)
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if beta1 is not None:
            m = st["exp_avg"]
            m.lerp_(update, 1 - beta1)
            if group["caution"]:
                mask = (m * grad > 0).to(grad.dtype)
                mask.div_(mask.mean().clamp_(min=1e-3))
                update = m * mask
            else:
                update = m
        if group["weight_decay"] != 0:
            w.add_(w, alpha=-group["weight_decay"] * lr)
        w.add_(-update)
        if w is not p:
            p.copy_(w)


def adafactor_shards(group, params, grads, states, shards):
    """adafactor_reference on dim-0 shards (local slices; shards: sharded.Layout, the full shapes and full_sums).
    What spans dim 0 is summed over the shards, one collective per dependent stage: (1) |w|^2 (RMS) and, where dim 0
    is a factored dim, the column sums of g^2 + eps and the row moment's sums over dim 0 (rows of a dim-0 shard are
    local); (2) |update|^2 (the clipping RMS); (3) with caution, the mask's count."""
    beta1, rate = group["beta1"], group["decay_rate"]
    n_full = [math.prod(shape) for shape in shards.shapes]
    dims = [factored_dims(shape, group["min_dim_size_to_factor"]) for shape in shards.shapes]
    work, stage1 = [], []
    for p, g, st, d in zip(params, grads, states, dims):
        grad = g.float() if g.dtype in LOW_PRECISION else g
        for k in af.MOMENT_KEYS:
            if k in st:
                st[k] = st[k].to(grad)
        w = p.float() if p.dtype in LOW_PRECISION else p
        st["step"] += 1
        beta2t = 1.0 - math.pow(float(st["step"]), rate)
        sq = grad.square().add_(group["eps"])
        part = [(w * w).sum().reshape(1)]
        if d is None:
            st["exp_avg_sq"].lerp_(sq, 1.0 - beta2t)
        else:
            st["exp_avg_sq_row"].lerp_(sq.mean(dim=d[1]), 1.0 - beta2t)
            if d[0] == 0:  # the column means and the rows' mean span dim 0
                part += [sq.sum(dim=0).flatten(), st["exp_avg_sq_row"].sum(dim=0).flatten()]
            else:
                st["exp_avg_sq_col"].lerp_(sq.mean(dim=d[0]), 1.0 - beta2t)
        work.append((w, grad, beta2t))
        stage1.append(torch.cat(part))
    updates, stage2 = [], []
    for (w, grad, beta2t), st, d, n, shape, sums in zip(work, states, dims, n_full, shards.shapes,
                                                         shards.full_sums(stage1)):
        st["RMS"] = sums[0].div(n).sqrt()
        if d is None:
            update = st["exp_avg_sq"].rsqrt().mul_(grad)
        else:
            da, db = d
            rows, cols = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
            if da == 0:
                k = cols.numel()
                cols.lerp_(sums[1:1 + k].view(cols.shape) / shape[0], 1.0 - beta2t)
                row_mean = (sums[1 + k:] / shape[0]).view(1, *rows.shape[1:])
            else:
                row_mean = rows.mean(dim=da, keepdim=True)
            r = (rows / row_mean).rsqrt_().unsqueeze(db)
            update = torch.mul(r, cols.unsqueeze(da).rsqrt()).mul_(grad)
        updates.append(update)
        stage2.append(update.square().sum())
    lrs = []
    for (w, grad, _), update, st, n, usq in zip(work, updates, states, n_full, shards.full_sums(torch.stack(stage2))):
        lr = adafactor_lr(group, float(st["step"]), st["RMS"])
        update.div_((usq.div(n).sqrt() / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        lrs.append(lr)
        if beta1 is not None:
            st["exp_avg"].lerp_(update, 1 - beta1)
    if beta1 is not None:
        masks = None
        if group["caution"]:
            masks = [(st["exp_avg"] * grad > 0).to(grad.dtype) for (_, grad, _), st in zip(work, states)]
            counts = shards.full_sums(torch.stack([m.sum() for m in masks]))
            masks = [m.div_((c / n).clamp_(min=1e-3)) for m, c, n in zip(masks, counts, n_full)]
        updates = [st["exp_avg"] if masks is None else st["exp_avg"] * m for st, m in
                   zip(states, masks or [None] * len(states))]
    for p, (w, _, _), update, lr in zip(params, work, updates, lrs):
        if group["weight_decay"] != 0:
            w.add_(w, alpha=-group["weight_decay"] * lr)
        w.add_(-update)
        if w is not p:
            p.copy_(w)


@register
class Adafactor(KeptStateDtypes, OwnKernels, FusedOptimizer):
    """Adafactor: a second moment factored into row and column means of g^2 for matrices (element-wise otherwise),
    a relative step size when lr=None, update RMS clipping, an optional first moment (betas[0]) and cautious
    masking. Anchor: timm.optim.Adafactor (same signature, defaults, state and group keys; `betas` is stored as
    group['beta1']). This is timm's Adafactor, not ``torch.optim.Adafactor``, a different algorithm with another
    signature; ``create_optimizer(model, "adafactor")`` builds this one too.

    Fused path: 2 launches per param group, step and dtype (the row/column statistics on the C++/CUDA engine, or
    in Triton where it is not built; then one persistent launch: fold, update RMS, apply), 1 for a group without
    factored params; the same with caution. float64 params take the reference path (the kernels compute in fp32).
    DTensor (FSDP2) dim-0 shards: the reference (``adafactor_shards``) or the kernels, one launch per pass with a
    collective of the local sums where they span the shards (Note [adafactor shards]). The precision and lean
    options run in the same launches (int8 states of non-contiguous params: the reference path).

    State: step (a Python int; a float32 0-d device tensor once the fused path has run), RMS (0-d), exp_avg with
    betas, exp_avg_sq_row / exp_avg_sq_col for factored params or exp_avg_sq, in fp32 for fp16/bf16 params."""
    nonnegative_states = ("exp_avg_sq",)
    supports_complex = False
    scalar_keys = ("step", "RMS")
    # timm's int step; a relative step leaves its last step size in group['lr'] as a 0-d tensor (a device view on
    # the fused path): saved as a float, like the None it replaces, so DCP's loading optimizer agrees on its type
    anchor_numbers = {"step": int, "lr": float}
    elementwise = False  # row/column means and update RMS over whole tensors
    shardable = True
    kernel_layout = "contiguous"  # factored rows / columns: other layouts go through contiguous copies
    precision_in_kernel = True  # the precision and lean options run inside its kernels (kernels/adafactor_lean.py)
    float64_in_kernel = False  # its kernels' statistics and coefficients are fp32: float64 params use the reference
    kernel_variants = ()  # no shared-kernel rule: tools/aot.py takes the dedicated kernel from aot_kernels()

    def __init__(self, params, lr=None, eps=1e-30, eps_scale=1e-3, clip_threshold=1.0, decay_rate=-0.8, betas=None,
                 weight_decay=0.0, scale_parameter=True, warmup_init=False, min_dim_size_to_factor=16,
                 caution=False, *, fused=None):
        relative_step = lr is None
        if warmup_init and not relative_step:
            raise ValueError("warmup_init requires relative_step=True (lr=None)")
        beta1 = None if betas is None else betas[0]
        defaults = dict(lr=lr, eps=eps, eps_scale=eps_scale, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init,
                        min_dim_size_to_factor=min_dim_size_to_factor, caution=caution)
        super().__init__(params, defaults, fused=fused)

    def _validate(self, group):
        if not group["relative_step"]:
            check_nonneg(lr=group["lr"])
        check_nonneg(eps=group["eps"], eps_scale=group["eps_scale"], weight_decay=group["weight_decay"])
        clip = group["clip_threshold"]
        check(isinstance(clip, (int, float)) and 0 < clip < math.inf, f"Invalid clip_threshold value: {clip}")
        check(isinstance(group["decay_rate"], (int, float)) and -math.inf < group["decay_rate"] <= 0,
              f"Invalid decay_rate value: {group['decay_rate']} (expected <= 0)")
        beta1 = group["beta1"]
        check(beta1 is None or (isinstance(beta1, (int, float)) and 0.0 <= beta1 < 1.0),
              f"Invalid beta parameter at index 0: {beta1}")
        check(not group["warmup_init"] or group["relative_step"], "warmup_init requires relative_step=True (lr=None)")
        check(isinstance(group["min_dim_size_to_factor"], int) and group["min_dim_size_to_factor"] >= 0,
              f"Invalid min_dim_size_to_factor value: {group['min_dim_size_to_factor']}")

    def _init_state(self, p, group):
        dtype = torch.float32 if p.dtype in LOW_PRECISION else p.dtype
        st = {"step": 0}
        if group["beta1"] is not None:
            st["exp_avg"] = torch.zeros_like(p, dtype=dtype)
        dims = factored_dims(p.shape, group["min_dim_size_to_factor"])
        if dims is not None:
            da, db = dims
            # (DTensor params: DTensor states, sharded like p where they keep its dim 0)
            st["exp_avg_sq_row"] = sharded.zeros_reduced(p, p.shape[:db] + p.shape[db + 1:], dtype, True)
            st["exp_avg_sq_col"] = sharded.zeros_reduced(p, p.shape[:da] + p.shape[da + 1:], dtype, da != 0)
        else:
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        st["RMS"] = 0
        return st

    def _kept_dtypes(self, group, p):
        # moments stay fp32 for fp16/bf16 params, as timm keeps them
        return {k: torch.float32 for k in af.MOMENT_KEYS} if p.dtype in LOW_PRECISION else {}

    def _reference(self, group, params, grads, states):
        if self._shards is not None:
            adafactor_shards(group, params, grads, states, self._shards)
        else:
            adafactor_reference(group, params, grads, states)

    def _kernel_step(self, group, params, grads, states, grad_scale, found_inf, variant=None):
        scalars_on_device(states, self.scalar_keys, params[0].device, keep_f64=False)  # its kernels read fp32
        sdts = af.prepare_moments(states, grads, params[0].device, [self._lean_dtype(p) for p in params])
        keys = af.PARAM_SHAPED_KEYS  # not every tensor has both: columns with None
        masters = self._masters(states)
        params, grads, columns, back = self._kernel_tensors(  # the master slots: one more column
            params, grads, states, (), grad_scale,
            extra=[*([st.get(k) for st in states] for k in keys), masters or [None] * len(states)])
        *columns, ms = columns
        if self._shards is not None:  # the kernel reads states from the dicts: their local shards
            states = [{k: local(v) for k, v in st.items()} for st in states]
        if back:  # ... ones holding the copies
            states = [{**st, **{k: v for k, v in zip(keys, vs) if v is not None}} for st, *vs in zip(states, *columns)]
        scales = [[quant.scales_of(st, k) if k in st else None for st in states] for k in keys]
        last_lr = af.step(_kernel_spec(group), self._kernel_caches, id(group), params, grads, states, sdts,
                          grad_scale, found_inf, self._shards, **self._precision_args(masters and ms), scales=scales,
                          unsigned=sum(1 << i for i, k in enumerate(keys) if k in self.nonnegative_states))
        self._write_back(back)
        if group["relative_step"] and last_lr is not None:
            group["lr"] = last_lr  # timm leaves the last param's step size here; a device view, no sync


def _kernel_spec(group) -> af.Spec:
    """adafactor_reference's step as the kernel takes it: passes, option bits, hyper-parameters by name."""
    relative, beta1, lr = group["relative_step"], group["beta1"], group["lr"]
    lr_tensor = lr if isinstance(lr, torch.Tensor) and not relative else None  # read on the device
    min_size = group["min_dim_size_to_factor"]
    return af.Spec(
        passes=af.CAUTIOUS if group["caution"] and beta1 is not None else af.PLAIN,
        flags=af.options(relative=relative, warmup=relative and group["warmup_init"],
                         scale_parameter=group["scale_parameter"], beta1=beta1 is not None,
                         weight_decay=group["weight_decay"] != 0),
        hypers=dict(lr=0.0 if relative or lr_tensor is not None else scalar(lr), eps=group["eps"],
                    eps_scale=group["eps_scale"], clip=group["clip_threshold"], decay_rate=group["decay_rate"],
                    beta1=0.0 if beta1 is None else beta1, wd=group["weight_decay"]),
        lr_tensor=lr_tensor, factored=functools.partial(factored_dims, min_size=min_size), factored_key=min_size)
