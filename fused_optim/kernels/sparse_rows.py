"""The sparse-rows kernel (SparseAdam): gathers p / exp_avg / exp_avg_sq at the rows a coalesced sparse grad holds,
applies an element rule of the multi-tensor UPDATE convention (kernels/multi_tensor.py) and scatters them back; one
launch per dtype combination for all params of a group."""
from __future__ import annotations

import struct

import torch

from . import runtime
from .tables import fields

if runtime.available():
    import triton
    import triton.language as tl

    from .access import chunk_ptr, grad_inv_scale, load, load_hypers, load_unscaled_grad, store, to_compute

    # a tensor's table row (int64): addresses, sizes, and the step size as float64 bits
    R_PARAM, R_EXP_AVG, R_EXP_AVG_SQ, R_VALUES, R_ROWS, R_NUMEL, R_ROW_LEN, R_STEP_SIZE, R_WIDTH = fields(
        "param", "exp_avg", "exp_avg_sq", "values", "rows", "numel", "row_len", "step_size")

    @triton.jit
    def sparse_rows_kernel(hypers, table, work, scale_ptr, UPDATE: tl.constexpr, FLAGS: tl.constexpr,
                            P_DT: tl.constexpr, G_DT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
                            ITERS: tl.constexpr):
        # One program = one chunk of one tensor's coalesced values (present rows x row length).
        pid = tl.program_id(0)
        t = tl.load(work + 2 * pid)
        chunk = tl.load(work + 2 * pid + 1)
        row = table + t * R_WIDTH
        p_ptr = chunk_ptr(row, R_PARAM, P_DT, False)
        m_ptr = chunk_ptr(row, R_EXP_AVG, P_DT, False)
        v_ptr = chunk_ptr(row, R_EXP_AVG_SQ, P_DT, False)
        g_ptr = chunk_ptr(row, R_VALUES, G_DT, False)
        idx_ptr = tl.load(row + R_ROWS).to(tl.pointer_type(tl.int64))
        n = tl.load(row + R_NUMEL)
        cols = tl.load(row + R_ROW_LEN)
        step_size = to_compute(tl.load(row + R_STEP_SIZE).to(tl.float64, bitcast=True), p_ptr)  # fp64 params: fp64
        lr, h1, h2, h3, h4, h5, h6, h7 = load_hypers(hypers)
        inv_scale = grad_inv_scale(scale_ptr, HAS_SCALE)
        zero = to_compute(tl.zeros([BLOCK], dtype=tl.float32), p_ptr)
        lanes = tl.arange(0, BLOCK)
        for i in range(ITERS):
            e = chunk * (BLOCK * ITERS) + i * BLOCK + lanes  # index into the coalesced values
            mask = e < n
            r = e // cols
            offs = tl.load(idx_ptr + r, mask=mask, other=0) * cols + (e - r * cols)  # into p, m, v
            p = load(p_ptr, offs, mask, False)
            m = load(m_ptr, offs, mask, False)
            v = load(v_ptr, offs, mask, False)
            g = load_unscaled_grad(g_ptr, e, mask, inv_scale, HAS_SCALE, False)
            p, m, v, _, _ = UPDATE(p, g, m, v, zero, zero, step_size, 0.0, 0.0, 0.0, lr, h1, h2, h3, h4, h5, h6, h7,
                                   FLAGS)
            store(p_ptr, offs, p, mask, False)
            store(m_ptr, offs, m, mask, False)
            store(v_ptr, offs, v, mask, False)


def constexprs(rule, dts, has_scale: bool) -> dict:
    return dict(UPDATE=rule.update, FLAGS=rule.flags, P_DT=runtime.tl_dtype(dts[0]), G_DT=runtime.tl_dtype(dts[1]),
                HAS_SCALE=has_scale, BLOCK=runtime.BLOCK, ITERS=runtime.ITERS)


def launch_rows(rule, dts, items, grad_scale) -> None:
    """One launch over the coalesced rows of every param in ``items`` ((p, exp_avg, exp_avg_sq, values, rows, step
    size) each):
    the table is uploaded each step (sparse indices are new every step anyway)."""
    chunk = runtime.BLOCK * runtime.ITERS
    table, work = [], []
    for t, (p, m, v, vals, rows, step_size) in enumerate(items):
        cols = vals[0].numel() if vals.dim() > 1 else 1
        table += [p.data_ptr(), m.data_ptr(), v.data_ptr(), vals.data_ptr(),
                  rows.data_ptr(), vals.numel(), cols, f64_bits(step_size)]
        work += [x for c in range(-(-vals.numel() // chunk)) for x in (t, c)]
    dev = items[0][0].device
    hypers = [f64_bits(h) for h in rule.hyper_values()]  # every slot: unused ones are 0
    buf = torch.tensor(hypers + table + work, dtype=torch.int64).to(dev)  # one upload per launch
    n_h, n_t = len(hypers), len(hypers) + len(table)
    runtime.launch(sparse_rows_kernel, len(work) // 2, buf[:n_h].view(torch.float64), buf[n_h:n_t], buf[n_t:],
                   grad_scale if grad_scale is not None else buf, **constexprs(rule, dts, grad_scale is not None))


def f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]
