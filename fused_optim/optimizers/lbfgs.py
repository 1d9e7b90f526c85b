"""L-BFGS with an optional strong-Wolfe line search (anchor: torch.optim.LBFGS).

The whole step is host-driven: each iteration needs the closure's loss and several reductions to decide what to do
next. The pieces a device path would replace are kept apart: the flat grad / param moves (``_gather_flat_grad``,
``_add_dir``: flat buffers), the curvature history (``_remember``: a ring buffer) and ``two_loop`` (batched dots).
State is exactly torch's (global state stored under the first param), so checkpoints move both ways; the op order
is torch's too, so trajectories agree to the last bit on CPU.
"""
from __future__ import annotations

import math

import torch

from .._base import FusedOptimizer, check, check_nonneg
from .._registry import register

_CARRIED = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss")


def _host(x):
    """A tensor hyper-parameter as a Python number (lr may be a 1-element tensor)."""
    return x.item() if isinstance(x, torch.Tensor) else x


def cubic_minimizer(x1, f1, g1, x2, f2, g2, bounds=None):
    """Minimizer of the cubic through (x1, f1, slope g1) and (x2, f2, slope g2), clamped to ``bounds`` (default:
    the interval between the points); the midpoint when the cubic has no real minimizer (or on NaN)."""
    if bounds is None:
        bounds = (x1, x2) if x1 <= x2 else (x2, x1)
    lo, hi = bounds
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    disc = d1 ** 2 - g1 * g2
    if not disc >= 0:
        return (lo + hi) / 2.0
    d2 = disc.sqrt()
    if x1 <= x2:
        x = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        x = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(x, lo), hi)


def strong_wolfe(evaluate, t, d, f0, g0, gtd0, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    """Line search along d from the point with loss f0, grad g0 and slope gtd0 = g0.d (< 0).

    ``evaluate(t)`` returns (loss, flat grad) at x + t d. Returns (loss, grad, t, number of evaluations) of the
    accepted point: one meeting the strong Wolfe conditions, or the best point found within ``max_ls`` evaluations.
    """
    d_max = d.abs().max()
    g0 = g0.clone(memory_format=torch.contiguous_format)
    f, g = evaluate(t)
    n_evals = 1
    gtd = g.dot(d)

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
            gs, gtds = [g_prev, g.clone(memory_format=torch.contiguous_format)], [gtd_prev, gtd]
            break
        t_next = cubic_minimizer(t_prev, f_prev, gtd_prev, t, f, gtd, bounds=(t + 0.01 * (t - t_prev), t * 10))
        t_prev, f_prev, g_prev, gtd_prev = t, f, g.clone(memory_format=torch.contiguous_format), gtd
        t = t_next
        f, g = evaluate(t)
        n_evals += 1
        gtd = g.dot(d)
        n_ls += 1
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
        f, g = evaluate(t)
        n_evals += 1
        gtd = g.dot(d)
        n_ls += 1
        if armijo_fails(t, f) or f >= fs[low]:
            ts[high], fs[high], gs[high], gtds[high] = t, f, g.clone(memory_format=torch.contiguous_format), gtd
            low, high = (0, 1) if fs[0] <= fs[1] else (1, 0)
        else:
            if curvature_ok(gtd):
                found = True
            elif gtd * (ts[high] - ts[low]) >= 0:
                ts[high], fs[high], gs[high], gtds[high] = ts[low], fs[low], gs[low], gtds[low]
            ts[low], fs[low], gs[low], gtds[low] = t, f, g.clone(memory_format=torch.contiguous_format), gtd
    return fs[low], gs[low], ts[low], n_evals


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


@register
class LBFGS(FusedOptimizer):
    requires_closure = True
    scalar_keys = ()
    _step_supports_amp_scaling = False

    def __init__(self, params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9,
                 history_size=100, line_search_fn=None, *, fused=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                        tolerance_change=tolerance_change, history_size=history_size, line_search_fn=line_search_fn)
        super().__init__(params, defaults, fused=fused)

    def add_param_group(self, param_group):
        if self.param_groups:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        super().add_param_group(param_group)

    def _validate(self, group):
        check_nonneg(lr=group["lr"], tolerance_grad=group["tolerance_grad"],
                     tolerance_change=group["tolerance_change"])
        for key in ("max_iter", "max_eval"):
            v = group[key]
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v < math.inf,
                  f"Invalid {key} value: {v}")
        h = group["history_size"]
        check(isinstance(h, int) and not isinstance(h, bool) and h >= 1, f"Invalid history_size value: {h}")
        ls = group["line_search_fn"]
        check(ls in (None, "strong_wolfe"), f"Invalid line_search_fn value: {ls!r} (None or 'strong_wolfe')")

    # ---- flat views of the params (one vector over all params, complex as real pairs) ----------------------------
    @staticmethod
    def _gather_flat_grad(params):
        views = []
        for p in params:
            if p.grad is None:
                v = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            elif p.grad.is_sparse:
                v = p.grad.to_dense().view(-1)
            else:
                v = p.grad.view(-1)
            views.append(torch.view_as_real(v).view(-1) if v.is_complex() else v)
        return torch.cat(views, 0)

    @staticmethod
    def _add_dir(params, t, d):
        """params += t * d (d flat)."""
        start = 0
        for p in params:
            p = torch.view_as_real(p) if p.is_complex() else p
            n = p.numel()
            p.add_(d[start:start + n].view_as(p), alpha=t)
            start += n
        if start != d.numel():
            raise RuntimeError(f"LBFGS: direction has {d.numel()} elements, params {start}")

    # ---- the step -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("LBFGS.step() requires a closure that re-evaluates the loss (and its grads)")
        return self._reference_step(self.param_groups[0], torch.enable_grad()(closure))

    @staticmethod
    def _remember(state, y, s, ys, history_size):
        """Append a curvature pair (dropping the oldest when full)."""
        if len(state["old_dirs"]) == history_size:
            for k in ("old_dirs", "old_stps", "ro"):
                state[k].pop(0)
        state["old_dirs"].append(y)
        state["old_stps"].append(s)
        state["ro"].append(1.0 / ys)

    def _reference_step(self, group, closure):
        params = group["params"]
        lr = _host(group["lr"])
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tol_grad, tol_change = group["tolerance_grad"], group["tolerance_change"]
        history_size = group["history_size"]
        # torch keeps the (global) state under the first param, so load_state_dict casts it with that param
        state = self.state[params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        orig_loss = closure()
        loss = float(orig_loss)
        evals = 1
        state["func_evals"] += 1
        flat_grad = self._gather_flat_grad(params)
        if flat_grad.abs().max() <= tol_grad:
            return orig_loss  # already optimal: nothing else is recorded

        st = {k: state.get(k) for k in _CARRIED}
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1

            # -- direction
            if state["n_iter"] == 1:
                st.update(d=flat_grad.neg(), old_dirs=[], old_stps=[], ro=[], H_diag=1)
            else:
                y = flat_grad.sub(st["prev_flat_grad"])
                s = st["d"].mul(st["t"])
                ys = y.dot(s)
                if ys > 1e-10:  # keep the pair only if it has positive curvature
                    self._remember(st, y, s, ys, history_size)
                    st["H_diag"] = ys / y.dot(y)
                al = state.setdefault("al", [None] * history_size)
                st["d"] = two_loop(flat_grad, st["old_dirs"], st["old_stps"], st["ro"], st["H_diag"], al)
            d = st["d"]
            if st["prev_flat_grad"] is None:
                st["prev_flat_grad"] = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                st["prev_flat_grad"].copy_(flat_grad)
            st["prev_loss"] = prev_loss = loss

            # -- step length
            t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if state["n_iter"] == 1 else lr
            gtd = flat_grad.dot(d)
            if gtd > -tol_change:  # not a descent direction (to tolerance)
                st["t"] = t
                break
            n_ls = 0
            if group["line_search_fn"] == "strong_wolfe":
                x0 = [p.clone(memory_format=torch.contiguous_format) for p in params]

                def evaluate(t_try):
                    self._add_dir(params, t_try, d)
                    f = float(closure())
                    g = self._gather_flat_grad(params)
                    for p, p0 in zip(params, x0):
                        p.copy_(p0)
                    return f, g

                loss, flat_grad, t, n_ls = strong_wolfe(evaluate, t, d, loss, flat_grad, gtd,
                                                        max_ls=max_eval - evals)
                self._add_dir(params, t, d)
                opt_cond = flat_grad.abs().max() <= tol_grad
            else:
                self._add_dir(params, t, d)
                opt_cond = False
                if n_iter != max_iter:  # the last iteration's loss is never looked at: skip that evaluation
                    loss = float(closure())
                    flat_grad = self._gather_flat_grad(params)
                    opt_cond = flat_grad.abs().max() <= tol_grad
                    n_ls = 1
            st["t"] = t
            evals += n_ls
            state["func_evals"] += n_ls

            # -- stopping tests
            if n_iter == max_iter or evals >= max_eval or opt_cond:
                break
            if d.mul(t).abs().max() <= tol_change or abs(loss - prev_loss) < tol_change:
                break

        state.update(st)
        return orig_loss
