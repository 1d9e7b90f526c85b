"""Time optimizer.step() for every optimizer and implementation available on this device.

    python bench/run.py [--device cuda|cpu] [--workload large gpt tiny] [--dtype float32 bfloat16]
                        [--only Adam,SGD] [--[no-]compile] [--out bench/results/NAME]

Implementations: ours (fused kernels on CUDA, the reference path everywhere), torch.optim (for-loop, foreach,
fused where torch has it, and `torch-compile`: step() under torch.compile, on by default on CUDA only since on
CPU it needs a C++ compiler and seconds per optimizer), timm's class where timm is the anchor. Timing: untimed
priming steps first (one; three for torch-compile, which recompiles once the state exists), whose time is reported
separately as `first_step_ms` so that compilation and table building stay out, then --warmup steps, then CUDA
events (CPU: perf_counter) around each step, median of --reps. Each row reports step time, bytes moved per step
(each tensor read or written once, see STREAMS), achieved GB/s and, on CUDA, the fraction of the device copy
bandwidth measured in the same run.
Writes <out>.json and <out>.md after every optimizer (a run cut short keeps what it measured) and <out>.png at the
end (with matplotlib). Shows a progress bar with tqdm (`pip install .[bench]`), else one line per item on stderr.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
import types

import torch

from fused_optim import anchors

try:  # optional (the `bench` extra): progress bar
    from tqdm import tqdm
except ImportError:
    tqdm = None

# bytes per element per step for fp32 params, grads and states: (tensors read) + (tensors written), x 4 bytes.
# Reduction optimizers also read the grad (and param) once more for their norms.
STREAMS = {  # optimizer: (reads, writes) in whole-tensor passes, default options
    "SGD": (2, 1), "Adam": (4, 3), "AdamW": (4, 3), "Adamax": (4, 3), "NAdam": (4, 3), "RAdam": (4, 3),
    "Adagrad": (3, 2), "RMSprop": (3, 2), "Adadelta": (4, 3), "Rprop": (4, 3), "ASGD": (3, 2),
    "SGDP": (4, 1), "AdamP": (6, 3), "Adahessian": (5, 3), "NovoGrad": (4, 2), "NvNovoGrad": (4, 2),
    "Adafactor": (3, 1), "Lion": (3, 2), "Adopt": (4, 3),
    "Lars": (5, 2), "Lamb": (9, 3),  # Lars: norms of g and p; Lamb: its statistics pass and the global clip's
    "Muon": (4, 3),  # its two element-wise passes (the bf16 Newton-Schulz matmuls are compute, not counted)
}
TORCH_ANCHORS = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Rprop", "ASGD", "Adamax", "NAdam",
                 "RAdam"]
TORCH_FUSED = {"SGD", "Adam", "AdamW", "Adagrad"}
TORCH_PLAIN = {"Muon"}  # torch anchors with no foreach / fused option: one row, `torch`
MATRICES_ONLY = {"Muon"}  # takes 2-D params only: the workloads' matrices
KW = {"SGD": {"lr": 0.01, "momentum": 0.9}, "SGDP": {"lr": 0.01, "momentum": 0.9},
      "Lars": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}}
PRIME = {"torch-compile": 3}  # untimed steps before timing (default 1): compile, then recompile once state exists


def workloads(device: str, which: list[str]):
    gpu = device == "cuda"
    out = {}
    if "large" in which:  # one large group
        out["large"] = [(100_000_000,) if gpu else (16_000_000,)]  # far above the last-level cache
    if "gpt" in which:  # a 24-layer GPT-style parameter list (12 layers, d=256 on CPU)
        layers, d, vocab = (24, 1024, 50304) if gpu else (12, 256, 8192)
        shapes = [(vocab, d), (1024, d)]
        for _ in range(layers):
            shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d),
                       (d,)]
        out["gpt"] = shapes + [(d,), (d,)]
    if "tiny" in which:  # many tiny tensors: launch overhead; tiny-flat: the same bytes as one tensor
        out["tiny"] = [(256,)] * (2000 if gpu else 500)
        out["tiny-flat"] = [(256 * len(out["tiny"]),)]
    return out


def make_params(shapes, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device=device, dtype=dtype)
    return params


class Timer:
    def __init__(self, device):
        self.cuda = device == "cuda"

    def time_ms(self, fn, reps: int, warmup: int):
        return statistics.median(self.samples_ms(fn, reps, warmup))

    def samples_ms(self, fn, reps: int, warmup: int) -> list:
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
        else:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return times


def copy_bandwidth_gbs(device, timer):
    n = 256 * 2**20 if device == "cuda" else 16 * 2**20  # 1 GiB fp32 on GPU: far above L2
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = timer.time_ms(lambda: dst.copy_(src), reps=20, warmup=3)
    return 2 * n * 4 / ms / 1e6


def compiled(opt):
    """torch's "Compiling the optimizer" recipe: the optimizer built with its defaults (torch picks for-loop or
    foreach), step() called inside a function under torch.compile(fullgraph=False)."""
    # every optimizer compiles this same code object (and torch's step()), two cache entries each (before and after
    # the state exists): past the recompile limit (8) dynamo silently runs eager, even once the earlier optimizers
    # are gone. Resetting is safe: only one compiled step is alive at a time.
    torch._dynamo.reset()

    @torch.compile(fullgraph=False)
    def step():
        opt.step()
    return types.SimpleNamespace(step=step)


def implementations(name, device, compile_torch=False):
    import fused_optim
    ours = fused_optim.REGISTRY[name.lower()]
    impls = {}
    if device == "cuda":  # where fused=True is refused, its row says why
        impls["ours-fused"] = lambda ps, **kw: ours(ps, fused=True, **kw)
    impls["ours-reference"] = lambda ps, **kw: ours(ps, fused=False, **kw)
    if name in TORCH_PLAIN:
        impls["torch"] = lambda ps, **kw: getattr(torch.optim, name)(ps, **kw)
    if name in TORCH_ANCHORS:
        cls = getattr(torch.optim, name)
        impls["torch-forloop"] = lambda ps, **kw: cls(ps, foreach=False, **kw)
        impls["torch-foreach"] = lambda ps, **kw: cls(ps, foreach=True, **kw)
        if name in TORCH_FUSED and device == "cuda":
            impls["torch-fused"] = lambda ps, **kw: cls(ps, fused=True, **kw)
        if compile_torch:
            impls["torch-compile"] = lambda ps, **kw: compiled(cls(ps, **kw))
    # timm's Adahessian differentiates the grads, which the fixed grads here cannot be
    if name in anchors.TIMM and name not in anchors.CREATE_GRAPH:
        cls = anchors.timm_class(*anchors.TIMM[name])
        if cls is not None:
            impls["timm"] = lambda ps, **kw: cls(ps, **kw)
    return impls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workload", nargs="+", default=["large", "gpt", "tiny"])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--only", default="", help="comma-separated optimizer names (factory names and aliases)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="add torch-compile for the torch anchors (default: on CUDA only)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import fused_optim
    device = args.device
    compile_torch = device == "cuda" if args.compile is None else args.compile
    timer = Timer(device)
    names = selected(args.only, ap.error)
    bw = copy_bandwidth_gbs(device, timer)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": _triton_version(), "fused_optim": fused_optim.__version__,
            "date": time.strftime("%Y-%m-%d"), "copy_bandwidth_GBs": round(bw, 1), "reps": args.reps}
    print(json.dumps(meta))
    rows = []
    items = list(itertools.product(workloads(device, args.workload).items(), args.dtype, names))
    for (wname, shapes), dtype_name, name in progress(items, lambda it: f"{it[0][0]} {it[1]} {it[2]}"):
        dtype = getattr(torch, dtype_name)
        if name in MATRICES_ONLY:
            shapes = [s for s in shapes if len(s) == 2]
            if not shapes:
                continue
        numel = sum(torch.Size(s).numel() for s in shapes)
        reads, writes = STREAMS[name]
        nbytes = numel * (reads + writes) * dtype.itemsize
        # build every implementation first, then time them in interleaved rounds, so that drift (clocks, other
        # load) hits all of them alike; median over all rounds
        opts, firsts = {}, {}
        for impl, make in implementations(name, device, compile_torch).items():
            params = make_params(shapes, dtype, device)
            try:
                opt = make(params, **KW.get(name, {}))
                t0 = time.perf_counter()
                for _ in range(PRIME.get(impl, 1)):
                    opt.step()
                if device == "cuda":
                    torch.cuda.synchronize()
                firsts[impl] = (time.perf_counter() - t0) * 1e3
                opts[impl] = opt
            except Exception as exc:  # noqa: BLE001 - an unsupported combination is a row, not a crash
                rows.append({"workload": wname, "dtype": dtype_name, "optimizer": name, "impl": impl,
                             "error": f"{type(exc).__name__}: {exc}"[:200]})
        samples = {impl: [] for impl in opts}
        rounds = 5
        for _ in range(rounds):
            for impl, opt in opts.items():
                samples[impl] += timer.samples_ms(opt.step, max(args.reps // rounds, 1), args.warmup)
        for impl in opts:
            ms = statistics.median(samples[impl])
            gbs = nbytes / ms / 1e6
            row = {"workload": wname, "dtype": dtype_name, "optimizer": name, "impl": impl,
                   "tensors": len(shapes), "numel": numel, "ms": round(ms, 4),
                   "first_step_ms": round(firsts[impl], 2), "bytes": nbytes, "GBs": float(f"{gbs:.4g}"),
                   "pct_copy_bw": round(100 * gbs / bw, 1)}
            rows.append(row)
            _log(f"{wname:6s} {dtype_name:9s} {name:11s} {impl:15s} {ms:10.3f} ms {gbs:8.1f} GB/s "
                 f"{row['pct_copy_bw']:5.1f}% of copy")
        del opts
        if args.out:
            _save(args.out, meta, rows)
    if args.out:
        _plot(meta, rows, args.out + ".png")
    return 0


def selected(only: str, error) -> list:
    """The benchmarked optimizers `--only` names (any factory name or alias, any case; all if empty), in STREAMS
    order; error(message) for a name the factory does not know or that is not benchmarked."""
    if not only:
        return list(STREAMS)
    try:
        wanted = {anchors.optimizer_class(n.strip()).__name__ for n in only.split(",") if n.strip()}
    except ValueError as exc:
        error(str(exc))
    missing = sorted(wanted - set(STREAMS))
    if missing:
        error(f"not benchmarked: {', '.join(missing)} (they need special grads or a closure); benchmarked: "
              f"{', '.join(STREAMS)}")
    return [n for n in STREAMS if n in wanted]


def progress(items, describe):
    """Yield items with a tqdm bar on stderr (shown on a terminal only), else one `[i/n] item` line per item."""
    if tqdm is None:
        for i, item in enumerate(items, 1):
            print(f"[{i}/{len(items)}] {describe(item)}", file=sys.stderr, flush=True)
            yield item
        return
    with tqdm(items, file=sys.stderr, disable=None, dynamic_ncols=True) as bar:  # disable=None: off when not a tty
        for item in bar:
            bar.set_description(describe(item))
            yield item


def _log(line):
    """Print a result line to stdout without tearing the progress bar."""
    if tqdm is None:
        print(line, flush=True)
    else:
        tqdm.write(line)


def _save(out, meta, rows):
    _speedups(rows)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(_markdown(meta, rows))


def _speedups(rows):
    """Per (workload, dtype, optimizer): each implementation's time over ours (fused, else reference)."""
    by = {}
    for r in rows:
        if "ms" in r:
            by.setdefault((r["workload"], r["dtype"], r["optimizer"]), {})[r["impl"]] = r["ms"]
    for r in rows:
        if "ms" in r:
            group = by[(r["workload"], r["dtype"], r["optimizer"])]
            ours = group.get("ours-fused", group.get("ours-reference"))
            r["time_over_ours"] = round(r["ms"] / ours, 3)


def _markdown(meta, rows):
    lines = [f"# Benchmark: {meta['device']}", "", "```", json.dumps(meta), "```", "",
             "| workload | dtype | optimizer | impl | ms | GB/s | % copy BW | time / ours |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" in r:
            lines.append(f"| {r['workload']} | {r['dtype']} | {r['optimizer']} | {r['impl']} | {r['ms']} | "
                         f"{r['GBs']} | {r['pct_copy_bw']} | {r['time_over_ours']} |")
        else:
            lines.append(f"| {r['workload']} | {r['dtype']} | {r['optimizer']} | {r['impl']} | error: "
                         f"{r['error']} | | | |")
    lines += ["", "## Targets", "", "Speed goals of the fused paths: element-wise steps at >= 90% of the device copy "
              "bandwidth, faster than torch's fused / foreach steps and timm's, and many tiny tensors about as fast "
              "as the same bytes in one tensor.", ""] + _targets(rows)
    return "\n".join(lines) + "\n"


ELEMENTWISE = {"SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop", "Adadelta", "Rprop", "ASGD"}


def _targets(rows) -> list:
    """One line per target and measured case: met or missed, by how much (speedup = their time / ours)."""
    ms = {(r["workload"], r["dtype"], r["optimizer"], r["impl"]): r for r in rows if "ms" in r}
    out = []

    def verdict(label, value, goal, higher=True):
        ok = value >= goal if higher else value <= goal
        out.append(f"- {label}: {value:.2f} (goal {'>=' if higher else '<='} {goal}) "
                   f"{'met' if ok else f'MISSED by {abs(value / goal - 1) * 100:.0f}%'}")

    for (w, dt, name, impl), r in sorted(ms.items()):
        if impl != "ours-fused":
            continue
        if w == "large" and name in ELEMENTWISE:
            verdict(f"{name} {dt} large: % of copy bandwidth", r["pct_copy_bw"], 90)
        for other, goal in (("torch-fused", 1.05), ("torch-foreach", 2.0), ("timm", 5.0)):
            if (w, dt, name, other) in ms and w != "tiny-flat":
                verdict(f"{name} {dt} {w}: speedup over {other}", ms[(w, dt, name, other)]["ms"] / r["ms"], goal)
        flat = ms.get(("tiny-flat", dt, name, impl))
        if w == "tiny" and flat:
            verdict(f"{name} {dt}: tiny (many tensors) / tiny-flat (one tensor) time", r["ms"] / flat["ms"], 1.3,
                    higher=False)
    return out or ["- no ours-fused rows (CPU runs compare the reference path with torch foreach only)"]


def _plot(meta, rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    rows = [r for r in rows if "GBs" in r and r["workload"] == rows[0]["workload"]]
    names = sorted({r["optimizer"] for r in rows})
    impls = sorted({r["impl"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(8, len(names)), 4))
    w = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        vals = {r["optimizer"]: r["GBs"] for r in rows if r["impl"] == impl}
        ax.bar([j + i * w for j in range(len(names))], [vals.get(n, 0) for n in names], w, label=impl)
    ax.axhline(meta["copy_bandwidth_GBs"], color="k", ls="--", label="device copy")
    ax.set_xticks([j + 0.4 for j in range(len(names))], names, rotation=45)
    ax.set_ylabel("GB/s")
    ax.set_title(f"{rows[0]['workload'] if rows else ''} — {meta['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
