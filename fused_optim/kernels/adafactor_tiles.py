"""Adafactor's table layout, tile shape, and the jit helpers its passes share (kernels/adafactor_passes.py): tile
geometry, step scalars, the second-moment estimate ("Note [adafactor passes]" in kernels/README.md)."""
from __future__ import annotations

from . import runtime
from .tables import fields

# Tiles: SUB rows x TB columns per iteration, ITERS iterations (TA rows); RB rows per step of the row-mean loop, PB
# partials per step of sum_partials. Small under the interpreter (CPU tests): the test shapes span several row and
# column blocks and every loop runs more than once.
if runtime.interpreter_enabled():
    TB, SUB, RB, PB = 32, 16, 32, 4
else:
    TB, SUB, RB, PB = 256, max(1, runtime.BLOCK // 256), 1024, 256
TA = SUB * runtime.ITERS

# ptrs[t]: the addresses of tensor t (row: exp_avg_sq_row, col: exp_avg_sq_col; sq: exp_avg_sq unfactored; master:
# the fp32 master copy or the int16 remainder; int8 states: where NORMS leaves each plane's mean row moment, the code
# maps and the scales of exp_avg and exp_avg_sq)
PTRS = ("param", "grad", "exp_avg", "row", "col", "step", "rms", "sq", "master", "rmean", "qmap", "exp_avg_absmax",
        "sq_absmax")
X_PARAM, X_GRAD, X_EXP_AVG, X_ROW, X_COL, X_STEP, X_RMS, X_SQ, X_MASTER, X_RMEAN, X_QMAP, _, _, X_WIDTH = fields(
    *PTRS)
# meta[t]: tensor t viewed as [pre, A, B, post] (unfactored: [1, A, TB, 1]), planes = pre * post, nab / nbb tiles
# along A / B, its partial row / column sums and block counters, its first work item and item count, the csrc
# engine's row / column means; over DTensor shards: the full tensor's numel, whether the column statistics span the
# shards (A is dim 0) and where the row moment's mean over A is (Note [adafactor shards]); int8 states: the
# storage-order chunk of each work item (whole 256-element blocks)
META = ("numel", "factored", "A", "B", "post", "planes", "nab", "nbb", "row_part", "col_part", "counters", "first",
        "items", "csrc_row", "csrc_col", "total", "span", "span_row", "chunk")
(M_NUMEL, M_FACTORED, M_A, M_B, M_POST, M_PLANES, M_NAB, M_NBB, M_ROW_PART, M_COL_PART, M_COUNTERS, M_FIRST,
 M_ITEMS, M_CSRC_ROW, M_CSRC_COL, M_TOTAL, M_SPAN, M_SPAN_ROW, M_CHUNK, M_WIDTH) = fields(*META)
W_TENSOR, W_PLANE, W_ABLOCK, W_BBLOCK, W_WIDTH = fields("tensor", "plane", "ablock", "bblock")  # work[item]
T_UPDATE_SQ, T_PARAM_SQ, T_MASK_COUNT, T_LR, T_WIDTH = fields("update_sq", "param_sq", "mask_count", "lr")  # tsc[t]

if runtime.available():
    import triton
    import triton.language as tl

    from .access import chunk_ptr, store
    from .multi_tensor import flag_bits
    from .sync import arrive

    RELATIVE, WARMUP, SCALE_PARAM, BETA1, WD, SHARDED = flag_bits(6)
    K_TB, K_SUB, K_ITERS, K_RB, K_PB = (tl.constexpr(x) for x in (TB, SUB, runtime.ITERS, RB, PB))

    @triton.jit
    def lerp(s, e, w):
        # torch's lerp, one rounding as its kernels (an fma): exact at both ends (w = 1 on the first step)
        return tl.where(w < 0.5, tl.fma(w, e - s, s), tl.fma(w - 1.0, e - s, e))

    @triton.jit
    def locate(item, work, meta, ptrs):
        """Work item -> (tensor, plane, A-block, B-block, its meta row, its address row)."""
        w = work + W_WIDTH * item
        t = tl.load(w + W_TENSOR).to(tl.int64)
        return (t, tl.load(w + W_PLANE).to(tl.int64), tl.load(w + W_ABLOCK).to(tl.int64),
                tl.load(w + W_BBLOCK).to(tl.int64), meta + M_WIDTH * t, ptrs + X_WIDTH * t)

    @triton.jit
    def geometry(mrow, plane):
        """(A, B, post, pre index i, post index j, numel) of a tensor's plane."""
        post = tl.load(mrow + M_POST)
        return tl.load(mrow + M_A), tl.load(mrow + M_B), post, plane // post, plane % post, tl.load(mrow + M_NUMEL)

    @triton.jit
    def tile_rows(geo, ab, it):
        """Iteration it's SUB rows of the tile: (rows, mask, index into a row state)."""
        A, B, post, i, j, n = geo
        rows = ab * (K_SUB * K_ITERS) + it * K_SUB + tl.arange(0, K_SUB)
        return rows, rows < A, (i * A + rows) * post + j

    @triton.jit
    def tile_cols(geo, bb):
        """The tile's TB columns: (cols, mask, index into a column state)."""
        A, B, post, i, j, n = geo
        cols = bb * K_TB + tl.arange(0, K_TB)
        return cols, cols < B, (i * B + cols) * post + j

    @triton.jit
    def sub_tile(geo, ab, it, cols, cmask):
        """Iteration it's [SUB, TB] sub-tile: tile_rows, then the element offsets and their mask."""
        A, B, post, i, j, n = geo
        rows, rmask, ridx = tile_rows(geo, ab, it)
        offs = i * (A * B * post) + j + rows[:, None] * (B * post) + cols[None, :] * post
        return rows, rmask, ridx, offs, rmask[:, None] & cmask[None, :] & (offs < n)

    @triton.jit
    def step_scalars(row, hyp, lr_ptr, rms, FLAGS: tl.constexpr, LR_TENSOR: tl.constexpr):
        """fp64: the tensor's new step, the second moment's EMA weight step^decay_rate (= 1 - beta2t; fp32) and the
        step size. Every pass reads the old step; the last pass's last program of the tensor writes the new one.
        (hyp: fp64 values, adafactor_kernel's fp64_arg.)"""
        lr, eps, eps_scale, clip, decay_rate, beta1, wd = hyp
        step = tl.load(chunk_ptr(row, X_STEP, tl.float32, False)).to(tl.float64) + 1.0
        keep = tl.exp2(decay_rate * tl.log2(step))
        if LR_TENSOR:
            lr = tl.load(lr_ptr).to(tl.float64)
        if FLAGS & RELATIVE:
            cap = 1e-2
            if FLAGS & WARMUP:
                cap = 1e-6 * step
            lr = tl.minimum(cap, 1.0 / tl.sqrt(step))
            if FLAGS & SCALE_PARAM:  # max(eps_scale, RMS); a NaN RMS gives eps_scale
                lr = lr * tl.where(rms > eps_scale, rms, eps_scale)
        return step, keep.to(tl.float32), lr

    @triton.jit
    def rms_of(sumsq, n):
        """timm's _rms from an fp32 sum of squares, rounded as torch's ops: norm / (numel ** 0.5) in fp32."""
        return tl.div_rn(tl.sqrt_rn(sumsq), tl.sqrt(n.to(tl.float64)).to(tl.float32))

    @triton.jit
    def fold_into(ptr, idx, mean, mask, keep):
        """A row / column moment <- lerp(old, this step's mean of g^2 + eps, 1 - beta2t)."""
        old = tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)
        store(ptr, idx, lerp(old, mean, keep), mask, False)

    @triton.jit
    def block_sums(part, stride, nblocks, mask, N: tl.constexpr):
        """The last tile of a row (column) block: its blocks' N-wide partial sums, in a fixed order."""
        tot = tl.zeros([N], tl.float32)
        for k in range(nblocks):
            tot += tl.load(part + k * stride, mask=mask, other=0.0, cache_modifier=".cg")
        return tot

    @triton.jit
    def row_state_sum(s_row, geo, nrows):
        """The sum of the plane's first nrows row moments (other programs folded them: loads through L2, .cg)."""
        A, B, post, i, j, n = geo
        acc = tl.zeros([K_RB], tl.float32)
        for a0 in range(0, nrows, K_RB):
            aa = a0 + tl.arange(0, K_RB)
            acc += tl.load(s_row + (i * A + aa) * post + j, mask=aa < A, other=0.0, cache_modifier=".cg").to(tl.float32)
        return tl.sum(acc, axis=0)

    @triton.jit
    def moment_ctx(row, mrow, geo, plane, rcpart, S_DT: tl.constexpr):
        """What a tile's second-moment estimate needs: (factored, row (or unfactored) state, column state, rows /
        columns / elements that are of each kind, the plane's mean row moment: over shards of a tensor whose A is
        dim 0, the host's full mean). The extents are 0 for the kind the tensor is not (a scalar bool in a mask
        trips Triton's interpreter: compare ranges instead)."""
        A, B, post, i, j, n = geo
        fac = tl.load(mrow + M_FACTORED) != 0
        span = tl.load(mrow + M_SPAN) != 0
        s_row = chunk_ptr(row, X_ROW, S_DT, False)
        fa = tl.where(fac, A, 0)
        rmean = tl.where(fac, row_state_sum(s_row, geo, tl.where(span, 0, fa)) / A.to(tl.float32), 1.0)
        if span:
            rmean = tl.load(rcpart + tl.load(mrow + M_SPAN_ROW) + plane, cache_modifier=".cg")
        return fac, s_row, chunk_ptr(row, X_COL, S_DT, False), fa, tl.where(fac, B, 0), tl.where(fac, 0, n), rmean

    @triton.jit
    def second_moment(fac, rr, cc, v_old, vmask, g, keep, eps):
        """Per element 1 / sqrt(second moment estimate) and the new unfactored moment: factored, rr * cc (rr =
        1 / sqrt(row / mean row), cc = 1 / sqrt(col), broadcast to the elements); else 1 / sqrt of the new moment
        (lerp of v_old, 1 outside vmask, to g^2 + eps)."""
        v = lerp(tl.where(vmask, v_old, 1.0), g * g + eps, keep)
        return tl.where(fac, rr * cc, 1.0 / tl.sqrt(v)), v

    @triton.jit
    def inv_root(ctx, g, vmask, v_old, rows, ridx, cols, cidx, keep, eps):
        """second_moment over a [SUB, TB] sub-tile. Row / column moments load with .cg (folded by other
        programs)."""
        fac, s_row, s_col, fa, fb, nu, rmean = ctx
        r = tl.load(s_row + ridx, mask=rows < fa, other=1.0, cache_modifier=".cg").to(tl.float32)
        c = tl.load(s_col + cidx, mask=cols < fb, other=1.0, cache_modifier=".cg").to(tl.float32)
        return second_moment(fac, (1.0 / tl.sqrt(r / rmean))[:, None], (1.0 / tl.sqrt(c))[None, :], v_old, vmask,
                             g, keep, eps)

    @triton.jit
    def update_scalars(row, mrow, t, tsc, hyp, lr_ptr, FLAGS: tl.constexpr, LR_TENSOR: tl.constexpr):
        """(new step, step size, -wd * step size; (EMA weight, eps, clip factor, step size, 1 - beta1) as fp32;
        RMS(p)). The clip factor is max(RMS(update) / clip_threshold, 1) from NORMS' sum (written by another
        program: .cg), in fp32 as timm computes it."""
        lr, eps, eps_scale, clip, decay_rate, beta1, wd = hyp
        total = tl.load(mrow + M_TOTAL)
        rms = rms_of(tl.load(tsc + T_WIDTH * t + T_PARAM_SQ, cache_modifier=".cg"), total)
        step, keep, lr_t = step_scalars(row, hyp, lr_ptr, rms.to(tl.float64), FLAGS, LR_TENSOR)
        urms = rms_of(tl.load(tsc + T_WIDTH * t + T_UPDATE_SQ, cache_modifier=".cg"), total)
        clip_f = tl.maximum(tl.div_rn(urms, clip.to(tl.float32)), 1.0)  # fp32 like timm's: a tie breaks the same
        one_minus_beta1 = (1.0 - beta1).to(tl.float32)
        sc = (keep, tl.cast(eps, tl.float32), clip_f, lr_t.to(tl.float32), one_minus_beta1)
        return step, lr_t, (-(wd * lr_t)).to(tl.float32), sc, rms

    @triton.jit
    def finish_step(counters, t, mrow, row, tsc, step, lr_t, rms):
        """The tensor's last program of the last pass advances its step (all others have read the old one) and
        stores RMS(p)."""
        if arrive(counters + t, tl.load(mrow + M_ITEMS)):
            tl.store(chunk_ptr(row, X_STEP, tl.float32, False), step.to(tl.float32))
            tl.store(chunk_ptr(row, X_RMS, tl.float32, False), rms)
            tl.store(tsc + T_WIDTH * t + T_LR, lr_t.to(tl.float32))
            tl.store(counters + t, 0)
