"""Training quality of memory-lean states against fp32 states: a teacher-student MLP, same seeds, same data.

    PYTHONPATH=$PWD python bench/lean_quality.py [--steps 200] [--paths reference fused] [--out FILE]

A fixed random teacher MLP (32 -> 64 -> 8, tanh) labels Gaussian inputs; a student of the same shape from
another seed trains on fresh batches of 128 for --steps steps. Reported: the final loss (mean of the last 20
steps) per optimizer and state setting, and its ratio to the fp32-states run. The fused path runs the Triton
kernels (under TRITON_INTERPRET=1 on a machine without a GPU).
"""
from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_optim  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPTIMIZERS = {"AdamW": dict(lr=3e-3), "Adam": dict(lr=3e-3), "NAdam": dict(lr=3e-3),
              "SGD": dict(lr=0.05, momentum=0.9), "RMSprop": dict(lr=1e-3)}
SETTINGS = {"fp32": {}, "bf16": {"state_dtype": torch.bfloat16},
            "bf16+SR": {"state_dtype": torch.bfloat16, "stochastic_rounding": True},
            # the student's two weight matrices (2048 and 512 elements) quantized; its biases keep fp32 states
            "int8": {"state_dtype": "int8", "int8_min_numel": 256}}


def mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(DEVICE)


def train(name, fused, steps, **opts):
    teacher, student = mlp(0), mlp(1)
    opt = getattr(fused_optim, name)(student.parameters(), fused=fused, **OPTIMIZERS[name], **opts)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        x = torch.randn(128, 32, generator=gen).to(DEVICE)
        with torch.no_grad():
            y = teacher(x)
        loss = torch.nn.functional.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


def report(title, train_fn, paths, out=None, optimizers=OPTIMIZERS, settings=None):
    """One table row per optimizer and path: train_fn(name, fused, **opts) -> final loss, for every SETTINGS entry,
    and each lean setting's ratio to fp32. Printed row by row, and written to ``out`` after every row (a long fused
    run keeps what it measured). ``settings``: names of SETTINGS entries (default all; fp32 is always run). Returns
    the rows' ratios {(name, path, setting): ratio}."""
    chosen = {s: SETTINGS[s] for s in SETTINGS if settings is None or s in settings or s == "fp32"}
    lines = [title, "",
             "| optimizer | path | " + " | ".join(f"{s} loss" for s in chosen) + " | " +
             " | ".join(f"{s} / fp32" for s in chosen if s != "fp32") + " |",
             "|---|---|" + "---|" * (2 * len(chosen) - 1)]
    ratios = {}
    for name in optimizers:
        for path in paths:
            loss = {s: train_fn(name, path == "fused", **o) for s, o in chosen.items()}
            ratios.update({(name, path, s): loss[s] / loss["fp32"] for s in chosen if s != "fp32"})
            lines.append(f"| {name} | {path} | " + " | ".join(f"{v:.5f}" for v in loss.values()) + " | " +
                         " | ".join(f"{ratios[name, path, s]:.4f}" for s in chosen if s != "fp32") + " |")
            print(lines[-1], flush=True)
            if out:
                with open(out, "w") as f:
                    f.write("\n".join(lines) + "\n")
    return ratios


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--paths", nargs="+", default=["reference", "fused"])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), help="fp32 and any of the others")
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    ap.add_argument("--out")
    args = ap.parse_args()
    report(f"# Lean states vs fp32 states: teacher-student MLP, {args.steps} steps, device {DEVICE}",
           lambda name, fused, **o: train(name, fused, args.steps, **o), args.paths, args.out,
           optimizers=args.optimizers, settings=args.settings)


if __name__ == "__main__":
    main()
