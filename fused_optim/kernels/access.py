"""Triton load/store helpers every kernel family shares: table pointers, fp32 loads, stores that round like the
GPU, and bf16 stochastic rounding."""
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
    def load(ptr, offs, mask, FULL: tl.constexpr):
        if FULL:
            return tl.load(ptr + offs).to(tl.float32)
        else:
            return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)

    # Triton's interpreter truncates fp32 -> bf16 casts, while the GPU rounds to nearest even; under the
    # interpreter we round explicitly so CPU tests see the GPU's numbers.
    EMULATE_BF16_RTNE = tl.constexpr(runtime.interpreter_enabled())

    @triton.jit
    def to_bf16_rtne(x):
        bits = x.to(tl.uint32, bitcast=True)
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
        bits = val.to(tl.uint32, bitcast=True) + (r & 0xFFFF)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        if FULL:
            tl.store(ptr + offs, out)
        else:
            tl.store(ptr + offs, out, mask=mask)
