"""Training quality of memory-lean states against fp32 states on examples/train_gpt.py's GPT (a tiny config, its
toy language), same seeds, same data; the MLP twin is bench/lean_quality.py, whose settings and table this reuses.

    PYTHONPATH=$PWD python bench/lean_gpt.py [--steps 200] [--paths reference fused] [--out FILE]

Every optimizer of lean_quality.OPTIMIZERS (with the learning rates below) trains the same GPT from the same
start on the same batches for every lean_quality.SETTINGS entry; reported: the final loss (mean of the last 20
steps) and its ratio to the fp32-states run. The fused path runs the Triton kernels (under TRITON_INTERPRET=1 on a
machine without a GPU: keep the model tiny there).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "examples")]

import lean_quality  # noqa: E402  (sets TRITON_INTERPRET without a GPU before fused_optim is imported)
import train_gpt  # noqa: E402

import fused_optim  # noqa: E402

DEVICE = lean_quality.DEVICE
# small enough for the interpreter: 1 block of width 16 over a 32-token vocabulary
MODEL = dict(vocab=32, d_model=16, n_layers=1, n_heads=2, seq_len=16)
BATCH, SEED = 8, 0
# per optimizer: what trains this model well in 200 steps (SGD and RMSprop want other rates than the Adams)
HYPER = {"AdamW": dict(lr=3e-3, weight_decay=0.1), "Adam": dict(lr=3e-3), "NAdam": dict(lr=3e-3),
         "SGD": dict(lr=0.3, momentum=0.9), "RMSprop": dict(lr=1e-3)}


def train(name, fused, steps, **opts):
    """The final loss (mean of the last 20 steps, or of all when fewer) of `steps` steps of optimizer `name`."""
    torch.manual_seed(SEED)
    model = train_gpt.GPT(**MODEL).to(DEVICE)
    opt = getattr(fused_optim, name)(model.parameters(), fused=fused, **HYPER[name], **opts)
    seqs = train_gpt.toy_sequences(MODEL, dict(seed=SEED, steps=steps, batch=BATCH))
    losses = []
    for batch in seqs:
        loss = train_gpt.lm_loss(model, batch.to(DEVICE), MODEL["vocab"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tail = losses[-20:]
    return sum(tail) / len(tail)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--paths", nargs="+", default=["reference", "fused"])
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    title = (f"# Lean states vs fp32 states: train_gpt's GPT {MODEL}, batch {BATCH}, {args.steps} steps, "
             f"device {DEVICE}")
    return lean_quality.report(title, lambda name, fused, **o: train(name, fused, args.steps, **o), args.paths,
                               args.out, optimizers=HYPER)


if __name__ == "__main__":
    main()
