"""LAMB's kernel (fused_optim/kernels/lamb.py launches it): the jit code of its two passes over (tensor, chunk) work
items, and the table layout they read.

Pass 0 (STATS) recomputes the step's moments and Adam direction u per element (nothing stored) and sums per work item
what the trust ratio needs: |p|^2 (decoupled-decayed p) and |u + wd * p|^2 (with caution: the mask's count, |u|^2 and
<u, p> over kept elements); a tensor's last program adds its partials in fixed order into its row of ``sums``, with
its element count. Over DTensor shards the host adds the rows of every shard between the passes (one collective).
Pass 1 (APPLY) turns the tensor's sums into its coefficients a, b (timm's trust ratio, the cautious mask's scale),
recomputes the moments, stores them and p <- decayed p + a * (kept) u + b * p, and advances the step. Grads are read
as g / grad_scale (AMP; written back so) and divided by the global clip factor ``clip`` (a device scalar,
max(|g| / max_grad_norm, 1), AMP's scale folded in).
The lean options ride in both passes: p is read as the exact fp32 master (lean.load_master) and the moments through
quant.load_slot (int8: dequantized), so the statistics are the reference's; the apply stores through
lean.store_master and quant.store_slot. A work item is BLOCK * ITERS elements and BLOCK a multiple of 256, so every
int8 block is whole in one program and one iteration (its absmax in registers).
"""
from __future__ import annotations

from . import multi_tensor as mt
from . import runtime
from .tables import fields

STATS, APPLY = 0, 1
# ptrs columns; then the master slot (MASTER), then the int8 code maps and each moment's scales (QUANT)
E_PARAM, E_GRAD, E_EXP_AVG, E_EXP_AVG_SQ, E_W = fields("param", "grad", "exp_avg", "exp_avg_sq")
P_PP, P_A, P_B, P_KEPT, P_W = fields("pp", "a", "b", "kept")  # partials: one [W] column per statistic
# sums: fp64 [T, S_W], a tensor's statistics over its elements (over DTensor shards: the full tensor's)
S_PP, S_A, S_B, S_KEPT, S_N, S_W = fields("pp", "a", "b", "kept", "n")
HYPERS = ("lr", "beta1", "beta2", "eps", "l2", "decay")  # the kernel's fp64 arguments, in order
SUM_LANES = 4 if runtime.interpreter_enabled() else 256  # partials added PB at a time (several rounds in CPU tests)

if runtime.available():
    import triton
    import triton.language as tl

    from .access import amp_skip, chunk_ptr, fp64_arg, grad_inv_scale, load, over_chunk, store
    from .lean import load_master, store_master
    from .quant import load_slot, store_slot
    from .rules import REMAINDER, SR_STATES_BIT
    from .sync import arrive, run_phases, sum_partials

    # STATS_ON: pass 0 runs this step (adapt or caution), in this launch or the one before
    BIAS_CORRECTION, GRAD_AVG, DECOUPLED, CAUTION, ADAPT, TRUST_CLIP, STATS_ON = mt.flag_bits(7)
    P_STATS = tl.constexpr(STATS)
    REMAINDER_K = tl.constexpr(REMAINDER)

    @triton.jit
    def _load_block(el, offs, mask, FULL: tl.constexpr, MASTER: tl.constexpr, QUANT: tl.constexpr):
        """(p: the exact master, raw grad, exp_avg, exp_avg_sq: int8 dequantized) of one block, fp32."""
        p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, qrow = el
        p = load_master(p_ptr, w_ptr, offs, mask, FULL, MASTER)
        return (p, load(g_ptr, offs, mask, FULL), load_slot(True, 0, m_ptr, offs, mask, FULL, p, qrow, QUANT),
                load_slot(True, 1, v_ptr, offs, mask, FULL, p, qrow, QUANT))

    @triton.jit
    def _direction(p, g, m, v, bc1, bc2_sqrt, hyps, FLAGS: tl.constexpr):
        """(decayed p, new m, new v, u, kept mask) of one block, in timm's op order (fp32 math in p's dtype)."""
        lr, beta1, beta2, eps, l2, decay = hyps
        if FLAGS & GRAD_AVG:  # m lerps towards g
            m = tl.fma((1.0 - beta1).to(p.dtype), g - m, m)
        else:
            m = tl.fma(m, beta1.to(p.dtype), g)
        v = tl.fma(v, beta2.to(p.dtype), (1.0 - beta2).to(p.dtype) * g * g)
        u = (m / bc1) / (tl.sqrt(v) / bc2_sqrt + eps.to(p.dtype))
        keep = u * g > 0.0  # the cautious mask (read with CAUTION only)
        if FLAGS & DECOUPLED:
            p = tl.fma(p, -decay.to(p.dtype), p)
        return p, m, v, u, keep

    @triton.jit
    def _stats_block(acc, offs, mask, FULL: tl.constexpr, el, scales, bc, hyps, FLAGS: tl.constexpr,
                     MASTER: tl.constexpr, QUANT: tl.constexpr):
        """over_chunk's BODY for pass 0: acc [4, BLOCK] += this block's |p|^2, a, b, kept (P_* rows)."""
        l2 = hyps[4]
        p0, raw, m, v = _load_block(el, offs, mask, FULL, MASTER, QUANT)
        p, m, v, u, keep = _direction(p0, raw * scales[0], m, v, bc[0], bc[1], hyps, FLAGS)
        keep = keep & mask
        if FLAGS & CAUTION:
            a = tl.where(keep, u * u, 0.0)
            b = tl.where(keep, u * p, 0.0)
        else:
            w = tl.fma(l2.to(p.dtype), p0, u)
            a = tl.where(mask, w * w, 0.0)
            b = tl.zeros_like(a)
        row = tl.arange(0, 4)[:, None]
        new = tl.where(row == P_PP, (p * p)[None, :], tl.where(row == P_A, a[None, :], tl.where(
            row == P_B, b[None, :], keep.to(tl.float32)[None, :])))
        return acc + new

    @triton.jit
    def _apply_block(carry, offs, mask, FULL: tl.constexpr, el, scales, bc, hyps, coef, seed, FLAGS: tl.constexpr,
                     HAS_SCALE: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr, QUANT: tl.constexpr):
        """over_chunk's BODY for pass 1: the update of one block (the master, the param rounded or split, the
        moments rounded, stochastically (SR) or quantized (QUANT))."""
        p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, qrow = el
        inv_math, inv_scale = scales
        p0, raw, m, v = _load_block(el, offs, mask, FULL, MASTER, QUANT)
        p, m, v, u, keep = _direction(p0, raw * inv_math, m, v, bc[0], bc[1], hyps, FLAGS)
        if FLAGS & CAUTION:
            u = tl.where(keep, u, 0.0)
        store_master(p_ptr, w_ptr, offs, tl.fma(coef[1], p0, tl.fma(coef[0], u, p)), mask, FULL, MASTER, SR, seed)
        # each moment its own random bits (the param's stream is seed itself)
        store_slot(True, 0, m_ptr, offs, m, mask, FULL, SR & SR_STATES_BIT, seed ^ 0x5A5A0001, qrow, QUANT)
        store_slot(True, 1, v_ptr, offs, v, mask, FULL, SR & SR_STATES_BIT, seed ^ 0x5A5A0002, qrow, QUANT)
        if HAS_SCALE:
            store(g_ptr, offs, raw * inv_scale, mask, FULL)  # p.grad ends AMP-unscaled (not clipped, as timm)
        return carry

    @triton.jit
    def _coefs(srow, hyps, FLAGS: tl.constexpr):
        """(a, b) of a tensor from its row of sums (fp64, written by pass 0, maybe by another program of this
        launch: loads bypass L1): timm's trust ratio |p| / |update| (1 where either is 0, at most 1 with
        trust_clip), the cautious mask's scale."""
        lr, l2 = hyps[0], hyps[4]
        pp, sa = tl.load(srow + S_PP, cache_modifier=".cg"), tl.load(srow + S_A, cache_modifier=".cg")
        sb, kept = tl.load(srow + S_B, cache_modifier=".cg"), tl.load(srow + S_KEPT, cache_modifier=".cg")
        n = tl.load(srow + S_N, cache_modifier=".cg")
        s = tl.cast(1.0, tl.float64)
        uu = sa
        if FLAGS & CAUTION:
            s = 1.0 / tl.maximum(kept / tl.maximum(n, 1.0), 1e-3)
            uu = s * s * sa + 2.0 * s * l2 * sb + l2 * l2 * pp
        ratio = tl.cast(1.0, tl.float64)
        if FLAGS & ADAPT:
            w = tl.sqrt(pp)
            un = tl.sqrt(tl.maximum(uu, 0.0))
            ratio = tl.where((w > 0.0) & (un > 0.0), w / un, 1.0)
            if FLAGS & TRUST_CLIP:
                ratio = tl.minimum(ratio, 1.0)
        return -lr * ratio * s, -lr * ratio * l2

    @triton.jit
    def _item(item, PASS: tl.constexpr, args):
        _run_pass(item, PASS, *args)  # run_phases' ITEM (flat args: triton 3.6 unpacks a flat tuple into constexprs)

    @triton.jit
    def _run_pass(item, PASS: tl.constexpr, n_items, tables, scalars, hyps, seed, FLAGS, P_DT, G_DT, S_DT,
                  MASTER, SR, QUANT, HAS_SCALE, HAS_CLIP, WRITE_STEP, ALIGNED, BLOCK, ITERS, PB):
        ptrs, numels, work, first, counters, partials, sums = tables
        step_ptr, step_counter, scale_ptr, clip_ptr = scalars
        lr, beta1, beta2 = hyps[0], hyps[1], hyps[2]
        t = tl.load(work + 2 * item)
        chunk = tl.load(work + 2 * item + 1).to(tl.int64)
        n = tl.load(numels + t)
        row = ptrs + t.to(tl.int64) * (E_W + (1 if MASTER else 0) + (3 if QUANT else 0))
        p_ptr = chunk_ptr(row, E_PARAM, P_DT, ALIGNED)
        w_ptr = p_ptr  # the master slot (absent: never dereferenced)
        if MASTER == REMAINDER_K:
            w_ptr = chunk_ptr(row, E_W, tl.int16, ALIGNED)
        elif MASTER:
            w_ptr = chunk_ptr(row, E_W, tl.float32, ALIGNED)
        # QUANT: the code maps' column, then the two moments' scales columns (quant.load_slot / store_slot)
        el = (p_ptr, chunk_ptr(row, E_GRAD, G_DT, ALIGNED), chunk_ptr(row, E_EXP_AVG, S_DT, ALIGNED),
              chunk_ptr(row, E_EXP_AVG_SQ, S_DT, ALIGNED), w_ptr, row + E_W + (1 if MASTER else 0))
        inv_scale = grad_inv_scale(scale_ptr, HAS_SCALE)
        inv_math = inv_scale
        if HAS_CLIP:  # the clip factor, AMP's scale folded in
            inv_math = 1.0 / tl.load(clip_ptr).to(tl.float32)
        step = tl.load(step_ptr).to(tl.float64) + 1.0
        bc1, bc2 = tl.cast(1.0, tl.float64), tl.cast(1.0, tl.float64)
        if FLAGS & BIAS_CORRECTION:
            bc1 = 1.0 - tl.exp2(step * tl.log2(beta1))
            bc2 = 1.0 - tl.exp2(step * tl.log2(beta2))
        bc = (bc1.to(tl.float32), tl.sqrt(bc2).to(tl.float32))
        nwork = tl.maximum(tl.cdiv(n, BLOCK * ITERS), 1).to(tl.int32)
        if PASS == P_STATS:
            acc = over_chunk(_stats_block, tl.zeros([4, BLOCK], tl.float32), chunk * (BLOCK * ITERS), n,
                             (el, (inv_math, inv_scale), bc, hyps, FLAGS, MASTER, QUANT), BLOCK, ITERS)
            tl.store(partials + tl.arange(0, 4) * n_items + item, tl.sum(acc, axis=1))
            if arrive(counters + t, nwork):  # the tensor's last program: its sums
                f = tl.load(first + t)
                srow = sums + t * S_W
                tl.store(srow + S_PP, sum_partials(partials + P_PP * n_items + f, nwork, PB).to(tl.float64))
                tl.store(srow + S_A, sum_partials(partials + P_A * n_items + f, nwork, PB).to(tl.float64))
                tl.store(srow + S_B, sum_partials(partials + P_B * n_items + f, nwork, PB).to(tl.float64))
                tl.store(srow + S_KEPT, sum_partials(partials + P_KEPT * n_items + f, nwork, PB).to(tl.float64))
                tl.store(srow + S_N, n.to(tl.float64))
                tl.store(counters + t, 0)
        else:
            a, b = (-lr).to(tl.float32), tl.cast(0.0, tl.float32)
            if FLAGS & STATS_ON:
                a64, b64 = _coefs(sums + t * S_W, hyps, FLAGS)
                a, b = a64.to(tl.float32), b64.to(tl.float32)
            over_chunk(_apply_block, tl.cast(0, tl.int32), chunk * (BLOCK * ITERS), n,
                       (el, (inv_math, inv_scale), bc, hyps, (a, b), seed + t, FLAGS, HAS_SCALE, MASTER, SR, QUANT),
                       BLOCK, ITERS)
            if WRITE_STEP:  # the last program of the pass: every program has read the old step
                if arrive(step_counter, n_items):
                    tl.store(step_ptr, step.to(tl.float32))
                    tl.store(step_counter, 0)

    @triton.jit
    def _count(PASS: tl.constexpr, args):
        return args[0]  # n_items: both passes run over all work items

    @triton.jit
    def lamb_kernel(ptrs, numels, work, first, counters, partials, sums, barrier, step_ptr, step_counter,
                    scale_ptr, clip_ptr, inf_ptr, n_items, seed, lr: tl.float64, beta1: tl.float64, beta2: tl.float64,
                    eps: tl.float64, l2: tl.float64, decay: tl.float64, FLAGS: tl.constexpr, PASSES: tl.constexpr,
                    P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr, MASTER: tl.constexpr,
                    SR: tl.constexpr, QUANT: tl.constexpr, HAS_SCALE: tl.constexpr,
                    HAS_CLIP: tl.constexpr, HAS_INF: tl.constexpr, WRITE_STEP: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK: tl.constexpr, ITERS: tl.constexpr, PB: tl.constexpr):
        """The passes in PASSES (bits) over the n_items work items: one pass is a plain launch, both a persistent
        one (runtime.launch_phases). MASTER: rules.NO_MASTER / MASTER_FP32 / REMAINDER (the column after the
        moments); SR: rules.SR_PARAM / SR_STATES bits (random bits from seed); QUANT: int8 moments, 1 + 2 * the
        unsigned slots' bits (quant.load_slot)."""
        if amp_skip(inf_ptr, HAS_INF) == 0:
            # every bit of the fp64 arguments (access.fp64_arg: the interpreter would round them through fp32)
            hyps = (fp64_arg(lr), fp64_arg(beta1), fp64_arg(beta2), fp64_arg(eps), fp64_arg(l2), fp64_arg(decay))
            # the args tuple is written out in the call: assigned to a name, its constexprs would become values
            run_phases(barrier, PASSES, 2, _item, _count,
                       (n_items, (ptrs, numels, work, first, counters, partials, sums),
                        (step_ptr, step_counter, scale_ptr, clip_ptr),
                        hyps, seed, FLAGS, P_DT, G_DT, S_DT, MASTER, SR, QUANT, HAS_SCALE, HAS_CLIP, WRITE_STEP,
                        ALIGNED, BLOCK,
                        ITERS, PB))
