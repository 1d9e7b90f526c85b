"""Main demonstration: train a small MLP with fused_optim.AdamW and torch.optim.AdamW from the same start and
print both loss curves, their agreement and the optimizer step time. Uses CUDA when present (fused Triton
kernels), else the CPU (reference path; pass --interpret to run the Triton kernels under the interpreter)."""
from __future__ import annotations

import argparse
import os
import sys
from timing import timed_step  # examples/timing.py (the script dir is on sys.path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--optimizer", default="AdamW")
    ap.add_argument("--interpret", action="store_true", help="CPU: run the fused kernels in Triton's interpreter")
    args = ap.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import fused_optim

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused = device == "cuda" or args.interpret
    torch.manual_seed(0)
    x = torch.randn(512, 64, device=device)
    y = (x[:, :8].sum(1, keepdim=True) > 0).float()

    def model():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 1)).to(device)

    results = {}
    for name, make in (("torch.optim", lambda ps: getattr(torch.optim, args.optimizer)(ps, lr=1e-3)),
                       ("fused_optim", lambda ps: getattr(fused_optim, args.optimizer)(ps, lr=1e-3, fused=fused))):
        net = model()
        opt = make(net.parameters())
        losses, times = [], []
        for _ in range(args.steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
            opt.zero_grad()
            loss.backward()
            times.append(timed_step(opt, device))
            losses.append(loss.item())
        results[name] = (losses, sorted(times[3:])[len(times[3:]) // 2])

    (la, ta), (lb, tb) = results["torch.optim"], results["fused_optim"]
    print(f"device={device} optimizer={args.optimizer} fused={fused} steps={args.steps}")
    print(f"{'step':>4} {'torch.optim':>12} {'fused_optim':>12}")
    for i in range(0, args.steps, max(1, args.steps // 10)):
        print(f"{i:4d} {la[i]:12.6f} {lb[i]:12.6f}")
    worst = max(abs(a - b) / abs(a) for a, b in zip(la, lb))
    print(f"max relative loss difference: {worst:.2e}")
    print(f"median step time: torch.optim {ta * 1e3:.3f} ms, fused_optim {tb * 1e3:.3f} ms "
          f"(host timing; see bench/ for kernel timings)")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
