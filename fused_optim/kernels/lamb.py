"""LAMB's kernel family, host side: the tables (laid out as kernels/lamb_passes.py reads them), the launcher and the
AOT entries. One persistent cooperative launch runs both passes (runtime.launch_phases), or two where the device
refuses one, or over DTensor shards (the host adds the shards' statistics between them: one collective); with
neither adaptation nor caution, pass 1 alone (a = -lr, b = 0).
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import torch

from . import multi_tensor as mt
from . import runtime, sync
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


def _build(key, params, grads, states, shards) -> LambTables:
    dev = params[0].device
    chunks = [max(1, -(-n // (runtime.BLOCK * runtime.ITERS))) for n in map(numel, params)]
    work = [(t, c) for t, n in enumerate(chunks) for c in range(n)]
    zeros = lambda *size, dtype=torch.float32: torch.zeros(size, dtype=dtype, device=dev)  # noqa: E731
    return LambTables(
        key=key, gkey=tuple(map(ptr, grads)), grad_col=int(E_GRAD), aligned=all_aligned(params, grads, *zip(*states)),
        ptrs=to_device([[ptr(p), ptr(g), *map(ptr, st)] for p, g, st in zip(params, grads, states)], torch.int64, dev),
        numels=to_device(list(map(numel, params)), torch.int64, dev), work=to_device(work, torch.int32, dev),
        first=to_device([0, *itertools.accumulate(chunks[:-1])], torch.int32, dev),
        counters=zeros(len(params) + 1, dtype=torch.int32), partials=zeros(int(P_W), len(work)),
        sums=zeros(len(params), int(S_W), dtype=torch.float64), barrier=sync.GridBarrier(dev), shards=shards)


def constexprs(spec: Spec, passes, dts, *, has_scale, has_clip, has_inf, write_step, aligned) -> dict:
    return dict(FLAGS=spec.flags(), PASSES=sum(1 << p for p in passes), P_DT=runtime.tl_dtype(dts[0]),
                G_DT=runtime.tl_dtype(dts[1]), S_DT=runtime.tl_dtype(dts[2]), HAS_SCALE=has_scale, HAS_CLIP=has_clip,
                HAS_INF=has_inf, WRITE_STEP=write_step, ALIGNED=aligned, BLOCK=runtime.BLOCK, ITERS=runtime.ITERS,
                PB=SUM_LANES)


def step(spec: Spec, cache: TableCache, params, grads, states, step_t, grad_scale, clip, found_inf, who: str,
         shards=None) -> None:
    """One fused step of a param group: ``states`` (exp_avg, exp_avg_sq) of each param, ``step_t`` the group's
    float32 step on the device (advanced once, by the last launch), ``clip`` the global clip factor or None,
    ``shards`` the group's sharded.Layout when its params are DTensor shards (local tensors here), else None."""
    keys = list(zip(map(dtype_of, params), map(dtype_of, grads), map(dtype_of, map(operator.itemgetter(0), states))))
    groups = list(buckets(keys).items())
    for k, (dts, idx) in enumerate(groups):
        ps, gs, sts = pick(idx, params, grads, states)
        key = (tuple(map(ptr, ps)), tuple(map(ptr, itertools.chain.from_iterable(sts))), tuple(map(numel, ps)))
        tab = cache.lookup(dts, key, gs, lambda: _build(key, ps, gs, sts, None if shards is None else shards.pick(idx)))
        n_items, sub = tab.work.shape[0], tab.shards
        dummy = tab.partials  # an fp32 stand-in for an absent grad_scale / clip / found_inf (never read)
        args = (tab.ptrs, tab.numels, tab.work, tab.first, tab.counters, tab.partials, tab.sums, tab.barrier.words,
                step_t, tab.counters[-1:], dummy if grad_scale is None else grad_scale, dummy if clip is None else clip,
                dummy if found_inf is None else found_inf, n_items,
                *(float(getattr(spec, h)) for h in HYPERS))
        passes = spec.passes()
        # over shards: the local sums -> the full tensors' between the passes (one launch each)
        between = None if sub is None else (lambda _: tab.sums.copy_(sub.full_sums(tab.sums)))
        runtime.launch_phases(
            lamb_kernel, passes, *args, grid_of=lambda _: n_items, device=ps[0].device, between=between,
            constexprs_of=lambda run: constexprs(spec, run, dts, has_scale=grad_scale is not None,
                                                 has_clip=clip is not None, has_inf=found_inf is not None,
                                                 write_step=APPLY in run and k == len(groups) - 1,
                                                 aligned=tab.aligned))
        if len(passes) > 1 and sub is None:
            tab.barrier.watch(who)


def aot_kernels() -> list:
    """Every launch of Lamb's step (pass 1 alone, pass 0 alone and 1 alone (the fallback), both persistent), options
    off and all on, fp32 (and bf16 / fp16 with AMP and clipping for all options on)."""
    if not runtime.available():
        return []
    ptr_args = dict(ptrs="*i64", numels="*i64", work="*i32", first="*i32", counters="*i32", sums="*fp64",
                    barrier="*i32", step_counter="*i32", n_items="i32")
    sig = {a: ptr_args.get(a, "constexpr" if a.isupper() else "fp64" if a in HYPERS else "*fp32")
           for a in lamb_kernel.arg_names}
    out = []
    for label, spec in (("plain", Spec(1e-3, 0.9, 0.999, 1e-6, 0.0, 0.0, True, True, False, False, False)),
                        ("default", Spec(1e-3, 0.9, 0.999, 1e-6, 0.01, 0.0, True, True, False, True, False)),
                        ("all", Spec(1e-3, 0.9, 0.999, 1e-6, 0.0, 1e-5, False, False, True, True, True))):
        variants = [((torch.float32,) * 3, False)] + (
            [((torch.bfloat16,) * 3, True), ((torch.float16,) * 3, True)] if label == "all" else [])
        runs = [[APPLY]] if spec.passes() == [APPLY] else [[STATS, APPLY], [STATS], [APPLY]]
        for dts, amp in variants:
            for run in runs:
                out.append(dict(name=f"Lamb[{label}] pass {'+'.join(map(str, run))} {str(dts[0])[6:]}"
                                     f"{' amp' * amp}", fn=lamb_kernel, signature=sig,
                                options=runtime.compile_options(),
                                constexprs=constexprs(spec, run, dts, has_scale=amp, has_clip=True, has_inf=amp,
                                                      write_step=APPLY in run, aligned=True)))
    return out
