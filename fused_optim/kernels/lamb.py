"""LAMB's kernel family, host side: the tables (laid out as kernels/lamb_passes.py reads them), the launcher and the
AOT entries. One persistent cooperative launch runs both passes (runtime.launch_phases), or two where the device
refuses one, or over DTensor shards (the host adds the shards' statistics between them: one collective); with
neither adaptation nor caution, pass 1 alone (a = -lr, b = 0). The lean options (masters, stochastic rounding, bf16
and int8 moments) run in the same launches: each param's row of addresses adds its master slot and int8 scales.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import torch

from . import multi_tensor as mt
from . import quant, runtime, sync
from .lamb_passes import APPLY, E_GRAD, HYPERS, P_W, S_W, STATS, SUM_LANES
from .tables import Tables, TableCache, all_aligned, buckets, dtype_of, numel, pick, ptr, to_device

if runtime.available():
    from .lamb_passes import (ADAPT, BIAS_CORRECTION, CAUTION, DECOUPLED, GRAD_AVG, STATS_ON, TRUST_CLIP,
                              lamb_kernel)


@dataclass
class Spec:
    """What Lamb hands the kernel for one param group."""
    lr: float
    beta1: float
    beta2: float
    eps: float
    l2: float       # weight decay added to the update (0 when decoupled)
    decay: float    # decoupled decay: p <- p - decay * p
    bias_correction: bool
    grad_averaging: bool
    caution: bool
    adapt: bool
    trust_clip: bool

    def flags(self) -> int:
        return mt.pack((BIAS_CORRECTION, self.bias_correction), (GRAD_AVG, self.grad_averaging),
                       (DECOUPLED, self.decay != 0), (CAUTION, self.caution), (ADAPT, self.adapt),
                       (TRUST_CLIP, self.trust_clip), (STATS_ON, self.adapt or self.caution))

    def passes(self) -> list:
        return [STATS, APPLY] if self.adapt or self.caution else [APPLY]


@dataclass
class LambTables(Tables):
    numels: torch.Tensor = None
    work: torch.Tensor = None      # int32 [W, 2]: (tensor, chunk)
    first: torch.Tensor = None     # int32 [T]: each tensor's first work item (its partials start there)
    counters: torch.Tensor = None  # int32 [T + 1]: Note [last program of a tensor]; the last one: the step's
    partials: torch.Tensor = None  # fp32 [P_W, W]
    sums: torch.Tensor = None      # fp64 [T, S_W]: each tensor's statistics (over DTensor shards: the full tensor's)
    barrier: sync.GridBarrier = None
    shards: object = None          # over DTensor shards: the bucket's sharded.Layout (kept: its masks are made once)
    qmap: torch.Tensor = None      # int8 moments: the code maps the address rows point to


def _build(key, params, grads, states, shards, masters, scales) -> LambTables:
    """The tables of one bucket; each address row: param, grad, the moments (E_* columns), then the param's master
    slot if any, then (int8 moments) the code maps and the two moments' block scales."""
    dev = params[0].device
    qmap = quant.code_maps(dev) if scales else None
    extra = [[*map(ptr, [m] if m is not None else []), *map(ptr, [qmap, *q] if q else [])]
             for m, q in zip(masters, scales or [()] * len(params))]
    chunks = [max(1, -(-n // (runtime.BLOCK * runtime.ITERS))) for n in map(numel, params)]
    work = [(t, c) for t, n in enumerate(chunks) for c in range(n)]
    zeros = lambda *size, dtype=torch.float32: torch.zeros(size, dtype=dtype, device=dev)  # noqa: E731
    return LambTables(
        key=key, gkey=tuple(map(ptr, grads)), grad_col=int(E_GRAD),
        aligned=all_aligned(params, grads, *zip(*states), [m for m in masters if m is not None]),
        ptrs=to_device([[ptr(p), ptr(g), *map(ptr, st), *ex] for p, g, st, ex in zip(params, grads, states, extra)],
                       torch.int64, dev), qmap=qmap,
        numels=to_device(list(map(numel, params)), torch.int64, dev), work=to_device(work, torch.int32, dev),
        first=to_device([0, *itertools.accumulate(chunks[:-1])], torch.int32, dev),
        counters=zeros(len(params) + 1, dtype=torch.int32), partials=zeros(int(P_W), len(work)),
        sums=zeros(len(params), int(S_W), dtype=torch.float64), barrier=sync.GridBarrier(dev), shards=shards)


def constexprs(spec: Spec, passes, dts, *, has_scale, has_clip, has_inf, write_step, aligned, master=mt.NO_MASTER,
               sr=0, quant_bits=0) -> dict:
    return dict(FLAGS=spec.flags(), PASSES=sum(1 << p for p in passes), P_DT=runtime.tl_dtype(dts[0]),
                G_DT=runtime.tl_dtype(dts[1]), S_DT=runtime.tl_dtype(dts[2]), MASTER=master, SR=sr, QUANT=quant_bits,
                HAS_SCALE=has_scale, HAS_CLIP=has_clip,
                HAS_INF=has_inf, WRITE_STEP=write_step, ALIGNED=aligned, BLOCK=runtime.BLOCK, ITERS=runtime.ITERS,
                PB=SUM_LANES)


def step(spec: Spec, cache: TableCache, params, grads, states, step_t, grad_scale, clip, found_inf, shards=None, *,
         who: str, masters=None, stochastic_rounding=False, seed=0, state_stochastic_rounding=False,
         scales=None, unsigned=0) -> None:
    """One fused step of a param group: ``states`` (exp_avg, exp_avg_sq) of each param, ``step_t`` the group's
    float32 step on the device (advanced once, by the last launch), ``clip`` the global clip factor or None,
    ``shards`` the group's sharded.Layout when its params are DTensor shards (local tensors here), else None. The
    lean options as mt.apply takes them: ``masters`` (fp32 master copies or int16 remainders, or None),
    ``stochastic_rounding`` / ``state_stochastic_rounding`` from ``seed``, ``scales`` (int8 moments: per moment,
    each param's block scales) and ``unsigned`` (bit k: moment k)."""
    masters = [None] * len(params) if masters is None else masters
    keys = list(zip(map(dtype_of, params), map(dtype_of, grads), map(dtype_of, map(operator.itemgetter(0), states)),
                    map(mt.master_kind, masters)))
    groups = list(buckets(keys).items())
    for k, ((*dts, master), idx) in enumerate(groups):
        dts = tuple(dts)
        ps, gs, sts, ms = pick(idx, params, grads, states, masters)
        qbits = quant.quant_bits(unsigned) if dts[2] == quant.CODE_DTYPE else 0
        qs = list(zip(*pick(idx, *scales))) if qbits else None  # each param's scales, by moment
        key = (tuple(map(ptr, ps)), tuple(map(ptr, itertools.chain.from_iterable(sts))), tuple(map(numel, ps)),
               tuple(ptr(m) for m in ms if m is not None),
               tuple(map(ptr, itertools.chain.from_iterable(qs or ()))))
        tab = cache.lookup((dts, master), key, gs,
                           lambda: _build(key, ps, gs, sts, None if shards is None else shards.pick(idx), ms, qs))
        sr = mt.sr_bits(dts[0], dts[2], master, stochastic_rounding, state_stochastic_rounding)
        n_items, sub = tab.work.shape[0], tab.shards
        dummy = tab.partials  # an fp32 stand-in for an absent grad_scale / clip / found_inf (never read)
        args = (tab.ptrs, tab.numels, tab.work, tab.first, tab.counters, tab.partials, tab.sums, tab.barrier.words,
                step_t, tab.counters[-1:], dummy if grad_scale is None else grad_scale, dummy if clip is None else clip,
                dummy if found_inf is None else found_inf, n_items, seed,
                *(float(getattr(spec, h)) for h in HYPERS))
        passes = spec.passes()
        # over shards: the local sums -> the full tensors' between the passes (one launch each)
        between = None if sub is None else (lambda _: tab.sums.copy_(sub.full_sums(tab.sums)))
        runtime.launch_phases(
            lamb_kernel, passes, *args, grid_of=lambda _: n_items, device=ps[0].device, between=between,
            constexprs_of=lambda run: constexprs(spec, run, dts, has_scale=grad_scale is not None,
                                                 has_clip=clip is not None, has_inf=found_inf is not None,
                                                 write_step=APPLY in run and k == len(groups) - 1,
                                                 aligned=tab.aligned, master=master, sr=sr, quant_bits=qbits))
        if len(passes) > 1 and sub is None:
            tab.barrier.watch(who)


def aot_kernels() -> list:
    """Every launch of Lamb's step (pass 1 alone, pass 0 alone and 1 alone (the fallback), both persistent), options
    off and all on, fp32 (and bf16 / fp16 with AMP and clipping for all options on). The lean options, for the
    default and all options on: bf16 params with an fp32 master copy and stochastic rounding, with remainders and
    bf16 moments rounded stochastically, and int8 moments (fp32 params, and bf16 params with remainders)."""
    if not runtime.available():
        return []
    ptr_args = dict(ptrs="*i64", numels="*i64", work="*i32", first="*i32", counters="*i32", sums="*fp64",
                    barrier="*i32", step_counter="*i32", n_items="i32", seed="i32")
    sig = {a: ptr_args.get(a, "constexpr" if a.isupper() else "fp64" if a in HYPERS else "*fp32")
           for a in lamb_kernel.arg_names}
    f32, bf16, u8 = torch.float32, torch.bfloat16, quant.CODE_DTYPE
    qbits = quant.quant_bits(0b10)  # int8 moments: exp_avg signed, exp_avg_sq unsigned
    # (dtypes, AMP, master, SR bits, QUANT, name suffix)
    lean = [((bf16, bf16, f32), False, mt.MASTER_FP32, mt.SR_PARAM, 0, " master sr"),
            ((bf16,) * 3, False, mt.REMAINDER, mt.SR_STATES, 0, " remainders sr-states"),
            ((f32, f32, u8), False, mt.NO_MASTER, 0, qbits, " int8 states"),
            ((bf16, bf16, u8), False, mt.REMAINDER, 0, qbits, " int8 states remainders")]
    out = []
    for label, spec in (("plain", Spec(1e-3, 0.9, 0.999, 1e-6, 0.0, 0.0, True, True, False, False, False)),
                        ("default", Spec(1e-3, 0.9, 0.999, 1e-6, 0.01, 0.0, True, True, False, True, False)),
                        ("all", Spec(1e-3, 0.9, 0.999, 1e-6, 0.0, 1e-5, False, False, True, True, True))):
        variants = [((f32,) * 3, False, mt.NO_MASTER, 0, 0, "")] + (
            [((bf16,) * 3, True, mt.NO_MASTER, 0, 0, ""), ((torch.float16,) * 3, True, mt.NO_MASTER, 0, 0, "")]
            if label == "all" else []) + (lean if label != "plain" else [])
        runs = [[APPLY]] if spec.passes() == [APPLY] else [[STATS, APPLY], [STATS], [APPLY]]
        for dts, amp, master, sr, quant_bits, suffix in variants:
            for run in runs:
                out.append(dict(name=f"Lamb[{label}] pass {'+'.join(map(str, run))} {str(dts[0])[6:]}"
                                     f"{' amp' * amp}{suffix}", fn=lamb_kernel, signature=sig,
                                options=runtime.compile_options(),
                                constexprs=constexprs(spec, run, dts, has_scale=amp, has_clip=True, has_inf=amp,
                                                      write_step=APPLY in run, aligned=True, master=master, sr=sr,
                                                      quant_bits=quant_bits)))
    return out
