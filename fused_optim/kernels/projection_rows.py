"""SGDP / AdamP's kernel rows: the table layout the passes (kernels/projection_passes.py) and the C++ engine read
and write, and the jit math of the projection decision from per-row sums (Note [projection decision], Note
[projection shards] in fused_optim/kernels/README.md)."""
from __future__ import annotations

from . import multi_tensor as mt
from . import runtime
from .tables import fields

NONE, CHANNEL, LAYER = 0, 1, 2  # projection modes (tmode holds them as floats, as the C++ engine writes them)

# Named table columns (Note [projection rows]); rowstat and rowcoef are the C++ engine's output layout too.
E_PARAM, E_GRAD, E_STATE0, E_STATE1, _ = fields("param", "grad", "state0", "state1")  # ptrs: element pointers
I_NUMEL, I_ROWS, I_COLS, I_ROW0, I_PROJ, I_SLOT, I_W = fields("numel", "rows", "cols", "row0", "proj", "slot")
W_TENSOR, W_BLOCK, W_W = fields("tensor", "block")  # work: one item per block of RB rows of a tensor
S_PG, S_GG, S_PP, S_PD, S_W = fields("pg", "gg", "pp", "pd")  # rowstat: <p,g>, |g|^2, |p|^2, <p,d> per row
C_A, C_C, C_W = fields("a", "c")  # rowcoef: the radial coefficients of d and g (Note [projection decision])
K_KEPT, K_PM, K_B, K_W = fields("kept", "pm", "b")  # rowcaut: mask count, <p, masked d>, re-projection coefficient
# tpart / ttot (fp64): per tensor its numel, rows failing the channel test, <p,g>, |g|^2, |p|^2, <p,d>, mask count and
# <p, masked d>: tpart over this rank's rows, ttot over the whole tensor (Note [projection shards])
T_N, T_FAILS, T_PG, T_GG, T_PP, T_PD, T_KEPT, T_PM, T_W = fields("n", "fails", "pg", "gg", "pp", "pd", "kept", "pm")

if runtime.available():
    import triton
    import triton.language as tl

    NESTEROV, CAUTION, DECAY, SHARDED = mt.flag_bits(4)
    # the jit code's copies of the modes (a kernel reads only constexpr globals)
    M_NONE, M_CHANNEL, M_LAYER = map(tl.constexpr, (NONE, CHANNEL, LAYER))

    @triton.jit
    def col(buf, rows, mask, WIDTH: tl.constexpr, COL: tl.constexpr):
        """fp64 column COL of a row buffer, through L2 (Note [cross-program reads])."""
        return tl.load(buf + rows * WIDTH + COL, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)

    @triton.jit
    def cosine(pg, gg, pp, eps):
        """|cos(p, g)| as torch's cosine_similarity computes it (each norm clamped at eps)."""
        return tl.abs(pg) / (tl.maximum(tl.sqrt(gg), eps) * tl.maximum(tl.sqrt(pp), eps))

    @triton.jit
    def totals(rowstat, R, C, row0, eps, delta, FB: tl.constexpr):
        """The tensor's sums over its rows (fp64): rows failing the channel test (|cos| < delta / sqrt(C) does not
        hold), <p,g>, |g|^2, |p|^2, <p,d>."""
        zero = tl.cast(0.0, tl.float64)
        fails, spg, sgg, spp, spd = zero, zero, zero, zero, zero
        thr = delta / tl.sqrt(C.to(tl.float64))
        for r0 in range(0, R, FB):
            rr = row0 + r0 + tl.arange(0, FB)
            m = rr < row0 + R
            pg, gg = col(rowstat, rr, m, S_W, S_PG), col(rowstat, rr, m, S_W, S_GG)
            pp, pd = col(rowstat, rr, m, S_W, S_PP), col(rowstat, rr, m, S_W, S_PD)
            fails += tl.sum(tl.where(m & (cosine(pg, gg, pp, eps) < thr), 0.0, m.to(tl.float64)), axis=0)
            spg += tl.sum(pg, axis=0)
            sgg += tl.sum(gg, axis=0)
            spp += tl.sum(pp, axis=0)
            spd += tl.sum(pd, axis=0)
        return fails, spg, sgg, spp, spd

    @triton.jit
    def mode_of(n, fails, spg, sgg, spp, proj, eps, delta):
        """NONE / CHANNEL / LAYER (fp32) from the tensor's sums (Note [projection decision])."""
        channel = (proj != 0) & (fails == 0)
        layer = (proj != 0) & (fails > 0) & (cosine(spg, sgg, spp, eps) < delta / tl.sqrt(tl.maximum(n, 1).to(tl.float64)))
        return tl.where(channel, M_CHANNEL, tl.where(layer, M_LAYER, M_NONE)).to(tl.float32)

    @triton.jit
    def coefs(rowstat, rr, m, mode, spg, spp, spd, eps):
        """The radial coefficients a (of d) and c (of g) of rows rr, fp64 (Note [projection decision])."""
        rn = tl.sqrt(col(rowstat, rr, m, S_W, S_PP)) + eps
        ln = tl.sqrt(spp) + eps  # timm's unit weight is p / (|p| + eps)
        a = tl.where(mode == M_CHANNEL, col(rowstat, rr, m, S_W, S_PD) / (rn * rn),
                     tl.where(mode == M_LAYER, spd / (ln * ln), 0.0))
        c = tl.where(mode == M_CHANNEL, col(rowstat, rr, m, S_W, S_PG) / (rn * rn),
                     tl.where(mode == M_LAYER, spg / (ln * ln), 0.0))
        return a, c

    @triton.jit
    def recoef(rowstat, rowcaut, rr, m, mode, s, spm, spp, eps):
        """Caution's re-projection coefficient b of rows rr, fp64 (s: the mask scale; spm: <p, masked d>)."""
        rn = tl.sqrt(col(rowstat, rr, m, S_W, S_PP)) + eps
        ln = tl.sqrt(spp) + eps
        return tl.where(mode == M_CHANNEL, s * col(rowcaut, rr, m, K_W, K_PM) / (rn * rn),
                        tl.where(mode == M_LAYER, s * spm / (ln * ln), 0.0))

    @triton.jit
    def coefs_of(at, bufs, hyps, FLAGS: tl.constexpr, WITH_B: tl.constexpr):
        """a, c (with WITH_B caution's b and s) of the item's rows and the tensor's mode, fp32: read from the
        decision's buffers, or over shards computed from the full tensor's sums (Note [projection shards])."""
        t, n, R, C, row0, proj, slot, rows, rmask = at
        counters, rowstat, rowcoef, rowcaut, tmode, tscale, tpart, ttot = bufs
        lr, eps, delta, wd_ratio, wd, h1, h2 = hyps
        rr = row0 + rows
        a = col(rowcoef, rr, rmask, C_W, C_A).to(tl.float32)
        c = col(rowcoef, rr, rmask, C_W, C_C).to(tl.float32)
        b = a
        s = tl.load(tscale + t, cache_modifier=".cg")
        mode = tl.load(tmode + slot, cache_modifier=".cg")
        if FLAGS & SHARDED:
            tot = ttot + t * T_W
            nf, spg, spp = tl.load(tot + T_N), tl.load(tot + T_PG), tl.load(tot + T_PP)
            mode = mode_of(nf, tl.load(tot + T_FAILS), spg, tl.load(tot + T_GG), spp, proj, eps, delta)
            a64, c64 = coefs(rowstat, rr, rmask, mode, spg, spp, tl.load(tot + T_PD), eps)
            a, c = a64.to(tl.float32), c64.to(tl.float32)
            if WITH_B:
                s64 = 1.0 / tl.maximum(tl.load(tot + T_KEPT) / tl.maximum(nf, 1.0), 1e-3)
                b = recoef(rowstat, rowcaut, rr, rmask, mode, s64, tl.load(tot + T_PM), spp, eps).to(tl.float32)
                s = s64.to(tl.float32)
        elif WITH_B:
            b = col(rowcaut, rr, rmask, K_W, K_B).to(tl.float32)
        return a, c, b, s, mode
