"""Adafactor's AOT entries (tools/aot.py): every launch kernels/adafactor.py makes, by step kind and dtypes."""
from __future__ import annotations

import torch

from . import quant, runtime
from .adafactor import CAUTIOUS, HYPERS, PASS_NAMES, PLAIN, constexprs, launches, options, sharded_phases
from .rules import MASTER_FP32, NO_MASTER, REMAINDER, SR_PARAM, SR_STATES

BF16, F32 = torch.bfloat16, torch.float32
# the precision and lean options (label, dts: param, grad, moments, element-wise states; master; sr; int8 bits):
# int8 states are unsigned for exp_avg_sq (slot 1)
INT8 = quant.quant_bits(0b10)
LEAN = [("remainders,bf16 states", (BF16, BF16, F32, BF16), REMAINDER, 0, 0),
        ("remainders,bf16 states sr", (BF16, BF16, F32, BF16), REMAINDER, SR_STATES, 0),
        ("master,sr", (BF16, BF16, F32, F32), MASTER_FP32, SR_PARAM, 0),
        ("int8 states", (F32, F32, F32, torch.uint8), NO_MASTER, 0, INT8),
        ("remainders,int8 states", (BF16, BF16, F32, torch.uint8), REMAINDER, 0, INT8)]


def _name(label, passes, dts, amp=False):
    return (f"Adafactor[{label},{'+'.join(PASS_NAMES[x] for x in passes)}] "
            f"{str(dts[0]).replace('torch.', '')}{' amp' if amp else ''}")


def aot_kernels():
    """Every launch of the kernel: the Triton statistics (ROWCOL) and the persistent launches after it or after the
    csrc engine (FOLD first); relative step (default), and external lr with beta1, weight decay, with and without
    caution; fp32, bf16 (fp32 states) and fp16 with AMP arguments; each pass of a cautious step over DTensor
    shards, fp32; and the persistent launches with each precision / lean option (LEAN; the statistics launch
    takes none of them)."""
    from .adafactor_passes import adafactor_kernel

    types = {"ptrs": "*i64", "meta": "*i64", "work": "*i32", "counters": "*i32", "barrier": "*i32",
             "n_fact": "i32", "n_work": "i32", "seed": "i32", **{k: "fp64" for k in HYPERS}}
    cx_names = constexprs([], 0, (F32,) * 3)
    sig = {a: "constexpr" if a in cx_names else types.get(a, "*fp32") for a in adafactor_kernel.arg_names}
    variants = [("relative", options(relative=True, scale_parameter=True), (False,)),
                ("lr,betas,weight_decay", options(beta1=True, weight_decay=True), (False, True))]
    runs = []
    for label, flags, cautions in variants:
        for cautious in cautions:
            for csrc_stats in (False, True):
                for passes in launches(CAUTIOUS if cautious else PLAIN, True, csrc_stats):
                    if (flags, passes) not in [x[1:] for x in runs]:
                        runs.append((label + (",caution" if cautious else ""), flags, passes))
    label, flags, _ = variants[1]  # over DTensor shards: one launch per pass, fp32 and bf16 params
    sharded = [(f"{label},caution,sharded", flags, [x]) for x in sharded_phases(CAUTIOUS, True, True)]
    dtypes = [((F32,) * 3, False), ((BF16, BF16, F32), False), ((torch.float16, torch.float16, F32), True)]

    def entry(name, passes, flags, dts, **kw):
        return dict(name=name, fn=adafactor_kernel, signature=sig, constexprs=constexprs(passes, flags, dts, **kw),
                    options=runtime.compile_options())

    return [entry(_name(label, passes, dts, amp), passes, flags, dts, has_scale=amp, has_inf=amp)
            for label, flags, passes in runs for dts, amp in dtypes] + [
        entry(f"Adafactor[{label},{PASS_NAMES[passes[0]]}] {str(dts[0])[6:]}", passes, flags, dts, sharded=True)
        for label, flags, passes in sharded for dts, _ in dtypes[:2]] + [
        entry(_name(f"{label},{lean}", passes, dts), passes, flags, dts, master=master, sr=sr, quant_bits=qbits)
        for label, flags, passes in runs if len(passes) > 1 for lean, dts, master, sr, qbits in LEAN]
