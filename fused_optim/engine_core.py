"""The C++/CUDA engine's core: loading its modules, their plans, and the one launch (``launch``).

``fused_optim.csrc`` re-exports everything public here and adds the wrappers with their torch fallbacks. Two
extension modules with the same functions, built by ``bash scripts/build_csrc.sh`` into this package:
``_fused_optim_host`` (the engine compiled for the CPU, used for CPU tensors) and ``_fused_optim_cuda`` (the same
engine compiled by nvcc, for CUDA tensors). A module is used only if its ABI_VERSION, its reduction kinds and its
dtype codes are the ones below (``module_mismatch``): the kinds' one list is ``FO_KINDS`` in csrc/fo_kinds.h, which
the ``KIND_*`` codes here mirror (usable with no module built); tests/infra/test_csrc.py compares both.
"""
from __future__ import annotations

import importlib
import operator
from collections import OrderedDict
from typing import Sequence

import torch

from .kernels import runtime

ABI_VERSION = 4
KIND_SUMSQ, KIND_FACTORED, KIND_PROJ = 0, 1, 2  # FO_KINDS' order (csrc/fo_kinds.h)
KINDS = {name[5:]: code for name, code in globals().items() if name.startswith("KIND_")}  # what modules export
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # fo_common.h's DType
_DTYPE_ATTRS = {"DTYPE_F32": 0, "DTYPE_BF16": 1, "DTYPE_F16": 2}
_MODULES = {"host": "_fused_optim_host", "cuda": "_fused_optim_cuda"}
_CACHE_SIZE = 64
_dtype = operator.attrgetter("dtype")

_modules: dict = {}
_errors: dict = {}
_plans: OrderedDict = OrderedDict()


def module_mismatch(mod) -> str | None:
    """Why a built module cannot be used with this Python side (an older build, another list of kinds), or None."""
    if getattr(mod, "ABI_VERSION", None) != ABI_VERSION:
        return f"ABI_VERSION {getattr(mod, 'ABI_VERSION', None)}, expected {ABI_VERSION}: rebuild"
    if getattr(mod, "KINDS", None) != KINDS:
        return f"kinds {getattr(mod, 'KINDS', None)}, expected {KINDS}: csrc/fo_kinds.h and engine_core.py differ"
    codes = {name: getattr(mod, name, None) for name in _DTYPE_ATTRS}
    if codes != _DTYPE_ATTRS:
        return f"dtype codes {codes}, expected {_DTYPE_ATTRS}"
    return None


def module(backend: str):
    """The built module of ``backend`` ("host" or "cuda"), or None (``load_errors()`` says why)."""
    name = _MODULES[backend]
    if name not in _modules:
        mod = None
        try:
            mod = importlib.import_module(f"fused_optim.{name}")
            why = module_mismatch(mod)
            if why is not None:
                _errors[name], mod = f"{name} has {why}", None
        except ImportError as e:  # not built here (see scripts/build_csrc.sh)
            _errors[name] = f"{type(e).__name__}: {e}"
        _modules[name] = mod
    return _modules[name]


def host_available() -> bool:
    return module("host") is not None


def cuda_available() -> bool:
    return torch.cuda.is_available() and module("cuda") is not None


def load_errors() -> dict:
    for backend in _MODULES:
        module(backend)
    return dict(_errors)


def engine_backend(device: torch.device) -> str:
    """The built module that serves tensors on `device` (callers have checked reduce.use_csrc)."""
    return "host" if device.type == "cpu" else "cuda"


def plan_cache_size() -> int:
    """How many plans are cached (a steady-state call builds none)."""
    return len(_plans)


def cached_plans() -> list:
    """The cached plans, least recently used first."""
    return list(_plans.values())


class Plan:
    """A launch's plan: device metadata and workspace, K terms per statistic, n_entries totals, n_stats row /
    column statistics; row_out / col_out: per tensor, its first row / column statistic (-1: none)."""
    __slots__ = ("meta", "n_entries", "n_items", "ws_items", "ws_extra", "counters", "n_stats", "K", "row_out",
                 "col_out")


def _plan(mod, kind, dev, a, b, c_, d_, st_, dims) -> Plan:
    none = [None] * len(a)
    descs = [(x.data_ptr(), *(t.data_ptr() if t is not None else 0 for t in (y, z, w, st)),
              *(DTYPE_CODES[t.dtype] if t is not None else 0 for t in (x, y, z)), x.numel(), *d)
             for x, y, z, w, st, d in zip(a, b if b is not None else none, c_ or none, d_ or none, st_ or none, dims)]
    meta, n_entries, n_items, ws_extra, n_stats, n_counters, K, row_out, col_out = mod.plan(kind, descs)
    plan = Plan()
    # pageable -> device without non_blocking would sync the stream; the runtime stages the bytes at once
    plan.meta = torch.frombuffer(bytearray(meta), dtype=torch.int64).to(dev, non_blocking=True)
    plan.n_entries, plan.n_items, plan.n_stats, plan.K = n_entries, n_items, n_stats, K
    plan.row_out, plan.col_out = row_out, col_out
    plan.ws_items = torch.empty(n_items * K, dtype=torch.float32, device=dev)
    plan.ws_extra = torch.empty(max(ws_extra, 1), dtype=torch.float32, device=dev)
    plan.counters = torch.zeros(n_counters, dtype=torch.int32, device=dev)  # kernels leave them zero
    return plan


def _out_parts(out, sizes: tuple, dev):
    if out is None:
        out = torch.empty(sum(sizes), dtype=torch.float32, device=dev)
    # out: one buffer, or its three parts (entry totals, row / column statistics, global) as separate tensors
    parts = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if any(t.dtype != torch.float32 or t.device != dev or not t.is_contiguous() for t in parts) or (
            [t.numel() for t in parts] != ([sum(sizes)] if len(parts) == 1 else list(sizes))):
        raise ValueError(f"fused_optim.csrc: out must be contiguous float32 on {dev}: one tensor of {sum(sizes)} "
                         f"elements or three of {sizes}")
    return parts if len(parts) == 3 else out.split(sizes)


def launch(kind: int, backend: str, a: list, b: list | None, dims: list, eps: float = 0.0, scale=None, out=None,
           cd: tuple | None = None, steps: list | None = None, proj: tuple | None = None, plan_key=None):
    """One launch over all tensors. dims[i] = (B, R, C, S). Returns (out_t [E, K], out_stats [N, K], out_g [K], plan).
    scale: an fp32 1-element device tensor; list A is multiplied by 1 / scale first. out: the fp32 buffer to write
    (else a fresh one), of (E + N + 1) * K elements: a caller that needs stable result addresses passes its own.
    cd = (list C, list D), steps = per-tensor fp32 scalars (the op's, e.g. step counts) or None, proj = the op's
    parameters (fo_bind.h's OpTuple; KIND_PROJ: csrc.projection_args).
    plan_key: a hashable that stands for everything but list A's addresses (a caller's table key), so a steady-state
    call does not rebuild the whole key."""
    mod = module(backend)
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
        plan = _plans[key] = _plan(mod, kind, dev, a, b, c_, d_, st_, dims)
        while len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    K = plan.K
    out_t, out_stats, out_g = _out_parts(out, (plan.n_entries * K, plan.n_stats * K, K), dev)
    if scale is not None and (scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != dev):
        raise ValueError(f"fused_optim.csrc: scale must be a 1-element float32 tensor on {dev}")
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


def contiguous(ts: Sequence[torch.Tensor]) -> list:
    """The tensors, copied only where one is not contiguous (only addresses are taken: no autograd views)."""
    ts = list(ts)
    return ts if all(map(torch.Tensor.is_contiguous, ts)) else [t.contiguous() for t in ts]


def build(host_only: bool = True, timeout: float = 600) -> str:
    """Run scripts/build_csrc.sh (incremental) from a source checkout; returns its output. Raises on failure.
    The modules are loaded afresh by the next call."""
    import fcntl
    import os
    import subprocess
    import sys

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
    _modules.clear()
    _errors.clear()
    _plans.clear()
    return r.stdout
