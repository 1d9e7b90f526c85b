"""The sparse-rows kernel (SparseAdam): gathers p / exp_avg / exp_avg_sq at the rows a coalesced sparse grad holds,
applies an element rule of the multi-tensor UPDATE convention (kernels/multi_tensor.py) and scatters them back; one
launch per dtype combination for all params of a group. The precision options ride along as in the shared apply:
the math updates the exact fp32 master (a master copy, or the bf16 param joined with its remainder), the param is
stored rounded (to nearest or stochastically), bf16 states to nearest or stochastically (kernels/lean.py), int8
states dequantized and requantized by whole 256-blocks (kernels/quant.py; rows of whole blocks only, so each 256
lanes of a chunk are one block of one row). Only the rows present are read or written, so every other row stays
bit-identical under every option."""
from __future__ import annotations

import struct

import torch

from . import quant, runtime
from .rules import NO_MASTER, REMAINDER, master_kind, sr_bits
from .tables import fields

if runtime.available():
    import triton
    import triton.language as tl

    from .access import chunk_ptr, grad_inv_scale, load_hypers, load_unscaled_grad, to_compute
    from .lean import load_master, store_master
    from .quant import load_slot, store_slot
    from .rules import SR_STATES_BIT

    # a tensor's table row (int64): addresses (the master: its fp32 copy or int16 remainder, else 0), sizes, the
    # step size as float64 bits, then int8 states' code maps and block scales (quant's qrow: maps, one per slot)
    (R_PARAM, R_EXP_AVG, R_EXP_AVG_SQ, R_VALUES, R_ROWS, R_MASTER, R_NUMEL, R_ROW_LEN, R_STEP_SIZE, R_QMAP,
     R_SCALES_EXP_AVG, R_SCALES_EXP_AVG_SQ, R_WIDTH) = fields(
        "param", "exp_avg", "exp_avg_sq", "values", "rows", "master", "numel", "row_len", "step_size", "qmap",
        "scales_exp_avg", "scales_exp_avg_sq")
    REMAINDER_K = tl.constexpr(REMAINDER)

    @triton.jit
    def sparse_rows_kernel(hypers, table, work, scale_ptr, seed, UPDATE: tl.constexpr, FLAGS: tl.constexpr,
                           P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr, HAS_SCALE: tl.constexpr,
                           MASTER: tl.constexpr, SR: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr,
                           ITERS: tl.constexpr):
        # One program = one chunk of one tensor's coalesced values (present rows x row length).
        pid = tl.program_id(0)
        t = tl.load(work + 2 * pid)
        chunk = tl.load(work + 2 * pid + 1)
        row = table + t * R_WIDTH
        p_ptr = chunk_ptr(row, R_PARAM, P_DT, False)
        m_ptr = chunk_ptr(row, R_EXP_AVG, S_DT, False)
        v_ptr = chunk_ptr(row, R_EXP_AVG_SQ, S_DT, False)
        g_ptr = chunk_ptr(row, R_VALUES, G_DT, False)
        if MASTER == REMAINDER_K:
            w_ptr = chunk_ptr(row, R_MASTER, tl.int16, False)
        else:
            w_ptr = chunk_ptr(row, R_MASTER, tl.float32, False)  # (never read without a master)
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
            p = load_master(p_ptr, w_ptr, offs, mask, False, MASTER)
            m = load_slot(True, 0, m_ptr, offs, mask, False, p, row + R_QMAP, QUANT).to(p.dtype)
            v = load_slot(True, 1, v_ptr, offs, mask, False, p, row + R_QMAP, QUANT).to(p.dtype)
            g = load_unscaled_grad(g_ptr, e, mask, inv_scale, HAS_SCALE, False)
            p, m, v, _, _ = UPDATE(p, g, m, v, zero, zero, step_size, 0.0, 0.0, 0.0, lr, h1, h2, h3, h4, h5, h6, h7,
                                   FLAGS)
            store_master(p_ptr, w_ptr, offs, p, mask, False, MASTER, SR, seed)
            # each state its own random bits, drawn at the element's offset in the tensor (the param's: seed)
            store_slot(True, 0, m_ptr, offs, m, mask, False, SR & SR_STATES_BIT, seed ^ 0x5A5A0001, row + R_QMAP,
                       QUANT)
            store_slot(True, 1, v_ptr, offs, v, mask, False, SR & SR_STATES_BIT, seed ^ 0x5A5A0002, row + R_QMAP,
                       QUANT)


def constexprs(rule, dts, has_scale: bool, master: int = NO_MASTER, sr: int = 0, unsigned: int = 0) -> dict:
    """dts: (param, grad values, states) dtypes (uint8 states: int8 codes); master: rules' NO_MASTER / MASTER_FP32 /
    REMAINDER; sr: SR_PARAM and SR_STATES bits; unsigned: quant.unsigned_slots' bits of int8 states."""
    return dict(UPDATE=rule.update, FLAGS=rule.flags, P_DT=runtime.tl_dtype(dts[0]), G_DT=runtime.tl_dtype(dts[1]),
                S_DT=runtime.tl_dtype(dts[2]), HAS_SCALE=has_scale, MASTER=master, SR=sr,
                QUANT=quant.quant_bits(unsigned) if dts[2] == quant.CODE_DTYPE else 0, BLOCK=runtime.BLOCK,
                ITERS=runtime.ITERS)


def row_len(grad) -> int:
    """Elements per row of a sparse grad's param (its dense dims)."""
    return grad.shape[grad.sparse_dim():].numel()


def fits(p, m, grad) -> bool:
    """Whether the rows kernel can update this param: int8 codes need a contiguous param whose rows are whole
    256-blocks (a block of another row's elements could not be requantized without them); every other state any
    param."""
    return m.dtype != quant.CODE_DTYPE or (p.is_contiguous() and row_len(grad) % quant.QBLOCK == 0)


def bucket_key(p, m, vals, master) -> tuple:
    """The launch a param goes to: its dtypes (param, grad values, states) and master kind."""
    return p.dtype, vals.dtype, m.dtype, master_kind(master)


def launch_rows(rule, key, items, grad_scale, *, stochastic_rounding=False, state_stochastic_rounding=False,
                seed=0, unsigned=0) -> None:
    """One launch over the coalesced rows of every param in ``items`` ((p, exp_avg, exp_avg_sq, values, rows, step
    size, master or None, (exp_avg's, exp_avg_sq's block scales) or None) each, all of one ``bucket_key``): the
    table is uploaded each step (sparse indices are new every step anyway). ``stochastic_rounding``: bf16 params
    (without a remainder) stored stochastically from ``seed``'s bits; ``state_stochastic_rounding``: bf16 states
    too; ``unsigned``: the unsigned slots of int8 states (PrecisionOptions._quant_args)."""
    chunk = runtime.BLOCK * runtime.ITERS
    table, work = [], []
    dev = items[0][0].device
    qmap = quant.code_maps(dev).data_ptr() if key[2] == quant.CODE_DTYPE else 0
    for t, (p, m, v, vals, rows, step_size, master, scales) in enumerate(items):
        cols = vals[0].numel() if vals.dim() > 1 else 1
        table += [p.data_ptr(), m.data_ptr(), v.data_ptr(), vals.data_ptr(), rows.data_ptr(),
                  0 if master is None else master.data_ptr(), vals.numel(), cols, f64_bits(step_size), qmap,
                  *((0, 0) if scales is None else (s.data_ptr() for s in scales))]
        work += [x for c in range(-(-vals.numel() // chunk)) for x in (t, c)]
    hypers = [f64_bits(h) for h in rule.hyper_values()]  # every slot: unused ones are 0
    buf = torch.tensor(hypers + table + work, dtype=torch.int64).to(dev)  # one upload per launch
    n_h, n_t = len(hypers), len(hypers) + len(table)
    p_dt, g_dt, s_dt, master = key
    sr = sr_bits(p_dt, s_dt, master, stochastic_rounding, state_stochastic_rounding)
    runtime.launch(sparse_rows_kernel, len(work) // 2, buf[:n_h].view(torch.float64), buf[n_h:n_t], buf[n_t:],
                   grad_scale if grad_scale is not None else buf, seed,
                   **constexprs(rule, (p_dt, g_dt, s_dt), grad_scale is not None, master, sr, unsigned))


def f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]
