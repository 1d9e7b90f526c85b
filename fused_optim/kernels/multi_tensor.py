"""One-launch multi-tensor apply for Triton.

A param group's tensors (params, grads, element-wise states) are described by device-resident tables:

* ``ptrs``    int64 [T, 2 + NS]  addresses of param, grad and each element-wise state of tensor t
* ``numels``  int64 [T]
* ``work``    int32 [W, 2]       (tensor, chunk) pairs; every tensor has >= 1 chunk (so 0-element tensors
                                 still advance their per-tensor scalars, like torch)
* ``sptrs``   int64 [T, NT]      addresses of per-tensor 0-d float32 states (``step``, NAdam's ``mu_product``,
                                 ASGD's ``eta``/``mu``, per-layer norms, ...)
* ``counters`` int32 [T]         finished-program counters, see below

One program updates one chunk of one tensor, so the whole group (per dtype combination) is ONE launch.
The tables are cached on the host side by the tuple of addresses and sizes: a steady-state step uploads nothing.

Per-tensor scalars: every program reads the old values; the program that finishes last (an atomic counter per
tensor) writes the new ones and resets the counter. No program of the launch can read a value written in the same
launch, so the result does not depend on scheduling, and nothing ever leaves the device (CUDA-graph capturable).

Each optimizer provides two ``@triton.jit`` functions, passed as constexprs:

* ``SCALARS(t0, t1, t2, t3, lr, h1..h7, FLAGS) -> (n0, n1, n2, n3, c0, c1, c2, c3)``: fp64 scalar math once per
  program: new per-tensor scalar states ``n*`` and coefficients ``c*`` for the element-wise part.
* ``UPDATE(p, g, s0, s1, s2, s3, c0, c1, c2, c3, lr, h1..h7, FLAGS) -> (p, s0, s1, s2, s3)``: fp32 element math.

Unused state / scalar slots are zeros and never stored. ``h*`` are fp64 hyper-parameters, ``FLAGS`` a constexpr
bit set (maximize, amsgrad, ...), so each specialisation carries only its own code.
"""
from __future__ import annotations

import itertools
import operator
import os
from dataclasses import dataclass, field

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path still works
    triton = None
    tl = None

MAX_STATES = 4
MAX_SCALARS = 4
N_HYPER = 8
# Elements per program: BLOCK lanes x ITERS iterations = 16K elements (64 KB fp32 per tensor). With 8 warps a
# thread holds 8 elements per tensor per iteration: two 128-bit fp32 accesses, one for bf16/fp16, at ~80 registers.
BLOCK = int(os.environ.get("FUSED_OPTIM_BLOCK", 2048))
ITERS = int(os.environ.get("FUSED_OPTIM_ITERS", 8))
NUM_WARPS = 8
# FMA contraction: explicit so triton 3.9's changing default does not change our last bits.
FP_FUSION = True

launch_count = 0  # number of Triton launches made; tests assert one per group and dtype combination


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    return triton is not None


if triton is not None:
    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                  torch.float64: tl.float64}

    @triton.jit
    def _no_scalars(t0, t1, t2, t3, lr, h1, h2, h3, h4, h5, h6, h7, FLAGS: tl.constexpr):
        # Default SCALARS for optimizers with no per-tensor scalar state.
        return t0, t1, t2, t3, lr, 0.0, 0.0, 0.0

    @triton.jit
    def _chunk_ptr(row, slot, DT: tl.constexpr, ALIGNED: tl.constexpr):
        p = tl.load(row + slot).to(tl.pointer_type(DT))
        if ALIGNED:
            p = tl.multiple_of(p, 16)
        return p

    @triton.jit
    def _load(ptr, offs, mask, FULL: tl.constexpr):
        if FULL:
            return tl.load(ptr + offs).to(tl.float32)
        else:
            return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)

    # Triton's interpreter truncates fp32 -> bf16 casts, while the GPU rounds to nearest even; under the
    # interpreter we round explicitly so CPU tests see the GPU's numbers.
    _EMULATE_BF16_RTNE = tl.constexpr(interpreter_enabled())

    @triton.jit
    def _to_bf16_rtne(x):
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _cast_for(ptr, val):
        if _EMULATE_BF16_RTNE and ptr.dtype.element_ty == tl.bfloat16:
            return _to_bf16_rtne(val)
        else:
            return val.to(ptr.dtype.element_ty)

    @triton.jit
    def _store(ptr, offs, val, mask, FULL: tl.constexpr):
        if FULL:
            tl.store(ptr + offs, _cast_for(ptr, val))
        else:
            tl.store(ptr + offs, _cast_for(ptr, val), mask=mask)

    @triton.jit
    def _store_bf16_stochastic(ptr, offs, val, mask, seed, FULL: tl.constexpr):
        # stochastic rounding to bf16: add 16 random bits below the kept mantissa, then truncate, so the stored
        # value is unbiased (E[stored] = val) and small updates survive on average
        r = tl.randint(seed, offs.to(tl.uint32))
        bits = val.to(tl.uint32, bitcast=True) + (r & 0xFFFF)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        if FULL:
            tl.store(ptr + offs, out)
        else:
            tl.store(ptr + offs, out, mask=mask)

    @triton.jit
    def _block(p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, m_ptr, offs, mask, inv_scale, seed,
               c0, c1, c2, c3, lr, h1, h2, h3, h4, h5, h6, h7,
               UPDATE: tl.constexpr, FLAGS: tl.constexpr, NS: tl.constexpr,
               HAS_SCALE: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr, FULL: tl.constexpr):
        if MASTER:
            p = _load(m_ptr, offs, mask, FULL)  # the fp32 master copy is the param the math updates
        else:
            p = _load(p_ptr, offs, mask, FULL)
        g = _load(g_ptr, offs, mask, FULL)
        if HAS_SCALE:
            g = g * inv_scale
            _store(g_ptr, offs, g, mask, FULL)  # like torch's fused path: p.grad holds the unscaled grad after
        s0 = tl.zeros_like(p)
        s1 = tl.zeros_like(p)
        s2 = tl.zeros_like(p)
        s3 = tl.zeros_like(p)
        if NS > 0:
            s0 = _load(s0_ptr, offs, mask, FULL)
        if NS > 1:
            s1 = _load(s1_ptr, offs, mask, FULL)
        if NS > 2:
            s2 = _load(s2_ptr, offs, mask, FULL)
        if NS > 3:
            s3 = _load(s3_ptr, offs, mask, FULL)
        p, s0, s1, s2, s3 = UPDATE(p, g, s0, s1, s2, s3, c0, c1, c2, c3, lr, h1, h2, h3, h4, h5, h6, h7, FLAGS)
        if MASTER:
            _store(m_ptr, offs, p, mask, FULL)
        if SR:
            _store_bf16_stochastic(p_ptr, offs, p, mask, seed, FULL)
        else:
            _store(p_ptr, offs, p, mask, FULL)
        if NS > 0:
            _store(s0_ptr, offs, s0, mask, FULL)
        if NS > 1:
            _store(s1_ptr, offs, s1, mask, FULL)
        if NS > 2:
            _store(s2_ptr, offs, s2, mask, FULL)
        if NS > 3:
            _store(s3_ptr, offs, s3, mask, FULL)

    @triton.jit
    def multi_tensor_apply_kernel(
        ptrs, numels, work, sptrs, counters, lr_ptr, scale_ptr, inf_ptr, hp, seed,
        UPDATE: tl.constexpr, SCALARS: tl.constexpr, FLAGS: tl.constexpr,
        NS: tl.constexpr, NT: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
        P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
        LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
        ALIGNED: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        skip = 0
        if HAS_INF:
            skip = tl.load(inf_ptr) != 0  # AMP overflow: touch nothing, advance nothing
        if skip == 0:
            t = tl.load(work + 2 * pid)
            chunk = tl.load(work + 2 * pid + 1).to(tl.int64)
            n = tl.load(numels + t)
            row = ptrs + t.to(tl.int64) * (2 + NS + MASTER)
            p_ptr = _chunk_ptr(row, 0, P_DT, ALIGNED)
            g_ptr = _chunk_ptr(row, 1, G_DT, ALIGNED)
            s0_ptr = p_ptr
            s1_ptr = p_ptr
            s2_ptr = p_ptr
            s3_ptr = p_ptr
            if NS > 0:
                s0_ptr = _chunk_ptr(row, 2, S_DT, ALIGNED)
            if NS > 1:
                s1_ptr = _chunk_ptr(row, 3, S_DT, ALIGNED)
            if NS > 2:
                s2_ptr = _chunk_ptr(row, 4, S_DT, ALIGNED)
            if NS > 3:
                s3_ptr = _chunk_ptr(row, 5, S_DT, ALIGNED)
            m_ptr = p_ptr
            if MASTER:
                m_ptr = _chunk_ptr(row, 2 + NS, tl.float32, ALIGNED)

            # per-tensor scalar states (fp32 in memory, fp64 math)
            srow = sptrs + t.to(tl.int64) * NT
            t0 = 0.0
            t1 = 0.0
            t2 = 0.0
            t3 = 0.0
            if NT > 0:
                t0 = tl.load(tl.load(srow).to(tl.pointer_type(tl.float32))).to(tl.float64)
            if NT > 1:
                t1 = tl.load(tl.load(srow + 1).to(tl.pointer_type(tl.float32))).to(tl.float64)
            if NT > 2:
                t2 = tl.load(tl.load(srow + 2).to(tl.pointer_type(tl.float32))).to(tl.float64)
            if NT > 3:
                t3 = tl.load(tl.load(srow + 3).to(tl.pointer_type(tl.float32))).to(tl.float64)
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
            inv_scale = 1.0
            if HAS_SCALE:
                inv_scale = 1.0 / tl.load(scale_ptr).to(tl.float32)

            lanes = tl.arange(0, BLOCK)
            start = chunk * (BLOCK * ITERS)
            if start + BLOCK * ITERS <= n:
                # full chunk: no mask, so aligned tensors get 128-bit loads and stores
                for i in range(ITERS):
                    offs = start + i * BLOCK + lanes
                    _block(p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, m_ptr, offs, offs < n, inv_scale, seed + t,
                           c0, c1, c2, c3, lr, h1, h2, h3, h4, h5, h6, h7, UPDATE, FLAGS, NS, HAS_SCALE, MASTER,
                           SR, True)
            else:
                for i in range(ITERS):
                    offs = start + i * BLOCK + lanes
                    _block(p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, s3_ptr, m_ptr, offs, offs < n, inv_scale, seed + t,
                           c0, c1, c2, c3, lr, h1, h2, h3, h4, h5, h6, h7, UPDATE, FLAGS, NS, HAS_SCALE, MASTER,
                           SR, False)

            if NT > 0:
                # the last program of this tensor writes the new scalars (all readers are done by then)
                nchunks = tl.maximum(tl.cdiv(n, BLOCK * ITERS), 1).to(tl.int32)
                tl.debug_barrier()  # every thread of this program has read the old scalars before it counts in
                done = tl.atomic_add(counters + t, 1, sem="acq_rel", scope="gpu")
                if done == nchunks - 1:
                    tl.store(tl.load(srow).to(tl.pointer_type(tl.float32)), tl.cast(n0, tl.float32))
                    if NT > 1:
                        tl.store(tl.load(srow + 1).to(tl.pointer_type(tl.float32)), tl.cast(n1, tl.float32))
                    if NT > 2:
                        tl.store(tl.load(srow + 2).to(tl.pointer_type(tl.float32)), tl.cast(n2, tl.float32))
                    if NT > 3:
                        tl.store(tl.load(srow + 3).to(tl.pointer_type(tl.float32)), tl.cast(n3, tl.float32))
                    tl.store(counters + t, 0)

    # ---- deterministic cross-program reductions (NovoGrad's per-layer norms, Adafactor's row/col means) ----------
    # Each program stores its partial result, then "arrives" at a counter; the last of the expected programs sums the
    # partials in a fixed order and resets the counter. No float atomics: the result does not depend on scheduling.

    @triton.jit
    def arrive(counter, expected):
        """Count this program in at `counter`; True in the last of `expected` programs (which must reset it to 0).

        The barrier makes every thread's earlier stores precede the device-scope acquire-release atomic, so the last
        program sees all partials stored before the other programs arrived."""
        tl.debug_barrier()
        done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        return done == expected - 1

    @triton.jit
    def sum_partials(ptr, n, PB: tl.constexpr):
        """fp32 sum of the n values at ptr, PB lanes at a time, in a fixed order. Loads bypass L1 (.cg): the values
        were written by other programs of this launch."""
        acc = tl.zeros([PB], tl.float32)
        for start in range(0, n, PB):
            offs = start + tl.arange(0, PB)
            acc += tl.load(ptr + offs, mask=offs < n, other=0.0, cache_modifier=".cg")
        return tl.sum(acc, axis=0)

    # ---- grid barrier for persistent launches (grid <= SM count, so every program is resident) ---------------------
    # The counter counts arrivals cumulatively over a launch: barrier k (k = 1, 2, ...) waits for k * G arrivals, and
    # grid_barrier_exit (one more arrival per program) lets the last program out reset it for the next launch.

    GRID_SPIN_LIMIT = tl.constexpr(1 << 24)  # ~seconds of polling: a barrier that never completes gives up

    @triton.jit
    def grid_barrier(counter, target):
        """Wait until `target` arrivals (this one included) are counted at `counter`; 1 if they were, 0 if the spin
        limit gave up. Cooperative groups' grid sync: the CTA barrier orders every thread's earlier stores before the
        acquire-release atomic at GPU scope, so after it they are visible to every program (loads of them must
        bypass L1: cache_modifier=".cg")."""
        tl.debug_barrier()
        seen = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") + 1
        spins = 0
        while (seen < target) & (spins < GRID_SPIN_LIMIT):
            seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
            spins += 1
        tl.debug_barrier()
        return (seen >= target).to(tl.int32)

    @triton.jit
    def grid_barrier_exit(counter, total, ok):
        """Every program calls this once after its last grid_barrier (total = (barriers + 1) * G): the last one out
        resets the counter to 0 (all others are past every spin). A program whose barrier gave up (ok == 0) sets
        counter[1], a sticky failure flag for the host to inspect."""
        if ok == 0:
            tl.atomic_xchg(counter + 1, 1, sem="relaxed", scope="gpu")
        tl.debug_barrier()
        left = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if left == total - 1:
            tl.atomic_xchg(counter, 0, sem="acq_rel", scope="gpu")


if triton is not None:
    class _Bit(tl.constexpr):
        """A FLAGS bit. Compiled kernels may only read tl.constexpr globals; the interpreter passes FLAGS as a
        plain int, so `FLAGS & BIT` also needs the reflected operator."""

        def __rand__(self, other):
            return tl.constexpr(int(getattr(other, "value", other)) & self.value)


def flag_bits(n: int):
    """n option bits for FLAGS (`if FLAGS & BIT:` in a kernel, `pack((BIT, cond), ...)` on the host)."""
    return tuple(_Bit(1 << i) for i in range(n))


def pack(*bits_and_conditions) -> int:
    """FLAGS value from (bit, condition) pairs: pack((MAXIMIZE, group["maximize"]), ...)."""
    return sum(int(bit.value) for bit, on in bits_and_conditions if on)


@dataclass
class Rule:
    """An optimizer's kernel math: the two jit functions above plus constexpr flags and fp64 hyper-parameters."""
    update: object
    scalars: object = None
    flags: int = 0
    hypers: tuple = ()          # lr first, then up to 7 more (fp64)


@dataclass
class _Tables:
    key: tuple
    ptrs: torch.Tensor
    numels: torch.Tensor
    work: torch.Tensor
    sptrs: torch.Tensor
    counters: torch.Tensor
    aligned: bool
    gkey: tuple = ()
    hp: torch.Tensor = None     # fp64 [N_HYPER] hyper-parameters on the device
    hkey: tuple = ()
    fdummy: torch.Tensor = None


@dataclass
class GroupCache:
    """Per param-group cache of device tables, one entry per dtype combination."""
    tables: dict = field(default_factory=dict)
    builds: int = 0  # how many times tables were (re)built: tests check steady state builds nothing
    grad_uploads: int = 0  # how many times only the grad addresses changed


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _all_aligned(params, grads, states) -> bool:
    # tl.multiple_of(ptr, 16) is a promise: one misaligned tensor (a view at an odd offset) sends the whole
    # bucket to the variant without the hint
    return all(_aligned(t) for t in params) and all(_aligned(t) for t in grads) and all(
        _aligned(s) for st in states for s in st)


def _build_tables(key, params, grads, states, scalars, device) -> _Tables:
    chunk = BLOCK * ITERS
    rows, numels, work, srows = [], [], [], []
    for i, (p, g, st, sc) in enumerate(zip(params, grads, states, scalars)):
        rows.append([p.data_ptr(), g.data_ptr(), *[s.data_ptr() for s in st]])
        srows.append([s.data_ptr() for s in sc])
        n = p.numel()
        numels.append(n)
        work.extend((i, c) for c in range(max(1, -(-n // chunk))))
    aligned = _all_aligned(params, grads, states)

    def dev(x, dtype):
        return torch.tensor(x, dtype=dtype).to(device)

    n_t = len(params)
    return _Tables(
        key=key,
        ptrs=dev(rows, torch.int64),
        numels=dev(numels, torch.int64),
        work=dev(work, torch.int32),
        sptrs=dev(srows, torch.int64) if srows and srows[0] else torch.zeros(1, dtype=torch.int64, device=device),
        counters=torch.zeros(max(n_t, 1), dtype=torch.int32, device=device),
        aligned=aligned,
        fdummy=torch.zeros(1, dtype=torch.float32, device=device),
        hp=torch.zeros(N_HYPER, dtype=torch.float64, device=device),
    )


def apply(rule: Rule, cache: GroupCache, params, grads, states, scalars, *, lr_tensor=None,
          grad_scale=None, found_inf=None, masters=None, stochastic_rounding=False, seed=0) -> None:
    """Update one param group in one launch per (param, grad, state) dtype combination.

    ``states[i]`` lists tensor i's element-wise states (same count for all tensors), ``scalars[i]`` its 0-d float32
    per-tensor scalar states. All tensors must be contiguous, of real dtype (any shape: only their addresses and
    sizes are used). ``masters[i]``: an fp32 master
    copy of a bf16/fp16 param (the math updates it, the param gets its rounding), or None. ``stochastic_rounding``:
    bf16 params are stored with stochastic rounding, random bits drawn from ``seed`` (vary it every step).
    """
    global launch_count
    buckets: dict = {}
    masters = masters or [None] * len(params)
    dtype = operator.attrgetter("dtype")
    pdt, gdt = set(map(dtype, params)), set(map(dtype, grads))
    sdt = {st[0].dtype for st in states} if states[0] else pdt
    if len(pdt) == len(gdt) == len(sdt) == 1 and all(m is None for m in masters):  # usual: no loop
        buckets[(*pdt, *gdt, *sdt, False)] = range(len(params))
    else:
        for i, (p, g, st, m) in enumerate(zip(params, grads, states, masters)):
            buckets.setdefault((p.dtype, g.dtype, st[0].dtype if st else p.dtype, m is not None), []).append(i)
    for (*dts, master), idx in buckets.items():
        dts = tuple(dts)
        if len(idx) == len(params):  # one bucket (the usual case): no copies
            ps, gs, sts, scs = params, grads, states, scalars
        else:
            ps, gs, sts, scs = ([x[i] for i in idx] for x in (params, grads, states, scalars))
        if master:  # the master copy rides in the table as one more element-wise slot, after the states
            sts = [st + [masters[i]] for st, i in zip(sts, idx)]
        # The key covers every address and size the tables hold: any change (a loaded state, a replaced param)
        # rebuilds. Grads are often re-allocated each step (zero_grad(set_to_none=True)): a new grad address only
        # re-uploads the grad column.
        ptr = torch.Tensor.data_ptr  # map() over the C methods: per-tensor host cost matters at 1000s of tensors
        flat = itertools.chain.from_iterable
        key = (*map(ptr, ps), *map(ptr, flat(sts)), *map(ptr, flat(scs)), *map(torch.Tensor.numel, ps))
        gkey = tuple(map(ptr, gs))
        tab = cache.tables.get((dts, master))
        # alignment is a property of the addresses: it can change only with them
        if tab is None or tab.key != key or (tab.gkey != gkey and tab.aligned and not all(map(_aligned, gs))):
            tab = _build_tables(key, ps, gs, sts, scs, ps[0].device)
            tab.gkey = gkey
            cache.tables[(dts, master)] = tab
            cache.builds += 1
        elif upload_grad_column(tab, gkey):
            cache.grad_uploads += 1
        sr = stochastic_rounding and dts[0] == torch.bfloat16
        _launch(rule, tab, dts, len(sts[0]) - master, len(scs[0]), lr_tensor, grad_scale, found_inf, master, sr,
                seed)
        launch_count += 1


def upload_grad_column(tab, gkey: tuple) -> bool:
    """Point a cached table's grad column (``ptrs[:, 1]``) at the grads with addresses ``gkey``, if they moved
    (zero_grad(set_to_none=True) makes new grads every step); True when it uploaded. Non-blocking: a pageable
    host -> device copy without it would sync the stream (the runtime stages the bytes at once)."""
    if tab.gkey == gkey:
        return False
    tab.ptrs[:, 1].copy_(torch.tensor(gkey, dtype=torch.int64), non_blocking=True)
    tab.gkey = gkey
    return True


def constexprs(rule: Rule, dts, ns: int, nt: int, *, lr_tensor: bool, has_scale: bool, has_inf: bool,
               aligned: bool, master: bool = False, sr: bool = False) -> dict:
    """The kernel's compile-time arguments for one launch: the launcher and the AOT inventory both use this."""
    assert ns <= MAX_STATES and nt <= MAX_SCALARS
    return dict(UPDATE=rule.update, SCALARS=rule.scalars or _no_scalars, FLAGS=rule.flags, NS=ns, NT=nt,
                P_DT=_TL_DTYPES[dts[0]], G_DT=_TL_DTYPES[dts[1]], S_DT=_TL_DTYPES[dts[2]],
                LR_TENSOR=lr_tensor, HAS_SCALE=has_scale, HAS_INF=has_inf, ALIGNED=aligned, BLOCK=BLOCK, ITERS=ITERS,
                MASTER=master, SR=sr)


def compile_options() -> dict:
    return {"num_warps": NUM_WARPS, "enable_fp_fusion": FP_FUSION}


def _launch(rule, tab, dts, ns, nt, lr_tensor, grad_scale, found_inf, master=False, sr=False, seed=0):
    hypers = tuple(float(h) for h in rule.hypers) + (0.0,) * (N_HYPER - len(rule.hypers))
    if tab.hkey != hypers:  # uploads only when a hyper-parameter changed (e.g. an LR schedule step)
        tab.hp.copy_(torch.tensor(hypers, dtype=torch.float64), non_blocking=True)
        tab.hkey = hypers
    dummy = tab.fdummy  # an fp32 stand-in for absent lr / grad_scale / found_inf (one specialization per use)
    grid = (tab.work.shape[0],)
    multi_tensor_apply_kernel[grid](
        tab.ptrs, tab.numels, tab.work, tab.sptrs, tab.counters,
        lr_tensor if lr_tensor is not None else dummy,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        tab.hp, seed,
        **constexprs(rule, dts, ns, nt, lr_tensor=lr_tensor is not None, has_scale=grad_scale is not None,
                     has_inf=found_inf is not None, aligned=tab.aligned, master=master, sr=sr),
        **({} if interpreter_enabled() else compile_options()),
    )


# ---- host side of persistent launches (grid_barrier above) ------------------------------------------------------
def persistent_grid(n_items: int, device) -> int:
    """Programs of a multi-phase launch: at most one per SM, so all are resident at once and the grid barrier
    cannot wait on a program that never gets scheduled. The interpreter runs programs one after another: 1."""
    if interpreter_enabled() or torch.device(device).type != "cuda":
        return 1
    return max(1, min(torch.cuda.get_device_properties(device).multi_processor_count, n_items))


class GridBarrier:
    """The host side of a table's persistent launches: ``words`` (int32 [2] on the device: the grid barrier's arrival
    count, and a sticky "a barrier gave up" flag) and the lazy report of that flag."""

    def __init__(self, device):
        self.words = torch.zeros(2, dtype=torch.int32, device=device)
        self._flag_host = None  # pinned copy of words[1] after the last persistent launch
        self._event = None

    def watch(self, who: str) -> None:
        """Call after every persistent launch. A grid barrier that gave up (the programs were not all resident, e.g.
        under MPS or SM partitioning) sets words[1], and that step's results are wrong. Reported without a host
        sync: the flag is copied to pinned memory after the launch, and a later step raises once that copy has
        landed. ``who`` names the optimizer in the error."""
        if torch.cuda.is_current_stream_capturing():
            return  # CUDA graphs: no event queries while capturing
        if self._flag_host is None:
            self._flag_host = torch.zeros(1, dtype=torch.int32, pin_memory=True)
            self._event = torch.cuda.Event()
        elif self._event.query() and int(self._flag_host[0]) != 0:  # a host tensor: no device sync
            raise RuntimeError(f"{who}(fused=True): a grid barrier gave up waiting for the kernel's programs (were "
                               "they all resident? MPS / SM partitioning can prevent it), so recent steps are wrong; "
                               "use fused=False on this setup")
        self._flag_host.copy_(self.words[1:], non_blocking=True)
        self._event.record()
