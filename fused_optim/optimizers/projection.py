"""SGDP and AdamP (anchors: timm.optim.SGDP / AdamP; paper: arXiv 2006.08217), with timm's cautious variant.

Both are SGD / Adam whose step direction loses its radial component when a weight looks scale invariant: if the
gradient is nearly orthogonal to the weight, per output channel (every row's |cos| < delta / sqrt(row length)) or
else for the whole layer (|cos| < delta / sqrt(numel)), the direction d becomes d - p_n <p_n, d> (p_n: the row's or
layer's unit weight) and weight decay is scaled by wd_ratio. Only tensors of 2+ dims are candidates.

Fused path: timm decides with ``cosine_sim.max() < ...`` (a host sync per tensor). Here the decision, the norms and
the dot products stay on the device: 2 launches per group and dtype combination ("reduce, then apply"), with or
without ``caution``, whatever the number of tensors. The dedicated Triton kernel's passes:

* pass 0 (stats): per row, <p,g>, |g|^2, |p|^2 and <p,d> (d recomputed from the states, nothing stored); the last
  program of each tensor (atomic counter) decides the projection mode and writes per-row radial coefficients.
  Where the C++ engine is built (fused_optim.csrc.projection_stats, KIND_PROJ: the same statistics and decision,
  into the same buffers), it runs instead of this pass;
* pass 1 (caution only): per row, the count of the cautious mask and <p, masked d>; the last program writes the
  mask scale and the per-row re-projection coefficients;
* pass 2 (apply): the element-wise update, reading those per-row coefficients.

  launch 1  the C++ engine's projection statistics, or pass 0 (one program per work item); none when the bucket
            has no tensor of 2+ dims
  launch 2  pass 2, one program per work item; with caution ONE persistent launch running pass 1, a grid-wide
            barrier (sync.grid_barrier), then pass 2: G = min(SM count, work items) programs (all resident, so the
            barrier cannot deadlock; 1 under the interpreter), each looping over items pid, pid + G, ... Pass 2
            loads what pass 1 wrote (rowcaut, tscale) with .cg; each pass's last program per tensor resets its
            counter before the barrier. A barrier that gives up (sync.GRID_SPIN_LIMIT) sets the table's sticky flag,
            reported without a host sync by sync.GridBarrier.watch.

The generic multi-tensor kernel has per-tensor coefficients only, so the passes use their own (tensor, row-block)
work list and tables (cached in multi_tensor's GroupCache, rebuilt only when an address or shape changes; new grads
only re-upload their column), multi_tensor's bf16 rounding and compile options, and Adam's jit math (adam.py).
No pass syncs with the host. Elements are read scalar-wide (rows have arbitrary length): a row-aligned vectorized
path is possible future work.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.optim.optimizer import required

from .._base import FusedOptimizer, check, check_betas, check_nonneg, scalar, scalars_on_device
from .._registry import register
from ..kernels import multi_tensor as mt
from ..kernels import runtime, access, sync
from ..kernels.tables import Tables, TableCache
from ..kernels import reduce
from .adam import timm_moments_

_ENGINE_DTYPES = {torch.float32, torch.bfloat16, torch.float16}  # what the C++ engine reads

NONE, CHANNEL, LAYER = 0, 1, 2  # projection modes (as stored in the kernel's per-tensor table)


# ---- reference math -----------------------------------------------------------------------------------------
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


# ---- Triton kernel --------------------------------------------------------------------------------------------
if runtime.available():
    import triton
    import triton.language as tl

    from .adam import _adam_scalars, adam_moments

    NESTEROV, CAUTION, DECAY = mt.flag_bits(3)
    grid_barrier, grid_barrier_exit = sync.grid_barrier, sync.grid_barrier_exit  # a kernel calls only its globals

    @triton.jit
    def _sgdp_coefs(step, lr, eps, momentum, dampening):
        # (new step, -step size, sqrt of Adam's bias correction 2): SGDP has no step counter
        return step, -lr, 1.0

    @triton.jit
    def _adamp_coefs(step, lr, eps, beta1, beta2):
        step, t1, t2, t3, neg_step, bc2_sqrt, c2, c3 = _adam_scalars(step, 0.0, 0.0, 0.0, lr, beta1, beta2, eps,
                                                                     0.0, 0.0, 0.0, 0.0, 0)
        return step, neg_step, bc2_sqrt

    @triton.jit
    def _sgdp_direction(g, buf, s1, bc2_sqrt, eps, momentum, dampening, FLAGS: tl.constexpr):
        buf = buf * momentum.to(tl.float32) + (1.0 - dampening).to(tl.float32) * g
        d = buf
        if FLAGS & NESTEROV:
            d = g + momentum.to(tl.float32) * buf
        return d, buf, s1

    @triton.jit
    def _adamp_direction(g, m, v, bc2_sqrt, eps, beta1, beta2, FLAGS: tl.constexpr):
        m, v = adam_moments(g, m, v, beta1, beta2)
        denom = tl.sqrt(v) / bc2_sqrt + eps.to(tl.float32)
        num = m
        if FLAGS & NESTEROV:
            num = beta1.to(tl.float32) * m + (1.0 - beta1).to(tl.float32) * g
        return num / denom, m, v

    # Under TRITON_INTERPRET every call of a jit helper costs milliseconds (the interpreter re-patches the language
    # per call), so the per-tile work is two helpers (_tile, _put) and the row-table reads are inline.
    @triton.jit
    def _tile(p_ptr, g_ptr, s0_ptr, s1_ptr, offs, mask, inv_scale, bc2_sqrt, eps, h1, h2,
              DIRECTION: tl.constexpr, FLAGS: tl.constexpr, NS: tl.constexpr, HAS_SCALE: tl.constexpr):
        """Load a tile (fp32 math) and compute the new states and the unprojected direction d."""
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * inv_scale
        s0 = tl.load(s0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.zeros_like(p)
        if NS > 1:
            s1 = tl.load(s1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d, s0, s1 = DIRECTION(g, s0, s1, bc2_sqrt, eps, h1, h2, FLAGS)
        return p, g, d, s0, s1

    @triton.jit
    def _put(ptr, offs, val, mask, DT: tl.constexpr):
        if DT == tl.bfloat16:
            tl.store(ptr + offs, access.cast_for(ptr, val), mask=mask)  # round to nearest even, as on the GPU
        else:
            tl.store(ptr + offs, val.to(DT), mask=mask)

    @triton.jit
    def _finish_stats(rowstat, rowcoef, tmode, t, n, R, C, row0, proj, eps, delta, FB: tl.constexpr):
        """Last program of tensor t in pass 0: decide the mode, write per-row a = <p,d>/(|p|+eps)^2 and
        c = <p,g>/(|p|+eps)^2 (channel: the row's, layer: the tensor's, none: 0). Rows written by other programs
        of this launch are read through L2 (.cg), never a possibly stale L1."""
        zero = tl.cast(0.0, tl.float64)
        maxcos, spg, sgg, spp, spd = zero, zero, zero, zero, zero
        for r0 in range(0, R, FB):
            rr = row0 + r0 + tl.arange(0, FB)
            m = rr < row0 + R
            pg = tl.load(rowstat + rr * 4 + 0, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64)
            gg = tl.load(rowstat + rr * 4 + 1, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64)
            pp = tl.load(rowstat + rr * 4 + 2, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64)
            pd = tl.load(rowstat + rr * 4 + 3, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64)
            cos = tl.abs(pg) / (tl.maximum(tl.sqrt(gg), eps) * tl.maximum(tl.sqrt(pp), eps))
            maxcos = tl.maximum(maxcos, tl.max(cos, axis=0))
            spg += tl.sum(pg, axis=0)
            sgg += tl.sum(gg, axis=0)
            spp += tl.sum(pp, axis=0)
            spd += tl.sum(pd, axis=0)
        layer_cos = tl.abs(spg) / (tl.maximum(tl.sqrt(sgg), eps) * tl.maximum(tl.sqrt(spp), eps))
        channel_thr = delta / tl.sqrt(C.to(tl.float64))
        channel = (proj != 0) & (maxcos < channel_thr)
        layer = (proj != 0) & (maxcos >= channel_thr) & (layer_cos < delta / tl.sqrt(tl.maximum(n, 1).to(tl.float64)))
        ln = tl.sqrt(spp) + eps  # timm's unit weight is p / (|p| + eps)
        for r0 in range(0, R, FB):
            rr = row0 + r0 + tl.arange(0, FB)
            m = rr < row0 + R
            rn = tl.sqrt(tl.load(rowstat + rr * 4 + 2, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64)) + eps
            pg = tl.load(rowstat + rr * 4 + 0, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64)
            pd = tl.load(rowstat + rr * 4 + 3, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64)
            a = tl.where(channel, pd / (rn * rn), tl.where(layer, spd / (ln * ln), 0.0))
            c = tl.where(channel, pg / (rn * rn), tl.where(layer, spg / (ln * ln), 0.0))
            tl.store(rowcoef + rr * 2 + 0, a.to(tl.float32), mask=m)
            tl.store(rowcoef + rr * 2 + 1, c.to(tl.float32), mask=m)
        mode = tl.where(channel, 1.0, tl.where(layer, 2.0, 0.0))
        tl.store(tmode + t, mode.to(tl.float32))

    @triton.jit
    def _finish_caution(rowstat, rowcaut, tmode, tscale, t, n, R, row0, eps, FB: tl.constexpr):
        """Last program of tensor t in pass 1: mask scale s = 1 / max(kept fraction, 1e-3) and per-row
        b = s <p, masked d'> / (|p|+eps)^2 (the second projection; 0 when not projected)."""
        zero = tl.cast(0.0, tl.float64)
        cnt, spp, spm = zero, zero, zero
        for r0 in range(0, R, FB):
            rr = row0 + r0 + tl.arange(0, FB)
            m = rr < row0 + R
            spp += tl.sum(tl.load(rowstat + rr * 4 + 2, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64), axis=0)
            cnt += tl.sum(tl.load(rowcaut + rr * 3 + 0, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64), axis=0)
            spm += tl.sum(tl.load(rowcaut + rr * 3 + 1, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64), axis=0)
        s = 1.0 / tl.maximum(cnt / tl.maximum(n, 1).to(tl.float64), 1e-3)
        mode = tl.load(tmode + t, cache_modifier=".cg")
        ln = tl.sqrt(spp) + eps
        for r0 in range(0, R, FB):
            rr = row0 + r0 + tl.arange(0, FB)
            m = rr < row0 + R
            rn = tl.sqrt(tl.load(rowstat + rr * 4 + 2, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64)) + eps
            pm = tl.load(rowcaut + rr * 3 + 1, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64)
            b = tl.where(mode == 1.0, s * pm / (rn * rn), tl.where(mode == 2.0, s * spm / (ln * ln), 0.0))
            tl.store(rowcaut + rr * 3 + 2, b.to(tl.float32), mask=m)
        tl.store(tscale + t, s.to(tl.float32))

    @triton.jit
    def _item(
        item, ptrs, info, work, sptrs, counters, rowstat, rowcoef, rowcaut, tmode, tscale, scale_ptr, lr, eps, delta,
        wd_ratio, wd, h1, h2,
        DIRECTION: tl.constexpr, COEFS: tl.constexpr, FLAGS: tl.constexpr, PASS: tl.constexpr, NS: tl.constexpr,
        HAS_STEP: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
        HAS_SCALE: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr, FB: tl.constexpr,
    ):
        """One pass over work item `item` = one block of RB rows of one tensor (1-D tensors: rows of BC elements),
        looping over the row in BC-wide tiles. info[t] = (numel, rows, row length, first row in the row buffers,
        projectable).

        The per-row / per-tensor coefficients (rowcaut, tscale) pass 2 reads may have been written by another
        program of the same launch in pass 1 (persistent launch): every such load uses .cg (L2, never a stale L1).
        Pass 1 writes no element-wise data, so the element loads need no care."""
        t = tl.load(work + 2 * item).to(tl.int64)
        blk = tl.load(work + 2 * item + 1).to(tl.int64)
        n = tl.load(info + 5 * t)
        R = tl.load(info + 5 * t + 1)
        C = tl.load(info + 5 * t + 2)
        row0 = tl.load(info + 5 * t + 3)
        proj = tl.load(info + 5 * t + 4)
        row = ptrs + t * (2 + NS)
        p_ptr = tl.load(row).to(tl.pointer_type(P_DT))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DT))
        s0_ptr = tl.load(row + 2).to(tl.pointer_type(S_DT))
        s1_ptr = s0_ptr
        if NS > 1:
            s1_ptr = tl.load(row + 3).to(tl.pointer_type(S_DT))
        step = tl.cast(0.0, tl.float64)
        if HAS_STEP:  # every pass reads the old step; the apply pass's last program writes the new one
            step = tl.load(tl.load(sptrs + t).to(tl.pointer_type(tl.float32))).to(tl.float64)
        step_new, neg_step, bc2_sqrt = COEFS(step, lr, eps, h1, h2)
        bc2_sqrt = tl.cast(bc2_sqrt, tl.float32)
        inv_scale = 1.0
        if HAS_SCALE:
            inv_scale = 1.0 / tl.load(scale_ptr).to(tl.float32)

        rows = blk * RB + tl.arange(0, RB)
        rmask = rows < R
        cols0 = tl.arange(0, BC)
        acc0 = tl.zeros([RB], tl.float32)
        acc1 = tl.zeros([RB], tl.float32)
        acc2 = tl.zeros([RB], tl.float32)
        acc3 = tl.zeros([RB], tl.float32)
        a = tl.zeros([RB], tl.float32)
        c = tl.zeros([RB], tl.float32)
        b = tl.zeros([RB], tl.float32)
        if PASS > 0:
            a = tl.load(rowcoef + (row0 + rows) * 2 + 0, mask=rmask, other=0.0, cache_modifier=".cg")
            if FLAGS & CAUTION:
                c = tl.load(rowcoef + (row0 + rows) * 2 + 1, mask=rmask, other=0.0, cache_modifier=".cg")
        s = 1.0
        decay = 1.0
        if PASS == 2:
            mode = tl.load(tmode + t, cache_modifier=".cg")
            if FLAGS & CAUTION:  # written by pass 1, maybe by another program of this launch
                b = tl.load(rowcaut + (row0 + rows) * 3 + 2, mask=rmask, other=0.0, cache_modifier=".cg")
                s = tl.load(tscale + t, cache_modifier=".cg")
            if FLAGS & DECAY:
                decay = (1.0 - lr * wd * tl.where(mode != 0.0, wd_ratio, 1.0)).to(tl.float32)
        for c0 in range(0, C, BC):
            cols = c0 + cols0
            offs = rows[:, None] * C + cols[None, :]
            mask = rmask[:, None] & (cols < C)[None, :] & (offs < n)
            p, g, d, s0, s1 = _tile(p_ptr, g_ptr, s0_ptr, s1_ptr, offs, mask, inv_scale, bc2_sqrt, eps, h1, h2,
                                    DIRECTION, FLAGS, NS, HAS_SCALE)
            if PASS == 0:
                acc0 += tl.sum(p * g, axis=1)
                acc1 += tl.sum(g * g, axis=1)
                acc2 += tl.sum(p * p, axis=1)
                acc3 += tl.sum(p * d, axis=1)
            else:
                d = d - a[:, None] * p
                keep = mask
                if FLAGS & CAUTION:
                    keep = mask & (d * (g - c[:, None] * p) > 0.0)
                if PASS == 1:
                    acc0 += tl.sum(keep.to(tl.float32), axis=1)
                    acc1 += tl.sum(tl.where(keep, p * d, 0.0), axis=1)
                else:
                    if FLAGS & CAUTION:
                        d = tl.where(keep, d * s, 0.0) - b[:, None] * p
                    p = p * decay + neg_step.to(tl.float32) * d
                    _put(p_ptr, offs, p, mask, P_DT)
                    _put(s0_ptr, offs, s0, mask, S_DT)
                    if NS > 1:
                        _put(s1_ptr, offs, s1, mask, S_DT)
                    if HAS_SCALE:
                        _put(g_ptr, offs, g, mask, G_DT)  # p.grad ends unscaled, like the generic kernel

        if PASS == 0:
            tl.store(rowstat + (row0 + rows) * 4 + 0, acc0, mask=rmask)
            tl.store(rowstat + (row0 + rows) * 4 + 1, acc1, mask=rmask)
            tl.store(rowstat + (row0 + rows) * 4 + 2, acc2, mask=rmask)
            tl.store(rowstat + (row0 + rows) * 4 + 3, acc3, mask=rmask)
        if PASS == 1:
            tl.store(rowcaut + (row0 + rows) * 3 + 0, acc0, mask=rmask)
            tl.store(rowcaut + (row0 + rows) * 3 + 1, acc1, mask=rmask)
        if PASS < 2 or HAS_STEP:
            # the last program of tensor t finishes it (every other program has stored its rows / read step) and
            # resets the counter, before the grid barrier lets the next pass of a persistent launch use it
            nprog = tl.maximum(tl.cdiv(R, RB), 1)
            tl.debug_barrier()  # all threads' row stores precede the (release) atomic below
            done = tl.atomic_add(counters + t, 1, sem="acq_rel", scope="gpu")
            if done == nprog - 1:
                if PASS == 0:
                    _finish_stats(rowstat, rowcoef, tmode, t, n, R, C, row0, proj, eps, delta, FB)
                if PASS == 1:
                    _finish_caution(rowstat, rowcaut, tmode, tscale, t, n, R, row0, eps, FB)
                if PASS == 2:
                    tl.store(tl.load(sptrs + t).to(tl.pointer_type(tl.float32)), tl.cast(step_new, tl.float32))
                tl.store(counters + t, 0)

    @triton.jit
    def projection_kernel(
        ptrs, info, work, sptrs, counters, rowstat, rowcoef, rowcaut, tmode, tscale, barrier, scale_ptr, inf_ptr,
        n_items,
        lr: tl.float64, eps: tl.float64, delta: tl.float64, wd_ratio: tl.float64, wd: tl.float64,
        h1: tl.float64, h2: tl.float64,
        DIRECTION: tl.constexpr, COEFS: tl.constexpr, FLAGS: tl.constexpr, PASSES: tl.constexpr,
        NS: tl.constexpr, HAS_STEP: tl.constexpr,
        P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr, FB: tl.constexpr,
    ):
        """The passes in PASSES (bits, run in order 0, 1, 2), each over the n_items work items with item = pid,
        pid + G, ... and a grid barrier between consecutive passes. One pass with one program per item is a plain
        launch; several need a persistent grid of G <= SM count programs (all resident: the barrier cannot
        deadlock)."""
        pid = tl.program_id(0)
        G = tl.num_programs(0)
        skip = 0
        if HAS_INF:
            skip = tl.load(inf_ptr) != 0  # AMP overflow: touch nothing, advance nothing
        if skip == 0:
            lr = tl.cast(lr, tl.float64)  # plain Python floats under the interpreter
            eps = tl.cast(eps, tl.float64)
            delta = tl.cast(delta, tl.float64)
            wd_ratio = tl.cast(wd_ratio, tl.float64)
            wd = tl.cast(wd, tl.float64)
            h1 = tl.cast(h1, tl.float64)
            h2 = tl.cast(h2, tl.float64)
            nb = 0  # barriers passed (compile-time)
            ok = 1
            for PASS in tl.static_range(3):
                if PASSES & (1 << PASS):
                    if PASSES & ((1 << PASS) - 1):  # an earlier pass ran in this launch: wait until all of it did
                        ok = ok & grid_barrier(barrier, (nb + 1) * G)
                        nb += 1
                    for item in range(pid, n_items, G):
                        _item(item, ptrs, info, work, sptrs, counters, rowstat, rowcoef, rowcaut, tmode, tscale,
                              scale_ptr, lr, eps, delta, wd_ratio, wd, h1, h2, DIRECTION, COEFS, FLAGS, PASS, NS,
                              HAS_STEP, P_DT, G_DT, S_DT, HAS_SCALE, RB, BC, FB)
            if nb > 0:
                grid_barrier_exit(barrier, (nb + 1) * G, ok)


@dataclass
class _Tables(Tables):
    info: torch.Tensor
    work: torch.Tensor
    sptrs: torch.Tensor
    counters: torch.Tensor
    rowstat: torch.Tensor   # [rows, 4] <p,g>, |g|^2, |p|^2, <p,d>   (pass 0 or the C++ engine)
    rowcoef: torch.Tensor   # [rows, 2] a, c: the radial coefficients of d and g (pass 0's last program / the engine)
    rowcaut: torch.Tensor   # [rows, 3] caution: mask count, <p, masked d>, b (pass 1)
    tmode: torch.Tensor     # [T] NONE / CHANNEL / LAYER (pass 0's last program / the engine)
    tscale: torch.Tensor    # [T] caution mask scale (pass 1)
    n_proj: int             # tensors 0 .. n_proj-1 are the projectable ones (their rows come first)
    tstat: torch.Tensor     # the engine's per-tensor totals [n_proj, 4] and global sums [4] (unused here)
    gstat: torch.Tensor
    barrier: sync.GridBarrier  # the persistent launch's grid barrier and its failure report
    fdummy: torch.Tensor
    rb: int
    bc: int
    order: tuple = ()  # the group's param index of each tensor t (projectable first)
    engine: dict = None  # the C++ engine launch's cached inputs (_engine_stats)
    dts: tuple = ()      # the bucket's (param, grad, state) dtypes


def _tile_shape(shapes) -> tuple[int, int]:
    """(RB, BC): BC covers the longest projected row (capped, longer rows loop), RB rows fill runtime.BLOCK lanes."""
    longest = max((math.prod(s) // s[0] for s in shapes if len(s) > 1 and math.prod(s) > 0), default=1)
    bc = min(triton.next_power_of_2(longest), max(runtime.BLOCK // 8, 16))
    return max(runtime.BLOCK // bc, 1), bc


def _projectable(p) -> bool:
    return p.dim() > 1 and p.numel() > 0


def _build_tables(key, params, grads, states, steps, device) -> _Tables:
    """params: projectable ones first (then the rows of tensor t < n_proj are the C++ engine's rows)."""
    rb, bc = _tile_shape([tuple(p.shape) for p in params])
    n_proj = sum(map(_projectable, params))
    assert all(map(_projectable, params[:n_proj]))
    rows, info, work, row_base = [], [], [], 0
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        n = p.numel()
        proj = _projectable(p)
        # projected tensors: one row per output channel; the others only need whole-tensor sums: rows of BC
        r, c = (p.shape[0], n // p.shape[0]) if proj else (max(-(-n // bc), 1), bc)
        rows.append([p.data_ptr(), g.data_ptr(), *[s.data_ptr() for s in st]])
        info.append([n, r, c, row_base, int(proj)])
        work.extend((i, b) for b in range(max(-(-r // rb), 1)))
        row_base += r

    def dev(x, dtype):
        return torch.tensor(x, dtype=dtype).to(device)

    return _Tables(key=key, gkey=tuple(g.data_ptr() for g in grads), ptrs=dev(rows, torch.int64), aligned=False,
                   grad_col=1,
                   info=dev(info, torch.int64), work=dev(work, torch.int32),
                   sptrs=dev([s.data_ptr() for s in steps] if steps else [0] * len(params), torch.int64),
                   counters=torch.zeros(len(params), dtype=torch.int32, device=device),
                   rowstat=torch.zeros(max(row_base, 1), 4, device=device),
                   rowcoef=torch.zeros(max(row_base, 1), 2, device=device),
                   rowcaut=torch.zeros(max(row_base, 1), 3, device=device),
                   tmode=torch.zeros(len(params), device=device), tscale=torch.zeros(len(params), device=device),
                   n_proj=n_proj, tstat=torch.zeros(n_proj * 4, device=device), gstat=torch.zeros(4, device=device),
                   barrier=sync.GridBarrier(device),
                   fdummy=torch.zeros(1, dtype=torch.float32, device=device), rb=rb, bc=bc)


@dataclass
class _Spec:
    """What differs between SGDP and AdamP in the kernel."""
    direction: object
    coefs: object
    flags: int
    hypers: tuple  # lr, eps, delta, wd_ratio, wd (already divided by 1 - momentum for SGDP), h1, h2
    state_keys: tuple
    has_step: bool


def _launches(cautious: bool, stats: bool) -> list:
    """The passes of each Triton launch of one step: pass 0 (stats) unless the C++ engine made them (or nothing is
    projectable), then the apply (caution: the caution stats and the apply in one persistent launch)."""
    return ([[0]] if stats else []) + [[1, 2] if cautious else [2]]


def _engine_stats(spec: _Spec, tab: _Tables, ps, gs, sts, steps, grad_scale) -> None:
    """Launch 1 on the C++ engine (instead of pass 0): the projectable tensors' row statistics, their projection
    decision and per-row coefficients, into the tables' buffers (pass 0's layout). Calls csrc.launch directly with
    what the tables cache: fused_optim.csrc.projection_stats is the same launch behind per-call input checks."""
    from .. import csrc

    n = tab.n_proj
    if tab.engine is None:  # everything but the grads and the hyper-parameters: fixed with the tables' key
        rows = sum(p.shape[0] for p in ps[:n])
        tab.engine = dict(backend=csrc.engine_backend(ps[0].device), dims=csrc.projection_dims(ps[:n]),
                          b=ps[:n], cd=([st[0] for st in sts[:n]], [st[-1] for st in sts[:n]]),
                          steps=list(steps[:n]) if spec.has_step else None,
                          out=(tab.tstat, tab.rowstat[:rows].view(-1), tab.gstat))
    lr, eps, delta, wd_ratio, wd, h1, h2 = spec.hypers
    e = tab.engine
    proj = csrc.projection_args(spec.has_step, bool(spec.flags & int(NESTEROV.value)), h1, h2, (h1, h2), delta,
                                tab.rowcoef, tab.tmode)
    csrc.launch(csrc.KIND_PROJ, e["backend"], gs[:n], e["b"], e["dims"], eps, scale=grad_scale, out=e["out"],
              cd=e["cd"], steps=e["steps"], proj=proj, plan_key=(tab.key, tab.dts))


def kernel_constexprs(spec: _Spec, passes, dts, *, rb: int, bc: int, has_scale: bool, has_inf: bool) -> dict:
    """passes: the passes one launch runs, in order (see projection_kernel)."""
    return dict(DIRECTION=spec.direction, COEFS=spec.coefs, FLAGS=spec.flags, PASSES=sum(1 << p for p in passes),
                NS=len(spec.state_keys),
                HAS_STEP=spec.has_step, P_DT=runtime.tl_dtype(dts[0]), G_DT=runtime.tl_dtype(dts[1]),
                S_DT=runtime.tl_dtype(dts[2]), HAS_SCALE=has_scale, HAS_INF=has_inf, RB=rb, BC=bc, FB=256)


def _apply(spec: _Spec, cache: TableCache, params, grads, states, steps, grad_scale, found_inf,
           who: str = "SGDP/AdamP") -> None:
    buckets: dict = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.dtype, grads[i].dtype, states[i][0].dtype), []).append(i)
    cautious = bool(spec.flags & int(CAUTION.value))
    for dts, idx in buckets.items():
        flags = [_projectable(params[i]) for i in idx]
        if 0 < sum(flags) < len(idx):  # projectable first: their rows are the engine's rows
            idx = [i for i, f in zip(idx, flags) if f] + [i for i, f in zip(idx, flags) if not f]
        ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
        sts, scs = [states[i] for i in idx], [steps[i] for i in idx] if steps else []
        ptr = torch.Tensor.data_ptr  # every address and shape the tables hold
        key = (tuple(map(ptr, ps)), tuple(map(ptr, itertools.chain.from_iterable(sts))), tuple(map(ptr, scs)),
               tuple(map(torch.Tensor.size, ps)))
        tab = cache.lookup(dts, key, gs, lambda: _build_tables(key, ps, gs, sts, scs, ps[0].device))
        tab.order, tab.dts = tuple(idx), dts
        n_items = tab.work.shape[0]
        # launch 1 on the C++ engine where it is built (fp32 / bf16 / fp16 tensors), else Triton's pass 0
        engine = tab.n_proj > 0 and set(dts) <= _ENGINE_DTYPES and reduce.use_csrc(ps[0].device)
        if engine:
            _engine_stats(spec, tab, ps, gs, sts, scs, grad_scale)
        args = (tab.ptrs, tab.info, tab.work, tab.sptrs, tab.counters, tab.rowstat, tab.rowcoef, tab.rowcaut,
                tab.tmode, tab.tscale, tab.barrier.words, grad_scale if grad_scale is not None else tab.fdummy,
                found_inf if found_inf is not None else tab.fdummy, n_items, *(float(h) for h in spec.hypers))
        for passes in _launches(cautious, tab.n_proj > 0 and not engine):
            runtime.launch_phases(
                projection_kernel, passes, *args, grid_of=lambda _: n_items, device=ps[0].device,
                constexprs_of=lambda run: kernel_constexprs(spec, run, dts, rb=tab.rb, bc=tab.bc,
                                                            has_scale=grad_scale is not None,
                                                            has_inf=found_inf is not None))
            if len(passes) > 1:
                tab.barrier.watch(who)


# ---- the optimizers -------------------------------------------------------------------------------------------
class _Projected(FusedOptimizer):
    """What SGDP and AdamP share: validation, the per-tensor projection, and the fused path."""
    supports_complex = False
    elementwise = False  # per-row / per-tensor reductions: FSDP2 shards are refused by the base class
    precision_in_kernel = False  # master_weights / stochastic_rounding run on the reference path
    kernel_variants = ()  # no generic-kernel rule: the AOT inventory takes the dedicated kernel from aot_kernels()

    @classmethod
    def _has_kernel(cls) -> bool:
        return True

    def _validate(self, group):
        check_nonneg(lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"], delta=group["delta"],
                     wd_ratio=group["wd_ratio"])

    def _project(self, group, params, grads, perturbs):
        """Reference projection of every tensor's direction: (directions, weight-decay ratios)."""
        out = [project(p, g, d, delta=group["delta"], wd_ratio=group["wd_ratio"], eps=group["eps"],
                       caution=group["caution"])
               for p, g, d in zip(params, grads, perturbs)]
        return [o[0] for o in out], [o[1] for o in out]

    @staticmethod
    def _spec(group) -> _Spec:
        raise NotImplementedError

    def _kernel_step(self, group, params, grads, states, grad_scale, found_inf):
        spec = self._spec(group)
        if spec.has_step:
            scalars_on_device(states, ("step",), params[0].device)
        self._require_contiguous(params, grads)
        cache = self._kernel_caches.setdefault(id(group), TableCache())
        _apply(spec, cache, params, grads, [[st[k] for k in spec.state_keys] for st in states],
               [st["step"] for st in states] if spec.has_step else None, grad_scale, found_inf, type(self).__name__)


@register
class SGDP(_Projected):
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
        momentum, lr, wd = group["momentum"], scalar(group["lr"]), group["weight_decay"]
        bufs = [st["momentum"] for st in states]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
        if group["nesterov"]:  # g + momentum * buf, rounded like timm (no fused multiply-add)
            perturbs = torch._foreach_mul(bufs, momentum)
            torch._foreach_add_(perturbs, grads)
        else:
            perturbs = [b.clone() for b in bufs]
        perturbs, ratios = self._project(group, params, grads, perturbs)
        for p, d, ratio in zip(params, perturbs, ratios):
            if wd != 0:
                p.mul_(1 - lr * wd * ratio / (1 - momentum))
            p.add_(d, alpha=-lr)

    @staticmethod
    def _spec(group):
        momentum, wd = group["momentum"], group["weight_decay"]
        flags = mt.pack((NESTEROV, group["nesterov"]), (CAUTION, group["caution"]), (DECAY, wd != 0))
        return _Spec(_sgdp_direction, _sgdp_coefs, flags,
                     (scalar(group["lr"]), group["eps"], group["delta"], group["wd_ratio"],
                      wd / (1 - momentum) if wd != 0 else 0.0, momentum, group["dampening"]),
                     ("momentum",), False)


@register
class AdamP(_Projected):
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
        beta1, beta2 = group["betas"]
        lr, eps = scalar(group["lr"]), group["eps"]
        m, v, steps = timm_moments_(states, grads, grads, beta1, beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** s) for s in steps])
        torch._foreach_add_(denom, eps)
        if group["nesterov"]:  # beta1 * m + (1 - beta1) * g, rounded like timm
            num = torch._foreach_mul(m, beta1)
            torch._foreach_add_(num, torch._foreach_mul(grads, 1 - beta1))
        else:
            num = m
        perturbs, ratios = self._project(group, params, grads, torch._foreach_div(num, denom))
        for p, d, ratio, s in zip(params, perturbs, ratios, steps):
            if group["weight_decay"] > 0:
                p.mul_(1 - lr * group["weight_decay"] * ratio)
            p.add_(d, alpha=-lr / (1 - beta1 ** s))

    @staticmethod
    def _spec(group):
        beta1, beta2 = group["betas"]
        flags = mt.pack((NESTEROV, group["nesterov"]), (CAUTION, group["caution"]),
                        (DECAY, group["weight_decay"] > 0))
        return _Spec(_adamp_direction, _adamp_coefs, flags,
                     (scalar(group["lr"]), group["eps"], group["delta"], group["wd_ratio"], group["weight_decay"],
                      beta1, beta2), ("exp_avg", "exp_avg_sq"), True)


def aot_kernels() -> list:
    """The dedicated kernel's specializations for fused_optim.tools.aot: every launch of both optimizers (pass 0;
    pass 2, or with caution the persistent pass 1+2), options off and all on, fp32 (and bf16 / fp16 with AMP for
    all options on)."""
    if not runtime.available():
        return []
    ptr = {"ptrs": "*i64", "info": "*i64", "work": "*i32", "sptrs": "*i64", "counters": "*i32", "rowstat": "*fp32",
           "rowcoef": "*fp32", "rowcaut": "*fp32", "tmode": "*fp32", "tscale": "*fp32", "barrier": "*i32",
           "scale_ptr": "*fp32", "inf_ptr": "*fp32", "n_items": "i32"}
    sig = {a: ptr.get(a, "fp64" if a in ("lr", "eps", "delta", "wd_ratio", "wd", "h1", "h2") else "constexpr")
           for a in projection_kernel.arg_names}
    rb, bc = _tile_shape([(512, 4608)])
    out = []
    for cls, kw in ((SGDP, {"lr": 0.1}), (AdamP, {})):
        group0 = cls([torch.nn.Parameter(torch.ones(2))], fused=False, **kw).param_groups[0]
        every = {"nesterov": True, "caution": True, "weight_decay": 0.1, "momentum": 0.9}
        for options in ({}, {k: v for k, v in every.items() if k in group0}):
            group = {**group0, **options}
            spec = cls._spec(group)
            variants = [((torch.float32,) * 3, False)] + ([((torch.bfloat16,) * 3, True),
                                                           ((torch.float16,) * 3, True)] if options else [])
            for dts, amp in variants:
                for passes in _launches(group["caution"], True):
                    label = ",".join(f"{k}={v}" for k, v in options.items()) or "default"
                    out.append(dict(name=f"{cls.__name__}[{label}] pass {'+'.join(map(str, passes))} "
                                         f"{str(dts[0])[6:]}{' amp' * amp}",
                                    fn=projection_kernel, signature=sig, options=runtime.compile_options(),
                                    constexprs=kernel_constexprs(spec, passes, dts, rb=rb, bc=bc, has_scale=amp,
                                                                 has_inf=amp)))
    return out
