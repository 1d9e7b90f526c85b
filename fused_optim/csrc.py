"""C++/CUDA multi-tensor reductions (``csrc/``): per-tensor norms, dot products and Adafactor factor statistics.

Two extension modules with the same functions, built by ``bash scripts/build_csrc.sh`` into this package:

* ``_fused_optim_host``  the engine compiled for the CPU (always buildable, needs no CUDA): used for CPU tensors;
* ``_fused_optim_cuda``  the same engine compiled by nvcc (built only where nvcc is found): used for CUDA tensors.

Neither links torch: they take addresses, sizes, dtype codes and the CUDA stream handle as integers, so one build
works with any torch version. Every call here is ONE kernel launch (one pass over the inputs) for any number of
tensors, mixed fp32 / bf16 / fp16 inputs, fp32 accumulation, and deterministic results: fixed-order partial sums
per tile, then a fixed-order second stage (see ``csrc/fo_engine.h``). The host build runs exactly the device
algorithm, so host and CUDA results are bit-identical. Without a built module the functions fall back to torch
ops (same results up to rounding); ``backend=`` forces one (``"host"``, ``"cuda"`` or ``"torch"``).

Python API (every result is float32, on the inputs' device, freshly allocated by Python):

``host_available() -> bool``, ``cuda_available() -> bool``, ``load_errors() -> dict``
    Whether each module imported, and why not.

``sumsq(tensors, scale=None, out=None) -> (Tensor[T], Tensor[])``
    Per-tensor sums of squares and their total, of ``x / scale`` when an AMP loss scale is given (the grad-norm
    clipping of every fused optimizer, NovoGrad's per-layer moments); ``out`` pins the results' addresses.

``sumsq_per_tensor(tensors) -> Tensor[T]``
    ``sum(t.float() ** 2)`` of each tensor (NovoGrad per-layer second moments; ``sumsq / numel`` is the mean
    square behind Adafactor's RMS clipping).

``norms(tensors) -> (Tensor[T], Tensor[])``
    Per-tensor L2 norms and the global L2 norm over all tensors (grad-norm clipping), from the same launch.

``dot_per_tensor(a_list, b_list) -> Tensor[T, 3]``
    Per tensor pair ``[a.b, a.a, b.b]``: everything a cosine similarity of the flattened tensors needs.

``dot_per_tensor_and_row(a_list, b_list) -> DotRows(per_tensor, per_row, row_counts)``
    As ``dot_per_tensor`` plus the same three sums per row of the channel view ``x.view(x.shape[0], -1)`` (SGDP /
    AdamP; a 1-D tensor has one-element rows, a 0-d tensor one row). ``per_row`` is ``[sum(row_counts), 3]``, the
    rows of all tensors in order; ``per_row.split(row_counts)`` gives one view per tensor.

``projection_stats(grads, params, states, steps=None, *, adam, ...) -> ProjStats``
    SGDP / AdamP: per row of each >= 2-D tensor [p.g, g.g, p.p, p.d] with d this step's direction (recomputed from
    the states, not stored), then the projection decision per tensor and its per-row coefficients (see the
    function). The fused SGDP / AdamP step's first launch.

``factored_stats(tensors, eps=0.0, dims=None) -> (row_means: list, col_means: list)``
    Adafactor's factored second-moment statistics, for tensors of >= 2 dims: with ``u = g.float() ** 2 + eps`` and
    ``(dc, dr) = dims[i]`` (two adjacent dims, ``dr == dc + 1``; default ``(ndim - 2, ndim - 1)``),
    ``row_means[i] = u.mean(dr)`` and ``col_means[i] = u.mean(dc)`` -- timm's ``update.mean(dim=dim_row)`` and
    ``update.mean(dim=dim_col)``, trailing dims (``[..., R, C]``) and conv-style ``(0, 1)`` alike.

Inputs: tensors of one device; fp32, bf16 or fp16 (other dtypes take the torch path); non-contiguous tensors are
copied first. Plans (tiling, device metadata, workspace) are cached by the inputs' addresses and shapes, so a
steady-state call uploads nothing and allocates only its output. CUDA graphs: make the first call for a given set
of tensors before capture (it uploads the metadata); later calls are capturable. Every launch goes through
``kernels/runtime.py``'s ``dispatch`` (counted there: ``engine_launch_count``).
"""
from __future__ import annotations

import math
import operator
from collections import OrderedDict
from typing import NamedTuple, Sequence

import torch

from .kernels import runtime

ABI_VERSION = 3
KIND_SUMSQ, KIND_DOT, KIND_DOT_ROWS, KIND_FACTORED, KIND_PROJ = 0, 1, 2, 3, 4
DIR_SGD, DIR_ADAM = 0, 1
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_dtype = operator.attrgetter("dtype")
_CACHE_SIZE = 64

_modules: dict = {}
_errors: dict = {}


def _load(name: str):
    if name in _modules:
        return _modules[name]
    mod = None
    try:
        import importlib

        mod = importlib.import_module(f"fused_optim.{name}")
        if getattr(mod, "ABI_VERSION", None) != ABI_VERSION:
            _errors[name] = f"{name} has ABI_VERSION {getattr(mod, 'ABI_VERSION', None)}, expected {ABI_VERSION}: rebuild"
            mod = None
    except ImportError as e:  # not built here (see scripts/build_csrc.sh)
        _errors[name] = f"{type(e).__name__}: {e}"
    _modules[name] = mod
    return mod


def host_available() -> bool:
    return _load("_fused_optim_host") is not None


def cuda_available() -> bool:
    return torch.cuda.is_available() and _load("_fused_optim_cuda") is not None


def load_errors() -> dict:
    _load("_fused_optim_host")
    _load("_fused_optim_cuda")
    return dict(_errors)


def _reset_modules():
    """Forget import results (after a build in the same process)."""
    _modules.clear()
    _errors.clear()
    _plans.clear()


class DotRows(NamedTuple):
    per_tensor: torch.Tensor  # [T, 3]: a.b, a.a, b.b
    per_row: torch.Tensor  # [sum(row_counts), 3]
    row_counts: list


# ---------------------------------------------------------------------------------------------------- dispatch
_plans: OrderedDict = OrderedDict()


class _Plan:
    __slots__ = ("meta", "n_entries", "n_items", "ws_items", "ws_extra", "counters", "n_stats", "K", "row_out",
                 "col_out")


def _backend(tensors: Sequence[torch.Tensor], backend: str | None) -> str:
    dev = tensors[0].device
    if len(set(map(torch.Tensor.get_device, tensors))) > 1:  # -1 on CPU, the index on CUDA
        raise ValueError("fused_optim.csrc: all tensors must be on one device")
    if backend is None:
        if not set(map(_dtype, tensors)) <= DTYPE_CODES.keys():
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


def launch(kind: int, backend: str, a: list, b: list | None, dims: list, eps: float = 0.0, scale=None, out=None,
         cd: tuple | None = None, steps: list | None = None, proj: tuple | None = None, plan_key=None):
    """One launch over all tensors. dims[i] = (B, R, C, S). Returns (out_t [E, K], out_stats [N, K], out_g [K], plan).
    scale: an fp32 1-element device tensor; list A is multiplied by 1 / scale first. out: the fp32 buffer to write
    (else a fresh one), of (E + N + 1) * K elements: a caller that needs stable result addresses passes its own.
    KIND_PROJ: cd = (list C, list D), steps = fp32 step tensors or None, proj = the launch's ProjTuple (fo_bind.h).
    plan_key: a hashable that stands for everything but list A's addresses (a caller's table key), so a steady-state
    call does not rebuild the whole key."""
    mod = _load("_fused_optim_host" if backend == "host" else "_fused_optim_cuda")
    dev = a[0].device
    stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
    # the cache key: every address, dtype and size a plan holds (whole-list maps: a step may cover 1000s of tensors)
    ptr, b_ = torch.Tensor.data_ptr, (b if b is not None else ())
    c_, d_, st_ = (cd if cd is not None else ((), ())) + (steps or (),)
    if plan_key is not None:
        key = (kind, str(dev), stream, plan_key, tuple(map(ptr, a)))
    else:
        key = (kind, str(dev), stream, tuple(map(ptr, a)), tuple(map(ptr, b_)), tuple(map(_dtype, a)),
               tuple(map(_dtype, b_)), tuple(map(torch.Tensor.numel, a)), tuple(dims), tuple(map(ptr, c_)),
               tuple(map(ptr, d_)), tuple(map(_dtype, c_)), tuple(map(ptr, st_)))
    plan = _plans.get(key)
    if plan is None:
        none = [None] * len(a)
        descs = [(x.data_ptr(), *(t.data_ptr() if t is not None else 0 for t in (y, z, w, st)),
                  *(DTYPE_CODES[t.dtype] if t is not None else 0 for t in (x, y, z)), x.numel(), *d)
                 for x, y, z, w, st, d in zip(a, b if b is not None else none, c_ or none, d_ or none,
                                              st_ or none, dims)]
        meta, n_entries, n_items, ws_extra, n_stats, n_counters, K, row_out, col_out = mod.plan(kind, descs)
        plan = _Plan()
        # pageable -> device without non_blocking would sync the stream; the runtime stages the bytes at once
        plan.meta = torch.frombuffer(bytearray(meta), dtype=torch.int64).to(dev, non_blocking=True)
        plan.n_entries, plan.n_items, plan.n_stats, plan.K = n_entries, n_items, n_stats, K
        plan.row_out, plan.col_out = row_out, col_out
        plan.ws_items = torch.empty(n_items * K, dtype=torch.float32, device=dev)
        plan.ws_extra = torch.empty(max(ws_extra, 1), dtype=torch.float32, device=dev)
        plan.counters = torch.zeros(n_counters, dtype=torch.int32, device=dev)  # kernels leave them zero
        _plans[key] = plan
        while len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    K = plan.K
    sizes = (plan.n_entries * K, plan.n_stats * K, K)
    if out is None:
        out = torch.empty(sum(sizes), dtype=torch.float32, device=dev)
    # out: one buffer, or its three parts (entry totals, row / column statistics, global) as separate tensors
    parts = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if any(t.dtype != torch.float32 or t.device != dev or not t.is_contiguous() for t in parts) or (
            [t.numel() for t in parts] != ([sum(sizes)] if len(parts) == 1 else list(sizes))):
        raise ValueError(f"fused_optim.csrc: out must be contiguous float32 on {dev}: one tensor of {sum(sizes)} "
                         f"elements or three of {sizes}")
    if scale is not None and (scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != dev):
        raise ValueError(f"fused_optim.csrc: scale must be a 1-element float32 tensor on {dev}")
    out_t, out_stats, out_g = parts if len(parts) == 3 else out.split(sizes)
    args = (kind, plan.meta.data_ptr(), plan.n_entries, plan.n_items, plan.ws_items.data_ptr(),
            plan.ws_extra.data_ptr(), plan.counters.data_ptr(), out_t.data_ptr(), out_stats.data_ptr(),
            out_g.data_ptr(), scale.data_ptr() if scale is not None else 0, float(eps))
    if proj is not None:
        args += (proj,)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            runtime.dispatch(mod.launch, args, dict(device=dev.index if dev.index is not None
                                                    else torch.cuda.current_device(), stream=stream), engine=True)
    else:
        runtime.dispatch(mod.launch, args, {}, engine=True)
    # a/b must stay alive until here (contiguous() copies); the caller holds them.
    return out_t.view(-1, K), out_stats.view(-1, K), out_g, plan


def _contig(ts: Sequence[torch.Tensor]) -> list:
    # only addresses are taken: no autograd views needed; copies only where a tensor is not contiguous
    ts = list(ts)
    return ts if all(map(torch.Tensor.is_contiguous, ts)) else [t.contiguous() for t in ts]


# --------------------------------------------------------------------------------------------- public functions
def sumsq(tensors: Sequence[torch.Tensor], *, scale: torch.Tensor | None = None, out: torch.Tensor | None = None,
          backend: str | None = None):
    """(per-tensor sums of squares [T], their total 0-d), fp32, one launch. ``scale``: a 1-element fp32 tensor on
    the inputs' device; each element x counts as x * (1 / scale) (AMP's unscaling). ``out``: an fp32 buffer of
    T + 1 elements to write (the results are views of it), for callers that need stable addresses."""
    ts = _contig(tensors)
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


def _pairs(a_list, b_list):
    a, b = _contig(a_list), _contig(b_list)
    if len(a) != len(b):
        raise ValueError(f"fused_optim.csrc: {len(a)} tensors in a_list but {len(b)} in b_list")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"fused_optim.csrc: pair {i}: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    return a, b


def _acc(t):
    return t.double() if t.dtype == torch.float64 else t.float()


def _dot3(x, y, dim=None):
    x, y = _acc(x), _acc(y)
    return torch.stack([(x * y).sum(dim), (x * x).sum(dim), (y * y).sum(dim)], -1).float()


def dot_per_tensor(a_list, b_list, *, backend: str | None = None) -> torch.Tensor:
    """[T, 3]: a.b, a.a, b.b of each flattened tensor pair, fp32, one launch."""
    a, b = _pairs(a_list, b_list)
    if not a:
        return torch.zeros(0, 3)
    be = _backend(a + b, backend)
    if be == "torch":
        return torch.stack([_dot3(x, y) for x, y in zip(a, b)])
    return launch(KIND_DOT, be, a, b, [(1, 1, 1, 1)] * len(a))[0]


def _rows(t):
    r = t.shape[0] if t.dim() >= 1 else 1
    return r, (math.prod(t.shape[1:]) if t.dim() >= 1 else 1)


def dot_per_tensor_and_row(a_list, b_list, *, backend: str | None = None) -> DotRows:
    """Per tensor and per row of ``x.view(x.shape[0], -1)``: a.b, a.a, b.b (fp32), one launch."""
    a, b = _pairs(a_list, b_list)
    counts = [_rows(x)[0] for x in a]
    if not a:
        return DotRows(torch.zeros(0, 3), torch.zeros(0, 3), counts)
    be = _backend(a + b, backend)
    if be == "torch":
        per_t = torch.stack([_dot3(x, y) for x, y in zip(a, b)])
        per_r = torch.cat([_dot3(x.reshape(r, c), y.reshape(r, c), 1) for x, y, (r, c) in
                           zip(a, b, map(_rows, a))])
        return DotRows(per_t, per_r, counts)
    out_t, out_stats, _, _ = launch(KIND_DOT_ROWS, be, a, b, [(1, *_rows(x), 1) for x in a])
    return DotRows(out_t, out_stats, counts)


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
    (no torch fallback: fused_optim.optimizers.projection holds the reference). ``out`` (a 3-tuple, see _run),
    ``coef`` [N, 2] and ``mode`` [T] pin the results' addresses."""
    gs, ps = _pairs(grads, params)
    sts = [_contig(st) for st in states]
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


def engine_backend(device: torch.device) -> str:
    """The built module that serves tensors on `device` (callers have checked reduce.use_csrc)."""
    return "host" if device.type == "cpu" else "cuda"


def projection_dims(tensors) -> list:
    """KIND_PROJ's geometry: each tensor as one [rows, row length] matrix."""
    return [(1, t.shape[0], t.numel() // t.shape[0], 1) for t in tensors]


def projection_args(adam, nesterov, momentum, dampening, betas, delta, coef, mode) -> tuple:
    """KIND_PROJ's launch parameters (fo_bind.h's ProjTuple; eps is the launch's own). Ctx's k0..k3
    (csrc/fo_functors.h: ProjOp) are computed in fp64, as the Triton kernel does before its fp32 cast."""
    b1, b2 = betas
    k = (1 - b1, b2, 1 - b2, b1) if adam else (momentum, 1 - dampening, 0.0, 0.0)
    return (DIR_ADAM if adam else DIR_SGD, int(nesterov), *map(float, k), float(b2), float(delta), coef.data_ptr(),
            mode.data_ptr())


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
    ts = _contig(tensors)
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


def build(host_only: bool = True, timeout: float = 600) -> str:
    """Run scripts/build_csrc.sh (incremental) from a source checkout; returns its output. Raises on failure."""
    import os
    import subprocess
    import sys

    import fcntl

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "scripts", "build_csrc.sh")
    cmd = ["bash", script] + (["--host-only"] if host_only else [])
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable))
    os.makedirs(os.path.join(root, "build"), exist_ok=True)
    with open(os.path.join(root, "build", "csrc.lock"), "w") as lock:  # concurrent test runs share build dirs
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    _reset_modules()
    return r.stdout
