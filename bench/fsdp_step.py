"""Step time of each optimizer on FSDP2 shards against the same optimizer on the unsharded model.

    python bench/fsdp_step.py [--device cuda|cpu] [--only AdamW,Adafactor] [--paths fused reference]
                              [--model n_layers=24 ...] [--reps 30] [--out bench/results/NAME]
    torchrun --nproc-per-node N bench/fsdp_step.py ...      (every rank of the job; the rows are rank 0's)

Without torchrun it runs on one process (world size 1): the sharded model is examples/train_gpt.py's GPT under
fully_shard per block and at the root (NCCL on CUDA, gloo on CPU), so the DTensor code paths run (the local
shards, the combine of the reduction optimizers' partial sums, max_grad_norm's global norm) against the same
optimizer on an unsharded copy of the model, same start, grads from one forward / backward on the same batch.
Timing as bench/run.py: untimed priming step, --warmup steps, CUDA events (CPU: perf_counter) around each step,
sharded and unsharded interleaved in rounds, median of --reps. Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "examples")]

import run  # noqa: E402  (bench/run.py: Timer, _triton_version)
import train_gpt  # noqa: E402

# the GPT timed: a 12-layer d=1024 model (~200M params) on a GPU, a small one on CPU
MODELS = {"cuda": dict(vocab=50304, d_model=1024, n_layers=12, n_heads=16, seq_len=128),
          "cpu": dict(vocab=512, d_model=64, n_layers=2, n_heads=4, seq_len=16)}
BATCH = 4
# every optimizer that steps on DTensor params (not LBFGS, SparseAdam, Adahessian), at bench/run.py's options;
# "+clip": with max_grad_norm=1.0 (the global norm over all shards)
OPTIMIZERS = {"AdamW": {}, "AdamW+clip": {"max_grad_norm": 1.0}, "Adam": {}, "SGD": run.KW["SGD"], "Lion": {},
              "Adopt": {}, "NovoGrad": {}, "NvNovoGrad": {}, "Lars": run.KW["Lars"], "SGDP": run.KW["SGDP"],
              "AdamP": {}, "Lamb": {}, "Adafactor": {}, "Muon": {}}
TORCH = {"AdamW", "Adam", "SGD"}  # torch.optim's own steps on DTensor params, for comparison


def implementations(name, device, paths):
    import fused_optim
    base = name.split("+")[0]
    ours = fused_optim.REGISTRY[base.lower()]
    impls = {}
    for path in paths:
        impls["ours-" + path] = lambda ps, fused=path == "fused", **kw: ours(ps, fused=fused, **kw)
    if base in TORCH and name == base:
        cls = getattr(torch.optim, base)
        impls["torch-foreach"] = lambda ps, **kw: cls(ps, foreach=True, **kw)
        if device == "cuda":
            impls["torch-fused"] = lambda ps, **kw: cls(ps, fused=True, **kw)
    return impls


def init_distributed(device):
    """The torchrun job's process group, else a one-process group (file rendezvous)."""
    import torch.distributed as dist
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":  # before the group: NCCL binds its communicator to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def models(device, cfg):
    """(unsharded, sharded) GPTs from the same start, each with the grads of one forward / backward on the same
    batch (the sharded one on its rank's slice)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    out = []
    batch = train_gpt.toy_sequences(cfg, dict(seed=0, steps=1, batch=BATCH * dist.get_world_size()))[0]
    for sharded in (False, True):
        torch.manual_seed(0)
        model = train_gpt.GPT(**cfg).to(device)
        if sharded:
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            data = batch.chunk(dist.get_world_size())[dist.get_rank()]
        else:
            data = batch
        train_gpt.lm_loss(model, data.to(device), cfg["vocab"]).backward()
        out.append(model)
    return out


def params_for(name, model):
    ps = list(model.parameters())
    import fused_optim
    return [p for p in ps if p.ndim == 2] if fused_optim.REGISTRY[name.split("+")[0].lower()].matrices_only else ps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default="", help="comma-separated names of OPTIMIZERS (default: all)")
    ap.add_argument("--paths", nargs="+", choices=["fused", "reference"], default=None,
                    help="ours' paths (default: both on CUDA, the reference on CPU)")
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=INT",
                    help="override MODELS' config, e.g. n_layers=24 (train_gpt.GPT's arguments)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(OPTIMIZERS)
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        ap.error(f"unknown: {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}")
    import torch.distributed as dist

    import fused_optim
    device = args.device
    paths = args.paths or (["fused", "reference"] if device == "cuda" else ["reference"])
    rank, world = init_distributed(device)
    try:
        cfg = {**MODELS[device], **{k: int(v) for k, v in (kv.split("=", 1) for kv in args.model)}}
        plain, sharded = models(device, cfg)
        timer = run.Timer(device)
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                "triton": run._triton_version(), "fused_optim": fused_optim.__version__,
                "date": time.strftime("%Y-%m-%d"), "world_size": world, "model": cfg, "batch": BATCH,
                "params": sum(p.numel() for p in plain.parameters()), "reps": args.reps}
        rows = []
        for name in names:
            for impl, make in implementations(name, device, paths).items():
                rows.append(time_pair(name, impl, make, plain, sharded, timer, args))
                if rank == 0:
                    print(_line(rows[-1]), flush=True)
                if args.out and rank == 0:
                    _save(args.out, meta, rows)
        return 0
    finally:
        dist.barrier()
        dist.destroy_process_group()


def time_pair(name, impl, make, plain, sharded, timer, args) -> dict:
    """One row: the step time of `impl` on the unsharded and on the sharded model, timed in interleaved rounds;
    then, both having taken the same steps from the same start, how far apart their params are (a sharded step
    that computed something else shows here), and the models are put back to the start."""
    from torch.distributed.tensor import DTensor
    row = {"optimizer": name, "impl": impl}
    pairs = list(zip(params_for(name, plain), params_for(name, sharded)))
    start = [(p.detach().clone(), q.detach().clone()) for p, q in pairs]
    row["dtensor_params"] = sum(isinstance(q, DTensor) for _, q in pairs)
    opts = {}
    for label, params in (("unsharded", [p for p, _ in pairs]), ("sharded", [q for _, q in pairs])):
        try:
            opt = make(params, **OPTIMIZERS[name])
            opt.step()  # priming: the states, the tables, Triton's compilation
            opts[label] = opt
        except Exception as exc:  # noqa: BLE001 - an unsupported combination is a row, not a crash
            row[label + "_error"] = f"{type(exc).__name__}: {exc}"[:200]
    for label, ms in timer.interleaved_ms({label: opt.step for label, opt in opts.items()}, args.reps,
                                          args.warmup).items():
        row[label + "_ms"] = round(ms, 4)
    if len(opts) == 2:
        row["sharded_over_unsharded"] = round(row["sharded_ms"] / row["unsharded_ms"], 3)
        row["max_rel_param_diff"] = float(f"{max(_rel_diff(p, q) for p, q in pairs):.3g}")
    with torch.no_grad():
        for (p, q), (p0, q0) in zip(pairs, start):
            p.copy_(p0)
            q.copy_(q0)
    return row


def _rel_diff(p, q) -> float:
    """max |q - p| / max |p| of the unsharded param p and the sharded q (gathered)."""
    full = q.full_tensor() if hasattr(q, "full_tensor") else q
    return float((full.detach() - p.detach()).abs().max() / p.detach().abs().max().clamp_min(1e-30))


def _line(r):
    cells = [f"{r[k + '_ms']} ms" if k + "_ms" in r else r.get(k + "_error", "-") for k in ("unsharded", "sharded")]
    return (f"{r['optimizer']:11s} {r['impl']:15s} unsharded {cells[0]}, sharded {cells[1]}, "
            f"ratio {r.get('sharded_over_unsharded', '-')}, params apart {r.get('max_rel_param_diff', '-')}")


def _save(out, meta, rows):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# FSDP2 step time: {meta['device']}, world size {meta['world_size']}", "", "```", json.dumps(meta),
             "```", "", "Params apart: max relative difference of the two models' params after the same steps.", "",
             "| optimizer | impl | unsharded ms | sharded ms | sharded / unsharded | params apart |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [str(r.get(k + "_ms", "error: " + r.get(k + "_error", ""))) for k in ("unsharded", "sharded")]
        lines.append(f"| {r['optimizer']} | {r['impl']} | {cells[0]} | {cells[1]} | "
                     f"{r.get('sharded_over_unsharded', '')} | {r.get('max_rel_param_diff', '')} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
