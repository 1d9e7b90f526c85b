#!/usr/bin/env python3
"""Train a small GPT-style model from a YAML config with fused_optim; run with fused true and false from the same
start and print both loss curves and median optimizer step times.

    python examples/train_gpt.py [examples/gpt.yaml]

On CPU, `fused: true` runs the Triton kernels under the interpreter (slow; set automatically here), so the
comparison is of numbers there; step times mean something on CUDA.
"""
from __future__ import annotations

import os
import statistics
import sys
from timing import timed_step  # examples/timing.py (the script dir is on sys.path)

import torch
import yaml


class Block(torch.nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x):
        n = x.shape[1]
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(torch.nn.Module):
    def __init__(self, vocab, d_model, n_layers, n_heads, seq_len):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d_model)
        self.pos = torch.nn.Parameter(torch.zeros(seq_len, d_model))
        self.blocks = torch.nn.Sequential(*[Block(d_model, n_heads) for _ in range(n_layers)])
        self.ln = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx):
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos[: idx.shape[1]])))


def train(cfg, fused: bool, device: str):
    import fused_optim
    m, t = cfg["model"], cfg["train"]
    torch.manual_seed(t["seed"])
    model = GPT(**m).to(device)
    opt = fused_optim.from_config(model, {**cfg["optimizer"], "fused": fused})
    g = torch.Generator().manual_seed(t["seed"] + 1)
    # a learnable toy language: each token is the previous one plus a fixed offset, with noise
    start = torch.randint(0, m["vocab"], (t["steps"], t["batch"], 1), generator=g)
    seqs = (start + 7 * torch.arange(m["seq_len"] + 1)) % m["vocab"]
    losses, times = [], []
    for step in range(t["steps"]):
        batch = seqs[step].to(device)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, m["vocab"]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        times.append(timed_step(opt, device))
        losses.append(loss.item())
    return losses, statistics.median(times[2:])


def main(path=os.path.join(os.path.dirname(__file__), "gpt.yaml")):
    with open(path) as f:
        cfg = yaml.safe_load(f)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {fused: train(cfg, fused, device) for fused in (False, True)}
    (l0, t0), (l1, t1) = results[False], results[True]
    print(f"device={device} optimizer={cfg['optimizer']['optimizer']} steps={cfg['train']['steps']}")
    print(f"{'step':>4} {'fused=false':>12} {'fused=true':>12}")
    for i in range(0, len(l0), max(1, len(l0) // 8)):
        print(f"{i:4d} {l0[i]:12.5f} {l1[i]:12.5f}")
    print(f"final loss {l0[-1]:.5f} vs {l1[-1]:.5f}; max relative difference "
          f"{max(abs(a - b) / a for a, b in zip(l0, l1)):.2e}")
    print(f"median step time: fused=false {t0 * 1e3:.2f} ms, fused=true {t1 * 1e3:.2f} ms")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fused_optim (triton) is imported
    main(*sys.argv[1:])
