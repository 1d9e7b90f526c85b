"""Host (Python) cost of a fused step, the kernel launch itself stubbed out: what a GPU would wait for when the
kernels are short (many small tensors). Runs on CPU, no GPU needed.

    python bench/host_overhead.py [--tensors 200 2000] [--only Adam,SGD] [--reps 30] [--reductions auto]
                                  [--out FILE.md]

Each row: median host milliseconds per step() and microseconds per tensor. Every launch is replaced by a no-op (the
shared Triton kernel, the dedicated ones, the reductions, the C++ engine's), so this is everything fused_optim
does around them (validation, state lookup, table keys, uploads when needed). The optimizers with per-tensor
reductions (SGDP, AdamP, NovoGrad, NvNovoGrad, Adafactor) get 32 x 32 params, so that every tensor is projected /
factored; the others 256-element vectors. ``--reductions csrc|triton`` picks their reduction backend.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # fused=True on CPU tensors (the kernel is stubbed anyway)

import torch  # noqa: E402

import fused_optim  # noqa: E402
from fused_optim.kernels import multi_tensor as mt  # noqa: E402

KW = {"SGD": {"lr": 0.1, "momentum": 0.9}, "SGDP": {"lr": 0.1, "momentum": 0.9}}
MATRIX_PARAMS = {"SGDP", "AdamP", "NovoGrad", "NvNovoGrad", "Adafactor"}


def _count(*args, **kwargs):
    _count.calls += 1


_count.calls = 0  # stubbed launches made (tests/test_bench.py checks the stubs are what runs)


class _NoLaunch:
    def __getitem__(self, grid):
        return _count


class _NoEngineLaunch:
    """A csrc module whose launch() does nothing (plan() and the rest stay real)."""

    def __init__(self, mod):
        self._mod = mod

    def __getattr__(self, name):
        return _count if name == "launch" else getattr(self._mod, name)


@contextlib.contextmanager
def stubbed_launches():
    """Within: every launch entry point is a no-op (restored on exit)."""
    from fused_optim import csrc
    from fused_optim.kernels import reduce
    from fused_optim.optimizers import adafactor, projection

    saved = [(mt, "multi_tensor_apply_kernel"), (projection, "projection_kernel"), (adafactor, "adafactor_kernel"),
             (reduce, "_sumsq_kernel"), (reduce, "_clip_scale_kernel")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in saved]
    engines = {name: csrc._load(name) for name in ("_fused_optim_host", "_fused_optim_cuda")}
    try:
        for mod, name, _ in saved:
            setattr(mod, name, _NoLaunch())
        for name, mod in engines.items():
            if mod is not None:
                csrc._modules[name] = _NoEngineLaunch(mod)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        csrc._modules.update(engines)


def measure(name: str, n: int, reps: int) -> float:
    shape = (32, 32) if name in MATRIX_PARAMS else (256,)
    params = [torch.nn.Parameter(torch.randn(shape)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(shape)
    opt = getattr(fused_optim, name)(params, fused=True, **KW.get(name, {}))
    opt.step()
    opt.step()  # tables built, states created
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensors", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--only", default="SGD,Adam,AdamW,NAdam,RAdam,Adagrad,RMSprop")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    ap.add_argument("--reductions", choices=["auto", "csrc", "triton"], default="auto")
    args = ap.parse_args(argv)
    from fused_optim.kernels import reduce

    backend, reduce.BACKEND = reduce.BACKEND, args.reductions
    lines = [f"# Host cost of a fused step (launches stubbed; reductions: {args.reductions}), torch "
             f"{torch.__version__}, {time.strftime('%Y-%m-%d')}", "",
             "| optimizer | tensors | ms / step | us / tensor |", "|---|---|---|---|"]
    try:
        with stubbed_launches():
            for name in args.only.split(","):
                for n in args.tensors:
                    ms = measure(name, n, args.reps)
                    lines.append(f"| {name} | {n} | {ms:.3f} | {ms * 1e3 / n:.2f} |")
                    print(lines[-1], flush=True)
    finally:
        reduce.BACKEND = backend
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
