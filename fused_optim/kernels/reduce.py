"""Per-tensor sums of squares of grads, on the device, and the global grad-norm clipping built on them.

``sumsq`` is what NovoGrad's per-layer second moments and every optimizer's ``max_grad_norm`` need: sum(g^2) of
each (unscaled) grad, into a cached fp32 buffer whose address stays fixed (a multi-tensor apply's tables point at
it). Two implementations of the same contract:

* ``csrc``   the C++/CUDA multi-tensor engine (fused_optim/csrc.py): one launch for all tensors and dtypes; its
             host build serves CPU tensors (so CI runs this path), its CUDA build CUDA tensors;
* ``triton`` a Triton pass over the shared work table (one launch per grad dtype), where csrc is not built.

``BACKEND`` ("auto": csrc where its module for the device is built, else triton; or "csrc" / "triton") picks one;
the environment variable FUSED_OPTIM_REDUCTIONS sets its initial value.

``clip_scale`` turns the sums into torch.nn.utils.clip_grad_norm_'s coefficient, folded into an effective loss
scale: every kernel already multiplies grads by 1 / grad_scale, so passing ``scale / coef`` as grad_scale clips in
the same pass, with no host sync and no extra pass over the grads.
"""
from __future__ import annotations

import itertools
import operator
import os
from dataclasses import dataclass

import torch

from . import multi_tensor as mt

_dtype = operator.attrgetter("dtype")

BACKEND = os.environ.get("FUSED_OPTIM_REDUCTIONS", "auto")
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coef = max_norm / (total_norm + 1e-6), at most 1
# partial sums are added PB at a time; small under the interpreter so CPU tests cover several passes
_PB = 4 if mt.interpreter_enabled() else 256

if mt.available():
    import triton
    import triton.language as tl

    # local names: a kernel may call only jit functions it finds among its module's globals
    _chunk_ptr, _load, arrive, sum_partials = mt._chunk_ptr, mt._load, mt.arrive, mt.sum_partials

    @triton.jit
    def _sumsq_kernel(ptrs, numels, work, first, dst, counters, partials, out, scale_ptr, inf_ptr,
                      G_DT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
                      ALIGNED: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, PB: tl.constexpr):
        # one program per (tensor, chunk) of mt's work table; out[dst[t]] = sum of the unscaled grad's squares
        pid = tl.program_id(0)
        skip = 0
        if HAS_INF:
            skip = tl.load(inf_ptr) != 0
        if skip == 0:
            t = tl.load(work + 2 * pid)
            chunk = tl.load(work + 2 * pid + 1).to(tl.int64)
            n = tl.load(numels + t)
            g_ptr = _chunk_ptr(ptrs + t.to(tl.int64) * 2, 1, G_DT, ALIGNED)
            inv_scale = 1.0
            if HAS_SCALE:
                inv_scale = 1.0 / tl.load(scale_ptr).to(tl.float32)
            lanes = tl.arange(0, BLOCK)
            start = chunk * (BLOCK * ITERS)
            acc = tl.zeros([BLOCK], tl.float32)
            if start + BLOCK * ITERS <= n:
                for i in range(ITERS):
                    offs = start + i * BLOCK + lanes
                    g = _load(g_ptr, offs, offs < n, True) * inv_scale
                    acc += g * g
            else:
                for i in range(ITERS):
                    offs = start + i * BLOCK + lanes
                    g = _load(g_ptr, offs, offs < n, False) * inv_scale
                    acc += g * g
            tl.store(partials + pid, tl.sum(acc, axis=0))
            nwork = tl.maximum(tl.cdiv(n, BLOCK * ITERS), 1).to(tl.int32)
            if arrive(counters + t, nwork):
                tl.store(out + tl.load(dst + t), sum_partials(partials + tl.load(first + t), nwork, PB))
                tl.store(counters + t, 0)

    @triton.jit
    def _clip_scale_kernel(sq, n, scale_ptr, out, max_norm, HAS_SCALE: tl.constexpr, PB: tl.constexpr):
        # one program: out[0] = the global norm, out[1] = grad_scale / clip coefficient (the effective scale)
        norm = tl.sqrt(sum_partials(sq, n, PB))
        coef = tl.minimum(max_norm / (norm + 1e-6), 1.0)  # CLIP_EPS
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr)
        tl.store(out, norm)
        tl.store(out + 1, scale / coef)


@dataclass
class _TritonTables:
    tab: object            # mt._Tables over the grads (ptrs column 1, numels, work, counters)
    first: torch.Tensor    # int32 [T]: index of each tensor's first work item (its partials start there)
    dst: torch.Tensor      # int32 [T]: where each tensor's sum goes in the output buffer
    partials: torch.Tensor  # fp32 [W]


def use_csrc(device: torch.device) -> bool:
    if BACKEND == "triton":
        return False
    from .. import csrc

    ok = csrc.host_available() if device.type == "cpu" else device.type == "cuda" and csrc.cuda_available()
    if BACKEND == "csrc" and not ok:
        raise RuntimeError(f"fused_optim: FUSED_OPTIM_REDUCTIONS=csrc but the csrc module for {device} is not built "
                           f"({csrc.load_errors()}); run bash scripts/build_csrc.sh")
    return ok


def sumsq(cache: dict, grads, grad_scale=None, found_inf=None) -> torch.Tensor:
    """fp32 [T] device buffer: sum((g / grad_scale)^2) of every grad (contiguous, real dtype). The buffer is cached
    in ``cache`` per list of sizes and dtypes, so its address is the same every step."""
    dev = grads[0].device
    key = (tuple(map(torch.Tensor.numel, grads)), tuple(map(_dtype, grads)), str(dev))
    out = cache.get(("out", key))
    if out is None:
        cache.clear()  # a new layout: drop the old buffers and tables
        out = cache[("out", key)] = torch.zeros(len(grads), dtype=torch.float32, device=dev)
    if use_csrc(dev):
        from .. import csrc

        buf = cache.get(("csrc", key))
        if buf is None:
            buf = cache[("csrc", key)] = torch.zeros(len(grads) + 1, dtype=torch.float32, device=dev)
        if set(key[1]) <= csrc._DTYPE_CODES.keys() and all(map(torch.Tensor.is_contiguous, grads)):
            # straight to the launch (what csrc.sumsq checks holds here), its plan keyed by this cache's key
            csrc._run(csrc.KIND_SUMSQ, csrc.engine_backend(dev), grads, None,
                      [(1, 1, 1, 1)] * len(grads), scale=grad_scale, out=buf, plan_key=key)
        else:
            csrc.sumsq(grads, scale=grad_scale, out=buf)
        mt.launch_count += 1
        return buf[:-1]
    buckets: dict = {}
    for i, g in enumerate(grads):
        buckets.setdefault(g.dtype, []).append(i)
    for dt, idx in buckets.items():
        gs = [grads[i] for i in idx]
        st = _triton_tables(cache, dt, idx, gs)
        dummy = st.tab.fdummy
        _sumsq_kernel[(st.tab.work.shape[0],)](
            st.tab.ptrs, st.tab.numels, st.tab.work, st.first, st.dst, st.tab.counters, st.partials, out,
            grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
            **_sumsq_constexprs(dt, grad_scale is not None, found_inf is not None, st.tab.aligned),
            **({} if mt.interpreter_enabled() else mt.compile_options()))
        mt.launch_count += 1
    return out


def _triton_tables(cache, dt, idx, gs) -> _TritonTables:
    gkey = tuple(map(torch.Tensor.data_ptr, gs))
    st = cache.get(("triton", dt))
    # as in mt.apply: alignment is a property of the addresses, so it is rechecked only when the grads move
    if st is None or (st.tab.gkey != gkey and st.tab.aligned and not all(map(mt._aligned, gs))):
        empty = [[] for _ in gs]
        key = tuple(g.numel() for g in gs)
        tab = mt._build_tables(key, gs, gs, empty, empty, gs[0].device)  # ptrs column 1 holds the grads
        chunks = [max(1, -(-n // (mt.BLOCK * mt.ITERS))) for n in key]
        starts = [0, *itertools.accumulate(chunks[:-1])]
        dev = gs[0].device
        st = cache[("triton", dt)] = _TritonTables(
            tab, torch.tensor(starts, dtype=torch.int32).to(dev), torch.tensor(idx, dtype=torch.int32).to(dev),
            torch.zeros(sum(chunks), dtype=torch.float32, device=dev))
        tab.gkey = gkey
    else:
        mt.upload_grad_column(st.tab, gkey)  # new grad tensors: re-upload their addresses only
    return st


def _sumsq_constexprs(g_dtype, has_scale, has_inf, aligned) -> dict:
    return dict(G_DT=mt._TL_DTYPES[g_dtype], HAS_SCALE=has_scale, HAS_INF=has_inf, ALIGNED=aligned,
                BLOCK=mt.BLOCK, ITERS=mt.ITERS, PB=_PB)


def clip_scale(cache: dict, grads, max_norm: float, grad_scale=None) -> torch.Tensor:
    """fp32 [2] device tensor: (global L2 norm of the unscaled grads, effective grad scale). Passing ``out[1:]`` as
    the kernels' grad_scale multiplies every grad by clip_grad_norm_'s min(1, max_norm / (norm + 1e-6)) / scale."""
    sq = sumsq(cache.setdefault("sumsq", {}), grads, grad_scale)
    out = cache.get("out")
    if out is None or out.device != sq.device:
        out = cache["out"] = torch.zeros(2, dtype=torch.float32, device=sq.device)
    _clip_scale_kernel[(1,)](sq, sq.numel(), grad_scale if grad_scale is not None else out, out, float(max_norm),
                             HAS_SCALE=grad_scale is not None, PB=_PB,
                             **({} if mt.interpreter_enabled() else mt.compile_options()))
    mt.launch_count += 1
    return out


def aot_kernels():
    """The reduction passes, for tools/aot.py."""
    sig = {"ptrs": "*i64", "numels": "*i64", "work": "*i32", "first": "*i32", "dst": "*i32", "counters": "*i32",
           "partials": "*fp32", "out": "*fp32", "scale_ptr": "*fp32", "inf_ptr": "*fp32"}
    sig.update({k: "constexpr" for k in _sumsq_constexprs(torch.float32, False, False, True)})
    out = [dict(name=f"sumsq {str(dt).replace('torch.', '')}{'' if al else ' unaligned'}{' amp' if amp else ''}",
                fn=_sumsq_kernel, signature=sig, constexprs=_sumsq_constexprs(dt, amp, amp, al),
                options=mt.compile_options())
           for dt, al, amp in ((torch.float32, True, False), (torch.float32, False, False),
                               (torch.bfloat16, True, False), (torch.float16, True, True))]
    csig = {"sq": "*fp32", "n": "i32", "scale_ptr": "*fp32", "out": "*fp32", "max_norm": "fp32",
            "HAS_SCALE": "constexpr", "PB": "constexpr"}
    out += [dict(name=f"clip scale{' amp' if amp else ''}", fn=_clip_scale_kernel, signature=csig,
                 constexprs=dict(HAS_SCALE=amp, PB=_PB), options=mt.compile_options()) for amp in (False, True)]
    return out
