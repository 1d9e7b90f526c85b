"""The documentation every optimizer shares: its keyword-only options beyond the anchor (``fused``,
``master_weights``, ``stochastic_rounding``, ``max_grad_norm``, ``param_remainders``, ``state_dtype``). ``register`` appends it to each public class's
docstring, worded from the class's attributes (where the precision options run, which options it refuses), so
``help(fused_optim.AdamW)`` shows it and each class's own docstring keeps only its algorithm, anchor and notes."""
from __future__ import annotations

import inspect
import textwrap

HEADER = "Keyword-only options beyond the anchor (every fused_optim optimizer has them):"

_FUSED = """\
fused=None
    Which implementation steps each param group (a param-group key, saved in the state dict). None: the Triton
    kernels when every param of the group is on CUDA and Triton imports, else the reference path. True: demand
    the kernels (RuntimeError at construction without Triton, or for a param not on CUDA; CPU params only under
    TRITON_INTERPRET=1, Triton's interpreter). False: the reference path, plain torch math that defines the
    numbers (tested against the anchor every step). Launches per param group and step: as stated above, for a
    group whose params share one dtype. Where the anchor has a ``fused`` flag of its own (torch's Adam, AdamW,
    SGD, Adagrad), this one takes its place, with its values.
{layouts}"""

# how the fused path takes non-contiguous tensors, by the class's kernel_layout
_COPIES = ("a grad in another layout or expanded costs a copy of the grad per step (and one back with AMP or "
           "max_grad_norm, which write the unscaled grad; an expanded grad is replaced by it); a state of other "
           "strides, a copy in and back (a checkpoint's states are relaid like their param at load).")
_LAYOUTS = {
    "storage": "Layouts: any. The kernels walk storage: a dense param (contiguous, channels_last, transposed) "
               "whose grad and states share its strides runs as it is, in the same launch. A param that is not "
               "dense (a strided slice) goes through a contiguous copy (in and back each step); " + _COPIES,
    "rows": "Layouts: any. The kernels read rows (dim 0) as blocks of storage: a dense param with dim 0 outermost "
            "(contiguous, channels_last) whose grad and states share its strides runs as it is, in the same "
            "launch; another param (transposed, a strided slice) goes through contiguous copies of it and its "
            "states (in and back each step); " + _COPIES,
    "contiguous": "Layouts: any. The kernels read logical rows and columns: a non-contiguous param (channels_last "
                  "included) goes through contiguous copies of it, its grad and its states of its shape (in and "
                  "back each step: about two extra reads and writes of each).",
    "flat": "Layouts: any: the flat vectors gather each grad in logical order (torch's view(-1); a copy where "
            "torch's view would refuse, e.g. a channels_last grad).",
}

_MASTER = """\
master_weights=False
    True: each bf16/fp16 param gets an fp32 master copy in ``state['master_param']`` (saved in the state dict)
    and fp32 element-wise states; the math updates the master and the param is the master rounded to its dtype.
    Costs 4 bytes per param element (and fp32 instead of bf16/fp16 states); fp32/fp64 params are unaffected.
{where}"""

_ROUNDING = """\
stochastic_rounding=False
    True: bf16 params are written with stochastic rounding (unbiased, so updates smaller than a bf16 ulp survive
    on average), with random bits from torch's RNG (``torch.manual_seed`` makes a run reproducible; the fused
    path takes one host draw per step as its seed, no sync); fp16 params are rounded to nearest.
{where}"""

_IN_KERNEL = "Fused: in the same kernel launch (no extra launch or pass)."
_ON_REFERENCE = ("This optimizer's kernels do not carry it: while it is set, a param group holding bf16/fp16 "
                 "params steps on the reference path (fp32 math, then rounding).")
_REFUSED_PRECISION = """\
master_weights=False, stochastic_rounding=False
    fp32 master copies of bf16/fp16 params and stochastic rounding of bf16 params: not supported by this
    optimizer (True raises ValueError at construction)."""

_CLIP = """\
max_grad_norm=None
    A positive number: before the step, clip the global grad norm as
    ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` does (2-norm over every param of every group that
    has a grad, eps 1e-6), on AMP-unscaled grads; ``p.grad`` holds the clipped grads afterwards and
    ``opt.last_grad_norm`` the norm before clipping (a 0-d tensor; None before the first step). Fused: +2
    launches per step for all groups together: the sum of squares of every grad (one C++/CUDA engine launch for
    all dtypes; with the Triton fallback, where the engine is not built, one per grad dtype), then a one-program
    launch that folds the clip coefficient into the grad scale the kernels apply anyway: no host sync, no extra
    pass over the grads.
    Reference path: unscale, then clip_grad_norm_ itself. All grads must be on one device. DTensor (FSDP2)
    params (Shard(d) on a 1-D mesh, or Replicate): the sums of squares of the local shards, one collective for
    the global norm, equal to clip_grad_norm_ on the full model (other placements raise NotImplementedError).
    Refused under ZeroRedundancyOptimizer (each rank's optimizer holds only its partition)."""

_LEAN = """\
param_remainders=False
    True (bf16 params only; not with master_weights): an int16 remainder per element in
    ``state['param_remainder']`` holds the low 16 bits of an exact fp32 master, which the math updates, at 2 bytes
    per param element instead of master_weights' 4, with the same fp32 masters bit for bit. The bf16 param is the
    master rounded to nearest, ties rounded up in magnitude (so the remainder fits 16 bits; at exact ties it is
    master_weights' param's neighbour, 1 ulp); element-wise states are fp32 unless state_dtype says otherwise;
    stochastic_rounding then applies to bf16 states only.
{where}

state_dtype=None
    The dtype of every element-wise state buffer (momentum, exp_avg, exp_avg_sq, square_avg, ...; not per-tensor
    scalars). None: the anchor's. ``torch.bfloat16``: 2 bytes per element; the math is fp32 on the loaded
    values, stored rounded to nearest, or stochastically under stochastic_rounding=True. ``"int8"``: blockwise
    8-bit states (fused_optim/kernels/quant.py): per block of 256 elements an fp32 absmax scale
    (``state[key + '_absmax']``) and a uint8 code per element (``state[key]``) into a dynamic-exponent map on
    [-1, 1], or on [0, 1] for the states the class names in ``nonnegative_states``, so small values keep relative
    precision; 1 + 1/64 bytes per element; fp32 math on the dequantized values, requantized on store (round to
    nearest code). Saved as is in the state dict (``anchor_state_dict()`` gives fp32 states in the anchor's
    layout); a checkpoint with fp32 states loads into bf16 ones or is quantized. Complex params are refused.
{where}

int8_min_numel=4096
    With state_dtype="int8": the states of params with fewer elements stay fp32 (their scales would cost more
    than the codes save)."""

_REFUSED_LEAN = """\
param_remainders=False, state_dtype=None, int8_min_numel=4096
    Memory-lean params and states: not supported by this optimizer (other values raise ValueError at
    construction)."""

_REFUSED_CLIP = """\
max_grad_norm=None
    Not supported by this optimizer: a number raises ValueError at construction."""


def options_doc(cls) -> str:
    """The shared keyword documentation, worded for ``cls``."""
    if cls.supports_precision_options:
        where = textwrap.fill(_IN_KERNEL if cls.precision_in_kernel else _ON_REFERENCE, 116,
                              initial_indent="    ", subsequent_indent="    ")
        precision = (_MASTER.format(where=where), _ROUNDING.format(where=where))
        lean = _LEAN.format(where=where)
    else:
        precision = (_REFUSED_PRECISION,)
        lean = _REFUSED_LEAN
    layouts = textwrap.fill(_LAYOUTS[cls.kernel_layout], 116, initial_indent="    ", subsequent_indent="    ")
    fused = _FUSED.format(layouts=layouts)
    if getattr(cls, "anchor_max_grad_norm", False):  # the anchor's own argument, documented above
        return "\n\n".join((HEADER, fused, *precision, lean))
    clip = _CLIP if cls.supports_max_grad_norm else _REFUSED_CLIP
    return "\n\n".join((HEADER, fused, *precision, clip, lean))


def document(cls):
    """Append the shared keyword documentation to ``cls``'s own docstring (its own part is kept as written)."""
    own = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    cls.__doc__ = f"{own}\n\n{options_doc(cls)}" if own else options_doc(cls)
    return cls
