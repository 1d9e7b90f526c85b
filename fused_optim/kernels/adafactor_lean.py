"""Adafactor's element work with the precision and lean options (kernels/adafactor_passes.py runs it): the exact
fp32 master (master copy or param + remainder) read for the math and the param's RMS, the param written rounded to
nearest or stochastically, exp_avg and the unfactored exp_avg_sq loaded dequantized (bf16, int8) and stored
requantized. The load / store helpers are kernels/lean.py's and kernels/quant.py's.

int8 states keep one fp32 scale per 256 consecutive elements in storage order, which the passes' [SUB, TB] tiles of
a factored tensor do not follow. Loads dequantize element by element, so tiles read them; the passes that store the
states (APPLY, CAUTIOUS_APPLY) walk each work item's chunk of whole 256-element blocks in storage order instead
(``M_CHUNK``), reading the row and column moments and the plane's mean row moment (left by NORMS at
``X_RMEAN``) by each element's index."""
from __future__ import annotations

from . import runtime

if runtime.available():
    import triton
    import triton.language as tl

    from .access import chunk_ptr, load, store
    from .adafactor_tiles import (BETA1, K_ITERS, M_CHUNK, M_FACTORED, M_FIRST, WD, X_EXP_AVG,
                                  X_MASTER, X_PARAM, X_QMAP, X_RMEAN, X_SQ, SUB, TB, lerp, second_moment)
    from .lean import REMAINDER_K, load_master, store_master
    from .quant import load_slot, store_slot
    from .rules import SR_STATES_BIT

    K_FLAT = tl.constexpr(SUB * TB)  # a chunk step: whole 256-element blocks (checked by the host)

    @triton.jit
    def lean_ptrs(row, P_DT: tl.constexpr, E_DT: tl.constexpr, MASTER: tl.constexpr):
        """(param, master slot, exp_avg, exp_avg_sq (unfactored), the int8 code maps' column) of an address row; the
        element-wise states in E_DT (uint8: int8 codes)."""
        if MASTER == REMAINDER_K:
            m_ptr = chunk_ptr(row, X_MASTER, tl.int16, False)
        else:
            m_ptr = chunk_ptr(row, X_MASTER, tl.float32, False)
        return (chunk_ptr(row, X_PARAM, P_DT, False), m_ptr, chunk_ptr(row, X_EXP_AVG, E_DT, False),
                chunk_ptr(row, X_SQ, E_DT, False), row + X_QMAP)

    @triton.jit
    def old_moment(lp, offs, vmask, g, QUANT: tl.constexpr):
        """The unfactored exp_avg_sq where vmask (0 elsewhere), in fp32."""
        return load_slot(True, 1, lp[3], offs, vmask, False, g, lp[4], QUANT)

    @triton.jit
    def new_moments(lp, g, f, v, vmask, offs, mask, sc, seed, FLAGS: tl.constexpr, SR: tl.constexpr,
                    QUANT: tl.constexpr, STORE: tl.constexpr):
        """The update lr * g / sqrt(v) / clip, or the new exp_avg with betas; STORE: the new moments stored (bf16
        states rounded to nearest or stochastically, int8 requantized: then offs are whole blocks in storage order),
        each state its own random bits."""
        keep, eps, clip_f, lr_f, one_minus_beta1 = sc
        upd = g * f / clip_f * lr_f
        if STORE:
            store_slot(True, 1, lp[3], offs, v, vmask, False, SR & SR_STATES_BIT, seed ^ 0x5A5A0002, lp[4], QUANT)
        if FLAGS & BETA1:
            upd = lerp(load_slot(True, 0, lp[2], offs, mask, False, g, lp[4], QUANT), upd, one_minus_beta1)
            if STORE:
                store_slot(True, 0, lp[2], offs, upd, mask, False, SR & SR_STATES_BIT, seed ^ 0x5A5A0001, lp[4],
                           QUANT)
        return upd

    @triton.jit
    def update_elements(lp, g_ptr, g, f, v, vmask, offs, mask, sc, neg_decay, mask_scale, seed, FLAGS: tl.constexpr,
                        HAS_SCALE: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr, QUANT: tl.constexpr,
                        CAUTIOUS: tl.constexpr):
        """APPLY's element work: new moments, the update (caution: where it agrees in sign with the grad, over the
        mask's mean), weight decay on the master, the param (and its master) written. p.grad ends unscaled, like
        the generic kernel's: written in exactly one phase."""
        upd = new_moments(lp, g, f, v, vmask, offs, mask, sc, seed, FLAGS, SR, QUANT, True)
        if CAUTIOUS:
            upd = tl.where(upd * g > 0.0, upd * mask_scale, 0.0)
        if HAS_SCALE:
            store(g_ptr, offs, g, mask, False)
        p = load_master(lp[0], lp[1], offs, mask, False, MASTER)
        if FLAGS & WD:
            p = p + neg_decay * p
        store_master(lp[0], lp[1], offs, p - upd, mask, False, MASTER, SR, seed)

    @triton.jit
    def flat_apply(item, row, mrow, geo, ctx, lp, g_ptr, inv_scale, sc, neg_decay, mask_scale, seed,
                   FLAGS: tl.constexpr, HAS_SCALE: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
                   QUANT: tl.constexpr, CAUTIOUS: tl.constexpr):
        """update_elements over the work item's chunk of whole 256-element blocks in storage order (int8 states):
        each element's row, column and plane from its index ([pre, A, B, post]; an unfactored tensor reads none)."""
        A, B, post, i, j, n = geo
        fac, s_row, s_col, fa, fb, nu, rmean = ctx
        keep, eps = sc[0], sc[1]
        size = tl.load(mrow + M_CHUNK)
        start = (item - tl.load(mrow + M_FIRST)) * size
        n_fac = tl.where(tl.load(mrow + M_FACTORED) != 0, n, 0)
        means = chunk_ptr(row, X_RMEAN, tl.float32, False)
        for it in range(K_ITERS):
            offs = start + it * K_FLAT + tl.arange(0, K_FLAT)
            mask = (offs < start + size) & (offs < n)
            g = load(g_ptr, offs, mask, False) * inv_scale
            q = offs // post
            ia, jj = q // B, offs % post  # (pre index * A + row, post index)
            fm = mask & (offs < n_fac)
            r = tl.load(s_row + ia * post + jj, mask=fm, other=1.0, cache_modifier=".cg").to(tl.float32)
            c = tl.load(s_col + ((ia // A) * B + q % B) * post + jj, mask=fm, other=1.0, cache_modifier=".cg")
            rm = tl.load(means + (ia // A) * post + jj, mask=fm, other=1.0, cache_modifier=".cg")
            vmask = mask & (offs < nu)
            f, v = second_moment(fac, 1.0 / tl.sqrt(r / rm), 1.0 / tl.sqrt(c.to(tl.float32)),
                                 old_moment(lp, offs, vmask, g, QUANT), vmask, g, keep, eps)
            update_elements(lp, g_ptr, g, f, v, vmask, offs, mask, sc, neg_decay, mask_scale, seed, FLAGS,
                            HAS_SCALE, MASTER, SR, QUANT, CAUTIOUS)
