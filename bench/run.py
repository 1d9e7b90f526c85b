"""Time optimizer.step() for every optimizer and implementation available on this device.

    python bench/run.py [--device cuda|cpu] [--workload large gpt tiny] [--dtype float32 bfloat16]
                        [--only Adam,SGD] [--[no-]compile] [--out bench/results/NAME]

Implementations: ours (fused kernels on CUDA, the reference path everywhere), torch.optim (for-loop, foreach,
fused where torch has it, and `torch-compile`: step() under torch.compile, on by default on CUDA only since on
CPU it needs a C++ compiler and seconds per optimizer), timm's class where timm is the anchor. Timing: untimed
priming steps first (one; three for torch-compile, which recompiles once the state exists), whose time is reported
separately as `first_step_ms` so that compilation and table building stay out, then --warmup steps, then CUDA
events (CPU: perf_counter) around each step, median of --reps. Each row reports step time, bytes moved per step
(the whole-tensor passes of STREAMS over params and grads, plus the bytes of the element-wise states measured in
the optimizer's own state after priming, each read STREAMS' count of times and written once), achieved GB/s and,
on CUDA, the fraction of the device copy bandwidth measured in the same run.
`--states int8 bfloat16` adds rows of ours with memory-lean states (`ours-fused-int8`, ...; `state_dtype` of the
optimizers): their `time / ours` is the step time over that of ours with the anchor's states.
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

# Whole-tensor passes per step at the options timed here (KW): (reads, writes) of params and grads, and how many
# times each element-wise state is read (each is written once). The states' bytes are measured (state_bytes), so
# int8 / bf16 states, momentum buffers made on the first step and small tensors kept in fp32 count as they are.
STREAMS = {  # optimizer: (param/grad reads, param writes, reads of each state)
    "SGD": (2, 1, 1), "Adam": (2, 1, 1), "AdamW": (2, 1, 1), "Adamax": (2, 1, 1), "NAdam": (2, 1, 1),
    "RAdam": (2, 1, 1), "Adagrad": (2, 1, 1), "RMSprop": (2, 1, 1), "Adadelta": (2, 1, 1), "Rprop": (2, 1, 1),
    "ASGD": (2, 1, 1), "Lion": (2, 1, 1), "Adopt": (2, 1, 1), "Adahessian": (2, 1, 1),
    "NovoGrad": (3, 1, 1), "NvNovoGrad": (3, 1, 1),  # the per-tensor grad norms read g once more
    "Lars": (4, 1, 1),  # the norms of g and p
    # their statistics (per-row dots, trust ratios, Adafactor's update RMS) recompute the update: p, g and the
    # states once more; Lamb's global clip (timm's max_grad_norm=1.0) reads g a third time
    "SGDP": (4, 1, 2), "AdamP": (4, 1, 2), "Adafactor": (4, 1, 2), "Lamb": (5, 1, 2),
    "Muon": (3, 2, 1),  # + the bf16 stacks its Newton-Schulz reads and writes (one pass each way, at most)
}
STATES = {"bfloat16": torch.bfloat16, "int8": "int8"}  # --states: the state_dtype of ours' lean rows
TORCH_ANCHORS = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Rprop", "ASGD", "Adamax", "NAdam",
                 "RAdam"]
TORCH_FUSED = {"SGD", "Adam", "AdamW", "Adagrad"}
TORCH_PLAIN = {"Muon"}  # torch anchors with no foreach / fused option: one row, `torch`
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

    def interleaved_ms(self, steps: dict, reps: int, warmup: int, rounds: int = 5) -> dict:
        """{name: median ms of step()} over `rounds` interleaved rounds, so that drift (clocks, other load) hits
        every one alike."""
        samples = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                samples[name] += self.samples_ms(step, max(reps // rounds, 1), warmup)
        return {name: statistics.median(s) for name, s in samples.items()}

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
    return types.SimpleNamespace(step=step, state=opt.state)  # state: bytes_moved reads it


def implementations(name, device, compile_torch=False, lean_states=()):
    import fused_optim
    ours = fused_optim.REGISTRY[name.lower()]
    impls = {}
    paths = (["fused"] if device == "cuda" else []) + ["reference"]  # where fused=True is refused, its row says why
    for states in ["default", *lean_states]:
        for path in paths:
            kw_states = {} if states == "default" else {"state_dtype": STATES[states]}
            impls["ours-" + path + ("" if states == "default" else "-" + states)] = (
                lambda ps, fused=path == "fused", extra=kw_states, **kw: ours(ps, fused=fused, **extra, **kw))
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
    ap.add_argument("--states", nargs="*", default=[], choices=list(STATES),
                    help="also time ours with these memory-lean states (state_dtype)")
    ap.add_argument("--impls", default="", help="comma-separated prefixes: time only the implementations named so "
                    "(e.g. ours)")
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
        if fused_optim.REGISTRY[name.lower()].matrices_only:  # Muon: the workloads' matrices
            shapes = [s for s in shapes if len(s) == 2]
            if not shapes:
                continue
        numel = sum(torch.Size(s).numel() for s in shapes)
        # build every implementation first, then time them in interleaved rounds
        opts, firsts, nbytes = {}, {}, {}
        wanted = [x.strip() for x in args.impls.split(",") if x.strip()]
        for impl, make in implementations(name, device, compile_torch, args.states).items():
            if wanted and not any(impl.startswith(w) for w in wanted):
                continue
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
                nbytes[impl] = bytes_moved(name, params, opt)
            except Exception as exc:  # noqa: BLE001 - an unsupported combination is a row, not a crash
                rows.append({"workload": wname, "dtype": dtype_name, "optimizer": name, "impl": impl,
                             "error": f"{type(exc).__name__}: {exc}"[:200]})
        medians = timer.interleaved_ms({impl: opt.step for impl, opt in opts.items()}, args.reps, args.warmup)
        for impl in opts:
            ms = medians[impl]
            total, states = nbytes[impl]
            gbs = total / ms / 1e6
            row = {"workload": wname, "dtype": dtype_name, "optimizer": name, "impl": impl,
                   "tensors": len(shapes), "numel": numel, "ms": round(ms, 4),
                   "first_step_ms": round(firsts[impl], 2), "bytes": total, "state_bytes": states,
                   "GBs": float(f"{gbs:.4g}"),
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


def state_bytes(params, opt) -> int:
    """The bytes of the element-wise states of params in opt.state: every tensor with a param's number of elements
    (momentum buffers, moments, int8 codes, fp32 masters) and the int8 codes' block scales; per-tensor scalars and
    Adafactor's factored row / column states are too small to count."""
    from fused_optim.kernels import quant
    total = 0
    for p in params:
        for key, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and (v.numel() == p.numel() > 1 or quant.is_scale_key(key)):
                total += v.numel() * v.element_size()
    return total


def bytes_moved(name, params, opt) -> tuple:
    """(bytes moved per step, of which the states'): STREAMS' passes over params and grads at their dtype, the
    states' measured bytes read STREAMS' count of times and written once."""
    reads, writes, state_reads = STREAMS[name]
    states = state_bytes(params, opt)
    pg = sum(p.numel() * p.element_size() for p in params) * (reads + writes)
    return pg + states * (state_reads + 1), states


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
        lean = impl.startswith("ours-fused-")
        if lean and w == "large":  # memory-lean states: their own bytes at the copy bandwidth too
            states = impl[len("ours-fused-"):]
            base = ms.get((w, dt, name, "ours-fused"))
            if base:
                out.append(f"- {name} {dt} large: {states} states / the anchor's states: step time "
                           f"{r['ms'] / base['ms']:.2f}, bytes moved {r['bytes'] / base['bytes']:.2f}")
            if name in ELEMENTWISE:
                verdict(f"{name} {dt} large, {states} states: % of copy bandwidth", r["pct_copy_bw"], 90)
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
