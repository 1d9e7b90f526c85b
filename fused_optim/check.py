"""Self-check: every optimizer's fused path against its reference path (``fused=False``) on this machine.

    python -m fused_optim.check [--quick] [--only NAME[,NAME]]

Runs on CUDA when present, else with the Triton kernels in Triton's interpreter on CPU tensors. Each optimizer
takes a few steps on small random non-zero problems (an odd-sized vector, matrices, a conv weight), with the inputs
its algorithm needs (LBFGS a closure, Adahessian grads with their graph, SparseAdam sparse grads); afterwards every
param must agree with the reference's to a relative error of 1e-5 (per tensor: max |fused - reference| over
max |reference|; LBFGS 1e-4). Prints one line per optimizer (error, kernel launches per step, PASS/FAIL) and exits non-zero on
any mismatch. ``--quick``: the smallest problems and fewer steps (for compute-sanitizer runs).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

import fused_optim
from fused_optim import anchors

RTOL = 1e-5
# LBFGS: its dot products round differently from the reference's, and each iteration's direction and step length
# build on them (the test suite's float32 bound for LBFGS trajectories too)
RTOL_OF = {"LBFGS": 1e-4}
TINY = 1e-12
SHAPES = [(7,), (5, 3), (33, 17), (4, 3, 3, 3)]  # Adafactor factors (33, 17); SGDP/AdamP project the 2+-D ones
QUICK_SHAPES = [(7,), (18, 17)]
STEPS, QUICK_STEPS = 5, 3
OPTIONS = {"SGD": {"momentum": 0.9}, "SGDP": {"momentum": 0.9}}  # the momentum paths


def launch_count() -> int:
    """Kernel launches the optimizers made so far, Triton's and the C++ engine's: kernels/runtime.py's counter where
    it exists, else kernels/multi_tensor.py's (which counts the engine launches made for an optimizer too)."""
    if importlib.util.find_spec("fused_optim.kernels.runtime") is not None:
        from fused_optim.kernels import runtime
        return runtime.launch_count
    from fused_optim.kernels import multi_tensor
    return multi_tensor.launch_count


def problem(name: str, shapes, steps: int, seed: int = 0):
    """(initial params, loss_fn(params, step)) on CPU in float64: per param p, the loss sums
    c p^2 / 2 + b sin(a p) / 4 + r_step p (c in [1, 2]: a Hessian diagonal away from zero, for Adahessian), r_step
    changing each step like a mini-batch. Sparse-grad optimizers get the 2-D params only, read through an embedding
    lookup of a few rows (one repeated) each step; so do the optimizers of matrices only (Muon)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda s: torch.rand(s, generator=gen, dtype=torch.float64)
    sparse = name in anchors.SPARSE_GRADS
    matrices = fused_optim.REGISTRY[name.lower()].matrices_only
    shapes = [s for s in shapes if len(s) == 2] if sparse or matrices else shapes
    params = [rand(s) * 2 - 1 + 0.1 for s in shapes]
    coef = [(rand(s) * 2 - 1, rand(s) * 2 - 1, rand(s) + 1) for s in shapes]
    rows = [torch.randint(0, s[0], (steps, 4), generator=gen) for s in shapes]
    rows = [torch.cat([r, r[:, :1]], 1) for r in rows]  # a repeated row: the optimizer must coalesce
    shift = [0.5 * torch.randn((steps, *((r.shape[1], s[1]) if sparse else s)), generator=gen, dtype=torch.float64)
             for r, s in zip(rows, shapes)]

    def loss_fn(ps, step):
        loss = 0.0
        for p, (a, b, c), r, idx in zip(ps, coef, shift, rows):
            a, b, c, r = (t.to(p.dtype).to(p.device) for t in (a, b, c, r[step]))
            if sparse:
                idx = idx[step].to(p.device)
                a, b, c, p = a[idx], b[idx], c[idx], F.embedding(idx, p, sparse=True)
            loss = loss + (c * p * p / 2 + b * torch.sin(a * p) / 4 + r * p).sum()
        return loss
    return params, loss_fn


def run(name: str, fused: bool, device, shapes, steps: int):
    """Params after `steps` steps, and the kernel launches of the last step (0: not seen by the counter)."""
    start, loss_fn = problem(name, shapes, steps)
    params = [torch.nn.Parameter(p.to(device=device, dtype=torch.float32)) for p in start]
    cls = fused_optim.REGISTRY[name.lower()]
    opt = cls(params, fused=fused, **OPTIONS.get(name, {}), **anchors.SHORT_RUN_OPTIONS.get(name, {}))
    launches = 0
    for i in range(steps):
        before = launch_count()
        anchors.take_step(opt, lambda: loss_fn(params, i))
        launches = launch_count() - before
    return [p.detach() for p in params], launches


def max_rel_error(got, want) -> float:
    return max(((g - w).abs().max() / w.abs().max().clamp_min(TINY)).item() for g, w in zip(got, want) if w.numel())


def environment(device) -> list:
    """Header lines: the versions and device this check runs with."""
    from fused_optim import csrc
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    where = (f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(device)}" if device.type == "cuda" else
             f"CPU ({platform.processor() or platform.machine()}): Triton kernels in Triton's interpreter")
    return [f"fused_optim {fused_optim.__version__}: fused path vs reference path (fused=False), fp32, "
            f"max relative error per tensor <= {RTOL:g}",
            f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}",
            f"device: {where}",
            f"C++ engine: host module {'built' if csrc.host_available() else 'not built'}, "
            f"CUDA module {'built' if csrc.cuda_available() else 'not built'}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_optim.check", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smallest problems, fewer steps (compute-sanitizer)")
    ap.add_argument("--only", default="", help="comma-separated optimizer names (factory names and aliases)")
    args = ap.parse_args(argv)
    try:
        names = sorted({anchors.optimizer_class(n).__name__ for n in args.only.split(",") if n.strip()})
    except ValueError as exc:
        ap.error(str(exc))
    names = names or sorted(cls.__name__ for cls in fused_optim.REGISTRY.values())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device, and TRITON_INTERPRET=1 was not set before fused_optim was imported: the kernels "
              "cannot run (python -m fused_optim.check sets it)", file=sys.stderr)
        return 2
    if device.type == "cpu":
        from fused_optim.kernels import runtime
        problem_here = runtime.interpreter_problem()
        if problem_here:
            print(problem_here, file=sys.stderr)
            return 2
    shapes, steps = (QUICK_SHAPES, QUICK_STEPS) if args.quick else (SHAPES, STEPS)
    print("\n".join(environment(device)))
    failed, t0 = [], time.perf_counter()
    for name in names:
        try:
            want, _ = run(name, False, device, shapes, steps)
            got, launches = run(name, True, device, shapes, steps)
            err, rtol = max_rel_error(got, want), RTOL_OF.get(name, RTOL)
            ok = err <= rtol  # False for NaN too
            line = (f"max rel error {err:8.1e}  launches/step {launches or '-':>3}  {'PASS' if ok else 'FAIL'}"
                    + (f" (bound {rtol:.0e})" if rtol != RTOL else ""))
        except Exception as exc:  # noqa: BLE001 - one optimizer's failure is its line, the others still run
            ok, line = False, f"FAIL: {type(exc).__name__}: {exc}"
        print(f"{name:<11} {line}", flush=True)
        if not ok:
            failed.append(name)
    print(f"{len(names) - len(failed)}/{len(names)} passed in {time.perf_counter() - t0:.1f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _restart_with_interpreter():
    """Without CUDA the kernels run in Triton's interpreter, which triton reads when the kernels are decorated, on
    importing fused_optim: before this module runs. Restart once with it set."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "fused_optim.check", *sys.argv[1:]])


if __name__ == "__main__":
    _restart_with_interpreter()
    sys.exit(main())
