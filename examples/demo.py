"""Main demonstration: train a small model with a fused_optim optimizer (fused Triton kernels) and with its anchor
from the same start, and print both loss curves, their agreement and the step times.

    python examples/demo.py [--optimizer NAME|all] [--steps N]

NAME: any name the factory accepts (case-insensitive, timm-style aliases; `fused_optim.optimizer_names()`), or
`all`. Anchors: torch.optim's class, timm.optim's (SGDP, AdamP, Adafactor, NvNovoGrad, Adahessian), and for NovoGrad
our own reference path in float64 (it has no external anchor). CUDA: the kernels run on the GPU. CPU: the same
kernels run in Triton's interpreter (slowly, so the problem is small). Exits non-zero, saying why, when the two
disagree.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when fused_optim's kernels are decorated: before importing it

import fused_optim  # noqa: E402
from fused_optim import anchors  # noqa: E402
from fused_optim.check import max_rel_error  # noqa: E402
from timing import timed_step  # noqa: E402  (examples/timing.py; the script dir is on sys.path)

RTOL = 1e-4  # relative difference allowed between the two runs' losses and final params (fp32)


def problem(name: str, device, dtype):
    """(model, loss_fn) from a fixed start: an MLP on a binary task, or for the sparse-grad optimizers an
    nn.Embedding(sparse=True) read out by a fixed vector."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    if name in anchors.SPARSE_GRADS:
        tokens = torch.randint(0, 100, (256, 4), generator=gen)
        readout = torch.randn(16, 1, generator=gen)
        model = torch.nn.Embedding(100, 16, sparse=True)
        x, y = tokens.to(device), (tokens[:, :1] < 50).to(device, dtype)
        readout = readout.to(device, dtype)
        forward = lambda: model(x).sum(1) @ readout
    else:
        x = torch.randn(256, 32, generator=gen)
        y = (x[:, :8].sum(1, keepdim=True) > 0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
        x, y = x.to(device, dtype), y.to(device, dtype)
        forward = lambda: model(x)
    model.to(device, dtype)
    return model, lambda: torch.nn.functional.binary_cross_entropy_with_logits(forward(), y)


def train(opt, loss_fn, steps: int, device: str):
    """Losses before each step, and the median step time (the first steps left out)."""
    losses, times = [], []
    record = lambda step: times.append(timed_step(opt, device, step))
    for _ in range(steps):
        losses.append(anchors.take_step(opt, loss_fn, run=record).item())
    return losses, statistics.median(times[min(3, steps - 1):])


def compare(name: str, steps: int, device: str) -> bool:
    """Train with fused_optim's `name` (fused) and its anchor, print the comparison; True if they agree."""
    cls = anchors.optimizer_class(name)
    anchor_cls, anchor_dtype, anchor_desc = anchors.anchor(cls.__name__)
    model, loss_fn = problem(cls.__name__, device, torch.float32)
    options = anchors.SHORT_RUN_OPTIONS.get(cls.__name__, {})
    ours = fused_optim.create_optimizer(model, name, fused=True, **options)
    ref_model, ref_loss_fn = problem(cls.__name__, device, anchor_dtype)
    ref = anchor_cls(ref_model.parameters(), **anchors.hyperparameters(ours, anchor_cls))

    la, ta = train(ours, loss_fn, steps, device)
    lb, tb = train(ref, ref_loss_fn, steps, device)
    loss_diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(la, lb))
    param_diff = max_rel_error([p.detach().double() for p in model.parameters()],
                               [p.detach().double() for p in ref_model.parameters()])

    print(f"device={device} optimizer={cls.__name__} ({name!r}) fused=True steps={steps}"
          + (f" options={options}" if options else ""))
    print(f"anchor: {anchor_desc}")
    print(f"{'step':>4} {'anchor':>12} {'fused_optim':>12}")
    for i in range(0, steps, max(1, steps // 10)):
        print(f"{i:4d} {lb[i]:12.6f} {la[i]:12.6f}")
    print(f"max relative loss difference: {loss_diff:.2e}")
    print(f"max relative param difference after {steps} steps: {param_diff:.2e} (per tensor, over its max |value|)")
    print(f"median step time: anchor {tb * 1e3:.3f} ms, fused_optim {ta * 1e3:.3f} ms "
          f"(host timing{', closure calls included' if cls.__name__ in anchors.CLOSURE else ''}; "
          f"see bench/ for kernel timings)")
    why = [f"max relative {what} difference {diff:.1e} exceeds {RTOL:.0e}"
           for what, diff in (("loss", loss_diff), ("param", param_diff)) if not diff <= RTOL]  # NaN fails too
    print(f"FAIL: {'; '.join(why)}" if why else "PASS: fused_optim agrees with the anchor")
    return not why


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="default: 30 on CUDA, 10 on CPU")
    ap.add_argument("--optimizer", default="AdamW", help="a factory name or alias, or 'all'")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = args.steps or (30 if device == "cuda" else 10)
    if steps < 1:
        ap.error(f"--steps must be at least 1, got {steps}")
    if args.optimizer.lower() == "all":
        names = sorted(cls.__name__ for cls in fused_optim.REGISTRY.values())
    else:
        try:
            anchors.optimizer_class(args.optimizer)
        except ValueError as exc:
            ap.error(str(exc))
        names = [args.optimizer]
    if device == "cpu":
        print("CPU: fused Triton kernels run in Triton's interpreter; step times are not GPU times")
    failed = []
    for name in names:
        try:
            ok = compare(name, steps, device)
        except Exception as exc:  # noqa: BLE001 - say why, and go on with the next optimizer
            print(f"FAIL: {name}: {type(exc).__name__}: {exc}")
            ok = False
        if not ok:
            failed.append(name)
        print()
    if len(names) > 1:
        print(f"{len(names) - len(failed)}/{len(names)} agree with their anchors"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
