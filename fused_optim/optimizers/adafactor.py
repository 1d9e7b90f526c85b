"""Adafactor (anchor: timm.optim.Adafactor; Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear
Memory Cost").

Second moment: factored into row and column means of g^2 + eps for params with two dims > min_dim_size_to_factor
(dims 0, 1 of a conv weight, else the last two), element-wise otherwise. Relative step size when lr=None, update RMS
clipping, optional first moment (betas[0]), timm's cautious masking.

Fused path: one dedicated Triton kernel (the factored update needs a row and a column factor per element, which the
shared element-wise kernel cannot express). Every tensor is cut into 2-D tiles (work items): a factored tensor, viewed
as [pre, A, B, post] (A, B the factored dims), into (plane = (pre, post) index, A-block, B-block) tiles; an unfactored
one into rows of TB elements. The kernel runs passes over the work items:

  ROWCOL  row/col sums of g^2 + eps (factored tensors only); the last tile of each row/column block folds the
          partial sums into exp_avg_sq_row / exp_avg_sq_col
  FOLD    the same fold from the C++ engine's row/col means (fused_optim.csrc.factored_stats)
  NORMS   sum of p^2 (-> RMS) and of the unclipped update^2 (-> clip factor), per tensor
  APPLY   the update: second moment, clip, lr, first moment, weight decay; step advances
          (caution=True with betas: MOMENTS updates the moments and counts the mask, CAUTIOUS_APPLY applies it)

Per param group and dtype combination, all tensors at once, a step is "reduce, then apply": at most 2 launches,
independent of the tensor count.

  launch 1  the factored statistics: ONE csrc engine launch where its module is built for the device (fp32 / bf16 /
            fp16 grads; reduce.use_csrc), else the Triton ROWCOL pass; none without factored tensors
  launch 2  persistent: [FOLD after csrc,] NORMS, APPLY (or NORMS, MOMENTS, CAUTIOUS_APPLY)

The passes of launch 2 depend on each other through whole-tensor sums (the update RMS needs every new row/col
moment, the apply needs the update RMS), so they are phases separated by a grid-wide barrier (sync.grid_barrier).
A barrier only works if every program of the grid is resident at once, hence G = min(SM count, work items)
programs (one per SM at most; each fits an SM alone), each looping over items pid, pid + G, ...; the interpreter
runs programs one after another, so there G = 1. A barrier that never completes gives up after sync.GRID_SPIN_LIMIT
polls instead of hanging, and sets a sticky flag (sync.GridBarrier reports it at a later step). The csrc launch stays
separate: it is another engine, and its one pass over the grads is the reduction.

Cross-program sums are deterministic (partials + the last arriving program sums them in order; sync.arrive), and do
not depend on G. No host syncs: RMS, step and the lr live on the device, and group['lr'] (timm writes the last
param's relative lr there) becomes a 0-d device view.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._base import (FusedOptimizer, check, check_nonneg, device_index, restore_state_dtypes, scalar,
                     scalars_on_device)
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime, access, sync
from ..kernels.tables import Tables, TableCache
from ..kernels import reduce

_LOW = (torch.float16, torch.bfloat16)
_CSRC_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the C++ engine's input dtypes
_MOMENTS = ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")
# Tiles: SUB rows x TB columns per iteration, runtime.ITERS iterations (TA rows). RB: rows per step of the row-mean loop,
# PB: partials per step of sum_partials. Under the interpreter (CPU tests, whose cost is per op and program): small
# enough that the test shapes span several row and column blocks and every loop runs more than once.
if runtime.interpreter_enabled():
    TB, SUB, RB, _PB = 32, 16, 32, 4
else:
    TB, SUB, RB, _PB = 256, max(1, runtime.BLOCK // 256), 1024, 256
TA = SUB * runtime.ITERS
FOLD, ROWCOL, NORMS, MOMENTS, APPLY, CAUTIOUS_APPLY = range(6)  # the passes, numbered in execution order


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
        grad = g.float() if g.dtype in _LOW else g
        for k in _MOMENTS:
            if k in st:
                st[k] = st[k].to(grad)  # a loaded checkpoint may hold another dtype or device
        w = p.float() if p.dtype in _LOW else p
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


if runtime.available():
    import triton
    import triton.language as tl

    RELATIVE, WARMUP, SCALE_PARAM, BETA1, WD = mt.flag_bits(5)
    # the passes as compile-time globals (a kernel may read only tl.constexpr globals), and as PASSES bits
    P_FOLD, P_ROWCOL, P_NORMS, P_MOMENTS, P_APPLY, P_CAUTIOUS_APPLY = (tl.constexpr(x) for x in range(6))
    _chunk_ptr, _store, arrive, sum_partials = access.chunk_ptr, access.store, sync.arrive, sync.sum_partials
    grid_barrier, grid_barrier_exit = sync.grid_barrier, sync.grid_barrier_exit

    @triton.jit
    def _lerp(s, e, w):
        # torch's lerp: exact at both ends (w = 1 on the first step)
        return tl.where(w < 0.5, s + w * (e - s), e - (e - s) * (1.0 - w))

    @triton.jit
    def _step_scalars(step_old, rms, lr, eps_scale, decay_rate, FLAGS: tl.constexpr):
        """fp64: the new step, the second moment's EMA weight step^decay_rate (= 1 - beta2t) and the step size."""
        step = step_old + 1.0
        keep = tl.exp2(decay_rate * tl.log2(step))
        if FLAGS & RELATIVE:
            cap = 1e-2
            if FLAGS & WARMUP:
                cap = 1e-6 * step
            lr = tl.minimum(cap, 1.0 / tl.sqrt(step))
            if FLAGS & SCALE_PARAM:
                lr = lr * tl.where(rms > eps_scale, rms, eps_scale)  # max(eps_scale, RMS); NaN RMS -> eps_scale
        return step, keep, lr

    @triton.jit
    def _inv_root(fac, g, s3_ptr, s4_ptr, offs, vmask, ridx, fmask_r, cidx, fmask_c, rmean, keep, eps):
        """Per element 1 / sqrt(second moment estimate), and the new unfactored moment (unused when factored).
        Slot 3 is exp_avg_sq_row of a factored tensor, exp_avg_sq of an unfactored one; slot 4 exp_avg_sq_col.
        The masks are empty for the kind the tensor is not (vmask: unfactored elements, fmask_*: factored).
        Row / column moments load with .cg: other programs of the same launch may have folded them (FOLD phase);
        the unfactored moment is this tile's own."""
        r = tl.load(s3_ptr + ridx, mask=fmask_r, other=1.0, cache_modifier=".cg").to(tl.float32)
        c = tl.load(s4_ptr + cidx, mask=fmask_c, other=1.0, cache_modifier=".cg").to(tl.float32)
        v = tl.load(s3_ptr + offs, mask=vmask, other=1.0).to(tl.float32)
        v = _lerp(v, g * g + eps, keep)
        f = (1.0 / tl.sqrt(r / rmean))[:, None] * (1.0 / tl.sqrt(c))[None, :]
        return tl.where(fac != 0, f, 1.0 / tl.sqrt(v)), v

    @triton.jit
    def _tile(
        item, ptrs, meta, work, tsc, part0, part1, rcpart, counters, lr_ptr, scale_ptr,
        lr, eps, eps_scale, clip, decay_rate, beta1, wd,
        PASS: tl.constexpr, FLAGS: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
        LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr,
        TB: tl.constexpr, SUB: tl.constexpr, ITERS: tl.constexpr, RB: tl.constexpr, PB: tl.constexpr,
    ):
        """One pass over one work item: a tile of SUB * ITERS rows x TB columns of one plane of one tensor.

        ptrs[t]  = (p, g, exp_avg, row moment | exp_avg_sq, col moment, step, RMS, -) addresses
        meta[t]  = (numel, factored, A, B, post, planes, A-blocks, B-blocks, row partials offset, col partials
                    offset, block counters offset, first work item, csrc row means offset, csrc col means offset)
        work[i]  = (t, plane, A-block, B-block); factored tensors first (ROWCOL / FOLD run over those only)
        tsc[t]   = (sum of update^2, caution mask count, step size, -) fp32
        part0/1[i] = NORMS partials (update^2, p^2) of work item i; MOMENTS reuses part0 for mask counts
        rcpart   = ROWCOL partial row / column sums, or in FOLD the csrc engine's row / column means;
        counters: per tensor [T], then per row / column block (ROWCOL). Every phase's last program of a tensor (or
        block) resets its counter, so the next phase of the same launch starts from zero.

        Values another program wrote in an earlier phase of the same launch (row / column moments, tsc, RMS) load
        with .cg (L2, not a possibly stale L1). The element-wise data (p, g, exp_avg, exp_avg_sq) a tile rewrites is
        read back in a later phase only by the same program: every phase over all items maps item -> program alike."""
        t = tl.load(work + 4 * item).to(tl.int64)
        plane = tl.load(work + 4 * item + 1).to(tl.int64)
        ab = tl.load(work + 4 * item + 2).to(tl.int64)
        bb = tl.load(work + 4 * item + 3).to(tl.int64)
        mrow = meta + 14 * t
        n = tl.load(mrow)
        fac = tl.load(mrow + 1)
        A = tl.load(mrow + 2)
        B = tl.load(mrow + 3)
        post = tl.load(mrow + 4)
        planes = tl.load(mrow + 5)
        nab = tl.load(mrow + 6)
        nbb = tl.load(mrow + 7)
        row = ptrs + 8 * t
        p_ptr = _chunk_ptr(row, 0, P_DT, False)
        g_ptr = _chunk_ptr(row, 1, G_DT, False)
        m_ptr = _chunk_ptr(row, 2, S_DT, False)
        s3_ptr = _chunk_ptr(row, 3, S_DT, False)
        s4_ptr = _chunk_ptr(row, 4, S_DT, False)
        step_ptr = _chunk_ptr(row, 5, tl.float32, False)
        rms_ptr = _chunk_ptr(row, 6, tl.float32, False)
        # every pass reads the old step; the last pass's last program of the tensor writes the new one
        rms = tl.cast(0.0, tl.float64)
        if PASS == P_APPLY or PASS == P_MOMENTS or PASS == P_CAUTIOUS_APPLY:
            rms = tl.load(rms_ptr, cache_modifier=".cg").to(tl.float64)  # NORMS' result
        # scalar arguments are plain Python floats under the interpreter: make them fp64 tensors everywhere
        lr = tl.cast(lr, tl.float64)
        clip = tl.cast(clip, tl.float64)
        beta1 = tl.cast(beta1, tl.float64)
        wd = tl.cast(wd, tl.float64)
        if LR_TENSOR:
            lr = tl.load(lr_ptr).to(tl.float64)
        step, keep, lr_t = _step_scalars(tl.load(step_ptr).to(tl.float64), rms, lr,
                                         tl.cast(eps_scale, tl.float64), tl.cast(decay_rate, tl.float64), FLAGS)
        keep = keep.to(tl.float32)
        eps32 = tl.cast(eps, tl.float32)
        inv_scale = 1.0
        if HAS_SCALE:
            if PASS != P_CAUTIOUS_APPLY:  # the moments phase already wrote the unscaled grads back
                inv_scale = 1.0 / tl.load(scale_ptr).to(tl.float32)

        i = plane // post
        j = plane % post
        base = i * (A * B * post) + j
        cols = bb * TB + tl.arange(0, TB)
        cmask = cols < B
        cidx = (i * B + cols) * post + j
        if PASS == P_FOLD:
            # exp_avg_sq_row / _col <- lerp(old, csrc's mean of g^2 + eps, 1 - beta2t): the items of A-block 0 fold
            # the columns of their B-block, those of B-block 0 the rows of their A-block (each exactly once)
            if bb == 0:
                for it in range(ITERS):
                    rows = ab * (SUB * ITERS) + it * SUB + tl.arange(0, SUB)
                    rmask = rows < A
                    ridx = (i * A + rows) * post + j  # csrc's [pre, A, post] row means: the row state's layout
                    mean = tl.load(rcpart + tl.load(mrow + 12) + ridx, mask=rmask, other=0.0)
                    r = tl.load(s3_ptr + ridx, mask=rmask, other=0.0).to(tl.float32)
                    _store(s3_ptr, ridx, _lerp(r, mean, keep), rmask, False)
            if ab == 0:
                mean = tl.load(rcpart + tl.load(mrow + 13) + cidx, mask=cmask, other=0.0)
                c = tl.load(s4_ptr + cidx, mask=cmask, other=0.0).to(tl.float32)
                _store(s4_ptr, cidx, _lerp(c, mean, keep), cmask, False)
        else:
            # masks of one kind only (a scalar bool in a mask trips Triton's interpreter: compare ranges instead)
            fa = tl.where(fac != 0, A, 0)
            nu = tl.where(fac != 0, 0, n)
            fmask_c = cols < tl.where(fac != 0, B, 0)
            # row mean of exp_avg_sq_row over A, for this plane (factored tensors only)
            rmean = tl.zeros([RB], tl.float32)
            if PASS == P_NORMS or PASS == P_APPLY or PASS == P_MOMENTS:
                for a0 in range(0, fa, RB):
                    aa = a0 + tl.arange(0, RB)
                    rmean += tl.load(s3_ptr + (i * A + aa) * post + j, mask=aa < A, other=0.0,
                                     cache_modifier=".cg").to(tl.float32)
            rmean = tl.where(fac != 0, tl.sum(rmean, axis=0) / A.to(tl.float32), 1.0)

            clip_f = tl.cast(1.0, tl.float32)
            lr_f = lr_t.to(tl.float32)
            if PASS == P_APPLY or PASS == P_MOMENTS:
                urms = tl.sqrt(tl.load(tsc + 4 * t, cache_modifier=".cg").to(tl.float64)) / tl.sqrt(n.to(tl.float64))
                clip_f = tl.maximum(urms / clip, 1.0).to(tl.float32)
            mask_scale = tl.cast(0.0, tl.float32)
            if PASS == P_CAUTIOUS_APPLY:
                mask_mean = tl.load(tsc + 4 * t + 1, cache_modifier=".cg") / n.to(tl.float32)
                mask_scale = 1.0 / tl.maximum(mask_mean, 1e-3)
            neg_decay = (-(wd * lr_t)).to(tl.float32)

            col_acc = tl.zeros([TB], tl.float32)
            acc0 = tl.zeros([SUB], tl.float32)  # per-row running sums: fewer registers than a [SUB, TB] tile
            acc1 = tl.zeros([SUB], tl.float32)
            for it in range(ITERS):
                rows = ab * (SUB * ITERS) + it * SUB + tl.arange(0, SUB)
                rmask = rows < A
                ridx = (i * A + rows) * post + j
                offs = base + rows[:, None] * (B * post) + cols[None, :] * post
                mask = rmask[:, None] & cmask[None, :] & (offs < n)
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
                if PASS == P_ROWCOL:
                    u = tl.where(mask, g * g + eps32, 0.0)
                    tl.store(rcpart + tl.load(mrow + 8) + (bb * planes + plane) * A + rows, tl.sum(u, axis=1),
                             mask=rmask)
                    col_acc += tl.sum(u, axis=0)
                else:
                    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    if PASS == P_CAUTIOUS_APPLY:
                        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                        upd = tl.where(m * g > 0.0, m * mask_scale, 0.0)
                    else:
                        vmask = mask & (offs < nu)
                        f, v = _inv_root(fac, g, s3_ptr, s4_ptr, offs, vmask, ridx, rows < fa, cidx, fmask_c, rmean,
                                         keep, eps32)
                        u = g * f
                        if PASS == P_NORMS:
                            acc0 += tl.sum(tl.where(mask, u * u, 0.0), axis=1)
                            acc1 += tl.sum(tl.where(mask, p * p, 0.0), axis=1)
                        else:
                            _store(s3_ptr, offs, v, vmask, False)
                            u = u / clip_f * lr_f
                            upd = u
                            if FLAGS & BETA1:
                                m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                                m = _lerp(m, u, (1.0 - beta1).to(tl.float32))
                                _store(m_ptr, offs, m, mask, False)
                                upd = m
                                if PASS == P_MOMENTS:
                                    acc0 += tl.sum(tl.where(mask & (m * g > 0.0), 1.0, 0.0), axis=1)
                            if HAS_SCALE:
                                # p.grad ends unscaled, like the generic kernel: written in exactly one phase
                                # (APPLY, or MOMENTS before CAUTIOUS_APPLY)
                                _store(g_ptr, offs, g, mask, False)
                    if PASS == P_APPLY or PASS == P_CAUTIOUS_APPLY:
                        if FLAGS & WD:
                            p = p + neg_decay * p
                        _store(p_ptr, offs, p - upd, mask, False)

            if PASS == P_ROWCOL:
                # fold each row / column block once all its tiles have stored their partial sums
                tl.store(rcpart + tl.load(mrow + 9) + (ab * planes + plane) * B + cols, col_acc, mask=cmask)
                cnt = counters + tl.load(mrow + 10)
                if arrive(cnt + plane * nab + ab, nbb):
                    for it in range(ITERS):
                        rows = ab * (SUB * ITERS) + it * SUB + tl.arange(0, SUB)
                        rmask = rows < A
                        tot = tl.zeros([SUB], tl.float32)
                        for k in range(nbb):
                            tot += tl.load(rcpart + tl.load(mrow + 8) + (k * planes + plane) * A + rows, mask=rmask,
                                           other=0.0, cache_modifier=".cg")
                        ridx = (i * A + rows) * post + j
                        r = tl.load(s3_ptr + ridx, mask=rmask, other=0.0).to(tl.float32)
                        _store(s3_ptr, ridx, _lerp(r, tot / B.to(tl.float32), keep), rmask, False)
                    tl.store(cnt + plane * nab + ab, 0)
                if arrive(cnt + planes * nab + plane * nbb + bb, nab):
                    tot = tl.zeros([TB], tl.float32)
                    for k in range(nab):
                        tot += tl.load(rcpart + tl.load(mrow + 9) + (k * planes + plane) * B + cols, mask=cmask,
                                       other=0.0, cache_modifier=".cg")
                    c = tl.load(s4_ptr + cidx, mask=cmask, other=0.0).to(tl.float32)
                    _store(s4_ptr, cidx, _lerp(c, tot / A.to(tl.float32), keep), cmask, False)
                    tl.store(cnt + planes * nab + plane * nbb + bb, 0)
            else:
                nwork = planes * nab * nbb
                if PASS == P_NORMS or PASS == P_MOMENTS:
                    tl.store(part0 + item, tl.sum(acc0, axis=0))
                    tl.store(part1 + item, tl.sum(acc1, axis=0))
                # the last program of the tensor finishes it (every other one has stored its partials / read step)
                if arrive(counters + t, nwork):
                    first = tl.load(mrow + 11)
                    if PASS == P_NORMS:
                        tl.store(tsc + 4 * t, sum_partials(part0 + first, nwork, PB))
                        psq = sum_partials(part1 + first, nwork, PB)
                        tl.store(rms_ptr, tl.sqrt(psq) / tl.sqrt(n.to(tl.float32)))
                    if PASS == P_MOMENTS:
                        tl.store(tsc + 4 * t + 1, sum_partials(part0 + first, nwork, PB))
                    if PASS == P_APPLY or PASS == P_CAUTIOUS_APPLY:
                        tl.store(step_ptr, step.to(tl.float32))
                        tl.store(tsc + 4 * t + 2, lr_t.to(tl.float32))
                    tl.store(counters + t, 0)

    @triton.jit
    def adafactor_kernel(
        ptrs, meta, work, tsc, part0, part1, rcpart, counters, barrier, lr_ptr, scale_ptr, inf_ptr, n_fact, n_work,
        lr: tl.float64, eps: tl.float64, eps_scale: tl.float64, clip: tl.float64, decay_rate: tl.float64,
        beta1: tl.float64, wd: tl.float64,
        PASSES: tl.constexpr, FLAGS: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
        LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
        TB: tl.constexpr, SUB: tl.constexpr, ITERS: tl.constexpr, RB: tl.constexpr, PB: tl.constexpr,
    ):
        """The phases in PASSES (bits, run in the order FOLD, ROWCOL, NORMS, MOMENTS, APPLY, CAUTIOUS_APPLY), each
        over its work items (FOLD / ROWCOL: the n_fact factored ones, else all n_work) with item = pid, pid + G, ...
        and a grid barrier between consecutive phases. One phase with one program per item is a plain launch; several
        phases need a persistent grid of G <= SM count programs (all resident, so the barrier cannot deadlock)."""
        pid = tl.program_id(0)
        G = tl.num_programs(0)
        skip = 0
        if HAS_INF:
            skip = tl.load(inf_ptr) != 0  # AMP overflow: touch nothing, advance nothing
        if skip == 0:
            nb = 0  # barriers passed (compile-time)
            ok = 1
            for PASS in tl.static_range(6):  # the passes in execution order
                if PASSES & (1 << PASS):
                    if PASSES & ((1 << PASS) - 1):  # an earlier phase ran in this launch: wait until all of it did
                        ok = ok & grid_barrier(barrier, (nb + 1) * G)
                        nb += 1
                    n_items = n_work
                    if PASS <= P_ROWCOL:
                        n_items = n_fact  # FOLD / ROWCOL: the factored tensors' items (they come first)
                    for item in range(pid, n_items, G):
                        _tile(item, ptrs, meta, work, tsc, part0, part1, rcpart, counters, lr_ptr, scale_ptr,
                              lr, eps, eps_scale, clip, decay_rate, beta1, wd, PASS, FLAGS, P_DT, G_DT, S_DT,
                              LR_TENSOR, HAS_SCALE, TB, SUB, ITERS, RB, PB)
            if nb > 0:
                grid_barrier_exit(barrier, (nb + 1) * G, ok)


@dataclass
class _Tables(Tables):
    meta: torch.Tensor
    work: torch.Tensor
    n_factored_work: int
    tsc: torch.Tensor
    part: torch.Tensor      # [2, W]: part0, part1
    rcpart: torch.Tensor
    counters: torch.Tensor
    barrier: sync.GridBarrier  # the persistent launch's grid barrier and its failure report
    fdummy: torch.Tensor
    stats: torch.Tensor = None  # the csrc engine's whole fp32 output buffer (fixed address), once it has run
    stats_view: torch.Tensor = None  # its row / column means part (meta columns 12, 13 index it)
    csrc_geo: tuple = None  # (factored tensor indices, their csrc geometry)


def _cdiv(a, b):
    return -(-a // b)


def _build_tables(key, ps, gs, sts, dims, device) -> _Tables:
    entries = []  # (factored first) per tensor: its table rows and work items
    rc_size, n_t = 0, len(ps)
    cnt_size = n_t
    for t, (p, g, st, d) in enumerate(zip(ps, gs, sts, dims)):
        n = p.numel()
        shape = p.shape
        if d is not None:
            da, db = d
            A, B = shape[da], shape[db]
            pre, post = math.prod(shape[:da]), math.prod(shape[db + 1:])
            planes, nab, nbb = pre * post, _cdiv(A, TA), _cdiv(B, TB)
            s3, s4 = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
            offs = (rc_size, rc_size + nbb * planes * A, cnt_size)
            rc_size += nbb * planes * A + nab * planes * B
            cnt_size += planes * (nab + nbb)
        else:  # rows of TB elements, one plane
            A, B, post, planes = max(1, _cdiv(n, TB)), TB, 1, 1
            nab, nbb = _cdiv(A, TA), 1
            s3, s4 = st["exp_avg_sq"], p
            offs = (0, 0, 0)
        m = st["exp_avg"] if "exp_avg" in st else p
        row = [p.data_ptr(), g.data_ptr(), m.data_ptr(), s3.data_ptr(), s4.data_ptr(), st["step"].data_ptr(),
               st["RMS"].data_ptr(), 0]
        items = [(t, pl, a, b) for pl in range(planes) for a in range(nab) for b in range(nbb)]
        entries.append((d is None, t, row, [n, int(d is not None), A, B, post, planes, nab, nbb, *offs], items))
    rows, meta, work = [None] * n_t, [None] * n_t, []
    n_fact = 0
    for unfactored, t, row, mrow, items in sorted(entries, key=lambda e: (e[0], e[1])):
        rows[t], meta[t] = row, mrow + [len(work), 0, 0]  # csrc offsets: filled on its first run
        work.extend(items)
        n_fact += 0 if unfactored else len(items)

    def dev(x, dtype):
        return torch.tensor(x, dtype=dtype).to(device)

    return _Tables(key=key, gkey=tuple(g.data_ptr() for g in gs), ptrs=dev(rows, torch.int64), aligned=False, grad_col=1,
                   meta=dev(meta, torch.int64), work=dev(work, torch.int32), n_factored_work=n_fact,
                   tsc=torch.zeros(n_t, 4, dtype=torch.float32, device=device),
                   part=torch.zeros(2, len(work), dtype=torch.float32, device=device),
                   rcpart=torch.zeros(max(rc_size, 1), dtype=torch.float32, device=device),
                   counters=torch.zeros(cnt_size, dtype=torch.int32, device=device),
                   barrier=sync.GridBarrier(device),
                   fdummy=torch.zeros(1, dtype=torch.float32, device=device))


def kernel_constexprs(passes, flags, dts, *, lr_tensor=False, has_scale=False, has_inf=False) -> dict:
    """passes: a list of passes, run in one launch (see adafactor_kernel)."""
    return dict(PASSES=sum(1 << int(x) for x in passes), FLAGS=flags, P_DT=runtime.tl_dtype(dts[0]),
                G_DT=runtime.tl_dtype(dts[1]), S_DT=runtime.tl_dtype(dts[2]), LR_TENSOR=lr_tensor, HAS_SCALE=has_scale,
                HAS_INF=has_inf, TB=TB, SUB=SUB, ITERS=runtime.ITERS, RB=RB, PB=_PB)


def _flags(group) -> int:
    return mt.pack((RELATIVE, group["relative_step"]), (WARMUP, group["relative_step"] and group["warmup_init"]),
                   (SCALE_PARAM, group["scale_parameter"]), (BETA1, group["beta1"] is not None),
                   (WD, group["weight_decay"] != 0))


def _launches(cautious, has_factored, csrc_stats) -> list:
    """The Triton launches of one step, each a list of passes: the reduction (absent without factored tensors; the
    csrc engine's when csrc_stats, then launch 2 folds its means in first), then the persistent rest."""
    rest = [NORMS] + ([MOMENTS, CAUTIOUS_APPLY] if cautious else [APPLY])
    if not has_factored:
        return [rest]
    return [[FOLD] + rest] if csrc_stats else [[ROWCOL], rest]


def _csrc_geometry(p, d):
    # csrc's (B, R, C, S) for factoring dims (da, db = da + 1): its row means are [pre, A, post], the row state's
    # layout, and its column means [pre, B, post], the column state's
    da, db = d
    s = p.shape
    return math.prod(s[:da]), s[da], s[db], math.prod(s[db + 1:])


def _csrc_factored_stats(tab, gs, dims, eps, grad_scale):
    """Launch 1 on the csrc engine: the row / column means of (g / grad_scale)^2 + eps of every factored tensor of
    the bucket, into tab.stats (allocated by the first run, whose plan also gives the offsets meta[:, 12:14])."""
    from .. import csrc

    if tab.csrc_geo is None:  # fixed with the tables' key (shapes, factored dims)
        fidx = [t for t, d in enumerate(dims) if d is not None]
        tab.csrc_geo = fidx, [_csrc_geometry(gs[t], dims[t]) for t in fidx]
    fidx, geo = tab.csrc_geo
    fgs = [gs[t] for t in fidx]
    _, out_stats, _, plan = csrc.launch(csrc.KIND_FACTORED, csrc.engine_backend(fgs[0].device), fgs, None, geo, eps,
                                      scale=grad_scale, out=tab.stats,
                                      plan_key=(tab.key, fgs[0].dtype))  # a bucket: one grad dtype
    if tab.stats is None:
        assert plan.K == 1
        size = (plan.n_entries + plan.n_stats + 1) * plan.K
        tab.stats = out_stats.as_strided((size,), (1,), 0)  # the whole buffer: out= keeps its address from now on
        tab.stats_view = out_stats.view(-1)
        offs = [[0, 0] for _ in gs]
        for k, t in enumerate(fidx):
            offs[t] = [plan.row_out[k], plan.col_out[k]]
        tab.meta[:, 12:14].copy_(torch.tensor(offs, dtype=torch.int64))
    return tab.stats_view


def aot_kernels():
    """Every launch of the dedicated kernel, for tools/aot.py: the Triton reduction (ROWCOL) and the persistent
    launches after it or after the csrc engine (FOLD first); relative step (default), and external lr with beta1,
    weight decay, with and without caution; fp32, bf16 (fp32 states) and fp16 with AMP arguments."""
    types = {"ptrs": "*i64", "meta": "*i64", "work": "*i32", "counters": "*i32", "barrier": "*i32",
             "n_fact": "i32", "n_work": "i32"}
    types.update({k: "fp64" for k in ("lr", "eps", "eps_scale", "clip", "decay_rate", "beta1", "wd")})
    cx_names = kernel_constexprs([], 0, (torch.float32,) * 3)
    sig = {a: "constexpr" if a in cx_names else types.get(a, "*fp32") for a in adafactor_kernel.arg_names}
    variants = [("relative", mt.pack((RELATIVE, True), (SCALE_PARAM, True)), (False,)),
                ("lr,betas,weight_decay", mt.pack((BETA1, True), (WD, True)), (False, True))]
    launches = []
    for label, flags, cautions in variants:
        for cautious in cautions:
            for csrc_stats in (False, True):
                for passes in _launches(cautious, True, csrc_stats):
                    if (flags, passes) not in [x[1:] for x in launches]:
                        launches.append((label + (",caution" if cautious else ""), flags, passes))
    dtypes = [((torch.float32,) * 3, False), ((torch.bfloat16, torch.bfloat16, torch.float32), False),
              ((torch.float16, torch.float16, torch.float32), True)]
    names = {ROWCOL: "rowcol", NORMS: "norms", APPLY: "apply", MOMENTS: "moments", CAUTIOUS_APPLY: "cautious",
             FOLD: "fold"}
    return [dict(name=f"Adafactor[{label},{'+'.join(names[x] for x in passes)}] "
                      f"{str(dts[0]).replace('torch.', '')}{' amp' if amp else ''}",
                 fn=adafactor_kernel, signature=sig,
                 constexprs=kernel_constexprs(passes, flags, dts, has_scale=amp, has_inf=amp),
                 options=runtime.compile_options())
            for label, flags, passes in launches for dts, amp in dtypes]


@register
class Adafactor(FusedOptimizer):
    """timm's Adafactor (same signature, defaults, state and group keys; `betas` is stored as group['beta1']).

    State: step (a Python int; a float32 0-d device tensor once the fused path has run), RMS (0-d), exp_avg with
    betas, exp_avg_sq_row / exp_avg_sq_col for factored params or exp_avg_sq, in fp32 for fp16/bf16 params."""

    supports_complex = False
    scalar_keys = ("step", "RMS")
    elementwise = False  # row/column means and update RMS over whole tensors
    precision_in_kernel = False  # its own kernels: master_weights / stochastic_rounding use the reference path
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

    @classmethod
    def _has_kernel(cls) -> bool:
        return True

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
        dtype = torch.float32 if p.dtype in _LOW else p.dtype
        st = {"step": 0}
        if group["beta1"] is not None:
            st["exp_avg"] = torch.zeros_like(p, dtype=dtype)
        dims = factored_dims(p.shape, group["min_dim_size_to_factor"])
        if dims is not None:
            da, db = dims
            st["exp_avg_sq_row"] = torch.zeros(p.shape[:db] + p.shape[db + 1:], dtype=dtype, device=p.device)
            st["exp_avg_sq_col"] = torch.zeros(p.shape[:da] + p.shape[da + 1:], dtype=dtype, device=p.device)
        else:
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        st["RMS"] = 0
        return st

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # moments stay fp32 for fp16/bf16 params, as timm keeps them
        restore_state_dtypes(self, state_dict, lambda group, p: {
            k: torch.float32 for k in _MOMENTS} if p.dtype in _LOW else {})

    def _reference(self, group, params, grads, states):
        adafactor_reference(group, params, grads, states)

    def _kernel_step(self, group, params, grads, states, grad_scale, found_inf, variant=None):
        dev = params[0].device
        scalars_on_device(states, self.scalar_keys, dev)
        index = device_index(dev)
        buckets: dict = {}
        for i, (p, g, st) in enumerate(zip(params, grads, states)):
            sdt = torch.float32 if g.dtype in _LOW else g.dtype  # the moments' dtype: fp32 for bf16 / fp16 grads
            for k in _MOMENTS:
                v = st.get(k)
                if v is not None and (v.dtype != sdt or v.get_device() != index or not v.is_contiguous()):
                    st[k] = v.to(device=dev, dtype=sdt).contiguous()
            buckets.setdefault((p.dtype, g.dtype, sdt), []).append(i)
        self._require_contiguous(params, grads)
        dims = [factored_dims(p.shape, group["min_dim_size_to_factor"]) for p in params]
        flags = _flags(group)
        lr = group["lr"]
        lr_tensor = lr if isinstance(lr, torch.Tensor) and not group["relative_step"] else None
        host_lr = 0.0 if group["relative_step"] or lr_tensor is not None else scalar(lr)  # a tensor lr: read on device
        hypers = (host_lr, group["eps"], group["eps_scale"], group["clip_threshold"], group["decay_rate"],
                  0.0 if group["beta1"] is None else group["beta1"], group["weight_decay"])
        cautious = group["caution"] and group["beta1"] is not None
        cache = self._kernel_caches.setdefault(id(group), TableCache())
        last_lr = None
        for dts, idx in buckets.items():
            ps, gs, sts, ds = ([x[i] for i in idx] for x in (params, grads, states, dims))
            # every address and size the tables hold: a replaced param or state rebuilds them
            ptr = torch.Tensor.data_ptr
            key = (tuple(map(ptr, ps)), tuple(map(torch.Tensor.size, ps)), tuple(ds),
                   tuple(v.data_ptr() for st in sts for v in st.values() if isinstance(v, torch.Tensor)))
            tab = cache.lookup(dts, key, gs, lambda: _build_tables(key, ps, gs, sts, ds, dev))
            has_factored = tab.n_factored_work > 0
            # launch 1 on the C++ engine where it is built (fp32 / bf16 / fp16 grads), else Triton's ROWCOL pass
            csrc_stats = has_factored and dts[1] in _CSRC_DTYPES and reduce.use_csrc(dev)
            stats = _csrc_factored_stats(tab, gs, ds, group["eps"], grad_scale) if csrc_stats else tab.rcpart
            args = (tab.ptrs, tab.meta, tab.work, tab.tsc, tab.part[0], tab.part[1], stats, tab.counters,
                    tab.barrier.words, lr_tensor if lr_tensor is not None else tab.fdummy,
                    grad_scale if grad_scale is not None else tab.fdummy,
                    found_inf if found_inf is not None else tab.fdummy, tab.n_factored_work, tab.work.shape[0],
                    *hypers)
            for passes in _launches(cautious, has_factored, csrc_stats):
                runtime.launch_phases(
                    adafactor_kernel, passes, *args, device=dev,
                    grid_of=lambda x: tab.n_factored_work if x in (ROWCOL, FOLD) else tab.work.shape[0],
                    constexprs_of=lambda run: kernel_constexprs(run, flags, dts, lr_tensor=lr_tensor is not None,
                                                                has_scale=grad_scale is not None,
                                                                has_inf=found_inf is not None))
                if len(passes) > 1:
                    tab.barrier.watch("Adafactor")
            if idx[-1] == len(params) - 1:
                last_lr = tab.tsc[len(idx) - 1, 2]
        if group["relative_step"] and last_lr is not None:
            group["lr"] = last_lr  # timm leaves the last param's step size here; a device view, no sync
