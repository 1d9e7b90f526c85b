"""C++/CUDA multi-tensor reductions (``csrc/``): per-tensor sums of squares and norms, SGDP / AdamP's projection
statistics, Adafactor's factored statistics, each ONE launch for any number of tensors.

The engine (``csrc/``, loaded and launched by ``fused_optim/engine_core.py``, whose public names this module
re-exports) takes addresses, sizes, dtype codes and the CUDA stream handle as integers, so one build works with
any torch version. Mixed fp32 / bf16 / fp16 inputs, fp32 accumulation, deterministic results (fixed-order partial
sums per tile, then a fixed-order second stage; see ``csrc/fo_engine.h``); the host build runs exactly the device
algorithm, so host and CUDA results are bit-identical. Without a built module the wrappers below fall back to
torch ops (same results up to rounding); ``backend=`` forces one (``"host"``, ``"cuda"`` or ``"torch"``).

Every result is float32, on the inputs' device. Inputs: tensors of one device; fp32, bf16 or fp16 (other dtypes
take the torch path); non-contiguous tensors are copied first. Plans (tiling, device metadata, workspace) are
cached by the inputs' addresses and shapes, so a steady-state call uploads nothing and allocates only its output.
CUDA graphs: make the first call for a given set of tensors before capture (it uploads the metadata); later calls
are capturable. Every launch goes through ``kernels/runtime.py``'s ``dispatch`` (``engine_launch_count``).

``sumsq`` / ``sumsq_per_tensor`` / ``norms``: grad-norm clipping, NovoGrad's per-layer moments, Adafactor's RMS.
``projection_stats``: the fused SGDP / AdamP step's first launch. ``factored_stats``: Adafactor's row / column means
(timm's ``update.mean(dim=dim_row)`` and ``update.mean(dim=dim_col)``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from .engine_core import (ABI_VERSION, DTYPE_CODES, KIND_FACTORED, KIND_PROJ, KIND_SUMSQ, KINDS, Plan,  # noqa: F401
                          build, cached_plans, contiguous, cuda_available, engine_backend, host_available, launch,
                          load_errors, module, module_mismatch, plan_cache_size)


def _backend(tensors: Sequence[torch.Tensor], backend: str | None) -> str:
    dev = tensors[0].device
    if len(set(map(torch.Tensor.get_device, tensors))) > 1:  # -1 on CPU, the index on CUDA
        raise ValueError("fused_optim.csrc: all tensors must be on one device")
    if backend is None:
        if any(t.dtype not in DTYPE_CODES for t in tensors):
            return "torch"
        if dev.type == "cpu":
            return "host" if host_available() else "torch"
        if dev.type == "cuda":
            return "cuda" if cuda_available() else "torch"
        return "torch"
    if backend == "host" and (dev.type != "cpu" or not host_available()):
        raise RuntimeError(f"fused_optim.csrc: host backend needs CPU tensors and the built module ({load_errors()})")
    if backend == "cuda" and (dev.type != "cuda" or not cuda_available()):
        raise RuntimeError(f"fused_optim.csrc: cuda backend needs CUDA tensors and the built module ({load_errors()})")
    if backend in ("host", "cuda") and any(t.dtype not in DTYPE_CODES for t in tensors):
        raise TypeError("fused_optim.csrc: the C++ engine takes float32, bfloat16 and float16 tensors")
    if backend not in ("host", "cuda", "torch"):
        raise ValueError(f"fused_optim.csrc: unknown backend {backend!r}")
    return backend


def _acc(t):
    return t.double() if t.dtype == torch.float64 else t.float()


def sumsq(tensors: Sequence[torch.Tensor], *, scale: torch.Tensor | None = None, out: torch.Tensor | None = None,
          backend: str | None = None):
    """(per-tensor sums of squares [T], their total 0-d), fp32, one launch. ``scale``: a 1-element fp32 tensor on
    the inputs' device; each element x counts as x * (1 / scale) (AMP's unscaling). ``out``: an fp32 buffer of
    T + 1 elements to write (the results are views of it), for callers that need stable addresses."""
    ts = contiguous(tensors)
    if not ts:
        return torch.zeros(0), torch.zeros(())
    be = _backend(ts, backend)
    if be == "torch":
        inv = None if scale is None else 1.0 / scale.float()
        per = torch.stack([(_acc(t) if inv is None else _acc(t) * inv).square().sum() for t in ts]).float()
        res = torch.cat([per, per.sum().view(1)])
        if out is not None:
            out.copy_(res)
            res = out
        return res[:-1], res[-1]
    out_t, _, out_g, _ = launch(KIND_SUMSQ, be, ts, None, [(1, 1, 1, 1)] * len(ts), scale=scale, out=out)
    return out_t.view(-1), out_g.view(())


def sumsq_per_tensor(tensors: Sequence[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    """Per-tensor sum of squares, fp32 [T]. See the module docstring."""
    return sumsq(tensors, backend=backend)[0]


def norms(tensors: Sequence[torch.Tensor], *, backend: str | None = None):
    """(per-tensor L2 norms [T], global L2 norm 0-d), fp32, one launch."""
    per, tot = sumsq(tensors, backend=backend)
    return per.sqrt(), tot.sqrt()


def _pairs(grads, params):
    a, b = contiguous(grads), contiguous(params)
    if len(a) != len(b):
        raise ValueError(f"fused_optim.csrc: {len(a)} grads but {len(b)} params")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"fused_optim.csrc: pair {i}: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    return a, b


class ProjStats(NamedTuple):
    per_tensor: torch.Tensor  # [T, 4]: p.g, g.g, p.p, p.d
    per_row: torch.Tensor  # [sum(row_counts), 4]
    coef: torch.Tensor  # [sum(row_counts), 2]: a, c of each row
    mode: torch.Tensor  # [T]: 0 none, 1 channel, 2 layer
    row_counts: list


def projection_stats(grads, params, states, steps=None, *, adam: bool, nesterov: bool = False, momentum=0.0,
                     dampening=0.0, betas=(0.9, 0.999), eps: float = 1e-8, delta: float = 0.1, scale=None,
                     out=None, coef=None, mode=None, backend: str | None = None) -> ProjStats:
    """SGDP / AdamP's projection statistics and decision for tensors of >= 2 dims (rows: ``x.view(x.shape[0], -1)``),
    one launch. states[i]: (momentum_buffer,) for SGD, (exp_avg, exp_avg_sq) for Adam, before this step; steps[i]
    (Adam): the fp32 step count before this step. d is this step's new direction (not stored): momentum / nesterov
    for SGD, Adam's bias-corrected m / (sqrt(v) + eps) for Adam. Per row: [p.g, g.g, p.p, p.d] of the unscaled grad
    (``scale``: AMP's loss scale); then per tensor the mode (timm's: channel if every row's |cos(p, g)| <
    delta / sqrt(row length), else layer if the tensor's |cos| < delta / sqrt(numel), else none) and per row
    a = <p,d> / (|p| + eps)^2, c = <p,g> / (|p| + eps)^2 of the chosen view (0 for none). Needs the built module
    (no torch fallback: fused_optim.optimizers.projection holds the reference). ``out`` (a 3-tuple, see launch),
    ``coef`` [N, 2] and ``mode`` [T] pin the results' addresses."""
    gs, ps = _pairs(grads, params)
    sts = [contiguous(st) for st in states]
    if len(sts) != len(gs) or any(len(st) != (2 if adam else 1) or any(x.shape != g.shape for x in st)
                                  for st, g in zip(sts, gs)):
        raise ValueError("fused_optim.csrc.projection_stats: one (exp_avg, exp_avg_sq) (Adam) or (momentum_buffer,) "
                         "(SGD) per tensor, of its shape")
    if any(g.dim() < 2 or g.numel() == 0 for g in gs) or any(st[0].dtype != st[-1].dtype for st in sts):
        raise ValueError("fused_optim.csrc.projection_stats: non-empty tensors of >= 2 dims; states of one dtype")
    if adam and (steps is None or len(steps) != len(gs)):
        raise ValueError("fused_optim.csrc.projection_stats: Adam needs one step tensor per param")
    counts = [g.shape[0] for g in gs]
    if not gs:
        return ProjStats(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 2), torch.zeros(0), counts)
    be = _backend(gs + ps + [x for st in sts for x in st], backend)
    if be == "torch":
        raise RuntimeError(f"fused_optim.csrc.projection_stats needs the built module ({load_errors()})")
    dev, n_rows = gs[0].device, sum(counts)
    coef = torch.zeros(n_rows, 2, device=dev) if coef is None else coef
    mode = torch.zeros(len(gs), device=dev) if mode is None else mode
    if coef.numel() != 2 * n_rows or mode.numel() != len(gs) or not (coef.is_contiguous() and mode.is_contiguous()):
        raise ValueError(f"fused_optim.csrc.projection_stats: coef must hold {n_rows} x 2, mode {len(gs)} floats")
    proj = projection_args(adam, nesterov, momentum, dampening, betas, delta, coef, mode)
    out_t, out_stats, _, _ = launch(KIND_PROJ, be, gs, ps, projection_dims(gs), eps, scale=scale, out=out,
                                    cd=([st[0] for st in sts], [st[-1] for st in sts]),
                                    steps=list(steps) if adam else None, proj=proj)
    return ProjStats(out_t, out_stats, coef.view(-1, 2), mode.view(-1), counts)


def projection_dims(tensors) -> list:
    """KIND_PROJ's geometry: each tensor as one [rows, row length] matrix."""
    return [(1, t.shape[0], t.numel() // t.shape[0], 1) for t in tensors]


def projection_args(adam, nesterov, momentum, dampening, betas, delta, coef, mode) -> tuple:
    """KIND_PROJ's op parameters for ``launch(proj=)``: ProjOp's Args::hyper slots (csrc/fo_projection.h; eps is
    the launch's own), then the coef [N, 2] and mode [T] outputs its entry hook writes. The direction constants
    k0..k3 are computed in fp64, as the Triton kernel does before its fp32 cast."""
    b1, b2 = betas
    k = (1 - b1, b2, 1 - b2, b1) if adam else (momentum, 1 - dampening, 0.0, 0.0)
    return tuple(map(float, (adam, nesterov, *k, b2, delta))), coef.data_ptr(), mode.data_ptr()


def _factor_dims(t, d):
    n = t.dim()
    if n < 2:
        raise ValueError(f"fused_optim.csrc.factored_stats: needs >= 2 dims, got shape {tuple(t.shape)}")
    dc, dr = (n - 2, n - 1) if d is None else (d[0] % n, d[1] % n)
    if dr != dc + 1:
        raise ValueError(f"fused_optim.csrc.factored_stats: dims {d} must be adjacent (dim_row == dim_col + 1)")
    s = t.shape
    return dc, dr, (math.prod(s[:dc]), s[dc], s[dr], math.prod(s[dr + 1:]))


def factored_stats(tensors, eps: float = 0.0, dims=None, *, backend: str | None = None):
    """(row_means, col_means): ``(g**2 + eps).mean(dim_row)`` and ``.mean(dim_col)`` per tensor, one launch."""
    ts = contiguous(tensors)
    dims = [None] * len(ts) if dims is None else list(dims)
    if len(dims) != len(ts):
        raise ValueError("fused_optim.csrc.factored_stats: one dims entry per tensor")
    geo = [_factor_dims(t, d) for t, d in zip(ts, dims)]
    if not ts:
        return [], []
    be = _backend(ts, backend)
    if be == "torch":
        us = [_acc(t).square().add(eps) for t in ts]
        return ([u.mean(dr).float() for u, (_, dr, _) in zip(us, geo)],
                [u.mean(dc).float() for u, (dc, _, _) in zip(us, geo)])
    _, out_stats, _, plan = launch(KIND_FACTORED, be, ts, None, [g[2] for g in geo], eps)
    flat = out_stats.view(-1)
    rows, cols = [], []
    for i, (t, (dc, dr, (B, R, C, S))) in enumerate(zip(ts, geo)):
        shape = list(t.shape)
        rows.append(flat[plan.row_out[i]: plan.row_out[i] + B * R * S].view(shape[:dr] + shape[dr + 1:]))
        cols.append(flat[plan.col_out[i]: plan.col_out[i] + B * C * S].view(shape[:dc] + shape[dc + 1:]))
    return rows, cols
