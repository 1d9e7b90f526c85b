"""Host (Python) cost of a fused step, the kernel launch itself stubbed out: what a GPU would wait for when the
kernels are short (many small tensors). Runs on CPU, no GPU needed.

    python bench/host_overhead.py [--tensors 200 2000] [--only Adam,SGD] [--reps 30] [--out FILE.md]

Each row: median host milliseconds per step() and microseconds per tensor. The Triton launch is replaced by a no-op,
so this is everything fused_optim does around it (validation, state lookup, table keys, uploads when needed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # fused=True on CPU tensors (the kernel is stubbed anyway)

import torch  # noqa: E402

import fused_optim  # noqa: E402
from fused_optim.kernels import multi_tensor as mt  # noqa: E402

KW = {"SGD": {"lr": 0.1, "momentum": 0.9}}


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def measure(name: str, n: int, reps: int) -> float:
    params = [torch.nn.Parameter(torch.randn(256)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(256)
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
    args = ap.parse_args(argv)
    mt.multi_tensor_apply_kernel = _NoLaunch()
    lines = [f"# Host cost of a fused step (kernel launch stubbed), torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}", "", "| optimizer | tensors | ms / step | us / tensor |", "|---|---|---|---|"]
    for name in args.only.split(","):
        for n in args.tensors:
            ms = measure(name, n, args.reps)
            lines.append(f"| {name} | {n} | {ms:.3f} | {ms * 1e3 / n:.2f} |")
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
