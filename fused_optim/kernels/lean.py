"""Memory-lean params and states: the numerics in one place, reference half (torch) beside kernel half (Triton).

* Param remainders: a bf16 param plus an int16 remainder hold an fp32 master exactly (2 extra bytes per element
  instead of master_weights' 4). The bf16 param is the master rounded to nearest with ties rounded up in
  magnitude (bits: hi = (m + 0x8000) >> 16), so the remainder m - (hi << 16) always fits a signed int16 and the
  pair decodes to m. Round-to-nearest-even cannot be used: its ties give an even bf16 value 65,537 preimages and
  an odd one 65,535, which 16 bits cannot tell apart. So the param equals master_weights' (nearest-even) param
  except where the master's low 16 bits are exactly 0x8000, where it is the other neighbour (1 bf16 ulp).
* bf16 states: fp32 math, stored rounded to nearest even, or stochastically (access.store_bf16_stochastic).
"""
from __future__ import annotations

import torch

from . import runtime

REMAINDER_DTYPE = torch.int16


def join_remainder(p: torch.Tensor, rem: torch.Tensor) -> torch.Tensor:
    """The fp32 master a bf16 param and its int16 remainder hold."""
    bits = (p.view(torch.int16).to(torch.int32) << 16) + rem.to(torch.int32)
    return bits.view(torch.float32)


def split_remainder(master: torch.Tensor):
    """(bf16 param, int16 remainder) holding the fp32 ``master`` exactly (see the module note on rounding)."""
    bits = master.contiguous().view(torch.int32)
    lo = bits.to(torch.int16)  # the low 16 bits, read as signed: negative where the param rounds up
    hi = ((bits >> 16) + (lo < 0).to(torch.int32)).to(torch.int16)
    return hi.view(torch.bfloat16), lo


if runtime.available():
    import triton
    import triton.language as tl

    from .access import load, store, store_bf16_stochastic
    from .rules import REMAINDER, SR_PARAM_BIT

    REMAINDER_K = tl.constexpr(REMAINDER)

    @triton.jit
    def load_raw(ptr, offs, mask, FULL: tl.constexpr):
        if FULL:
            return tl.load(ptr + offs)
        else:
            return tl.load(ptr + offs, mask=mask, other=0)

    @triton.jit
    def store_raw(ptr, offs, val, mask, FULL: tl.constexpr):
        if FULL:
            tl.store(ptr + offs, val)
        else:
            tl.store(ptr + offs, val, mask=mask)

    @triton.jit
    def load_joined(p_ptr, r_ptr, offs, mask, FULL: tl.constexpr):
        """The fp32 master of a bf16 param (p_ptr) and its int16 remainder (r_ptr): join_remainder."""
        hi = load_raw(p_ptr, offs, mask, FULL).to(tl.int16, bitcast=True).to(tl.int32)
        lo = load_raw(r_ptr, offs, mask, FULL).to(tl.int32)
        return ((hi << 16) + lo).to(tl.float32, bitcast=True)

    @triton.jit
    def store_split(p_ptr, r_ptr, offs, val, mask, FULL: tl.constexpr):
        """Store the fp32 master ``val`` as a bf16 param and its int16 remainder: split_remainder."""
        bits = val.to(tl.int32, bitcast=True)
        lo = bits.to(tl.int16)
        hi = ((bits >> 16) + (lo < 0).to(tl.int32)).to(tl.int16)
        store_raw(p_ptr, offs, hi.to(tl.bfloat16, bitcast=True), mask, FULL)
        store_raw(r_ptr, offs, lo, mask, FULL)

    @triton.jit
    def load_master(p_ptr, m_ptr, offs, mask, FULL: tl.constexpr, MASTER: tl.constexpr):
        """The value the math updates: the exact fp32 master (MASTER: rules.REMAINDER, the param joined with its
        remainder at m_ptr; rules.MASTER_FP32, the master copy at m_ptr), else the param itself."""
        if MASTER == REMAINDER_K:
            return load_joined(p_ptr, m_ptr, offs, mask, FULL)
        elif MASTER:
            return load(m_ptr, offs, mask, FULL)
        else:
            return load(p_ptr, offs, mask, FULL)

    @triton.jit
    def store_master(p_ptr, m_ptr, offs, val, mask, FULL: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
                     seed):
        """load_master's way back: the master split into param and remainder, or stored with the param rounded to
        nearest (SR: rules.SR_PARAM set, bf16 params rounded stochastically from ``seed``'s bits)."""
        if MASTER == REMAINDER_K:
            store_split(p_ptr, m_ptr, offs, val, mask, FULL)
        else:
            if MASTER:
                store(m_ptr, offs, val, mask, FULL)
            if SR & SR_PARAM_BIT:
                store_bf16_stochastic(p_ptr, offs, val, mask, seed, FULL)
            else:
                store(p_ptr, offs, val, mask, FULL)
