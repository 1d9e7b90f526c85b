#!/usr/bin/env python3
"""Train a small GPT-style model from a YAML config with fused_optim; run with fused true and false from the same
start and print both loss curves and median optimizer step times.

    python examples/train_gpt.py [examples/gpt.yaml]

On CPU, `fused: true` runs the Triton kernels under the interpreter (slow; set automatically here), so the
comparison is of numbers there; step times mean something on CUDA.

FSDP2 mode: every block and the root sharded with fully_shard (gloo on CPU, NCCL on GPUs), any optimizer of the
config (or --optimizer), its max_grad_norm, and DCP checkpoints every --save-every steps into --checkpoint; a run
started with an existing checkpoint there resumes from it (with any number of ranks):

    torchrun --nproc-per-node 2 examples/train_gpt.py examples/gpt.yaml --fsdp --checkpoint /tmp/gpt_ckpt
"""
from __future__ import annotations

import argparse
import os
import statistics
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


def toy_sequences(m, t):
    g = torch.Generator().manual_seed(t["seed"] + 1)
    # a learnable toy language: each token is the previous one plus a fixed offset, with noise
    start = torch.randint(0, m["vocab"], (t["steps"], t["batch"], 1), generator=g)
    return (start + 7 * torch.arange(m["seq_len"] + 1)) % m["vocab"]


def lm_loss(model, batch, vocab):
    logits = model(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))


def train(cfg, fused: bool, device: str):
    import fused_optim
    m, t = cfg["model"], cfg["train"]
    torch.manual_seed(t["seed"])
    model = GPT(**m).to(device)
    opt = fused_optim.from_config(model, {**cfg["optimizer"], "fused": fused})
    seqs = toy_sequences(m, t)
    losses, times = [], []
    for step in range(t["steps"]):
        loss = lm_loss(model, seqs[step].to(device), m["vocab"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        times.append(timed_step(opt, device))
        losses.append(loss.item())
    return losses, statistics.median(times[2:])


def train_fsdp(cfg, checkpoint: str | None, save_every: int):
    """FSDP2 over every rank of the torchrun job: each rank trains on its slice of every batch."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    import fused_optim
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    m, t = cfg["model"], cfg["train"]
    torch.manual_seed(t["seed"])
    model = GPT(**m).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = fused_optim.from_config(model, cfg["optimizer"])
    seqs, start = toy_sequences(m, t), 0
    if checkpoint and os.path.exists(os.path.join(checkpoint, ".metadata")):
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd, "step": torch.zeros((), dtype=torch.int64)}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])
    for step in range(start, t["steps"]):
        loss = lm_loss(model, seqs[step].chunk(world)[rank].to(device), m["vocab"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss = loss.detach()
        dist.all_reduce(loss)  # (a sum: gloo has no average)
        if rank == 0:
            print(f"step {step:4d} loss {float(loss) / world:.5f}", flush=True)
        if checkpoint and (step + 1) % save_every == 0:
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd, "step": torch.tensor(step + 1)},
                     checkpoint_id=checkpoint)
    # every rank done with its collectives before any tears its process group down: a rank leaving while a peer's
    # gloo thread still waits on it aborts the peer at exit ('terminate called without an active exception')
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default=os.path.join(os.path.dirname(__file__), "gpt.yaml"))
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 training over the ranks of a torchrun job")
    ap.add_argument("--optimizer", help="override the config's optimizer name (e.g. novograd, adafactor)")
    ap.add_argument("--steps", type=int, help="override the config's number of steps")
    ap.add_argument("--checkpoint", help="FSDP2: the DCP checkpoint directory to save into and resume from")
    ap.add_argument("--save-every", type=int, default=10)
    args = ap.parse_args(argv)
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    if args.optimizer:
        cfg["optimizer"]["optimizer"] = args.optimizer
    if args.steps:
        cfg["train"]["steps"] = args.steps
    if args.fsdp:
        train_fsdp(cfg, args.checkpoint, args.save_every)
        return
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
    main()
