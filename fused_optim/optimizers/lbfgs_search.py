"""LBFGS's host logic, shared by the reference and the fused path: torch's strong-Wolfe line search, its cubic
interpolation, the two-loop recursion, and host stand-ins for torch's 0-d tensors (so the fused path takes torch's
branches without a sync; see Note [LBFGS host scalars] in fused_optim/kernels/README.md)."""
from __future__ import annotations

import contextlib
import math

import torch

try:
    import numpy as np
except ImportError:  # pragma: no cover - the fused path then emulates torch's scalars with CPU 0-d tensors
    np = None


def host_sqrt(x):
    # host stand-ins: IEEE sqrt, as torch's on CUDA (its vectorized CPU sqrt can be 1 ulp off)
    return x.sqrt() if isinstance(x, torch.Tensor) else np.sqrt(x) if np is not None and isinstance(x, np.generic) \
        else math.sqrt(x)


def _rdiv(a, b):
    """a / b for a Python number a, as torch evaluates it when b is a 0-d tensor: Tensor.__rtruediv__ is
    b.reciprocal() * a (two roundings). A host stand-in b (numpy scalar) gets the same two steps."""
    if np is not None and isinstance(b, np.generic):
        return (b.dtype.type(1) / b) * a
    return a / b


def host_scalar(dtype):
    """Host stand-in for torch's 0-d device tensors of ``dtype`` in the line search and tolerance tests: a numpy
    scalar of the same IEEE type (numpy 2's promotion of Python scalars is torch's wrapped-number rule: float32 op
    float -> float32, comparisons in float32), else a CPU 0-d tensor (bfloat16). Host arithmetic on these takes the
    exact branches torch takes on the device, without a sync."""
    np_type = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16"}.get(dtype)
    if np is not None and np_type is not None and int(np.__version__.split(".")[0]) >= 2:
        return getattr(np, np_type)
    return lambda v: torch.tensor(v, dtype=dtype)


_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16}


def as_state_value(x, device):
    """A host value as torch's state holds it: a Python number stays one; a 0-d tensor or a host stand-in becomes
    a 0-d tensor of its dtype on ``device``."""
    if type(x) in (int, float):
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return torch.tensor(x.item(), dtype=_TORCH_DTYPES[x.dtype.name], device=device)


def quiet_host_math():
    """numpy warns where torch silently rounds (a huge loss cast to float32 is inf in both): silence it."""
    return np.errstate(all="ignore") if np is not None else contextlib.nullcontext()


def cubic_minimizer(x1, f1, g1, x2, f2, g2, bounds=None):
    """Minimizer of the cubic through (x1, f1, slope g1) and (x2, f2, slope g2), clamped to ``bounds`` (default:
    the interval between the points); the midpoint when the cubic has no real minimizer (or on NaN)."""
    if bounds is None:
        bounds = (x1, x2) if x1 <= x2 else (x2, x1)
    lo, hi = bounds
    d1 = g1 + g2 - _rdiv(3 * (f1 - f2), x1 - x2)
    disc = d1 * d1 - g1 * g2  # torch's d1 ** 2: a tensor's square is exactly d1 * d1
    if not disc >= 0:
        return (lo + hi) / 2.0
    d2 = host_sqrt(disc)
    if x1 <= x2:
        x = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        x = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(x, lo), hi)


def strong_wolfe(evaluate, t, d_max, f0, g0, gtd0, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    """Line search along d (d_max = max |d|) from the point with loss f0, grad g0 and slope gtd0 = g0.d (< 0).

    ``evaluate(t)`` returns (loss, grad, slope grad.d) at x + t d. Grads are only passed along (never mutated, so
    never cloned): the reference hands flat grad tensors, the fused path handles of device buffers. The slopes may
    be 0-d tensors (reference) or their host stand-ins (fused path, see ``host_scalar``): the arithmetic is the
    same. Returns (loss, grad, t, number of evaluations) of the accepted point: one meeting the strong Wolfe
    conditions, or the best point found within ``max_ls`` evaluations.
    """
    f, g, gtd = evaluate(t)

    def armijo_fails(t, f):
        return f > f0 + c1 * t * gtd0

    def curvature_ok(gtd):
        return abs(gtd) <= -c2 * gtd0

    # Phase 1: grow t until [t_prev, t] brackets an acceptable point (or t itself is one).
    t_prev, f_prev, g_prev, gtd_prev = 0, f0, g0, gtd0
    found = False
    n_ls = 0
    while n_ls < max_ls:
        decreased = not (armijo_fails(t, f) or (n_ls > 1 and f >= f_prev))
        if decreased and curvature_ok(gtd):
            ts, fs, gs = [t], [f], [g]
            found = True
            break
        if not decreased or gtd >= 0:  # the minimum lies between t_prev and t
            ts, fs = [t_prev, t], [f_prev, f]
            gs, gtds = [g_prev, g], [gtd_prev, gtd]
            break
        t_next = cubic_minimizer(t_prev, f_prev, gtd_prev, t, f, gtd, bounds=(t + 0.01 * (t - t_prev), t * 10))
        t_prev, f_prev, g_prev, gtd_prev = t, f, g, gtd
        t = t_next
        f, g, gtd = evaluate(t)
        n_ls += 1  # evaluations so far: n_ls + 1
    if n_ls == max_ls:  # budget spent while still descending: fall back to [0, last t]
        ts, fs, gs = [0, t], [f0, f], [g0, g]

    # Phase 2 (zoom): shrink the bracket by cubic interpolation until the strong Wolfe conditions hold.
    low, high = (0, 1) if fs[0] <= fs[-1] else (1, 0)
    near_edge_before = False
    while not found and n_ls < max_ls:
        if abs(ts[1] - ts[0]) * d_max < tolerance_change:
            break
        t = cubic_minimizer(ts[0], fs[0], gtds[0], ts[1], fs[1], gtds[1])
        left, right = min(ts), max(ts)
        margin = 0.1 * (right - left)
        if min(right - t, t - left) < margin:
            # too close to an end: accept once, then (or if outside) move to 10% of the width inside
            if near_edge_before or t >= right or t <= left:
                t = right - margin if abs(t - right) < abs(t - left) else left + margin
                near_edge_before = False
            else:
                near_edge_before = True
        else:
            near_edge_before = False
        f, g, gtd = evaluate(t)
        n_ls += 1  # evaluations so far: n_ls + 1
        if armijo_fails(t, f) or f >= fs[low]:
            ts[high], fs[high], gs[high], gtds[high] = t, f, g, gtd
            low, high = (0, 1) if fs[0] <= fs[1] else (1, 0)
        else:
            if curvature_ok(gtd):
                found = True
            elif gtd * (ts[high] - ts[low]) >= 0:
                ts[high], fs[high], gs[high], gtds[high] = ts[low], fs[low], gs[low], gtds[low]
            ts[low], fs[low], gs[low], gtds[low] = t, f, g, gtd
    return fs[low], gs[low], ts[low], n_ls + 1


def two_loop(flat_grad, old_dirs, old_stps, ro, H_diag, al):
    """The L-BFGS direction -H g from the curvature pairs (y = old_dirs, s = old_stps, ro = 1 / y.s), oldest
    first; ``al`` (length >= len(old_dirs)) receives the first loop's coefficients (torch keeps them in state)."""
    q = flat_grad.neg()
    for i in reversed(range(len(old_dirs))):
        al[i] = old_stps[i].dot(q) * ro[i]
        q.add_(old_dirs[i], alpha=-al[i])
    r = torch.mul(q, H_diag)
    for i in range(len(old_dirs)):
        be = old_dirs[i].dot(r) * ro[i]
        r.add_(old_stps[i], alpha=al[i] - be)
    return r


def remember(state, y, s, ys, history_size):
    """Append a curvature pair to torch's history lists (dropping the oldest when full)."""
    if len(state["old_dirs"]) == history_size:
        for k in ("old_dirs", "old_stps", "ro"):
            state[k].pop(0)
    state["old_dirs"].append(y)
    state["old_stps"].append(s)
    state["ro"].append(1.0 / ys)


# ---- flat vectors over all params (complex params as real pairs) ---------------------------------------------------
def real_views(params):
    return [torch.view_as_real(p) if p.is_complex() else p for p in params]


def flat_dtype(params):
    """dtype of the flat vectors (torch.cat of the real views of the grads)."""
    dt = None
    for p in params:
        r = p.dtype.to_real()
        dt = r if dt is None else torch.promote_types(dt, r)
    return dt


def gather_flat_grad(params):
    """The grads as one flat vector (torch's ``_gather_flat_grad``): zeros for a missing grad, dense for a sparse."""
    views = []
    for p in params:
        if p.grad is None:
            v = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        elif p.grad.is_sparse:
            v = p.grad.to_dense().view(-1)
        else:
            v = p.grad.reshape(-1)  # torch's view(-1), which refuses grads it cannot view (channels_last)
        views.append(torch.view_as_real(v).view(-1) if v.is_complex() else v)
    return torch.cat(views, 0)


def flat_views(flat, reals):
    """The flat vector split into views shaped like ``reals`` (the params' real views)."""
    out, start = [], 0
    for r in reals:
        out.append(flat[start:start + r.numel()].view_as(r))
        start += r.numel()
    if start != flat.numel():
        raise RuntimeError(f"LBFGS: direction has {flat.numel()} elements, params {start}")
    return out


def add_flat(params, t, d):
    """params += t * d (d flat), one add_ per param as torch does."""
    reals = real_views(params)
    for p, v in zip(reals, flat_views(d, reals)):
        p.add_(v, alpha=t)
