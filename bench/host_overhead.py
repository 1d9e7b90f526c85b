"""Host (Python) cost of a fused step, the kernel launch itself stubbed out: what a GPU would wait for when the
kernels are short (many small tensors). Runs on CPU, no GPU needed.

    python bench/host_overhead.py [--tensors 200 2000] [--only Adam,SGD] [--reps 30] [--reductions auto]
                                  [--out FILE.md]

Each row: median host milliseconds per step() and microseconds per tensor. Every launch is replaced by a no-op at
the one launch point (``fused_optim.kernels.runtime.dispatch``: the Triton kernels and the C++ engine alike), so this
is everything fused_optim does around them (validation, state lookup, table keys, uploads when needed). Adam, AdamW
and SGD are timed next to torch.optim's own ``fused=True`` step with torch's kernels stubbed the same way. The optimizers with per-tensor
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
from fused_optim.kernels import runtime  # noqa: E402

KW = {"SGD": {"lr": 0.1, "momentum": 0.9}, "SGDP": {"lr": 0.1, "momentum": 0.9}}
MATRIX_PARAMS = {"SGDP", "AdamP", "NovoGrad", "NvNovoGrad", "Adafactor"}


def _count(fn, args, kwargs, engine=False):
    """Stands in for fused_optim.kernels.runtime.dispatch: counts the launch instead of making it."""
    _count.calls += 1
    _count.engine += engine


_count.calls = 0   # stubbed launches made (tests/infra/test_bench.py checks the stubs are what runs)
_count.engine = 0  # of which the C++ engine's
TORCH_KERNELS = ("_fused_adam_", "_fused_adamw_", "_fused_sgd_", "_foreach_add_")  # torch's fused-path launches
TORCH_FUSED = {"Adam", "AdamW", "SGD"}  # torch.optim classes with fused=True on CPU


def _no_torch_kernel(*args, **kwargs):
    _no_torch_kernel.calls += 1


_no_torch_kernel.calls = 0


@contextlib.contextmanager
def stubbed_launches():
    """Within: every launch is a no-op, ours (the one dispatch point: Triton kernels and the C++ engine alike; the
    engine's planning stays real) and torch's fused optimizer kernels (+ its step-count foreach); restored on
    exit."""
    saved = [(runtime, "dispatch")] + [(torch, name) for name in TORCH_KERNELS]
    saved = [(mod, name, getattr(mod, name)) for mod, name in saved]
    try:
        runtime.dispatch = _count
        for name in TORCH_KERNELS:
            setattr(torch, name, _no_torch_kernel)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def _params(name: str, n: int):
    shape = (32, 32) if name in MATRIX_PARAMS else (256,)
    params = [torch.nn.Parameter(torch.randn(shape)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(shape)
    return params


def _time(opt, reps: int) -> float:
    opt.step()
    opt.step()  # tables built, states created
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(name: str, n: int, reps: int) -> float:
    return _time(getattr(fused_optim, name)(_params(name, n), fused=True, **KW.get(name, {})), reps)


def measure_torch(name: str, n: int, reps: int) -> float:
    """torch.optim's own fused=True step, its kernels stubbed the same way."""
    return _time(getattr(torch.optim, name)(_params(name, n), fused=True, **KW.get(name, {})), reps)


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
             "| optimizer | tensors | ms / step | us / tensor | torch fused=True ms / step | ours / torch |",
             "|---|---|---|---|---|---|"]
    try:
        with stubbed_launches():
            for name in args.only.split(","):
                for n in args.tensors:
                    ms = measure(name, n, args.reps)
                    if name in TORCH_FUSED:  # interleaved: both sides see the same machine load
                        ref = measure_torch(name, n, args.reps)
                        ref_cols = f"{ref:.3f} | {ms / ref:.2f}"
                    else:
                        ref_cols = "- | -"
                    lines.append(f"| {name} | {n} | {ms:.3f} | {ms * 1e3 / n:.2f} | {ref_cols} |")
                    print(lines[-1], flush=True)
    finally:
        reduce.BACKEND = backend
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
