"""Adafactor's passes, one jit function each, and the kernel that runs them in order (sync.run_phases). The
launcher is kernels/adafactor.py; "Note [adafactor passes]" in kernels/README.md says how they fit."""
from __future__ import annotations

from . import runtime
from .tables import fields

FOLD, ROWCOL, NORMS, MOMENTS, APPLY, CAUTIOUS_APPLY = range(6)  # the passes, numbered in execution order

if runtime.available():
    import triton
    import triton.language as tl

    from .access import amp_skip, chunk_ptr, fp64_arg, grad_inv_scale
    from .adafactor_lean import flat_apply, lean_ptrs, new_moments, old_moment, update_elements
    from .lean import load_master
    from .sync import arrive, run_phases, sum_partials
    from .adafactor_tiles import (K_ITERS, K_PB, K_SUB, K_TB, M_COL_PART, M_COUNTERS, M_CSRC_COL, M_CSRC_ROW,
                                  M_FACTORED, M_FIRST, M_ITEMS, M_NAB, M_NBB, M_PLANES, M_ROW_PART, M_SPAN,
                                  M_SPAN_ROW, M_TOTAL, SHARDED, T_MASK_COUNT, T_PARAM_SQ, T_UPDATE_SQ, T_WIDTH, X_COL,
                                  X_GRAD, X_RMEAN, X_ROW, block_sums, finish_step, fold_into, geometry, inv_root, locate,
                                  moment_ctx, row_state_sum, step_scalars, sub_tile, tile_cols, tile_rows,
                                  update_scalars)

    P_FOLD, P_ROWCOL, P_NORMS, P_MOMENTS, P_APPLY, P_CAUTIOUS_APPLY = (tl.constexpr(x) for x in range(6))
    # the compile-time settings in run_phases' args (args[3])
    C_FLAGS, C_P_DT, C_G_DT, C_S_DT, C_LR_TENSOR, C_HAS_SCALE, C_E_DT, C_MASTER, C_SR, C_QUANT, _C_WIDTH = fields(
        "flags", "p_dt", "g_dt", "s_dt", "lr_tensor", "has_scale", "e_dt", "master", "sr", "quant")

    @triton.jit
    def _fold(item, tabs, hyp, FLAGS: tl.constexpr, S_DT: tl.constexpr):
        """FOLD: the csrc engine's row / column means into the moments. The items of A-block 0 fold the columns of
        their B-block, those of B-block 0 the rows of their A-block (each exactly once). Over shards: only the
        columns whose means span them, the host's full means (ROWCOL folded the rest)."""
        ptrs, meta, work, tsc, part0, part1, rcpart, counters, lr_ptr, scale_ptr = tabs
        t, plane, ab, bb, mrow, row = locate(item, work, meta, ptrs)
        geo = geometry(mrow, plane)
        keep = step_scalars(row, hyp, lr_ptr, 0.0, 0, False)[1]
        rows_too = 1
        if FLAGS & SHARDED:
            rows_too = 0
        if (bb == 0) & (rows_too != 0):
            means = rcpart + tl.load(mrow + M_CSRC_ROW)  # [pre, A, post]: the row state's layout
            for it in range(K_ITERS):
                rows, rmask, ridx = tile_rows(geo, ab, it)
                mean = tl.load(means + ridx, mask=rmask, other=0.0)
                fold_into(chunk_ptr(row, X_ROW, S_DT, False), ridx, mean, rmask, keep)
        if (ab == 0) & ((rows_too != 0) | (tl.load(mrow + M_SPAN) != 0)):
            cols, cmask, cidx = tile_cols(geo, bb)
            mean = tl.load(rcpart + tl.load(mrow + M_CSRC_COL) + cidx, mask=cmask, other=0.0, cache_modifier=".cg")
            fold_into(chunk_ptr(row, X_COL, S_DT, False), cidx, mean, cmask, keep)

    @triton.jit
    def _rowcol(item, tabs, hyp, G_DT: tl.constexpr, S_DT: tl.constexpr, HAS_SCALE: tl.constexpr):
        """ROWCOL: partial row / column sums of (g / grad_scale)^2 + eps over the tile; the last tile of each row
        (column) block folds the block's sums into exp_avg_sq_row (_col). Where the columns span the shards (M_SPAN):
        the column sums, and the plane's last row block the sum of its new row moments, go to the host's combine
        instead (Note [adafactor shards])."""
        ptrs, meta, work, tsc, part0, part1, rcpart, counters, lr_ptr, scale_ptr = tabs
        lr, eps, eps_scale, clip, decay_rate, beta1, wd = hyp
        t, plane, ab, bb, mrow, row = locate(item, work, meta, ptrs)
        geo = geometry(mrow, plane)
        A, B = geo[0], geo[1]
        planes, nab, nbb = tl.load(mrow + M_PLANES), tl.load(mrow + M_NAB), tl.load(mrow + M_NBB)
        g_ptr = chunk_ptr(row, X_GRAD, G_DT, False)
        inv_scale = grad_inv_scale(scale_ptr, HAS_SCALE)
        rpart = rcpart + tl.load(mrow + M_ROW_PART) + plane * A  # [B-block, plane, A]
        cpart = rcpart + tl.load(mrow + M_COL_PART) + plane * B  # [A-block, plane, B]
        cols, cmask, cidx = tile_cols(geo, bb)
        col_acc = tl.zeros([K_TB], tl.float32)
        for it in range(K_ITERS):
            rows, rmask, ridx, offs, mask = sub_tile(geo, ab, it, cols, cmask)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
            u = tl.where(mask, g * g + tl.cast(eps, tl.float32), 0.0)
            tl.store(rpart + bb * planes * A + rows, tl.sum(u, axis=1), mask=rmask)
            col_acc += tl.sum(u, axis=0)
        tl.store(cpart + ab * planes * B + cols, col_acc, mask=cmask)
        keep = step_scalars(row, hyp, lr_ptr, 0.0, 0, False)[1]
        cnt = counters + tl.load(mrow + M_COUNTERS)
        span = tl.load(mrow + M_SPAN)
        if arrive(cnt + plane * nab + ab, nbb):  # every tile of this row block has stored its sums
            s_row = chunk_ptr(row, X_ROW, S_DT, False)
            for it in range(K_ITERS):
                rows, rmask, ridx = tile_rows(geo, ab, it)
                fold_into(s_row, ridx, block_sums(rpart + rows, planes * A, nbb, rmask, K_SUB) / B.to(tl.float32),
                          rmask, keep)
            tl.store(cnt + plane * nab + ab, 0)
            if span != 0:  # the plane's last row block: the sum of its new row moments (all folded by now)
                if arrive(cnt + planes * (nab + nbb) + plane, nab):
                    tl.store(rcpart + tl.load(mrow + M_SPAN_ROW) + plane, row_state_sum(s_row, geo, A))
                    tl.store(cnt + planes * (nab + nbb) + plane, 0)
        if arrive(cnt + planes * nab + plane * nbb + bb, nab):  # ... of this column block
            sums = block_sums(cpart + cols, planes * B, nab, cmask, K_TB)
            if span != 0:
                tl.store(rcpart + tl.load(mrow + M_CSRC_COL) + cidx, sums, mask=cmask)
            else:
                fold_into(chunk_ptr(row, X_COL, S_DT, False), cidx, sums / A.to(tl.float32), cmask, keep)
            tl.store(cnt + planes * nab + plane * nbb + bb, 0)

    @triton.jit
    def _norms(item, tabs, hyp, P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr, E_DT: tl.constexpr,
               HAS_SCALE: tl.constexpr, MASTER: tl.constexpr, QUANT: tl.constexpr):
        """NORMS: per tensor the sum of the unclipped update^2 (-> the clip factor) and RMS of the param (its
        master), from per-item partials summed by the tensor's last program; int8 states: each plane's mean row
        moment for the storage-order walk (adafactor_lean.py)."""
        ptrs, meta, work, tsc, part0, part1, rcpart, counters, lr_ptr, scale_ptr = tabs
        lr, eps, eps_scale, clip, decay_rate, beta1, wd = hyp
        t, plane, ab, bb, mrow, row = locate(item, work, meta, ptrs)
        geo = geometry(mrow, plane)
        ctx = moment_ctx(row, mrow, geo, plane, rcpart, S_DT)
        keep = step_scalars(row, hyp, lr_ptr, 0.0, 0, False)[1]
        lp = lean_ptrs(row, P_DT, E_DT, MASTER)
        g_ptr = chunk_ptr(row, X_GRAD, G_DT, False)
        inv_scale = grad_inv_scale(scale_ptr, HAS_SCALE)
        cols, cmask, cidx = tile_cols(geo, bb)
        usq = tl.zeros([K_SUB], tl.float32)  # per-row running sums: fewer registers than a [SUB, TB] tile
        psq = tl.zeros([K_SUB], tl.float32)
        for it in range(K_ITERS):
            rows, rmask, ridx, offs, mask = sub_tile(geo, ab, it, cols, cmask)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
            p = load_master(lp[0], lp[1], offs, mask, False, MASTER)
            vmask = mask & (offs < ctx[5])
            u = g * inv_root(ctx, g, vmask, old_moment(lp, offs, vmask, g, QUANT), rows, ridx, cols, cidx, keep,
                             tl.cast(eps, tl.float32))[0]
            usq += tl.sum(tl.where(mask, u * u, 0.0), axis=1)
            psq += tl.sum(tl.where(mask, p * p, 0.0), axis=1)
        tl.store(part0 + item, tl.sum(usq, axis=0))
        tl.store(part1 + item, tl.sum(psq, axis=0))
        if QUANT:
            if (ab == 0) & (bb == 0) & (tl.load(mrow + M_FACTORED) != 0):
                tl.store(chunk_ptr(row, X_RMEAN, tl.float32, False) + plane, ctx[6])
        nwork, first = tl.load(mrow + M_ITEMS), tl.load(mrow + M_FIRST)
        if arrive(counters + t, nwork):  # every other program of the tensor has stored its partials
            tl.store(tsc + T_WIDTH * t + T_UPDATE_SQ, sum_partials(part0 + first, nwork, K_PB))
            tl.store(tsc + T_WIDTH * t + T_PARAM_SQ, sum_partials(part1 + first, nwork, K_PB))
            tl.store(counters + t, 0)

    @triton.jit
    def _apply(item, tabs, hyp, seed, FLAGS: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
               S_DT: tl.constexpr, E_DT: tl.constexpr, LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr,
               MASTER: tl.constexpr, SR: tl.constexpr, QUANT: tl.constexpr, CAUTIOUS: tl.constexpr):
        """APPLY: new moments, the clipped update, weight decay; the step advances. CAUTIOUS_APPLY: the same, the
        update masked where exp_avg and the grad disagree in sign, over the mask's mean (MOMENTS' count): the
        moments are recomputed from the old ones and stored here, so the update uses them unrounded, as the
        reference does. Tiles, or with int8 states the storage-order walk of adafactor_lean.flat_apply."""
        ptrs, meta, work, tsc, part0, part1, rcpart, counters, lr_ptr, scale_ptr = tabs
        t, plane, ab, bb, mrow, row = locate(item, work, meta, ptrs)
        geo = geometry(mrow, plane)
        ctx = moment_ctx(row, mrow, geo, plane, rcpart, S_DT)
        step, lr_t, neg_decay, sc, rms = update_scalars(row, mrow, t, tsc, hyp, lr_ptr, FLAGS, LR_TENSOR)
        mask_scale = 1.0
        if CAUTIOUS:
            mask_mean = tl.load(tsc + T_WIDTH * t + T_MASK_COUNT, cache_modifier=".cg") / tl.load(
                mrow + M_TOTAL).to(tl.float32)
            mask_scale = 1.0 / tl.maximum(mask_mean, 1e-3)
        lp = lean_ptrs(row, P_DT, E_DT, MASTER)
        g_ptr = chunk_ptr(row, X_GRAD, G_DT, False)
        inv_scale = grad_inv_scale(scale_ptr, HAS_SCALE)
        seed = seed + t.to(tl.int32)  # each tensor its own random bits
        if QUANT:
            flat_apply(item, row, mrow, geo, ctx, lp, g_ptr, inv_scale, sc, neg_decay, mask_scale, seed, FLAGS,
                       HAS_SCALE, MASTER, SR, QUANT, CAUTIOUS)
        else:
            cols, cmask, cidx = tile_cols(geo, bb)
            for it in range(K_ITERS):
                rows, rmask, ridx, offs, mask = sub_tile(geo, ab, it, cols, cmask)
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
                vmask = mask & (offs < ctx[5])
                f, v = inv_root(ctx, g, vmask, old_moment(lp, offs, vmask, g, QUANT), rows, ridx, cols, cidx, sc[0],
                                sc[1])
                update_elements(lp, g_ptr, g, f, v, vmask, offs, mask, sc, neg_decay, mask_scale, seed, FLAGS,
                                HAS_SCALE, MASTER, SR, QUANT, CAUTIOUS)
        finish_step(counters, t, mrow, row, tsc, step, lr_t, rms)

    @triton.jit
    def _moments(item, tabs, hyp, FLAGS: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
                 E_DT: tl.constexpr, LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, QUANT: tl.constexpr):
        """MOMENTS (caution): the new exp_avg as APPLY makes it (stored by CAUTIOUS_APPLY), and per tensor the count
        of elements where it and the grad agree in sign (the caution mask's mean, for CAUTIOUS_APPLY)."""
        ptrs, meta, work, tsc, part0, part1, rcpart, counters, lr_ptr, scale_ptr = tabs
        t, plane, ab, bb, mrow, row = locate(item, work, meta, ptrs)
        geo = geometry(mrow, plane)
        ctx = moment_ctx(row, mrow, geo, plane, rcpart, S_DT)
        sc = update_scalars(row, mrow, t, tsc, hyp, lr_ptr, FLAGS, LR_TENSOR)[3]
        lp = lean_ptrs(row, tl.float32, E_DT, 0)
        g_ptr = chunk_ptr(row, X_GRAD, G_DT, False)
        inv_scale = grad_inv_scale(scale_ptr, HAS_SCALE)
        cols, cmask, cidx = tile_cols(geo, bb)
        count = tl.zeros([K_SUB], tl.float32)
        for it in range(K_ITERS):
            rows, rmask, ridx, offs, mask = sub_tile(geo, ab, it, cols, cmask)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
            vmask = mask & (offs < ctx[5])
            f, v = inv_root(ctx, g, vmask, old_moment(lp, offs, vmask, g, QUANT), rows, ridx, cols, cidx, sc[0], sc[1])
            m = new_moments(lp, g, f, v, vmask, offs, mask, sc, 0, FLAGS, 0, QUANT, False)
            count += tl.sum(tl.where(mask & (m * g > 0.0), 1.0, 0.0), axis=1)
        tl.store(part0 + item, tl.sum(count, axis=0))
        nwork, first = tl.load(mrow + M_ITEMS), tl.load(mrow + M_FIRST)
        if arrive(counters + t, nwork):
            tl.store(tsc + T_WIDTH * t + T_MASK_COUNT, sum_partials(part0 + first, nwork, K_PB))
            tl.store(counters + t, 0)

    @triton.jit
    def _item(item, PASS: tl.constexpr, args):
        """run_phases' ITEM: one pass over one work item. args = (tables, hypers, item counts, settings, seed); the
        settings are read by index, never assigned: an assignment makes a tuple's constexprs run-time values."""
        if PASS == P_FOLD:
            _fold(item, args[0], args[1], args[3][C_FLAGS], args[3][C_S_DT])
        elif PASS == P_ROWCOL:
            _rowcol(item, args[0], args[1], args[3][C_G_DT], args[3][C_S_DT], args[3][C_HAS_SCALE])
        elif PASS == P_NORMS:
            _norms(item, args[0], args[1], args[3][C_P_DT], args[3][C_G_DT], args[3][C_S_DT], args[3][C_E_DT],
                   args[3][C_HAS_SCALE], args[3][C_MASTER], args[3][C_QUANT])
        elif PASS == P_MOMENTS:
            _moments(item, args[0], args[1], args[3][C_FLAGS], args[3][C_G_DT], args[3][C_S_DT], args[3][C_E_DT],
                     args[3][C_LR_TENSOR], args[3][C_HAS_SCALE], args[3][C_QUANT])
        else:
            _apply(item, args[0], args[1], args[4], args[3][C_FLAGS], args[3][C_P_DT], args[3][C_G_DT],
                   args[3][C_S_DT], args[3][C_E_DT], args[3][C_LR_TENSOR], args[3][C_HAS_SCALE], args[3][C_MASTER],
                   args[3][C_SR], args[3][C_QUANT], PASS == P_CAUTIOUS_APPLY)

    @triton.jit
    def _count(PASS: tl.constexpr, args):
        """run_phases' COUNT: FOLD and ROWCOL run over the factored tensors' items (they come first), the rest over
        all."""
        n_fact, n_work = args[2]
        n = n_work
        if PASS <= P_ROWCOL:
            n = n_fact
        return n

    @triton.jit
    def adafactor_kernel(
        ptrs, meta, work, tsc, part0, part1, rcpart, counters, barrier, lr_ptr, scale_ptr, inf_ptr, n_fact, n_work,
        seed, lr: tl.float64, eps: tl.float64, eps_scale: tl.float64, clip: tl.float64, decay_rate: tl.float64,
        beta1: tl.float64, wd: tl.float64,
        PASSES: tl.constexpr, FLAGS: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
        E_DT: tl.constexpr, LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
        MASTER: tl.constexpr, SR: tl.constexpr, QUANT: tl.constexpr,
    ):
        """The passes in PASSES (bits), each over its work items, a grid barrier between consecutive ones. E_DT: the
        element-wise states' dtype (exp_avg, unfactored exp_avg_sq; uint8: int8 codes, QUANT); MASTER, SR: the
        param's master slot and stochastic rounding bits (kernels/rules.py); seed: this step's random bits."""
        if amp_skip(inf_ptr, HAS_INF) == 0:
            run_phases(barrier, PASSES, 6, _item, _count,
                       ((ptrs, meta, work, tsc, part0, part1, rcpart, counters, lr_ptr, scale_ptr),
                        (fp64_arg(lr), fp64_arg(eps), fp64_arg(eps_scale), fp64_arg(clip), fp64_arg(decay_rate),
                         fp64_arg(beta1), fp64_arg(wd)), (n_fact, n_work),
                        (FLAGS, P_DT, G_DT, S_DT, LR_TENSOR, HAS_SCALE, E_DT, MASTER, SR, QUANT), seed))
