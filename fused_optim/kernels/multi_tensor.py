"""The element-wise apply: one Triton launch updates a whole param group (per dtype combination).

An optimizer states its math as two ``@triton.jit`` functions (see optimizers/nadam.py) wrapped in a ``Rule``:

* ``SCALARS(t0, t1, t2, t3, lr, h1..h7, FLAGS) -> (n0, n1, n2, n3, c0, c1, c2, c3)``: fp64 scalar math once per
  program: new per-tensor scalar states ``n*`` (``step``, ...) and coefficients ``c*`` for the element math.
* ``UPDATE(p, g, s0, s1, s2, s3, c0, c1, c2, c3, lr, h1..h7, FLAGS) -> (p, s0, s1, s2, s3)``: fp32 element math.

The hyper-parameters ``lr, h1..h7`` are named: a Rule's ``hypers`` dict must match, in order, the names the two
functions give those slots (a slot a function does not use is named ``h<k>``), so a misordered or missing
hyper-parameter fails when the rule is made. ``FLAGS`` is a constexpr bit set (maximize, amsgrad, ...), so each
specialisation carries only its own code. Unused state slots are zeros and never stored.

Tables (tables.py caches them): ``ptrs`` int64 [T, S_COL + NS (+1 master)] the addresses of param, grad and each
state of tensor t; ``numels`` [T]; ``work`` int32 [W, W_WIDTH] (tensor, chunk) pairs, every tensor >= 1 chunk so
0-element tensors still advance their scalars; ``sptrs`` int64 [T, NT] addresses of the per-tensor 0-d float32
states; ``counters`` int32 [T]. See Note [last program writes scalars] in kernels/README.md.
"""
from __future__ import annotations

import inspect
import re
from functools import lru_cache
from itertools import chain, repeat
from dataclasses import dataclass

import torch

from . import runtime
from .runtime import BLOCK, ITERS
from .tables import Tables, TableCache, all_aligned, buckets, dtype_of, fields, numel, pick, ptr, to_device

MAX_STATES = 4
# MASTER: what the slot after the states holds for a bf16/fp16 param
NO_MASTER, MASTER_FP32, REMAINDER = 0, 1, 2  # none, an fp32 master copy, an int16 remainder (kernels/lean.py)
MAX_SCALARS = 4
N_HYPER = 8

if runtime.available():
    import triton
    import triton.language as tl

    from .access import (amp_skip, chunk_ptr, grad_inv_scale, load, load_unscaled_grad, over_chunk, store,
                         store_bf16_stochastic)
    from .lean import load_joined, store_split
    from .sync import arrive

    P_COL, G_COL, S_COL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # ptrs columns (states from S_COL)
    REMAINDER_K = tl.constexpr(REMAINDER)
    W_TENSOR, W_CHUNK, W_WIDTH = fields("tensor", "chunk")

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
    def _load_slot(ON: tl.constexpr, ptr, offs, mask, FULL: tl.constexpr, like):
        if ON:
            return load(ptr, offs, mask, FULL)
        else:
            return tl.zeros_like(like)

    @triton.jit
    def _store_slot(ON: tl.constexpr, ptr, offs, val, mask, FULL: tl.constexpr, SR: tl.constexpr, seed):
        # SR: bf16 states stored with stochastic rounding (state_dtype=bf16 with stochastic_rounding)
        if ON:
            if SR:
                store_bf16_stochastic(ptr, offs, val, mask, seed, FULL)
            else:
                store(ptr, offs, val, mask, FULL)

    @triton.jit
    def _load_scalar(ON: tl.constexpr, srow, k: tl.constexpr):
        # a per-tensor scalar state: fp32 in memory, fp64 math
        if ON:
            return tl.load(tl.load(srow + k).to(tl.pointer_type(tl.float32))).to(tl.float64)
        else:
            return 0.0

    @triton.jit
    def _store_scalar(ON: tl.constexpr, srow, k: tl.constexpr, val):
        if ON:
            tl.store(tl.load(srow + k).to(tl.pointer_type(tl.float32)), tl.cast(val, tl.float32))

    @triton.jit
    def _block(carry, offs, mask, FULL: tl.constexpr, p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, m_ptr,
               inv_scale, seed, c0, c1, c2, c3, lr, h1, h2, h3, h4, h5, h6, h7,
               UPDATE: tl.constexpr, FLAGS: tl.constexpr, NS: tl.constexpr,
               HAS_SCALE: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr, STATE_SR: tl.constexpr):
        # over_chunk's BODY: nothing to carry, the carry (a tensor: loops carry no constants) passes through
        if MASTER == REMAINDER_K:
            p = load_joined(p_ptr, m_ptr, offs, mask, FULL)  # the exact fp32 master: bf16 param + int16 remainder
        elif MASTER:
            p = load(m_ptr, offs, mask, FULL)  # the fp32 master copy is the param the math updates
        else:
            p = load(p_ptr, offs, mask, FULL)
        g = load_unscaled_grad(g_ptr, offs, mask, inv_scale, HAS_SCALE, FULL)
        s0 = _load_slot(NS > 0, s0_ptr, offs, mask, FULL, p)
        s1 = _load_slot(NS > 1, s1_ptr, offs, mask, FULL, p)
        s2 = _load_slot(NS > 2, s2_ptr, offs, mask, FULL, p)
        s3 = _load_slot(NS > 3, s3_ptr, offs, mask, FULL, p)
        p, s0, s1, s2, s3 = UPDATE(p, g, s0, s1, s2, s3, c0, c1, c2, c3, lr, h1, h2, h3, h4, h5, h6, h7, FLAGS)
        if MASTER == REMAINDER_K:
            store_split(p_ptr, m_ptr, offs, p, mask, FULL)
        else:
            if MASTER:
                store(m_ptr, offs, p, mask, FULL)
            if SR:
                store_bf16_stochastic(p_ptr, offs, p, mask, seed, FULL)
            else:
                store(p_ptr, offs, p, mask, FULL)
        # each state its own random bits (the param's stream is seed itself)
        _store_slot(NS > 0, s0_ptr, offs, s0, mask, FULL, STATE_SR, seed ^ 0x5A5A0001)
        _store_slot(NS > 1, s1_ptr, offs, s1, mask, FULL, STATE_SR, seed ^ 0x5A5A0002)
        _store_slot(NS > 2, s2_ptr, offs, s2, mask, FULL, STATE_SR, seed ^ 0x5A5A0003)
        _store_slot(NS > 3, s3_ptr, offs, s3, mask, FULL, STATE_SR, seed ^ 0x5A5A0004)
        return carry

    @triton.jit
    def multi_tensor_apply_kernel(
        ptrs, numels, work, sptrs, counters, lr_ptr, scale_ptr, inf_ptr, hp, seed,
        UPDATE: tl.constexpr, SCALARS: tl.constexpr, FLAGS: tl.constexpr,
        NS: tl.constexpr, NT: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr, STATE_SR: tl.constexpr,
        P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
        LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
        ALIGNED: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if amp_skip(inf_ptr, HAS_INF) == 0:
            t = tl.load(work + W_WIDTH * pid + W_TENSOR)
            chunk = tl.load(work + W_WIDTH * pid + W_CHUNK).to(tl.int64)
            n = tl.load(numels + t)
            row = ptrs + t.to(tl.int64) * (S_COL + NS + (1 if MASTER else 0))
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
            t0 = _load_scalar(NT > 0, srow, 0)
            t1 = _load_scalar(NT > 1, srow, 1)
            t2 = _load_scalar(NT > 2, srow, 2)
            t3 = _load_scalar(NT > 3, srow, 3)
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
            c0 = tl.cast(c0, tl.float32)
            c1 = tl.cast(c1, tl.float32)
            c2 = tl.cast(c2, tl.float32)
            c3 = tl.cast(c3, tl.float32)
            inv_scale = grad_inv_scale(scale_ptr, HAS_SCALE)
            over_chunk(_block, tl.cast(0, tl.int32), chunk * (BLOCK * ITERS), n,
                       (p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, m_ptr, inv_scale, seed + t,
                        c0, c1, c2, c3, lr, h1, h2, h3, h4, h5, h6, h7, UPDATE, FLAGS, NS, HAS_SCALE, MASTER, SR,
                        STATE_SR),
                       BLOCK, ITERS)

            if NT > 0:
                # Note [last program writes scalars]: all readers of the old values are done by then
                if arrive(counters + t, tl.maximum(tl.cdiv(n, BLOCK * ITERS), 1).to(tl.int32)):
                    _store_scalar(True, srow, 0, n0)
                    _store_scalar(NT > 1, srow, 1, n1)
                    _store_scalar(NT > 2, srow, 2, n2)
                    _store_scalar(NT > 3, srow, 3, n3)
                    tl.store(counters + t, 0)


    class _Bit(tl.constexpr):
        """A FLAGS bit. Compiled kernels may only read tl.constexpr globals; the interpreter passes FLAGS as a
        plain int, so `FLAGS & BIT` also needs the reflected operator."""

        def __rand__(self, other):
            return tl.constexpr(int(getattr(other, "value", other)) & self.value)


def flag_bits(n: int, first: int = 0):
    """n option bits for FLAGS, from bit `first` on (`if FLAGS & BIT:` in a kernel, `pack((BIT, cond), ...)` on the
    host)."""
    return tuple(_Bit(1 << i) for i in range(first, first + n))


def pack(*bits_and_conditions) -> int:
    """FLAGS value from (bit, condition) pairs: pack((MAXIMIZE, group["maximize"]), ...)."""
    return sum(int(bit.value) for bit, on in bits_and_conditions if on)


_PLACEHOLDER = re.compile(r"h\d+$")


@lru_cache(maxsize=None)
def _slot_names(fn, first: int) -> tuple:
    return tuple(inspect.signature(fn.fn).parameters)[first:first + N_HYPER]


def _check_hypers(fn, first: int, names: tuple) -> None:
    """The slots ``lr, h1..h7`` of ``fn`` start at argument ``first``: each slot ``fn`` names must get that name."""
    if fn is None:
        return
    slots = _slot_names(fn, first)
    for i, slot in enumerate(slots):
        given = names[i] if i < len(names) else None
        if not _PLACEHOLDER.match(slot) and slot != given:
            raise ValueError(f"{fn.fn.__name__} reads hyper-parameter slot {i} as {slot!r}, but the rule gives "
                             f"{given!r} there (hypers in order: {list(names)})")


@dataclass
class Rule:
    """An optimizer's kernel math: the two jit functions above, constexpr flags and named fp64 hyper-parameters
    (``lr`` first, then up to 7 more, in the order the functions take them)."""
    update: object
    scalars: object = None
    flags: int = 0
    hypers: dict = None

    def __post_init__(self):
        self.hypers = dict(self.hypers or {})
        names = tuple(self.hypers)
        if len(names) > N_HYPER or (names and names[0] != "lr"):
            raise ValueError(f"a Rule takes lr and up to {N_HYPER - 1} more hyper-parameters, got {list(names)}")
        _check_hypers(self.update, 10, names)
        _check_hypers(self.scalars, 4, names)

    def hyper_values(self) -> tuple:
        vals = tuple(float(v) for v in self.hypers.values())
        return vals + (0.0,) * (N_HYPER - len(vals))


@dataclass
class _Tables(Tables):
    numels: torch.Tensor = None
    work: torch.Tensor = None
    sptrs: torch.Tensor = None
    counters: torch.Tensor = None
    hp: torch.Tensor = None     # fp64 [N_HYPER] hyper-parameters on the device
    hkey: tuple = ()            # the values hp holds
    fdummy: torch.Tensor = None  # an fp32 stand-in for absent lr / grad_scale / found_inf


def _build_tables(key, params, grads, columns, scalars, device) -> _Tables:
    chunk = BLOCK * ITERS
    rows = [list(r) for r in zip(map(ptr, params), map(ptr, grads), *(map(ptr, c) for c in columns))]
    work = [(i, c) for i, n in enumerate(map(numel, params)) for c in range(max(1, -(-n // chunk)))]
    srows = [list(r) for r in zip(*(map(ptr, c) for c in scalars))]
    return _Tables(
        key=key, gkey=tuple(map(ptr, grads)), ptrs=to_device(rows, torch.int64, device), grad_col=1,
        aligned=all_aligned(params, grads, *columns),
        numels=to_device(list(map(numel, params)), torch.int64, device),
        work=to_device(work, torch.int32, device),
        sptrs=to_device(srows, torch.int64, device) if scalars else torch.zeros(1, dtype=torch.int64, device=device),
        counters=torch.zeros(max(len(params), 1), dtype=torch.int32, device=device),
        hp=torch.zeros(N_HYPER, dtype=torch.float64, device=device),
        fdummy=torch.zeros(1, dtype=torch.float32, device=device))


def apply(rule: Rule, cache: TableCache, params, grads, columns, scalars, *, lr_tensor=None,
          grad_scale=None, found_inf=None, masters=None, stochastic_rounding=False, seed=0,
          state_stochastic_rounding=False) -> None:
    """Update one param group in one launch per (param, grad, state) dtype combination.

    ``columns``: one list per element-wise state (``columns[k][i]``: state k of tensor i); ``scalars``: one list per
    per-tensor 0-d float32 scalar state. Tensors are read by address and size only: each tensor and its states must
    be dense in one storage order (the caller checks). ``masters[i]``: an fp32 master copy of a bf16/fp16 param (the
    math updates it, the param gets its rounding), an int16 remainder of a bf16 param (param_remainders: the
    two are the exact fp32 master, kernels/lean.py), or None. ``stochastic_rounding``: bf16 params are stored with
    stochastic rounding, random bits drawn from ``seed`` (vary it every step); ``state_stochastic_rounding``: bf16
    states too.
    """
    has_master = masters is not None and any(m is not None for m in masters)
    # every address and size the tables hold but the grads': any change (a loaded state, a replaced param's .data)
    # rebuilds; dtypes are fixed with the addresses, so the dtype buckets are reused while the key holds
    key = (*map(ptr, params), *map(ptr, chain.from_iterable((*columns, *scalars))), *map(numel, params),
           *([0 if m is None else m.data_ptr() for m in masters] if has_master else ()))
    plan = cache.plan
    if plan is None or plan[0] != key:
        keys = list(zip(map(dtype_of, params), map(dtype_of, grads), map(dtype_of, columns[0] if columns else params),
                        list(map(_master_kind, masters)) if has_master else repeat(NO_MASTER)))
        plan = cache.plan = (key, buckets(keys))
    for (*dts, master), idx in plan[1].items():
        dts = tuple(dts)
        ps, gs, *cols = pick(idx, params, grads, *columns, *scalars)
        cols, scs = cols[:len(columns)], cols[len(columns):]
        if master:  # the master copy rides in the table as one more element-wise slot, after the states
            cols = [*cols, [masters[i] for i in idx]]
        tab = cache.lookup((dts, master), key, gs, lambda: _build_tables(key, ps, gs, cols, scs, ps[0].device))
        sr = stochastic_rounding and dts[0] == torch.bfloat16 and master != REMAINDER
        state_sr = state_stochastic_rounding and dts[2] == torch.bfloat16 and bool(columns)
        _launch(rule, tab, dts, len(cols) - bool(master), len(scs), lr_tensor, grad_scale, found_inf, master, sr,
                seed, state_sr)


def _master_kind(m) -> int:
    return NO_MASTER if m is None else REMAINDER if m.dtype == torch.int16 else MASTER_FP32


def constexprs(rule: Rule, dts, ns: int, nt: int, *, lr_tensor: bool, has_scale: bool, has_inf: bool,
               aligned: bool, master: int = NO_MASTER, sr: bool = False, state_sr: bool = False) -> dict:
    """The kernel's compile-time arguments for one launch: the launcher and the AOT inventory both use this."""
    assert ns <= MAX_STATES and nt <= MAX_SCALARS
    return dict(UPDATE=rule.update, SCALARS=rule.scalars or _no_scalars, FLAGS=rule.flags, NS=ns, NT=nt,
                P_DT=runtime.tl_dtype(dts[0]), G_DT=runtime.tl_dtype(dts[1]), S_DT=runtime.tl_dtype(dts[2]),
                LR_TENSOR=lr_tensor, HAS_SCALE=has_scale, HAS_INF=has_inf, ALIGNED=aligned, BLOCK=BLOCK, ITERS=ITERS,
                MASTER=int(master), SR=sr, STATE_SR=state_sr)


def _launch(rule, tab, dts, ns, nt, lr_tensor, grad_scale, found_inf, master=NO_MASTER, sr=False, seed=0,
            state_sr=False):
    hypers = rule.hyper_values()
    if tab.hkey != hypers:  # uploads only when a hyper-parameter changed (e.g. an LR schedule step)
        tab.hp.copy_(torch.tensor(hypers, dtype=torch.float64), non_blocking=True)
        tab.hkey = hypers
    dummy = tab.fdummy
    runtime.launch(
        multi_tensor_apply_kernel, tab.work.shape[0],
        tab.ptrs, tab.numels, tab.work, tab.sptrs, tab.counters,
        lr_tensor if lr_tensor is not None else dummy,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        tab.hp, seed,
        **constexprs(rule, dts, ns, nt, lr_tensor=lr_tensor is not None, has_scale=grad_scale is not None,
                     has_inf=found_inf is not None, aligned=tab.aligned, master=master, sr=sr, state_sr=state_sr))
