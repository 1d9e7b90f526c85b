"""The jit code of SGDP / AdamP's kernel (fused_optim/kernels/projection.py launches it): one function per pass over
(tensor, row block) work items; the table layout they read and the decision math are kernels/projection_rows.py.
The notes named here are in fused_optim/kernels/README.md, "Projection (SGDP, AdamP)"."""
from __future__ import annotations

from . import runtime
from .projection_rows import (C_A, C_C, C_W, E_GRAD, E_PARAM, E_STATE0, E_STATE1, I_COLS, I_NUMEL, I_PROJ,
                              I_ROW0, I_ROWS, I_SLOT, I_W, K_B, K_KEPT, K_PM, K_W, S_GG, S_PD, S_PG,
                              S_PP, S_W, T_FAILS, T_GG, T_KEPT, T_N, T_PD, T_PG, T_PM, T_PP, T_W, W_BLOCK, W_TENSOR,
                              W_W)

STATS, CAUTION_STATS, APPLY = 0, 1, 2  # the passes (Note [projection passes])
HYPERS = ("lr", "eps", "delta", "wd_ratio", "wd", "h1", "h2")  # the kernel's fp64 arguments, in order

if runtime.available():
    import triton
    import triton.language as tl

    from .access import amp_skip, chunk_ptr, fp64_arg, grad_inv_scale, load, store
    from .lean import load_master, store_master
    from .projection_rows import (CAUTION, DECAY, M_NONE, NESTEROV, SHARDED, coefs, coefs_of, col, mode_of, recoef,
                                  totals)
    from .quant import QB, load_slot, store_slot
    from .rules import REMAINDER, SR_STATES_BIT
    from .sync import arrive, run_phases

    P_STATS, P_CAUTION = map(tl.constexpr, (STATS, CAUTION_STATS))  # (a kernel reads only constexpr globals)
    REMAINDER_K = tl.constexpr(REMAINDER)

    @triton.jit
    def _setup(item, tables, hyps, COEFS: tl.constexpr, NS: tl.constexpr, HAS_STEP: tl.constexpr,
               HAS_SCALE: tl.constexpr, MASTER: tl.constexpr, QUANT: tl.constexpr, P_DT: tl.constexpr,
               G_DT: tl.constexpr, S_DT: tl.constexpr, RB: tl.constexpr):
        """What every pass needs of work item `item`: where its rows are (tensor t, numel, rows R of C elements,
        first row in the row buffers, projectable, mode slot; this item's rows and their mask) and the tile inputs
        (element pointers: param, grad, states, master slot, int8 scales' row; 1 / grad scale, this step's
        coefficients, the tensor's random seed)."""
        ptrs, info, work, sptrs, scale_ptr, seed = tables
        lr, eps, delta, wd_ratio, wd, h1, h2 = hyps
        t = tl.load(work + item * W_W + W_TENSOR).to(tl.int64)
        rows = tl.load(work + item * W_W + W_BLOCK).to(tl.int64) * RB + tl.arange(0, RB)
        meta = info + t * I_W
        R = tl.load(meta + I_ROWS)
        at = (t, tl.load(meta + I_NUMEL), R, tl.load(meta + I_COLS), tl.load(meta + I_ROW0), tl.load(meta + I_PROJ),
              tl.load(meta + I_SLOT), rows, rows < R)
        row = ptrs + t * (E_STATE0 + NS + (1 if MASTER else 0) + (NS + 1 if QUANT else 0))
        s0 = chunk_ptr(row, E_STATE0, S_DT, False)
        s1 = s0
        if NS > 1:
            s1 = chunk_ptr(row, E_STATE1, S_DT, False)
        p_ptr = chunk_ptr(row, E_PARAM, P_DT, False)
        m_ptr = p_ptr  # the master slot after the states (absent: never dereferenced)
        if MASTER == REMAINDER_K:
            m_ptr = chunk_ptr(row, E_STATE0 + NS, tl.int16, False)
        elif MASTER:
            m_ptr = chunk_ptr(row, E_STATE0 + NS, tl.float32, False)
        step_ptr = sptrs  # (no step without HAS_STEP)
        step = tl.cast(0.0, tl.float64)
        if HAS_STEP:  # every pass reads the old step; the apply pass's last program writes the new one
            step_ptr = tl.load(sptrs + t).to(tl.pointer_type(tl.float32))
            step = tl.load(step_ptr).to(tl.float64)
        step_new, neg_step, bc2_sqrt = COEFS(step, lr, eps, h1, h2)
        inv_scale = grad_inv_scale(scale_ptr, HAS_SCALE)
        # QUANT: the code maps' column, then one scales column per state (quant.load_slot / store_slot)
        el = (p_ptr, chunk_ptr(row, E_GRAD, G_DT, False), s0, s1, m_ptr, row + E_STATE0 + NS + (1 if MASTER else 0))
        return at, (el, inv_scale, tl.cast(bc2_sqrt, tl.float32), neg_step.to(tl.float32), step_new, step_ptr,
                    seed + t.to(tl.int32))

    @triton.jit
    def _elements(offs, mask, sc, hyps, DIRECTION: tl.constexpr, FLAGS: tl.constexpr, NS: tl.constexpr,
                  HAS_SCALE: tl.constexpr, MASTER: tl.constexpr, QUANT: tl.constexpr):
        """The elements at offs (any shape; fp32 math): p (the exact master where there is one), g (unscaled), the
        states (int8: dequantized), then this step's direction d and new states (DIRECTION: the optimizer's math)."""
        el, inv_scale, bc2_sqrt, neg_step, step_new, step_ptr, seed = sc
        p_ptr, g_ptr, s0_ptr, s1_ptr, m_ptr, qrow = el
        lr, eps, delta, wd_ratio, wd, h1, h2 = hyps
        p = load_master(p_ptr, m_ptr, offs, mask, False, MASTER)
        g = load(g_ptr, offs, mask, False)
        if HAS_SCALE:
            g = g * inv_scale
        s0 = load_slot(True, 0, s0_ptr, offs, mask, False, p, qrow, QUANT)
        s1 = load_slot(NS > 1, 1, s1_ptr, offs, mask, False, p, qrow, QUANT)
        d, s0, s1 = DIRECTION(g, s0, s1, bc2_sqrt, eps, h1, h2, (FLAGS & NESTEROV) != 0)
        return p, g, d, s0, s1

    @triton.jit
    def _tile(at, sc, c0, hyps, DIRECTION: tl.constexpr, FLAGS: tl.constexpr, NS: tl.constexpr,
              HAS_SCALE: tl.constexpr, MASTER: tl.constexpr, QUANT: tl.constexpr, BC: tl.constexpr):
        """Columns c0 .. c0 + BC of the item's rows: _elements, and their offsets and mask."""
        t, n, R, C, row0, proj, slot, rows, rmask = at
        cols = c0 + tl.arange(0, BC)
        offs = rows[:, None] * C + cols[None, :]
        mask = rmask[:, None] & (cols < C)[None, :] & (offs < n)
        p, g, d, s0, s1 = _elements(offs, mask, sc, hyps, DIRECTION, FLAGS, NS, HAS_SCALE, MASTER, QUANT)
        return p, g, d, s0, s1, offs, mask

    @triton.jit
    def _stats_pass(at, sc, bufs, hyps, DIRECTION, FLAGS, NS, HAS_SCALE, MASTER, QUANT, RB, BC, FB):
        """Pass 0: per row <p,g>, |g|^2, |p|^2, <p,d> into rowstat; the tensor's last program decides (over shards:
        stores its sums in tpart, and the passes after the host's combine decide)."""
        t, n, R, C, row0, proj, slot, rows, rmask = at
        counters, rowstat, rowcoef, rowcaut, tmode, tscale, tpart, ttot = bufs
        pg = tl.zeros([RB], tl.float32)
        gg = tl.zeros([RB], tl.float32)
        pp = tl.zeros([RB], tl.float32)
        pd = tl.zeros([RB], tl.float32)
        for c0 in range(0, C, BC):
            p, g, d, s0, s1, offs, mask = _tile(at, sc, c0, hyps, DIRECTION, FLAGS, NS, HAS_SCALE, MASTER, QUANT,
                                                BC)
            pg += tl.sum(p * g, axis=1)
            gg += tl.sum(g * g, axis=1)
            pp += tl.sum(p * p, axis=1)
            pd += tl.sum(p * d, axis=1)
        out = rowstat + (row0 + rows) * S_W
        tl.store(out + S_PG, pg, mask=rmask)
        tl.store(out + S_GG, gg, mask=rmask)
        tl.store(out + S_PP, pp, mask=rmask)
        tl.store(out + S_PD, pd, mask=rmask)
        if arrive(counters + t, tl.maximum(tl.cdiv(R, RB), 1)):  # Note [last program of a tensor]
            lr, eps, delta, wd_ratio, wd, h1, h2 = hyps
            fails, spg, sgg, spp, spd = totals(rowstat, R, C, row0, eps, delta, FB)
            if FLAGS & SHARDED:
                tot = tpart + t * T_W
                tl.store(tot + T_N, n.to(tl.float64))
                tl.store(tot + T_FAILS, fails)
                tl.store(tot + T_PG, spg)
                tl.store(tot + T_GG, sgg)
                tl.store(tot + T_PP, spp)
                tl.store(tot + T_PD, spd)
            else:
                mode = mode_of(n, fails, spg, sgg, spp, proj, eps, delta)
                for r0 in range(0, R, FB):
                    rr = row0 + r0 + tl.arange(0, FB)
                    m = rr < row0 + R
                    a, c = coefs(rowstat, rr, m, mode, spg, spp, spd, eps)
                    tl.store(rowcoef + rr * C_W + C_A, a.to(tl.float32), mask=m)
                    tl.store(rowcoef + rr * C_W + C_C, c.to(tl.float32), mask=m)
                tl.store(tmode + slot, mode)
            tl.store(counters + t, 0)

    @triton.jit
    def _caution_pass(at, sc, bufs, hyps, DIRECTION, FLAGS, NS, HAS_SCALE, MASTER, QUANT, RB, BC, FB):
        """Pass 1 (caution): per row the count of the cautious mask and <p, masked d>; the tensor's last program
        writes the mask scale s and the re-projection coefficients b (Note [projection decision]; over shards: its
        sums into tpart)."""
        t, n, R, C, row0, proj, slot, rows, rmask = at
        counters, rowstat, rowcoef, rowcaut, tmode, tscale, tpart, ttot = bufs
        a, c, b, s, mode = coefs_of(at, bufs, hyps, FLAGS, False)
        kept = tl.zeros([RB], tl.float32)
        pm = tl.zeros([RB], tl.float32)
        for c0 in range(0, C, BC):
            p, g, d, s0, s1, offs, mask = _tile(at, sc, c0, hyps, DIRECTION, FLAGS, NS, HAS_SCALE, MASTER, QUANT,
                                                BC)
            d = d - a[:, None] * p
            keep = mask & (d * (g - c[:, None] * p) > 0.0)
            kept += tl.sum(keep.to(tl.float32), axis=1)
            pm += tl.sum(tl.where(keep, p * d, 0.0), axis=1)
        out = rowcaut + (row0 + rows) * K_W
        tl.store(out + K_KEPT, kept, mask=rmask)
        tl.store(out + K_PM, pm, mask=rmask)
        if arrive(counters + t, tl.maximum(tl.cdiv(R, RB), 1)):
            lr, eps, delta, wd_ratio, wd, h1, h2 = hyps
            zero = tl.cast(0.0, tl.float64)
            cnt, spp, spm = zero, zero, zero
            for r0 in range(0, R, FB):
                rr = row0 + r0 + tl.arange(0, FB)
                m = rr < row0 + R
                spp += tl.sum(col(rowstat, rr, m, S_W, S_PP), axis=0)
                cnt += tl.sum(col(rowcaut, rr, m, K_W, K_KEPT), axis=0)
                spm += tl.sum(col(rowcaut, rr, m, K_W, K_PM), axis=0)
            if FLAGS & SHARDED:
                tl.store(tpart + t * T_W + T_KEPT, cnt)
                tl.store(tpart + t * T_W + T_PM, spm)
            else:
                s64 = 1.0 / tl.maximum(cnt / tl.maximum(n, 1).to(tl.float64), 1e-3)
                for r0 in range(0, R, FB):
                    rr = row0 + r0 + tl.arange(0, FB)
                    m = rr < row0 + R
                    b64 = recoef(rowstat, rowcaut, rr, m, mode, s64, spm, spp, eps)
                    tl.store(rowcaut + rr * K_W + K_B, b64.to(tl.float32), mask=m)
                tl.store(tscale + t, s64.to(tl.float32))
            tl.store(counters + t, 0)

    @triton.jit
    def _write(offs, mask, p, g, d, s0, s1, a, c, b, s, decay, sc, FLAGS: tl.constexpr, NS: tl.constexpr,
               HAS_SCALE: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr, QUANT: tl.constexpr):
        """The apply's update of loaded elements: d projected (with caution masked; a, c, b: the rows' coefficients,
        shaped to broadcast), the param (master) moved, the states and the unscaled grad stored."""
        el, inv_scale, bc2_sqrt, neg_step, step_new, step_ptr, seed = sc
        p_ptr, g_ptr, s0_ptr, s1_ptr, m_ptr, qrow = el
        d = d - a * p
        if FLAGS & CAUTION:
            keep = mask & (d * (g - c * p) > 0.0)
            d = tl.where(keep, d * s, 0.0) - b * p
        # timm's p.add_(d, alpha=-lr): an fma
        store_master(p_ptr, m_ptr, offs, tl.fma(neg_step, d, p * decay), mask, False, MASTER, SR, seed)
        # each state its own random bits (the param's stream is seed itself)
        store_slot(True, 0, s0_ptr, offs, s0, mask, False, SR & SR_STATES_BIT, seed ^ 0x5A5A0001, qrow, QUANT)
        store_slot(NS > 1, 1, s1_ptr, offs, s1, mask, False, SR & SR_STATES_BIT, seed ^ 0x5A5A0002, qrow, QUANT)
        if HAS_SCALE:
            store(g_ptr, offs, g, mask, False)  # p.grad ends unscaled, like the generic kernel

    @triton.jit
    def _apply_pass(at, sc, bufs, hyps, DIRECTION, FLAGS, NS, HAS_STEP, HAS_SCALE, MASTER, SR, QUANT, RB, BC):
        """Pass 2: the element-wise update with the projected (and, with caution, masked) direction."""
        t, n, R, C, row0, proj, slot, rows, rmask = at
        el, inv_scale, bc2_sqrt, neg_step, step_new, step_ptr, seed = sc
        counters = bufs[0]
        lr, eps, delta, wd_ratio, wd, h1, h2 = hyps
        # (with caution b and s were written by pass 1, maybe by another program of this launch)
        a, c, b, s, mode = coefs_of(at, bufs, hyps, FLAGS, (FLAGS & CAUTION) != 0)
        decay = 1.0
        if FLAGS & DECAY:
            decay = (1.0 - lr * wd * tl.where(mode != M_NONE, wd_ratio, 1.0)).to(tl.float32)
        if QUANT:  # int8 states: flat runs of RB * BC elements (a multiple of QB: the launcher checks) from this
            # item's first element, both ends rounded up to a quantization block, so each block is whole in one
            # program and one run (its absmax in registers)
            first = tl.min(rows, axis=0) * C
            lo = tl.minimum(tl.cdiv(first, QB) * QB, n)
            hi = tl.minimum(tl.cdiv(first + RB * C, QB) * QB, n)
            for e0 in range(lo, hi, RB * BC):
                offs = e0 + tl.arange(0, RB * BC)
                mask = offs < hi
                p, g, d, s0, s1 = _elements(offs, mask, sc, hyps, DIRECTION, FLAGS, NS, HAS_SCALE, MASTER, QUANT)
                # each element's row coefficients (the rows of this run: this item's, maybe a neighbour's)
                ea, ec, eb, _, _ = coefs_of((t, n, R, C, row0, proj, slot, offs // C, mask), bufs, hyps, FLAGS,
                                           (FLAGS & CAUTION) != 0)
                _write(offs, mask, p, g, d, s0, s1, ea, ec, eb, s, decay, sc, FLAGS, NS, HAS_SCALE, MASTER, SR, QUANT)
        else:
            for c0 in range(0, C, BC):
                p, g, d, s0, s1, offs, mask = _tile(at, sc, c0, hyps, DIRECTION, FLAGS, NS, HAS_SCALE, MASTER, QUANT,
                                                    BC)
                _write(offs, mask, p, g, d, s0, s1, a[:, None], c[:, None], b[:, None], s, decay, sc, FLAGS, NS,
                       HAS_SCALE, MASTER, SR, QUANT)
        if HAS_STEP:
            if arrive(counters + t, tl.maximum(tl.cdiv(R, RB), 1)):  # every program of t has read the old step
                tl.store(step_ptr, tl.cast(step_new, tl.float32))
                tl.store(counters + t, 0)

    @triton.jit
    def _item(item, PASS: tl.constexpr, args):
        """run_phases' ITEM: pass PASS over work item `item`."""
        _run_pass(item, PASS, *args)  # flat: triton 3.6 unpacks a flat tuple into constexpr parameters

    @triton.jit
    def _run_pass(item, PASS: tl.constexpr, n_items, tables, bufs, hyps, DIRECTION, COEFS, FLAGS, NS, HAS_STEP,
                  MASTER, SR, QUANT, P_DT, G_DT, S_DT, HAS_SCALE, RB, BC, FB):
        at, sc = _setup(item, tables, hyps, COEFS, NS, HAS_STEP, HAS_SCALE, MASTER, QUANT, P_DT, G_DT, S_DT, RB)
        if PASS == P_STATS:
            _stats_pass(at, sc, bufs, hyps, DIRECTION, FLAGS, NS, HAS_SCALE, MASTER, QUANT, RB, BC, FB)
        elif PASS == P_CAUTION:
            _caution_pass(at, sc, bufs, hyps, DIRECTION, FLAGS, NS, HAS_SCALE, MASTER, QUANT, RB, BC, FB)
        else:
            _apply_pass(at, sc, bufs, hyps, DIRECTION, FLAGS, NS, HAS_STEP, HAS_SCALE, MASTER, SR, QUANT, RB, BC)

    @triton.jit
    def _count(PASS: tl.constexpr, args):
        return args[0]  # n_items: every pass runs over all work items

    @triton.jit
    def projection_kernel(
        ptrs, info, work, sptrs, counters, rowstat, rowcoef, rowcaut, tmode, tscale, tpart, ttot, barrier, scale_ptr,
        inf_ptr, n_items, seed, lr: tl.float64, eps: tl.float64, delta: tl.float64, wd_ratio: tl.float64,
        wd: tl.float64, h1: tl.float64, h2: tl.float64,
        DIRECTION: tl.constexpr, COEFS: tl.constexpr, FLAGS: tl.constexpr, PASSES: tl.constexpr,
        NS: tl.constexpr, HAS_STEP: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr, QUANT: tl.constexpr,
        P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr, FB: tl.constexpr,
    ):
        """The passes in PASSES (bits) over the n_items work items: one pass is a plain launch, several a
        persistent one (runtime.launch_phases). MASTER: rules.NO_MASTER / MASTER_FP32 / REMAINDER (the slot after
        the states); SR: rules.SR_PARAM / SR_STATES bits (random bits from seed); QUANT: int8 states, 1 + 2 * the
        unsigned slots' bits (quant.load_slot)."""
        if amp_skip(inf_ptr, HAS_INF) == 0:
            hyps = (fp64_arg(lr), fp64_arg(eps), fp64_arg(delta), fp64_arg(wd_ratio), fp64_arg(wd), fp64_arg(h1),
                    fp64_arg(h2))
            # the args tuple is written out in the call: assigned to a name, its constexprs would become values
            run_phases(barrier, PASSES, 3, _item, _count,
                       (n_items, (ptrs, info, work, sptrs, scale_ptr, seed),
                        (counters, rowstat, rowcoef, rowcaut, tmode, tscale, tpart, ttot),
                        hyps, DIRECTION, COEFS, FLAGS, NS, HAS_STEP, MASTER, SR, QUANT, P_DT, G_DT, S_DT, HAS_SCALE,
                        RB, BC, FB))
