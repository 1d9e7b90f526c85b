"""Per-tensor sums of squares of grads, on the device, and the global grad-norm clipping built on them.

``sumsq`` is what NovoGrad's per-layer second moments and every optimizer's ``max_grad_norm`` need: sum(g^2) of
each (unscaled) grad, into a cached buffer whose address stays fixed (a multi-tensor apply's tables point at it):
fp32, or fp64 when a grad is fp64 (fp64 grads are summed in fp64, like torch's sum). Two implementations of the same
contract:

* ``csrc``   the C++/CUDA multi-tensor engine (fused_optim/csrc.py): one launch for all tensors and dtypes; its
             host build serves CPU tensors (so CI runs this path), its CUDA build CUDA tensors;
* ``triton`` a Triton pass over the shared work table (one launch per grad dtype), where csrc is not built, and
             for every list with an fp64 grad (the engine reads fp32, bf16 and fp16 only).

``BACKEND`` ("auto": csrc where its module for the device is built, else triton; or "csrc" / "triton") picks one;
the environment variable FUSED_OPTIM_REDUCTIONS sets its initial value.

``clip_scale`` turns the sums into torch.nn.utils.clip_grad_norm_'s coefficient, folded into an effective loss
scale: every kernel already multiplies grads by 1 / grad_scale, so passing ``scale / coef`` as grad_scale clips in
the same pass, with no host sync and no extra pass over the grads.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from . import runtime
from .._tensors import dense
from .tables import Tables, TableCache, all_aligned, buckets, dtype_of, numel, pick, ptr, to_device

BACKEND = os.environ.get("FUSED_OPTIM_REDUCTIONS", "auto")
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coef = max_norm / (total_norm + 1e-6), at most 1
# partial sums are added PB at a time; small under the interpreter so CPU tests cover several passes
_PB = 4 if runtime.interpreter_enabled() else 256

if runtime.available():
    import triton
    import triton.language as tl

    # a kernel may call only jit functions it finds among its module's globals
    from .access import amp_skip, chunk_ptr, grad_inv_scale, load, over_chunk, to_compute
    from .lean import load_joined
    from .sync import arrive, sum_partials

    @triton.jit
    def _sumsq_block(acc, offs, mask, FULL: tl.constexpr, g_ptr, inv_scale):
        # over_chunk's BODY
        g = load(g_ptr, offs, mask, FULL) * inv_scale
        return acc + g * g

    @triton.jit
    def _sumsq_joined_block(acc, offs, mask, FULL: tl.constexpr, g_ptr, r_ptr, joined, inv_scale):
        # over_chunk's BODY where a tensor of the bucket may have an int16 remainder: its exact fp32 value
        if joined:
            g = load_joined(g_ptr, r_ptr, offs, mask, FULL) * inv_scale
        else:
            g = load(g_ptr, offs, mask, FULL) * inv_scale
        return acc + g * g

    @triton.jit
    def _sumsq_kernel(ptrs, numels, work, first, dst, counters, partials, out, scale_ptr, inf_ptr,
                      G_DT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, REM: tl.constexpr,
                      ALIGNED: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, PB: tl.constexpr):
        # one program per (tensor, chunk) of the work table; out[dst[t]] = sum of the unscaled grad's squares.
        # REM: each ptrs row also holds a remainder's address (0: none)
        pid = tl.program_id(0)
        if amp_skip(inf_ptr, HAS_INF) == 0:
            t = tl.load(work + 2 * pid)
            chunk = tl.load(work + 2 * pid + 1).to(tl.int64)
            n = tl.load(numels + t)
            row = ptrs + t.to(tl.int64) * (2 if REM else 1)
            g_ptr = chunk_ptr(row, 0, G_DT, ALIGNED)
            inv_scale = grad_inv_scale(scale_ptr, HAS_SCALE)
            acc = to_compute(tl.zeros([BLOCK], tl.float32), g_ptr)
            if REM:
                acc = over_chunk(_sumsq_joined_block, acc, chunk * (BLOCK * ITERS), n,
                                 (g_ptr, chunk_ptr(row, 1, tl.int16, ALIGNED), tl.load(row + 1) != 0, inv_scale),
                                 BLOCK, ITERS)
            else:
                acc = over_chunk(_sumsq_block, acc, chunk * (BLOCK * ITERS), n, (g_ptr, inv_scale), BLOCK, ITERS)
            tl.store(partials + pid, tl.sum(acc, axis=0))
            nwork = tl.maximum(tl.cdiv(n, BLOCK * ITERS), 1).to(tl.int32)
            if arrive(counters + t, nwork):
                tl.store(out + tl.load(dst + t), sum_partials(partials + tl.load(first + t), nwork, PB))
                tl.store(counters + t, 0)

    @triton.jit
    def _clip_scale_kernel(sq, n, scale_ptr, out, HAS_SCALE: tl.constexpr, PB: tl.constexpr):
        # one program: out[0] = the global norm, out[1] = grad_scale / clip coefficient (the effective scale), in
        # the sums' dtype; out[2:4] hold max_norm and eps (there, not kernel arguments, so fp64 sums get them in fp64)
        norm = tl.sqrt(sum_partials(sq, n, PB))
        coef = tl.minimum(tl.load(out + 2) / (norm + tl.load(out + 3)), 1.0)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr)
        tl.store(out, norm)
        tl.store(out + 1, scale / coef)


@dataclass
class _SumsqTables(Tables):
    numels: torch.Tensor = None
    work: torch.Tensor = None      # int32 [W, 2] (tensor, chunk)
    first: torch.Tensor = None     # int32 [T]: index of each tensor's first work item (its partials start there)
    dst: torch.Tensor = None       # int32 [T]: where each tensor's sum goes in the output buffer
    partials: torch.Tensor = None  # [W], in the grads' compute dtype (fp64 for fp64 grads, else fp32)
    counters: torch.Tensor = None


def _build_sumsq_tables(key, gs, idx, rems=None) -> _SumsqTables:
    dev = gs[0].device
    chunks = [max(1, -(-n // (runtime.BLOCK * runtime.ITERS))) for n in map(numel, gs)]
    work = [(t, c) for t, n in enumerate(chunks) for c in range(n)]
    rows = [[p] for p in map(ptr, gs)] if rems is None else [[ptr(g), _rem_ptr(r)] for g, r in zip(gs, rems)]
    return _SumsqTables(key=key, gkey=tuple(map(ptr, gs)), ptrs=to_device(rows, torch.int64, dev),
                        aligned=all_aligned(gs, [r for r in rems or () if r is not None]), grad_col=0,
                        numels=to_device(list(map(numel, gs)), torch.int64, dev),
                        work=to_device(work, torch.int32, dev),
                        first=to_device([0, *itertools.accumulate(chunks[:-1])], torch.int32, dev),
                        dst=to_device(list(idx), torch.int32, dev),
                        partials=torch.zeros(len(work), dtype=_acc_dtype(gs), device=dev),
                        counters=torch.zeros(len(gs), dtype=torch.int32, device=dev))


def _rem_ptr(r) -> int:
    return 0 if r is None else ptr(r)


def _acc_dtype(grads) -> torch.dtype:
    return torch.float64 if torch.float64 in set(map(dtype_of, grads)) else torch.float32


def use_csrc(device: torch.device) -> bool:
    if BACKEND == "triton":
        return False
    from .. import csrc

    ok = csrc.host_available() if device.type == "cpu" else device.type == "cuda" and csrc.cuda_available()
    if BACKEND == "csrc" and not ok:
        raise RuntimeError(f"fused_optim: FUSED_OPTIM_REDUCTIONS=csrc but the csrc module for {device} is not built "
                           f"({csrc.load_errors()}); run bash scripts/build_csrc.sh")
    return ok


def sumsq(cache: dict, grads, grad_scale=None, found_inf=None, remainders=None) -> torch.Tensor:
    """[T] device buffer: sum((g / grad_scale)^2) of every grad (real dtype); fp32, fp64 if any grad is fp64. The
    buffer is cached in ``cache`` per list of sizes and dtypes, so its address is the same every step. A grad that is
    not dense (a strided slice, an expanded grad) is summed from a contiguous copy; any dense layout is walked as it
    is. ``remainders[i]``: None, or the int16 remainder of a contiguous bf16 ``grads[i]`` (a param with
    param_remainders): the sum is then over the exact fp32 master the pair holds (kernels/lean.py), on Triton (the
    C++ engine reads plain tensors only)."""
    rem = remainders is not None and any(r is not None for r in remainders)
    if not all(map(torch.Tensor.is_contiguous, grads)):
        grads = [g if dense(g) else g.contiguous() for g in grads]
    dev = grads[0].device
    key = (tuple(map(numel, grads)), tuple(map(dtype_of, grads)), str(dev))
    out = cache.get(("out", key))
    if out is None:
        cache.clear()  # a new layout: drop the old buffers and tables
        out = cache[("out", key)] = torch.zeros(len(grads), dtype=_acc_dtype(grads), device=dev)
    if out.dtype == torch.float32 and not rem and use_csrc(dev):
        from .. import csrc

        buf = cache.get(("csrc", key))
        if buf is None:
            buf = cache[("csrc", key)] = torch.zeros(len(grads) + 1, dtype=torch.float32, device=dev)
        if set(key[1]) <= csrc.DTYPE_CODES.keys() and all(map(torch.Tensor.is_contiguous, grads)):
            # straight to the launch (what csrc.sumsq checks holds here), its plan keyed by this cache's key
            csrc.launch(csrc.KIND_SUMSQ, csrc.engine_backend(dev), grads, None,
                        [(1, 1, 1, 1)] * len(grads), scale=grad_scale, out=buf, plan_key=key)
        else:
            csrc.sumsq(grads, scale=grad_scale, out=buf)
        return buf[:-1]
    tables = cache.setdefault("triton", TableCache())
    for dt, idx in buckets(key[1]).items():
        gs, rs = pick(idx, grads, remainders if rem else [None] * len(grads))
        rs = rs if any(r is not None for r in rs) else None
        # the remainders' addresses are part of the tables' key (a loaded checkpoint replaces them)
        tkey = (tuple(map(numel, gs)), *map(_rem_ptr, rs or ()))
        tab = tables.lookup(dt, tkey, gs, lambda: _build_sumsq_tables(tkey, gs, idx, rs))
        dummy = tab.partials
        runtime.launch(_sumsq_kernel, tab.work.shape[0], tab.ptrs, tab.numels, tab.work, tab.first, tab.dst,
                       tab.counters, tab.partials, out, grad_scale if grad_scale is not None else dummy,
                       found_inf if found_inf is not None else dummy,
                       **_sumsq_constexprs(dt, grad_scale is not None, found_inf is not None, tab.aligned,
                                           rs is not None))
    return out


def _sumsq_constexprs(g_dtype, has_scale, has_inf, aligned, rem=False) -> dict:
    return dict(G_DT=runtime.tl_dtype(g_dtype), HAS_SCALE=has_scale, HAS_INF=has_inf, REM=rem, ALIGNED=aligned,
                BLOCK=runtime.BLOCK, ITERS=runtime.ITERS, PB=_PB)


def clip_scale(cache: dict, grads, max_norm: float, grad_scale=None, eps: float = CLIP_EPS,
               full_sums=None) -> torch.Tensor:
    """[2] device tensor: (global L2 norm of the unscaled grads, effective grad scale), fp32, fp64 if any grad is
    fp64 (as clip_grad_norm_'s norm and coefficient). Passing ``out[1:]`` as the kernels' grad_scale multiplies every
    grad by clip_grad_norm_'s min(1, max_norm / (norm + eps)) / scale (eps 0: timm's Lamb's
    1 / max(norm / max_norm, 1)). Sharded grads (local shards): ``full_sums`` turns the per-shard sums into the full
    tensors' (a collective between the two launches, none inside a kernel)."""
    sq = sumsq(cache.setdefault("sumsq", {}), grads, grad_scale)
    if full_sums is not None:
        sq = full_sums(sq)
    key = (sq.device, sq.dtype, float(max_norm), float(eps))
    if cache.get("out_key") != key:  # max_norm and eps ride in out[2:4], uploaded once
        cache["out"] = torch.tensor([0.0, 0.0, float(max_norm), float(eps)], dtype=sq.dtype).to(sq.device)
        cache["out_key"] = key
    out = cache["out"]
    runtime.launch(_clip_scale_kernel, 1, sq, sq.numel(), grad_scale if grad_scale is not None else out, out,
                   HAS_SCALE=grad_scale is not None, PB=_PB)
    return out[:2]


def aot_kernels():
    """The reduction passes, for tools/aot.py."""
    def sig(acc):  # fp64 grads: fp64 partials and sums
        s = {"ptrs": "*i64", "numels": "*i64", "work": "*i32", "first": "*i32", "dst": "*i32", "counters": "*i32",
             "partials": acc, "out": acc, "scale_ptr": "*fp32", "inf_ptr": "*fp32"}
        return {**s, **{k: "constexpr" for k in _sumsq_constexprs(torch.float32, False, False, True)}}

    out = [dict(name=f"sumsq {str(dt).replace('torch.', '')}{'' if al else ' unaligned'}{' amp' if amp else ''}"
                     f"{' remainders' if rem else ''}",
                fn=_sumsq_kernel, signature=sig("*fp64" if dt == torch.float64 else "*fp32"),
                constexprs=_sumsq_constexprs(dt, amp, amp, al, rem), options=runtime.compile_options())
           for dt, al, amp, rem in ((torch.float32, True, False, False), (torch.float32, False, False, False),
                                    (torch.bfloat16, True, False, False), (torch.float16, True, True, False),
                                    (torch.float64, True, False, False), (torch.float64, True, True, False),
                                    (torch.bfloat16, True, False, True))]
    out += [dict(name=f"clip scale{' amp' if amp else ''}{' float64' if acc == '*fp64' else ''}",
                 fn=_clip_scale_kernel, constexprs=dict(HAS_SCALE=amp, PB=_PB), options=runtime.compile_options(),
                 signature={"sq": acc, "n": "i32", "scale_ptr": "*fp32", "out": acc, "HAS_SCALE": "constexpr",
                            "PB": "constexpr"})
            for amp in (False, True) for acc in ("*fp32", "*fp64")]
    return out
