"""State bytes per param of every optimizer under each memory-lean setting, on a model of 2M+ params in large
tensors (measured: the bytes of every tensor in ``opt.state`` after one step, over the param count).

    PYTHONPATH=$PWD python bench/state_bytes.py [--out bench/results/state-bytes.md]

Settings: fp32 params with the anchor's states, with state_dtype=torch.bfloat16, with state_dtype="int8" (1-byte
codes plus an fp32 scale per 256 elements; the two bias vectors, under int8_min_numel=4096, keep fp32 states);
bf16 params with master_weights=True and with param_remainders=True (the fp32-master alternatives, counted with the
master or the remainder). Runs the reference path on CPU: state layout, not speed.
"""
from __future__ import annotations

import argparse

import torch

import fused_optim

SHAPES = [(1024, 1024), (1024, 512), (512, 1024), (1024,), (512,)]  # 2.1M params, all but two in large matrices
SETTINGS = {"fp32 states": (torch.float32, {}), "bf16 states": (torch.float32, {"state_dtype": torch.bfloat16}),
            "bf16 params + master_weights": (torch.bfloat16, {"master_weights": True}),
            "bf16 params + param_remainders": (torch.bfloat16, {"param_remainders": True}),
            "bf16 params + param_remainders + bf16 states": (torch.bfloat16, {"param_remainders": True,
                                                                             "state_dtype": torch.bfloat16}),
            "int8 states": (torch.float32, {"state_dtype": "int8"}),
            "bf16 params + param_remainders + int8 states": (torch.bfloat16, {"param_remainders": True,
                                                                             "state_dtype": "int8"})}
LR = {"sgd": {"lr": 0.01, "momentum": 0.9}, "lbfgs": None}


def state_bytes(name, dtype, opts):
    cls = fused_optim.REGISTRY[name]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    kw = LR.get(name, {"lr": 1e-3} if name in ("sgdp", "lars") else {})
    opt = cls(params, fused=False, **kw, **opts)
    loss = sum((p.float() ** 2).sum() for p in params)
    loss.backward(create_graph=name == "adahessian")  # Adahessian's estimate needs the grad's graph
    if name == "sparseadam":
        for p in params:
            p.grad = p.grad.detach().to_sparse()
    opt.step()
    n = sum(p.numel() for p in params)
    total = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor))
    states = sum(1 for k, v in next(iter(opt.state.values())).items()
                 if opt._is_elementwise_state(k, v, params[0]))
    return total / n, states, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--only", nargs="+", help="registry names (default: every optimizer that takes the options)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), help="setting labels (default: all)")
    args = ap.parse_args()
    rows = []
    for name in args.only or sorted(fused_optim.REGISTRY):
        if not fused_optim.REGISTRY[name].supports_precision_options:
            continue
        for label in args.settings:
            dtype, opts = SETTINGS[label]
            try:
                b, ns, n = state_bytes(name, dtype, opts)
                rows.append((fused_optim.REGISTRY[name].__name__, label, ns, f"{b:.3f}"))
            except Exception as e:  # noqa: BLE001 - a setting an optimizer refuses is reported, not fatal
                rows.append((fused_optim.REGISTRY[name].__name__, label, "-", f"error: {type(e).__name__}: {e}"[:80]))
            print(*rows[-1], flush=True)
    text = [f"# State bytes per param ({n:,} params: {SHAPES})", "",
            "Measured on CPU, reference path (the fused path keeps the same state tensors).", "",
            "| optimizer | setting | element-wise states | bytes / param |", "|---|---|---|---|"]
    text += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
