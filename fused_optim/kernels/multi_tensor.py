"""The element-wise apply: one Triton launch updates a whole param group (per dtype combination), running an
optimizer's ``Rule`` (kernels/rules.py: the jit functions that state its math and its named hyper-parameters).

Tables (tables.py caches them): ``ptrs`` int64 [T, S_COL + NS (+1 master)] the addresses of param, grad and each
state of tensor t; ``numels`` [T]; ``work`` int32 [W, W_WIDTH] (tensor, chunk) pairs, every tensor >= 1 chunk so
0-element tensors still advance their scalars; ``sptrs`` int64 [T, NT] addresses of the per-tensor 0-d
states; ``counters`` int32 [T]; with a statistics pass also ``partials`` fp64 [W], ``stats`` fp64 [T, 2] and a grid
barrier. See Note [last program writes scalars] in kernels/README.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, repeat

import torch

from . import quant, runtime, sync
from .runtime import BLOCK, ITERS
from .tables import Tables, TableCache, all_aligned, buckets, dtype_of, fields, numel, pick, ptr, to_device
from .rules import (MASTER_FP32, MAX_SCALARS, MAX_STATES, N_HYPER, NO_MASTER, P_APPLY, P_STATS, REMAINDER,  # noqa: F401
                    SCALAR_F64_FIRST, SR_PARAM, SR_STATES, Rule, flag_bits, master_kind, pack, scalar_f64_flags,
                    sr_bits)

_PB = 4 if runtime.interpreter_enabled() else 256  # partial sums added PB at a time (sync.sum_partials)

if runtime.available():
    import triton
    import triton.language as tl

    from .access import amp_skip, chunk_ptr, grad_inv_scale, load, load_unscaled_grad, over_chunk, to_compute
    from .lean import load_master, store_master
    from .quant import load_slot, store_slot
    from .rules import F64_0, F64_1, F64_2, F64_3, SCALAR_F64, SR_PARAM_BIT, SR_STATES_BIT  # noqa: F401
    from .sync import arrive, run_phases, sum_partials

    P_COL, G_COL, S_COL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # ptrs columns (states from S_COL)
    REMAINDER_K = tl.constexpr(REMAINDER)
    W_TENSOR, W_CHUNK, W_WIDTH = fields("tensor", "chunk")
    STATS_PASS, APPLY_PASS = tl.constexpr(P_STATS), tl.constexpr(P_APPLY)

    @triton.jit
    def _no_scalars(t0, t1, t2, t3, lr, h1, h2, h3, h4, h5, h6, h7, FLAGS: tl.constexpr):
        # Default SCALARS for optimizers with no per-tensor scalar state.
        return t0, t1, t2, t3, lr, 0.0, 0.0, 0.0

    @triton.jit
    def _slot_ptr(ON: tl.constexpr, row, col, DT: tl.constexpr, ALIGNED: tl.constexpr, absent):
        if ON:
            return chunk_ptr(row, col, DT, ALIGNED)
        else:
            return absent

    @triton.jit
    def _scalar_ptr(srow, k: tl.constexpr, F64: tl.constexpr):
        if F64:
            return tl.load(srow + k).to(tl.pointer_type(tl.float64))
        else:
            return tl.load(srow + k).to(tl.pointer_type(tl.float32))

    @triton.jit
    def _load_scalar(ON: tl.constexpr, srow, k: tl.constexpr, F64: tl.constexpr):
        # a per-tensor scalar state: fp32 (F64: fp64) in memory, fp64 math
        if ON:
            return tl.load(_scalar_ptr(srow, k, F64)).to(tl.float64)
        else:
            return 0.0

    @triton.jit
    def _scalar_in(k: tl.constexpr, NT: tl.constexpr, HAS_STATS: tl.constexpr, srow, stat_ptr, p_ptr,
                   F64: tl.constexpr):
        # slot k of SCALARS: a scalar state, else (the first free slot) the statistics pass's mean, else 0. The
        # mean: its total (written by another program) / the full tensor's numel, in the compute dtype as torch's
        if k < NT:
            return _load_scalar(True, srow, k, F64)
        elif HAS_STATS and k == NT:
            total = to_compute(tl.load(stat_ptr, cache_modifier=".cg"), p_ptr)
            return (total / to_compute(tl.load(stat_ptr + 1), p_ptr)).to(tl.float64)
        else:
            return 0.0

    @triton.jit
    def _no_stats(p, g, s0, s1, s2, s3, c0, c1, c2, c3, lr, h1, h2, h3, h4, h5, h6, h7, FLAGS: tl.constexpr):
        return p

    @triton.jit
    def _store_scalar(ON: tl.constexpr, srow, k: tl.constexpr, val, F64: tl.constexpr):
        if ON:
            ptr = _scalar_ptr(srow, k, F64)
            tl.store(ptr, tl.cast(val, ptr.dtype.element_ty))

    @triton.jit
    def _inputs(offs, mask, FULL: tl.constexpr, p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, m_ptr, inv_scale, qrow,
                NS: tl.constexpr, HAS_SCALE: tl.constexpr, MASTER: tl.constexpr, QUANT: tl.constexpr,
                WRITE_BACK: tl.constexpr):
        """An element block's (p, g, s0..s3) as both passes read them; WRITE_BACK: the update's read, which stores
        the unscaled grad back (the statistics pass only reads)."""
        p = load_master(p_ptr, m_ptr, offs, mask, FULL, MASTER)  # the exact fp32 master where there is one
        if WRITE_BACK:
            g = load_unscaled_grad(g_ptr, offs, mask, inv_scale, HAS_SCALE, FULL)
        else:
            g = load(g_ptr, offs, mask, FULL)
            if HAS_SCALE:
                g = g * inv_scale  # the same product the update's read makes
        s0 = load_slot(NS > 0, 0, s0_ptr, offs, mask, FULL, p, qrow, QUANT)
        s1 = load_slot(NS > 1, 1, s1_ptr, offs, mask, FULL, p, qrow, QUANT)
        s2 = load_slot(NS > 2, 2, s2_ptr, offs, mask, FULL, p, qrow, QUANT)
        s3 = load_slot(NS > 3, 3, s3_ptr, offs, mask, FULL, p, qrow, QUANT)
        return p, g, s0, s1, s2, s3

    @triton.jit
    def _block(carry, offs, mask, FULL: tl.constexpr, p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, m_ptr,
               inv_scale, qrow, seed, c0, c1, c2, c3, lr, h1, h2, h3, h4, h5, h6, h7,
               UPDATE: tl.constexpr, FLAGS: tl.constexpr, NS: tl.constexpr,
               HAS_SCALE: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr, QUANT: tl.constexpr):
        # over_chunk's BODY: nothing to carry, the carry (a tensor: loops carry no constants) passes through
        p, g, s0, s1, s2, s3 = _inputs(offs, mask, FULL, p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, m_ptr,
                                       inv_scale, qrow, NS, HAS_SCALE, MASTER, QUANT, True)
        p, s0, s1, s2, s3 = UPDATE(p, g, s0, s1, s2, s3, c0, c1, c2, c3, lr, h1, h2, h3, h4, h5, h6, h7, FLAGS)
        store_master(p_ptr, m_ptr, offs, p, mask, FULL, MASTER, SR, seed)
        # each state its own random bits (the param's stream is seed itself)
        store_slot(NS > 0, 0, s0_ptr, offs, s0, mask, FULL, SR & SR_STATES_BIT, seed ^ 0x5A5A0001, qrow,
                   QUANT)
        store_slot(NS > 1, 1, s1_ptr, offs, s1, mask, FULL, SR & SR_STATES_BIT, seed ^ 0x5A5A0002, qrow,
                   QUANT)
        store_slot(NS > 2, 2, s2_ptr, offs, s2, mask, FULL, SR & SR_STATES_BIT, seed ^ 0x5A5A0003, qrow,
                   QUANT)
        store_slot(NS > 3, 3, s3_ptr, offs, s3, mask, FULL, SR & SR_STATES_BIT, seed ^ 0x5A5A0004, qrow,
                   QUANT)
        return carry

    @triton.jit
    def _stats_block(acc, offs, mask, FULL: tl.constexpr, p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, m_ptr,
                     inv_scale, qrow, c0, c1, c2, c3, lr, h1, h2, h3, h4, h5, h6, h7,
                     STATS: tl.constexpr, FLAGS: tl.constexpr, NS: tl.constexpr,
                     HAS_SCALE: tl.constexpr, MASTER: tl.constexpr, QUANT: tl.constexpr):
        # over_chunk's BODY of the statistics pass: acc += STATS over the block's elements (compute-dtype lanes)
        p, g, s0, s1, s2, s3 = _inputs(offs, mask, FULL, p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, m_ptr,
                                       inv_scale, qrow, NS, HAS_SCALE, MASTER, QUANT, False)
        x = STATS(p, g, s0, s1, s2, s3, c0, c1, c2, c3, lr, h1, h2, h3, h4, h5, h6, h7, FLAGS)
        return acc + tl.where(mask, x, 0.0).to(acc.dtype)

    @triton.jit
    def _run_pass(item, PASS: tl.constexpr, ptrs, numels, work, sptrs, counters, lr_ptr, scale_ptr, hp, seed,
                  partials, stats, n_items, UPDATE: tl.constexpr, SCALARS: tl.constexpr, STATS: tl.constexpr,
                  FLAGS: tl.constexpr, NS: tl.constexpr, NT: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
                  QUANT: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
                  LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_STATS: tl.constexpr, ALIGNED: tl.constexpr,
                  BLOCK: tl.constexpr, ITERS: tl.constexpr, PB: tl.constexpr):
        """Pass PASS over work item `item` (one chunk of one tensor)."""
        t = tl.load(work + W_WIDTH * item + W_TENSOR)
        chunk = tl.load(work + W_WIDTH * item + W_CHUNK).to(tl.int64)
        n = tl.load(numels + t)
        row = ptrs + t.to(tl.int64) * (S_COL + NS + (1 if MASTER else 0) + (NS + 1 if QUANT else 0))
        qrow = row + S_COL + NS + (1 if MASTER else 0)  # QUANT: the code maps' column, then the scales'
        p_ptr = chunk_ptr(row, P_COL, P_DT, ALIGNED)
        g_ptr = chunk_ptr(row, G_COL, G_DT, ALIGNED)
        s0_ptr = _slot_ptr(NS > 0, row, S_COL + 0, S_DT, ALIGNED, p_ptr)  # absent slots: never dereferenced
        s1_ptr = _slot_ptr(NS > 1, row, S_COL + 1, S_DT, ALIGNED, p_ptr)
        s2_ptr = _slot_ptr(NS > 2, row, S_COL + 2, S_DT, ALIGNED, p_ptr)
        s3_ptr = _slot_ptr(NS > 3, row, S_COL + 3, S_DT, ALIGNED, p_ptr)
        if MASTER == REMAINDER_K:
            m_ptr = _slot_ptr(True, row, S_COL + NS, tl.int16, ALIGNED, p_ptr)
        else:
            m_ptr = _slot_ptr(MASTER, row, S_COL + NS, tl.float32, ALIGNED, p_ptr)

        srow = sptrs + t.to(tl.int64) * NT
        t0 = _scalar_in(0, NT, HAS_STATS, srow, stats + 2 * t, p_ptr, FLAGS & F64_0)
        t1 = _scalar_in(1, NT, HAS_STATS, srow, stats + 2 * t, p_ptr, FLAGS & F64_1)
        t2 = _scalar_in(2, NT, HAS_STATS, srow, stats + 2 * t, p_ptr, FLAGS & F64_2)
        t3 = _scalar_in(3, NT, HAS_STATS, srow, stats + 2 * t, p_ptr, FLAGS & F64_3)
        # fp64 hyper-parameters come from a device buffer: kernel float arguments would be fp32 under the
        # interpreter, and 1 - beta2 ** step needs fp64
        lr = tl.load(hp)
        h1 = tl.load(hp + 1)
        h2 = tl.load(hp + 2)
        h3 = tl.load(hp + 3)
        h4 = tl.load(hp + 4)
        h5 = tl.load(hp + 5)
        h6 = tl.load(hp + 6)
        h7 = tl.load(hp + 7)
        if LR_TENSOR:
            lr = tl.load(lr_ptr).to(tl.float64)
        n0, n1, n2, n3, c0, c1, c2, c3 = SCALARS(t0, t1, t2, t3, lr, h1, h2, h3, h4, h5, h6, h7, FLAGS)
        c0 = to_compute(c0, p_ptr)  # float64 params keep fp64 coefficients
        c1 = to_compute(c1, p_ptr)
        c2 = to_compute(c2, p_ptr)
        c3 = to_compute(c3, p_ptr)
        inv_scale = grad_inv_scale(scale_ptr, HAS_SCALE)
        nwork = tl.maximum(tl.cdiv(n, BLOCK * ITERS), 1).to(tl.int32)
        if PASS == STATS_PASS:
            acc = over_chunk(_stats_block, to_compute(tl.zeros([BLOCK], tl.float32), p_ptr), chunk * (BLOCK * ITERS), n,
                             (p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, m_ptr, inv_scale, qrow, c0, c1, c2,
                              c3, lr, h1, h2, h3, h4, h5, h6, h7, STATS, FLAGS, NS, HAS_SCALE, MASTER, QUANT),
                             BLOCK, ITERS)
            tl.store(partials + item, tl.sum(acc, axis=0))
            # Note [statistics pass]: the tensor's last program sums its chunks' partials in chunk order
            if arrive(counters + t, nwork):
                # the total (FSDP2: of the local shard, then summed over the shards between the launches)
                tl.store(stats + 2 * t, sum_partials(partials + (item - chunk), nwork, PB))
                tl.store(counters + t, 0)
        else:
            over_chunk(_block, tl.cast(0, tl.int32), chunk * (BLOCK * ITERS), n,
                       (p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, m_ptr, inv_scale, qrow, seed + t, c0, c1,
                        c2, c3, lr, h1, h2, h3, h4, h5, h6, h7, UPDATE, FLAGS, NS, HAS_SCALE, MASTER, SR, QUANT),
                       BLOCK, ITERS)
            if NT > 0:
                # Note [last program writes scalars]: all readers of the old values are done by then
                if arrive(counters + t, nwork):
                    _store_scalar(True, srow, 0, n0, FLAGS & F64_0)
                    _store_scalar(NT > 1, srow, 1, n1, FLAGS & F64_1)
                    _store_scalar(NT > 2, srow, 2, n2, FLAGS & F64_2)
                    _store_scalar(NT > 3, srow, 3, n3, FLAGS & F64_3)
                    tl.store(counters + t, 0)

    @triton.jit
    def _item(item, PASS: tl.constexpr, args):
        """run_phases' ITEM."""
        _run_pass(item, PASS, *args)  # flat: triton 3.6 unpacks a flat tuple into constexpr parameters

    @triton.jit
    def _count(PASS: tl.constexpr, args):
        return args[11]  # n_items: both passes run over every work item

    @triton.jit
    def multi_tensor_apply_kernel(
        ptrs, numels, work, sptrs, counters, lr_ptr, scale_ptr, inf_ptr, hp, seed, partials, stats, barrier, n_items,
        UPDATE: tl.constexpr, SCALARS: tl.constexpr, STATS: tl.constexpr, FLAGS: tl.constexpr,
        NS: tl.constexpr, NT: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr, QUANT: tl.constexpr,
        P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
        LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, HAS_STATS: tl.constexpr,
        PASSES: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, PB: tl.constexpr,
    ):
        """The passes in PASSES (bits): one pass is a plain launch, one program per work item; both passes a
        persistent cooperative one (runtime.launch_phases)."""
        if amp_skip(inf_ptr, HAS_INF) == 0:
            # the args tuples are written out in the calls: assigned to a name, their constexprs would become values
            if PASSES == 3:  # both passes, a grid barrier between them
                run_phases(barrier, PASSES, 2, _item, _count,
                           (ptrs, numels, work, sptrs, counters, lr_ptr, scale_ptr, hp, seed, partials, stats, n_items,
                            UPDATE, SCALARS, STATS, FLAGS, NS, NT, MASTER, SR, QUANT, P_DT, G_DT, S_DT, LR_TENSOR,
                            HAS_SCALE, HAS_STATS, ALIGNED, BLOCK, ITERS, PB))
            else:  # one pass (bit 1: statistics, bit 2: update), one program per work item
                _run_pass(tl.program_id(0), PASSES // 2, ptrs, numels, work, sptrs, counters, lr_ptr, scale_ptr, hp,
                          seed, partials, stats, n_items, UPDATE, SCALARS, STATS, FLAGS, NS, NT, MASTER, SR, QUANT,
                          P_DT, G_DT, S_DT, LR_TENSOR, HAS_SCALE, HAS_STATS, ALIGNED, BLOCK, ITERS, PB)


@dataclass
class _Tables(Tables):
    numels: torch.Tensor = None
    work: torch.Tensor = None
    sptrs: torch.Tensor = None
    counters: torch.Tensor = None
    hp: torch.Tensor = None     # fp64 [N_HYPER] hyper-parameters on the device
    hkey: tuple = ()            # the values hp holds
    fdummy: torch.Tensor = None  # an fp32 stand-in for absent lr / grad_scale / found_inf
    partials: torch.Tensor = None  # the statistics pass (made on its first use): fp64 [W] per work item,
    stats: torch.Tensor = None     # fp64 [T, 2] per tensor: the pass's total, the full tensor's numel (>= 1),
    barrier: sync.GridBarrier = None  # and the grid barrier of its persistent launch
    qmap: torch.Tensor = None  # int8 states: the code maps (kernels/quant.py), their address in every row
    shards: object = None  # FSDP2: the bucket's sharded.Layout when some tensor is sharded (statistics span ranks),
    full_numels: torch.Tensor = None  # and its tensors' full numels (int64 [T])


def _build_tables(key, params, grads, columns, scalars, device, qscales=(), shards=None) -> _Tables:
    chunk = BLOCK * ITERS
    qmap = quant.code_maps(device) if qscales else None
    columns = [*columns, *([[qmap] * len(params), *qscales] if qscales else ())]
    rows = [list(r) for r in zip(map(ptr, params), map(ptr, grads), *(map(ptr, c) for c in columns))]
    work = [(i, c) for i, n in enumerate(map(numel, params)) for c in range(max(1, -(-n // chunk)))]
    srows = [list(r) for r in zip(*(map(ptr, c) for c in scalars))]
    sharded = shards is not None and shards.group is not None  # FSDP2: a statistic spans the ranks
    return _Tables(
        key=key, gkey=tuple(map(ptr, grads)), ptrs=to_device(rows, torch.int64, device), grad_col=1,
        aligned=all_aligned(params, grads, *columns),
        numels=to_device(list(map(numel, params)), torch.int64, device),
        work=to_device(work, torch.int32, device),
        sptrs=to_device(srows, torch.int64, device) if scalars else torch.zeros(1, dtype=torch.int64, device=device),
        counters=torch.zeros(max(len(params), 1), dtype=torch.int32, device=device),
        hp=torch.zeros(N_HYPER, dtype=torch.float64, device=device),
        fdummy=torch.zeros(1, dtype=torch.float32, device=device), qmap=qmap, shards=shards if sharded else None,
        full_numels=to_device(shards.numels(params), torch.int64, device) if sharded else None)


def apply(rule: Rule, cache: TableCache, params, grads, columns, scalars, *, lr_tensor=None,
          grad_scale=None, found_inf=None, masters=None, stochastic_rounding=False, seed=0,
          state_stochastic_rounding=False, scales=None, unsigned=0, who="fused_optim", shards=None) -> None:
    """Update one param group in one launch per (param, grad, state, scalar state) dtype combination (a rule with
    ``stats``: one persistent launch, or two where the device refuses it; ``who`` names the optimizer in a grid
    barrier's report).

    ``columns``: one list per element-wise state (``columns[k][i]``: state k of tensor i); ``scalars``: one list per
    per-tensor 0-d scalar state (float32, or float64: see SCALAR_F64). Tensors are read by address and size only:
    each tensor and its states must be dense in one storage order (the caller checks). ``masters[i]``: an fp32 master
    copy of a bf16/fp16 param (the math updates it, the param gets its rounding), an int16 remainder of a bf16 param
    (param_remainders: the two are the exact fp32 master, kernels/lean.py), or None. ``stochastic_rounding``: bf16
    params are stored with stochastic rounding, random bits drawn from ``seed`` (vary it every step);
    ``state_stochastic_rounding``: bf16 states too. ``scales``: int8 states (uint8 codes in ``columns``): one list
    per column of their fp32 block scales (None for a tensor whose states are not int8); ``unsigned``: bit k for
    a non-negative state k (kernels/quant.py). ``shards``: the sharded.Layout of DTensor params given as their
    local shards: a statistics pass's totals are summed over the shards between its two launches."""
    has_master = masters is not None and any(m is not None for m in masters)
    # every address and size the tables hold but the grads': any change (a loaded state, a replaced param's .data)
    # rebuilds; dtypes are fixed with the addresses, so the dtype buckets are reused while the key holds
    key = (*map(ptr, params), *map(ptr, chain.from_iterable((*columns, *scalars))), *map(numel, params),
           *([0 if m is None else m.data_ptr() for m in masters] if has_master else ()),
           *([s.data_ptr() for col in scales for s in col if s is not None] if scales else ()))
    # the grads' dtypes too: a new grad may come in another dtype (its new address alone re-uploads the column)
    gdts = tuple(map(dtype_of, grads))
    plan = cache.plan
    if plan is None or plan[0] != key or plan[1] != gdts:
        keys = list(zip(map(dtype_of, params), gdts, map(dtype_of, columns[0] if columns else params),
                        list(map(master_kind, masters)) if has_master else repeat(NO_MASTER),
                        zip(*(map(dtype_of, col) for col in scalars)) if scalars else repeat(())))
        plan = cache.plan = (key, gdts, buckets(keys))
        cache.tables.clear()  # the tables are keyed by the whole group's addresses, not by their bucket's
    for (*dts, master, sdts), idx in plan[2].items():
        dts = tuple(dts)
        ps, gs, *cols = pick(idx, params, grads, *columns, *scalars)
        cols, scs = cols[:len(columns)], cols[len(columns):]
        if master:  # the master copy rides in the table as one more element-wise slot, after the states
            cols = [*cols, [masters[i] for i in idx]]
        qbits = quant.quant_bits(unsigned) if dts[2] == quant.CODE_DTYPE else 0
        qs = pick(idx, *scales) if qbits else ()
        tab = cache.lookup((dts, master, sdts), key, gs,
                           lambda: _build_tables(key, ps, gs, cols, scs, ps[0].device, qs,
                                                 shards and shards.pick(idx)))
        sr = sr_bits(dts[0], dts[2] if columns else None, master, stochastic_rounding, state_stochastic_rounding)
        _launch(rule, tab, dts, len(cols) - bool(master), len(scs), lr_tensor, grad_scale, found_inf, master, sr, seed,
                who, scalar_f64_flags(scs), qbits)


def constexprs(rule: Rule, dts, ns: int, nt: int, *, lr_tensor: bool, has_scale: bool, has_inf: bool,
               aligned: bool, master: int = NO_MASTER, sr: int = 0, passes=(P_APPLY,), scalar_f64: int = 0,
               quant: int = 0) -> dict:
    """The kernel's compile-time arguments for one launch running ``passes`` (one of rule.launches(), or one pass
    of it): the launcher and the AOT inventory both use this. ``master``: NO_MASTER, MASTER_FP32 or REMAINDER;
    ``sr``: SR_PARAM / SR_STATES bits (True: SR_PARAM); ``scalar_f64``: the SCALAR_F64 bits of the float64 scalar
    slots; ``quant``: QUANT (int8 states: 1 + 2 * the unsigned slots' bits; dts[2] is then uint8)."""
    has_stats = rule.stats is not None
    assert ns <= MAX_STATES and nt + has_stats <= MAX_SCALARS
    return dict(UPDATE=rule.update, SCALARS=rule.scalars or _no_scalars, STATS=rule.stats or _no_stats,
                FLAGS=rule.flags | scalar_f64, NS=ns, NT=nt,
                P_DT=runtime.tl_dtype(dts[0]), G_DT=runtime.tl_dtype(dts[1]), S_DT=runtime.tl_dtype(dts[2]),
                LR_TENSOR=lr_tensor, HAS_SCALE=has_scale, HAS_INF=has_inf, HAS_STATS=has_stats,
                PASSES=sum(1 << p for p in passes), ALIGNED=aligned, BLOCK=BLOCK, ITERS=ITERS, PB=_PB,
                MASTER=int(master), SR=int(sr), QUANT=int(quant))


def _launch(rule, tab, dts, ns, nt, lr_tensor, grad_scale, found_inf, master=NO_MASTER, sr=0, seed=0,
            who="fused_optim", scalar_f64=0, quant=0):
    hypers = rule.hyper_values()
    if tab.hkey != hypers:  # uploads only when a hyper-parameter changed (e.g. an LR schedule step)
        tab.hp.copy_(torch.tensor(hypers, dtype=torch.float64), non_blocking=True)
        tab.hkey = hypers
    dummy = tab.fdummy
    n_items = tab.work.shape[0]
    if rule.stats is not None and tab.partials is None:
        dev = tab.work.device
        tab.partials = torch.zeros(n_items, dtype=torch.float64, device=dev)
        n = tab.numels if tab.shards is None else tab.full_numels
        tab.stats = torch.stack([torch.zeros_like(n, dtype=torch.float64), n.clamp(min=1).double()], 1)
        tab.barrier = sync.GridBarrier(dev)
    args = (tab.ptrs, tab.numels, tab.work, tab.sptrs, tab.counters,
            lr_tensor if lr_tensor is not None else dummy,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            tab.hp, seed,
            # hp: an fp64 stand-in for the absent statistics buffers (never read)
            tab.hp if tab.partials is None else tab.partials, tab.hp if tab.stats is None else tab.stats,
            tab.counters if tab.barrier is None else tab.barrier.words, n_items)

    def constexprs_of(passes):
        return constexprs(rule, dts, ns, nt, lr_tensor=lr_tensor is not None, has_scale=grad_scale is not None,
                          has_inf=found_inf is not None, aligned=tab.aligned, master=master, sr=sr, passes=passes,
                          scalar_f64=scalar_f64, quant=quant)

    for passes in rule.launches():
        if len(passes) == 1:
            runtime.launch(multi_tensor_apply_kernel, n_items, *args, **constexprs_of(passes))
        else:
            runtime.launch_phases(multi_tensor_apply_kernel, list(passes), *args, grid_of=lambda _: n_items,
                                  device=tab.work.device, constexprs_of=constexprs_of, between=tab.shards and (
                                      lambda _: tab.stats[:, 0].copy_(tab.shards.full_sums(tab.stats[:, 0]))))
            tab.barrier.watch(who)
