"""Triton load/store helpers every kernel family shares: table pointers, loads into the compute dtype, the fp64
hyper-parameters, stores that round like the GPU, bf16 stochastic rounding, AMP's overflow skip and grad unscaling,
the walk over a chunk of a tensor, and the IEEE-rounded division and square root for either compute dtype.

The compute dtype of a tensor is float64 for float64 tensors (torch's kernels compute in double for double tensors)
and float32 for every other dtype. Element math casts its scalars to it with ``x.to(p.dtype)`` (p: a loaded value)."""
from __future__ import annotations

from . import runtime

if runtime.available():
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_ptr(row, slot, DT: tl.constexpr, ALIGNED: tl.constexpr):
        p = tl.load(row + slot).to(tl.pointer_type(DT))
        if ALIGNED:
            p = tl.multiple_of(p, 16)
        return p

    @triton.jit
    def to_compute(x, ptr):
        """x in the compute dtype of the tensor behind ptr: float64 for float64 tensors, else float32."""
        if ptr.dtype.element_ty == tl.float64:
            return tl.cast(x, tl.float64)
        else:
            return tl.cast(x, tl.float32)

    @triton.jit
    def fp64_arg(x):
        """An fp64 scalar argument, every bit kept. Under the interpreter it is a plain Python float, which tl.cast
        would round to fp32 first (Triton types float literals as fp32); on the GPU it is an fp64 value already."""
        return tl.full((), x, tl.float64)

    @triton.jit
    def load(ptr, offs, mask, FULL: tl.constexpr):
        if FULL:
            return to_compute(tl.load(ptr + offs), ptr)
        else:
            return to_compute(tl.load(ptr + offs, mask=mask, other=0.0), ptr)

    @triton.jit
    def load_hypers(hp):
        """A rule's fp64 hyper-parameter slots (lr, h1..h7: rules.N_HYPER) from a device buffer: kernel float
        arguments would be fp32 under the interpreter, and 1 - beta2 ** step needs fp64."""
        return (tl.load(hp), tl.load(hp + 1), tl.load(hp + 2), tl.load(hp + 3),
                tl.load(hp + 4), tl.load(hp + 5), tl.load(hp + 6), tl.load(hp + 7))

    # tl.div_rn / tl.sqrt_rn take float32 only; float64 division and sqrt are IEEE-rounded already
    @triton.jit
    def div_rn(x, y):
        if x.dtype == tl.float64:
            return x / y
        else:
            return tl.div_rn(x, y)

    @triton.jit
    def sqrt_rn(x):
        if x.dtype == tl.float64:
            return tl.sqrt(x)
        else:
            return tl.sqrt_rn(x)

    # Triton's interpreter truncates fp32 -> bf16 casts, while the GPU rounds to nearest even; under the
    # interpreter we round explicitly so CPU tests see the GPU's numbers.
    EMULATE_BF16_RTNE = tl.constexpr(runtime.interpreter_enabled())

    @triton.jit
    def to_bf16_rtne(x):
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)  # (fp64: via fp32, a double rounding the GPU skips)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def cast_for(ptr, val):
        if EMULATE_BF16_RTNE and ptr.dtype.element_ty == tl.bfloat16:
            return to_bf16_rtne(val)
        else:
            return val.to(ptr.dtype.element_ty)

    @triton.jit
    def store(ptr, offs, val, mask, FULL: tl.constexpr):
        if FULL:
            tl.store(ptr + offs, cast_for(ptr, val))
        else:
            tl.store(ptr + offs, cast_for(ptr, val), mask=mask)

    @triton.jit
    def store_bf16_stochastic(ptr, offs, val, mask, seed, FULL: tl.constexpr):
        # stochastic rounding to bf16: add 16 random bits below the kept mantissa, then truncate, so the stored
        # value is unbiased (E[stored] = val) and small updates survive on average
        r = tl.randint(seed, offs.to(tl.uint32))
        bits = val.to(tl.float32).to(tl.uint32, bitcast=True) + (r & 0xFFFF)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        store(ptr, offs, out, mask, FULL)  # already bf16: store's cast is exact

    @triton.jit
    def amp_skip(inf_ptr, HAS_INF: tl.constexpr):
        """Nonzero where AMP found an overflow (``found_inf``): the kernel then touches nothing, advances nothing."""
        if HAS_INF:
            return tl.load(inf_ptr) != 0
        else:
            return 0

    @triton.jit
    def grad_inv_scale(scale_ptr, HAS_SCALE: tl.constexpr):
        """1 / AMP's grad scale, or 1: in the scale's dtype (fp32; fp64 for the clip scale of fp64 grads)."""
        inv = 1.0
        if HAS_SCALE:
            inv = 1.0 / tl.load(scale_ptr)
        return inv

    @triton.jit
    def load_unscaled_grad(g_ptr, offs, mask, inv_scale, HAS_SCALE: tl.constexpr, FULL: tl.constexpr):
        """The grad times inv_scale, stored back (like torch's fused path, p.grad holds the unscaled grad after)."""
        g = load(g_ptr, offs, mask, FULL)
        if HAS_SCALE:
            g = g * inv_scale.to(g.dtype)
            store(g_ptr, offs, g, mask, FULL)
        return g

    @triton.jit
    def over_chunk(BODY: tl.constexpr, carry, start, n, args, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        """carry = BODY(carry, offs, mask, FULL, *args) over the ITERS blocks of BLOCK lanes from `start` of an
        n-element tensor. FULL (constexpr) when the whole chunk is in bounds: no mask, so aligned tensors get 128-bit
        loads and stores."""
        lanes = tl.arange(0, BLOCK)
        if start + BLOCK * ITERS <= n:
            for i in range(ITERS):
                offs = start + i * BLOCK + lanes
                carry = BODY(carry, offs, offs < n, True, *args)
        else:
            for i in range(ITERS):
                offs = start + i * BLOCK + lanes
                carry = BODY(carry, offs, offs < n, False, *args)
        return carry
