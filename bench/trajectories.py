"""Two long trajectories against timm, step by step: Adafactor on timm's Rosenbrock test and SGDP on least squares
through a row-normalised 10x5 weight. Runs timm in --dtype and in float64, our reference path (fused=False) and our
fused path (fused=True) in --dtype, all from the same start, each on the grads of its own params, and prints every
--every steps the largest difference of each run from timm's --dtype run with the decisive quantities (Adafactor:
timm's and the fused run's clip factor; SGDP: timm's decision and each view's |cos(p, g)| - delta / sqrt(length)),
then the first step where each run parts from timm's in any bit; for SGDP also every step the fused path decided
otherwise than timm, and how far its statistics' cosine is from torch's. Findings: Note [trajectories against timm]
in fused_optim/kernels/README.md. On CPU export TRITON_INTERPRET=1 first.

    TRITON_INTERPRET=1 python bench/trajectories.py [--problem adafactor sgdp] [--steps 300] [--dtype float32]
                                                  [--every 25]
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import fused_optim
from fused_optim import anchors

ADAFACTOR = dict(lr=5e-2)  # timm's test_adafactor: _test_rosenbrock(..., lr=5e-2)
SGDP = dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=5e-2)


# ---- the problems: (start, grad(param, step)) ------------------------------------------------------------------
def rosenbrock_grad(p, step):
    """timm's _test_rosenbrock: f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from (1.5, 1.5), cyclic coordinate descent
    (even steps the y derivative only, odd steps the x derivative only)."""
    x, y = p.detach().clone().requires_grad_(True).unbind()  # (autograd in the param's dtype)
    with torch.enable_grad():
        xy = torch.stack((x, y))
        gx, gy = torch.autograd.grad((1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2, (x, y))
    return torch.stack((gx, torch.zeros_like(gy)) if step % 2 else (torch.zeros_like(gx), gy))


def rosenbrock_start(dtype):
    return torch.tensor([1.5, 1.5], dtype=dtype)


_gen = torch.Generator().manual_seed(0)
_X = torch.randn(40, 5, generator=_gen, dtype=torch.float64)
_W_TRUE = torch.randn(10, 5, generator=_gen, dtype=torch.float64)
_W0 = torch.randn(10, 5, generator=_gen, dtype=torch.float64)
MU = 5e-4


def lsq_grad(w, step):
    """Least squares through a row-normalised weight (a scale-invariant layer: the grad is orthogonal to each row)
    plus a small radial term 0.5 MU |w|^2, in the weight's dtype: SGDP projects per channel while the invariant grad
    dominates, then the two views' |cos| wander about their thresholds and the decision changes often."""
    w = w.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        pred = _X.to(w.dtype) @ (w / w.norm(dim=1, keepdim=True)).T
        loss = 0.5 * ((pred - (_X @ _W_TRUE.T).to(w.dtype)) ** 2).mean() + 0.5 * MU * (w ** 2).sum()
        return torch.autograd.grad(loss, w)[0]


def lsq_start(dtype):
    return _W0.to(dtype, copy=True)  # (a param of its own, also in float64)


PROBLEMS = {"adafactor": ("Adafactor", ADAFACTOR, rosenbrock_start, rosenbrock_grad),
            "sgdp": ("SGDP", SGDP, lsq_start, lsq_grad)}


# ---- the decisive quantities of a step ---------------------------------------------------------------------------
def adafactor_stats(opt, p, g):
    """After a step: the second moment and the update RMS (timm's: norm / sqrt(numel) in p's dtype) of the
    unclipped update g / sqrt(v), and the clip factor max(RMS / clip_threshold, 1)."""
    st = opt.state[p]
    v = st["exp_avg_sq"].detach()
    u = v.rsqrt() * g
    rms = u.norm(2) / (u.numel() ** 0.5)
    return {"v": v.clone(), "rms": rms, "clip": (rms / opt.param_groups[0]["clip_threshold"]).clamp(min=1.0)}


def cosines(p, g, eps=1e-8):
    """Each view's largest |cos(p, g)| (torch's cosine_similarity in p's dtype) and its threshold."""
    out = {}
    for view, (pv, gv) in {"channel": (p.reshape(p.shape[0], -1), g.reshape(g.shape[0], -1)),
                           "layer": (p.reshape(1, -1), g.reshape(1, -1))}.items():
        cos = F.cosine_similarity(gv, pv, dim=1, eps=eps).abs().max().item()
        out[view] = (cos, SGDP.get("delta", 0.1) / math.sqrt(pv.shape[1]))
    return out


def stat_cosines(p, g, eps=1e-8):
    """The same from per-row fp32 sums <p,g>, |g|^2, |p|^2 finished in fp64, as the fused statistics compute it
    (torch's cosine_similarity normalises first: (p / |p|) . (g / |g|) in p's dtype)."""
    pg, gg, pp = ((a * b).reshape(p.shape[0], -1).sum(1).double() for a, b in ((p, g), (g, g), (p, p)))
    cos = lambda a, b, c: (a.abs() / (b.sqrt().clamp(min=eps) * c.sqrt().clamp(min=eps))).max().item()
    return {"channel": cos(pg, gg, pp), "layer": cos(pg.sum(), gg.sum(), pp.sum())}


def fused_mode(opt):
    """The mode the fused step decided (its tables' tmode; one 2-D param)."""
    tab = next(iter(opt._kernel_caches[id(opt.param_groups[0])].tables.values()))
    return ("none", "channel", "layer")[int(tab.tmode[0].item())]


def mode_of(cos):
    return "channel" if cos["channel"][0] < cos["channel"][1] else "layer" if cos["layer"][0] < cos["layer"][1] \
        else "none"


# ---- the runs ----------------------------------------------------------------------------------------------------
RUNS = ("timm", "timm64", "reference", "fused")


def runs(problem: str, dtype, labels=RUNS):
    """label -> (optimizer, param): timm in dtype and float64, ours fused=False and fused=True in dtype."""
    name, options, start, _ = PROBLEMS[problem]
    timm_cls = getattr(anchors.timm_module(name.lower()), name)
    ours = getattr(fused_optim, name)
    makers = {"timm": (timm_cls, dtype), "timm64": (timm_cls, torch.float64),
              "reference": (lambda ps, **kw: ours(ps, fused=False, **kw), dtype),
              "fused": (lambda ps, **kw: ours(ps, fused=True, **kw), dtype)}
    out = {}
    for label in labels:
        make, dt = makers[label]
        p = torch.nn.Parameter(start(dt))
        out[label] = make([p], **options), p
    return out


def trajectories(problem: str, steps: int, dtype=torch.float32, labels=RUNS):
    """Per step and run: the param after the step (a float64 copy and itself) and the decisive quantities (cosines
    before the step for SGDP, the moments after it for Adafactor)."""
    grad = PROBLEMS[problem][3]
    rs = runs(problem, dtype, labels)
    hist = {k: [] for k in rs}
    for step in range(steps):
        for label, (opt, p) in rs.items():
            p.grad = grad(p.detach(), step)
            info = dict(cosines(p.detach(), p.grad), stat=stat_cosines(p.detach(), p.grad)) if problem == "sgdp" \
                else {}
            opt.step()
            if problem == "adafactor":
                info = adafactor_stats(opt, p, p.grad)
            elif label == "fused":
                info["decided"] = fused_mode(opt)
            hist[label].append((p.detach().to(torch.float64).clone(), p.detach().clone(), info))
    return hist


def first_difference(a, b):
    """The first step where two histories' params differ in any bit, or None."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if not torch.equal(x[1], y[1].to(x[1].dtype))), None)


def report_decisions(timm, fused):
    """Where the fused step decided otherwise than timm, each view's margin |cos| - threshold there; how far the
    statistics' cosines are from torch's on the same inputs, and the smallest margins of the run."""
    for i, (t, f) in enumerate(zip(timm, fused)):
        if mode_of(t[2]) != f[2]["decided"]:
            c = t[2]
            print(f"step {i + 1}: timm {mode_of(c)}, fused {f[2]['decided']}; |cos| - threshold channel "
                  f"{c['channel'][0] - c['channel'][1]:+.3e}, layer {c['layer'][0] - c['layer'][1]:+.3e}")
    for view in ("channel", "layer"):
        gap = max(abs(f[2]["stat"][view] - f[2][view][0]) for f in fused)
        margin = min(abs(t[2][view][0] - t[2][view][1]) for t in timm)
        print(f"{view}: max |statistics' cos - torch's cos| {gap:.2e} (same inputs); min |timm's cos - threshold| "
              f"{margin:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--every", type=int, default=25)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    for problem in args.problem:
        hist = trajectories(problem, args.steps, dtype)
        base = hist["timm"]
        others = [k for k in hist if k != "timm"]
        print(f"\n== {PROBLEMS[problem][0]} {PROBLEMS[problem][1]}, {args.dtype}: max |run - timm {args.dtype}|")
        head = "   mode(timm) |cos|-thr channel, layer" if problem == "sgdp" else "   clip(timm)  clip(fused)"
        print("step  " + "  ".join(f"{k:>10}" for k in others) + head)
        for i in range(args.steps):
            if (i + 1) % args.every and i + 1 != args.steps:
                continue
            diffs = "  ".join(f"{(hist[k][i][0] - base[i][0]).abs().max().item():10.2e}" for k in others)
            if problem == "sgdp":
                c = base[i][2]
                extra = f"   {mode_of(c):>8}" + "".join(f" {c[v][0] - c[v][1]:+.3e}" for v in ("channel", "layer"))
            else:
                extra = f"   {base[i][2]['clip'].item():.9g}  {hist['fused'][i][2]['clip'].item():.9g}"
            print(f"{i + 1:4d}  {diffs}{extra}")
        if problem == "sgdp":
            report_decisions(base, hist["fused"])
        for k in others:
            s = first_difference(base, hist[k])
            print(f"first step where {k} parts from timm {args.dtype} in a bit: {'none' if s is None else s + 1}")


if __name__ == "__main__":
    main()
