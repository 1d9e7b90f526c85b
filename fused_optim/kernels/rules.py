"""An optimizer's kernel math for the element-wise apply (kernels/multi_tensor.py), and the FLAGS bits.

An optimizer states its math as two ``@triton.jit`` functions (see optimizers/nadam.py) wrapped in a ``Rule``:

* ``SCALARS(t0, t1, t2, t3, lr, h1..h7, FLAGS) -> (n0, n1, n2, n3, c0, c1, c2, c3)``: fp64 scalar math once per
  program: new per-tensor scalar states ``n*`` (``step``, ...) and coefficients ``c*`` for the element math.
* ``UPDATE(p, g, s0, s1, s2, s3, c0, c1, c2, c3, lr, h1..h7, FLAGS) -> (p, s0, s1, s2, s3)``: element math in the
  compute dtype (kernels/access.py: float64 for float64 params, float32 otherwise), which p, g, the states and
  c0..c3 arrive in; the fp64 hyper-parameters are cast to it with ``x.to(p.dtype)``.
* optional ``STATS(p, g, s0, s1, s2, s3, c0, c1, c2, c3, lr, h1..h7, FLAGS) -> x``: an element-wise statistic whose
  per-tensor mean the update needs first (caution's mask mean). A statistics pass sums it per tensor, deterministic
  (fixed-order partial sums, no float atomics), and its mean (0 for an empty tensor) arrives in the first per-tensor
  scalar slot after the scalar states (``t<NT>`` of SCALARS) of the apply pass. STATS reads the same inputs as
  UPDATE but must not depend on the coefficients SCALARS derives from that slot (the pass computes them from the
  previous value). Both passes run in ONE persistent cooperative launch (a grid barrier between them;
  Note [cooperative launches]), or in two launches where the device refuses it. See Note [statistics pass].

The hyper-parameters ``lr, h1..h7`` are named: a Rule's ``hypers`` dict must match, in order, the names the two
functions give those slots (a slot a function does not use is named ``h<k>``), so a misordered or missing
hyper-parameter fails when the rule is made. ``FLAGS`` is a constexpr bit set (maximize, amsgrad, ...), so each
specialisation carries only its own code. Unused state slots are zeros and never stored.

Per-tensor scalar states are float32 0-d tensors, or float64 where a checkpoint loaded into float64 params made them
so (torch casts every state but ``step`` to the param's dtype): the apply reads and writes each slot in its dtype and
sets the FLAGS bit ``SCALAR_F64[k]`` for a float64 slot k, so a SCALARS that rounds like torch's float32 scalar math
(NAdam's mu_product) knows when not to.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import runtime

MAX_STATES = 4
# MASTER: what the slot after the states holds for a bf16/fp16 param
NO_MASTER, MASTER_FP32, REMAINDER = 0, 1, 2  # none, an fp32 master copy, an int16 remainder (kernels/lean.py)
SR_PARAM, SR_STATES = 1, 2  # SR bits: bf16 params / bf16 states stored with stochastic rounding


def master_kind(m) -> int:
    """The MASTER kind of a param's master slot: None, an fp32 master copy, or an int16 remainder."""
    return NO_MASTER if m is None else REMAINDER if m.dtype == torch.int16 else MASTER_FP32


def sr_bits(p_dtype, s_dtype, master: int, params_sr: bool, states_sr: bool) -> int:
    """The SR bits of a launch: bf16 params stored stochastically (not with a remainder: the pair is exact), bf16
    states too."""
    return (SR_PARAM if params_sr and p_dtype == torch.bfloat16 and master != REMAINDER else 0) | (
        SR_STATES if states_sr and s_dtype == torch.bfloat16 else 0)
MAX_SCALARS = 4
N_HYPER = 8
P_STATS, P_APPLY = 0, 1  # the passes of a launch (PASSES bits): the statistics pass, the update
SCALAR_F64_FIRST = 24  # FLAGS bits SCALAR_F64_FIRST + k: scalar slot k is float64 (optimizers' own bits stay below)

if runtime.available():
    import triton.language as tl

    class _Bit(tl.constexpr):
        """A FLAGS bit. Compiled kernels may only read tl.constexpr globals; the interpreter passes FLAGS as a
        plain int, so `FLAGS & BIT` also needs the reflected operator."""

        def __rand__(self, other):
            return tl.constexpr(int(getattr(other, "value", other)) & self.value)

    SR_PARAM_BIT, SR_STATES_BIT = _Bit(SR_PARAM), _Bit(SR_STATES)  # the SR bits as the kernels read them


def flag_bits(n: int, first: int = 0):
    """n option bits for FLAGS, from bit `first` on (`if FLAGS & BIT:` in a kernel, `pack((BIT, cond), ...)` on the
    host)."""
    return tuple(_Bit(1 << i) for i in range(first, first + n))


if runtime.available():
    SCALAR_F64 = F64_0, F64_1, F64_2, F64_3 = flag_bits(MAX_SCALARS, first=SCALAR_F64_FIRST)


def scalar_f64_flags(scalars) -> int:
    """The SCALAR_F64 bits of a bucket's scalar columns (``scalars[k][i]``: slot k of tensor i): all of a column's
    states share a dtype within a bucket (``apply`` buckets by it)."""
    return sum(1 << (SCALAR_F64_FIRST + k) for k, col in enumerate(scalars) if col and col[0].dtype == torch.float64)


def pack(*bits_and_conditions) -> int:
    """FLAGS value from (bit, condition) pairs: pack((MAXIMIZE, group["maximize"]), ...)."""
    return sum(int(bit.value) for bit, on in bits_and_conditions if on)


_PLACEHOLDER = re.compile(r"h\d+$")


@lru_cache(maxsize=None)
def _check_hypers(fn, first: int, names: tuple) -> None:
    """The slots ``lr, h1..h7`` of ``fn`` start at argument ``first``: each slot ``fn`` names must get that name
    (cached: a Rule is made every step, from a handful of (function, names) pairs; a failed check is not cached)."""
    if fn is None:
        return
    slots = tuple(inspect.signature(fn.fn).parameters)[first:first + N_HYPER]
    for i, slot in enumerate(slots):
        given = names[i] if i < len(names) else None
        if not _PLACEHOLDER.match(slot) and slot != given:
            raise ValueError(f"{fn.fn.__name__} reads hyper-parameter slot {i} as {slot!r}, but the rule gives "
                             f"{given!r} there (hypers in order: {list(names)})")


@dataclass
class Rule:
    """An optimizer's kernel math: the jit functions of the module note (``stats``: the optional STATS, which adds the statistics
    pass), constexpr flags and named fp64 hyper-parameters (``lr`` first, then up to 7 more, in the order the
    functions take them)."""
    update: object
    scalars: object = None
    flags: int = 0
    hypers: dict = None
    stats: object = None

    def __post_init__(self):
        self.hypers = dict(self.hypers or {})
        names = tuple(self.hypers)
        if len(names) > N_HYPER or (names and names[0] != "lr"):
            raise ValueError(f"a Rule takes lr and up to {N_HYPER - 1} more hyper-parameters, got {list(names)}")
        _check_hypers(self.update, 10, names)
        _check_hypers(self.scalars, 4, names)
        _check_hypers(self.stats, 10, names)

    def launches(self) -> list:
        """The PASSES of each launch of a step: the update alone, or the statistics pass and the update (one
        persistent launch where the device grants it, else one launch each: runtime.launch_phases)."""
        return [(P_STATS, P_APPLY)] if self.stats is not None else [(P_APPLY,)]

    def hyper_values(self) -> tuple:
        vals = tuple(float(v) for v in self.hypers.values())
        return vals + (0.0,) * (N_HYPER - len(vals))


